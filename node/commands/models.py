"""`macmesh models`: the models this machine can name, where their weights are, and whether
native MTP is available for each (and why not).

Offline by default: the checkpoints in the models directory, the models bundled with macmesh,
the model repos in the Hugging Face cache, and the shipped cards (whose weights, when not here,
can be downloaded with ``macmesh pull`` from the repos listed). MODEL resolves in this order:
a checkpoint directory, the models directory, the bundled models, the Hugging Face cache, then
a card (docs/models.md). With ``--node HOST:PORT`` the list comes from that daemon and says
which models are launched on the cluster, each under the id a client sends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def models(
    json_output: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
    node: Annotated[
        str | None, typer.Option(help="ask this daemon (HOST:PORT) instead of reading locally")
    ] = None,
    models_dir: Annotated[
        Path | None, typer.Option("--models-dir", help="where checkpoints live (offline listing)")
    ] = None,
) -> None:
    """List model cards and local checkpoints, with native MTP (default_k, max_k)."""
    rows = _from_daemon(node) if node else _offline(models_dir)
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(rows, launched_known=node is not None)


def _offline(models_dir: Path | None) -> list[dict[str, Any]]:
    from node.cluster.catalog import list_models
    from node.config import SettingsError, load_settings

    if models_dir is None:
        try:
            models_dir = load_settings().models_dir
        except SettingsError as exc:
            typer.echo(f"macmesh models: {exc}", err=True)
            raise typer.Exit(code=2) from None
    return [entry.model_dump() for entry in list_models(models_dir.expanduser())]


def _from_daemon(address: str) -> list[dict[str, Any]]:
    from node.client import MacmeshClient, MacmeshError
    from node.commands.launch import daemon_address, describe_error, exit_code_for

    address = daemon_address(address)
    with MacmeshClient(address, timeout=10) as client:
        try:
            infos = client.list_models()
        except MacmeshError as exc:
            typer.echo(f"macmesh models: {describe_error(exc, address)}", err=True)
            raise typer.Exit(code=exit_code_for(exc)) from None
    return [info.model_dump() for info in infos]


def _print_table(rows: list[dict[str, Any]], launched_known: bool) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from node.placement import format_bytes

    table = Table(
        title="models",
        caption=(
            "ctx: context length in tokens; MTP: draft tokens per step with the checkpoint's "
            "own MTP head, default/max"
        ),
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    table.add_column("id", no_wrap=True, min_width=max((len(r["id"]) for r in rows), default=2))
    table.add_column(  # model types are ids: never split "qwen3_5"
        "type", no_wrap=True, min_width=max((len(r["model_type"]) for r in rows), default=4)
    )
    table.add_column("layers", justify="right", no_wrap=True, min_width=6)
    table.add_column("size", justify="right", no_wrap=True, min_width=8)
    table.add_column("ctx", justify="right", no_wrap=True, min_width=4)
    table.add_column("MTP", no_wrap=True, min_width=3)
    table.add_column("weights", overflow="ellipsis", min_width=9)
    if launched_known:
        table.add_column("launched", no_wrap=True)
    for row in rows:
        mtp = row.get("native_mtp")
        capability = f"{mtp['default_k']}/{mtp['max_k']}" if mtp else "no"
        table.add_row(
            row["id"],
            row["model_type"],
            str(row["num_layers"]),
            format_bytes(row["bytes"]),
            _tokens(row["context_length"]),
            capability,
            _weights(row),
            *(["yes" if row.get("launched") else ""] if launched_known else []),
        )
    console = Console(soft_wrap=True)
    console.print(table)
    console.print("native MTP:", highlight=False)
    for row in rows:
        if row.get("mtp_note"):
            console.print(f"  {row['id']}: {row['mtp_note']}", highlight=False)


def _weights(row: dict[str, Any]) -> str:
    """Where the weights are: a local directory, the hub cache, or what to pull them from."""
    if row.get("has_weights"):
        source = row.get("source")
        if source == "bundled":
            return "bundled"
        if source == "hub_cache":
            return "hub cache"
        return row.get("checkpoint") or "local"
    repos = row.get("download_from") or []
    return f"not here: pull {repos[0]}" if repos else "not here"


def _tokens(count: int) -> str:
    """262144 -> 256K: fits the 80-column table without cutting anything else."""
    return f"{count // 1024}K" if count >= 1024 and count % 1024 == 0 else str(count)
