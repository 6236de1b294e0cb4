"""`macmesh pull MODEL`: download a model from the Hugging Face hub into the hub cache.

MODEL is a repo id (``mlx-community/Qwen3.6-27B-4bit``, optionally ``@revision``) or a card id
(its source repo or conversion at the card's precision). Files go where ``huggingface_hub``
puts them (``HF_HUB_CACHE`` / ``HF_HOME``), resumable, verified against the hub's sizes and
hashes. A stripped conversion gets its MTP head from ``--mtp-from`` or the card's source repo,
by ranged reads of only the ``mtp.*`` tensors. Exit codes: 0 done, 1 the hub or the disk
failed, 2 bad input (unknown repo or revision).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer


def pull(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="repo id[@revision] or card id")],
    mtp_from: Annotated[
        str | None,
        typer.Option("--mtp-from", help="repo to take a stripped checkpoint's MTP head from"),
    ] = None,
    no_mtp: Annotated[bool, typer.Option("--no-mtp", help="do not recover an MTP head")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Download MODEL (and a stripped checkpoint's MTP head) into the Hugging Face cache."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from node.hub.pull import pull_model
    from node.hub.remote import HubError, RepoNotFound, RevisionNotFound

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=json_output,
    )
    task = None

    def on_progress(p) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(p.repo, total=p.total_bytes)
        bar.update(task, completed=p.done_bytes, total=p.total_bytes)

    try:
        with bar:
            result = pull_model(
                model, mtp_from=mtp_from, recover_mtp=not no_mtp, progress=on_progress
            )
    except (RepoNotFound, RevisionNotFound) as exc:
        typer.echo(f"macmesh pull: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except HubError as exc:
        typer.echo(f"macmesh pull: {exc}", err=True)
        raise typer.Exit(code=1) from None
    out = {
        "repo": result.ref.repo_id,
        "revision": result.ref.rev,
        "commit": result.commit,
        "snapshot": str(result.snapshot),
        "fetched_bytes": result.fetched_bytes,
        "native_mtp": result.mtp_note,
        "mtp_sidecar_bytes_fetched": result.sidecar.bytes_fetched if result.sidecar else 0,
    }
    if json_output:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"pulled {result.ref} ({result.commit[:12]}) into {result.snapshot}")
    typer.echo(f"  native MTP: {result.mtp_note}")
    typer.echo(f"  use it as MODEL: {result.ref.repo_id}")
