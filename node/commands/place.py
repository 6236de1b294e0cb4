"""`macmesh place MODEL`: a dry-run placement, offline from a nodes file or from the live cluster.

Exit codes: 0 placed; 1 the model does not fit (or no daemon to ask); 2 bad input (unknown
model, unreadable nodes file, invalid node, options the cluster cannot satisfy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from node.placement import (
    InsufficientMemoryError,
    NodeCapacity,
    Placement,
    PlacementError,
    PlanOptions,
    format_bytes,
    plan,
    resolve_card,
)


class DaemonUnreachableError(RuntimeError):
    """No macmesh daemon answered at the address asked."""


def fetch_live_nodes(address: str) -> list[NodeCapacity]:
    """The live (``up``) nodes of the cluster as the daemon at ``address`` sees them."""
    from node.discovery.client import DaemonUnreachable, cluster_nodes

    try:
        live = cluster_nodes(address)
    except DaemonUnreachable as exc:
        raise DaemonUnreachableError(f"{exc}; pass --nodes FILE to plan offline") from None
    # ClusterNode carries the nodes-file fields (id, available/total memory, bandwidth, ...).
    return [NodeCapacity.model_validate(_unknown_as_none(node.model_dump())) for node in live]


def _unknown_as_none(entry: dict[str, Any]) -> dict[str, Any]:
    """Daemons report 0 for a total or a bandwidth they could not measure."""
    return {
        **entry,
        **{k: None for k in ("total_memory_bytes", "memory_bandwidth_gbps") if not entry.get(k)},
    }


def load_nodes_file(path: Path) -> list[NodeCapacity]:
    """A JSON list of node objects (or ``{"nodes": [...]}``, as ``macmesh status --json``
    prints, whose nodes not ``up`` are left out), each with at least ``id`` and
    ``available_memory_bytes``. Errors name the file, the entry and the bad value."""
    try:
        data: Any = json.loads(path.read_text())
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {str(path)!r}: {exc.strerror}", param_hint="--nodes"
        ) from None
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"{str(path)!r} is not JSON: {exc}", param_hint="--nodes"
        ) from None
    if isinstance(data, dict) and "nodes" in data:
        data = data["nodes"]
    if not isinstance(data, list):
        raise typer.BadParameter(
            f"{str(path)!r} must hold a JSON list of nodes, not {type(data).__name__}",
            param_hint="--nodes",
        )
    nodes = []
    for i, entry in enumerate(data):
        label = f"node {i}" + (f" ({entry.get('id')!r})" if isinstance(entry, dict) else "")
        if isinstance(entry, dict) and entry.get("state", "up") != "up":
            continue
        try:
            nodes.append(
                NodeCapacity.model_validate(
                    _unknown_as_none(entry) if isinstance(entry, dict) else entry
                )
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'entry'}={err.get('input')!r}: {err['msg']}"
                for err in exc.errors()
            )
            raise typer.BadParameter(
                f"{str(path)!r} {label}: {problems}", param_hint="--nodes"
            ) from None
    return nodes


def place(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="model card id (see `macmesh models`) or checkpoint directory"
        ),
    ],
    nodes_file: Annotated[
        Path | None,
        typer.Option(
            "--nodes", help='plan offline from a JSON list of {"id", "available_memory_bytes", ...}'
        ),
    ] = None,
    min_nodes: Annotated[int, typer.Option("--min-nodes", help="use at least this many nodes")] = 1,
    context: Annotated[
        int | None,
        typer.Option(
            "--context", help="tokens of KV cache to budget (default: min(model max, 8192))"
        ),
    ] = None,
    headroom: Annotated[
        float, typer.Option("--headroom", help="fraction of each node's available memory kept free")
    ] = 0.1,
    sequences: Annotated[
        int,
        typer.Option("--sequences", help="concurrent sequences to budget KV cache and state for"),
    ] = 1,
    prompt_cache_mb: Annotated[
        int,
        typer.Option(
            "--prompt-cache-mb",
            help="MiB of prompt cache to budget, spread over the stages (a launch budgets the "
            "daemon's --prompt-cache-mb, default 1024)",
        ),
    ] = 0,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            help="daemon HOST:PORT to ask for the live cluster (default: this machine's daemon)",
            show_default=False,
        ),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option("--models-dir", help="where checkpoint directories named by MODEL live"),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="print the placement as JSON")
    ] = False,
    mtp_across_pipeline: Annotated[
        bool,
        typer.Option(
            "--mtp-across-pipeline",
            help="budget the MTP head on the last stage of a multi-node placement "
            "(what `macmesh launch --mtp-across-pipeline` plans)",
        ),
    ] = False,
) -> None:
    """Plan where a model's layers would go, without loading anything."""
    if min_nodes < 1:
        raise typer.BadParameter(f"must be >= 1, got {min_nodes}", param_hint="--min-nodes")
    if context is not None and context < 1:
        raise typer.BadParameter(f"must be >= 1, got {context}", param_hint="--context")
    if not 0.0 <= headroom < 1.0:
        raise typer.BadParameter(f"must be in [0, 1), got {headroom}", param_hint="--headroom")
    if sequences < 1:
        raise typer.BadParameter(f"must be >= 1, got {sequences}", param_hint="--sequences")
    if prompt_cache_mb < 0:
        raise typer.BadParameter(
            f"must be >= 0, got {prompt_cache_mb}", param_hint="--prompt-cache-mb"
        )

    try:
        card = resolve_card(model, models_dir.expanduser() if models_dir else None)
    except PlacementError as exc:
        raise typer.BadParameter(str(exc), param_hint="MODEL") from None

    if nodes_file is not None:
        nodes = load_nodes_file(nodes_file)
    else:
        from node.commands.status import _local_daemon_address
        from node.discovery.static import parse_peer

        node = node or _local_daemon_address()
        try:
            parse_peer(node)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--node") from None
        try:
            nodes = fetch_live_nodes(node)
        except DaemonUnreachableError as exc:
            typer.echo(f"macmesh place: {exc}", err=True)
            raise typer.Exit(code=1) from None

    options = PlanOptions(
        min_nodes=min_nodes,
        context_length=context,
        headroom_fraction=headroom,
        max_concurrent_sequences=sequences,
        prompt_cache_bytes=prompt_cache_mb * 2**20,
        mtp_across_pipeline=mtp_across_pipeline,
    )
    try:
        placement = plan(card, nodes, options)
    except InsufficientMemoryError as exc:
        typer.echo(f"macmesh place: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except PlacementError as exc:
        typer.echo(f"macmesh place: {exc}", err=True)
        raise typer.Exit(code=2) from None

    if json_output:
        typer.echo(json.dumps(placement.model_dump(mode="json"), indent=2))
    else:
        _print_table(placement)


def _print_table(placement: Placement) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{placement.model_id} placement")
    table.add_column("stage", justify="right")
    table.add_column("node")
    table.add_column("layers")
    table.add_column("bytes", justify="right")
    table.add_column("% of node", justify="right")
    for i, stage in enumerate(placement.stages):
        share = stage.bytes / stage.node_available_bytes if stage.node_available_bytes else 0.0
        extras = [x for x, on in (("emb", stage.has_embedding), ("head", stage.has_head)) if on]
        if stage.has_mtp_head:
            extras.append("mtp")
        layers = f"{stage.start_layer}-{stage.end_layer - 1}"
        if extras:
            layers += f" (+{', '.join(extras)})"
        table.add_row(str(i), stage.node_id, layers, format_bytes(stage.bytes), f"{share:.0%}")
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(placement.explanation, highlight=False, markup=False)
