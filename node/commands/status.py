"""`macmesh status`: every node and every instance of the cluster, as seen from any one daemon.

Two tables: the nodes (state, address, memory, ...) and the instances (model, state, engine and
the reason it was chosen, stages with their layer ranges, recent decode tok/s). ``--json``
prints the nodes view with an ``instances`` list added; ``--watch`` refreshes every second.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from node.discovery.models import ClusterNode, ClusterView, PeerState

_STATE_STYLE = {PeerState.UP: "green", PeerState.SUSPECT: "yellow", PeerState.DOWN: "red"}


def status(
    node: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of any daemon (default: the one running on this machine)"),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
    watch: Annotated[bool, typer.Option(help="refresh every second until Ctrl-C")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the daemon")] = 3.0,
) -> None:
    """Show every node and instance of the cluster: memory, engines, stages, tok/s."""
    from node.discovery.client import DaemonUnreachable

    address = node or _local_daemon_address()
    if watch:
        _watch(address, json_output, timeout)
        return
    try:
        view, instances = fetch(address, timeout)
    except (DaemonUnreachable, ValueError) as exc:
        typer.echo(f"macmesh status: {exc}", err=True)
        raise typer.Exit(code=1) from None
    if json_output:
        typer.echo(json.dumps(as_json(view, instances), indent=2))
    else:
        console = Console()
        console.print(render_all(view, instances, console.width))


def fetch(address: str, timeout: float) -> tuple[ClusterView, list[Any] | None]:
    """The nodes (NodeService) and the instances (InferenceService; None when the daemon
    serves none, or could not say) as the daemon at ``address`` sees them."""
    import grpc

    from node.cluster.peers import status_instances
    from node.discovery.client import cluster_view

    view = cluster_view(address, timeout_s=timeout)
    try:
        instances = status_instances(address, timeout_s=timeout)
    except grpc.RpcError:
        instances = None  # the nodes still answer; the table says instances are unknown
    return view, instances


def as_json(view: ClusterView, instances: list[Any] | None) -> dict[str, Any]:
    data = view.model_dump(mode="json")
    data["instances"] = None if instances is None else [i.model_dump() for i in instances]
    return data


def render_all(view: ClusterView, instances: list[Any] | None, width: int = 120) -> RenderableType:
    return Group(render(view, width), render_instances(view, instances, width))


def _watch(address: str, json_output: bool, timeout: float) -> None:
    """Refresh every second until Ctrl-C or SIGTERM. On a terminal the table is redrawn in
    place; into a pipe or file every frame is printed (and flushed) whole, so a supervisor or
    ``| tee`` that stops it with SIGTERM keeps every frame so far."""
    import signal

    from rich.live import Live

    from node.discovery.client import DaemonUnreachable

    console = Console()
    width = console.width

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    def frame() -> tuple[RenderableType, dict]:
        try:
            view, instances = fetch(address, timeout)
        except (DaemonUnreachable, ValueError) as exc:
            return Text(f"{exc} (retrying)", style="red"), {"error": str(exc), "queried": address}
        return render_all(view, instances, width), as_json(view, instances)

    try:
        if json_output or not console.is_terminal:
            while True:
                if json_output:
                    typer.echo(json.dumps(frame()[1]))
                else:
                    console.print(frame()[0])
                    console.print()
                sys.stdout.flush()
                time.sleep(1.0)
        with Live(frame()[0], auto_refresh=False) as live:
            while True:
                time.sleep(1.0)
                live.update(frame()[0], refresh=True)
    except KeyboardInterrupt:
        pass


def _local_daemon_address() -> str:
    """The daemon of this machine: from its state dir, else the configured port on loopback."""
    from node.config import SettingsError, load_settings
    from node.daemon import read_daemon_file

    try:
        settings = load_settings()
    except SettingsError as exc:
        typer.echo(f"macmesh status: {exc}", err=True)
        raise typer.Exit(code=2) from None
    running = read_daemon_file(settings.state_dir)
    if running and isinstance(running.get("client_address"), str):
        return running["client_address"]
    return f"127.0.0.1:{settings.grpc_port}"


WIDE_COLUMNS = 120  # below this terminal width, the table drops bandwidth, os, mlx and id


def render(view: ClusterView, width: int = WIDE_COLUMNS) -> Table:
    """A table a person reads at a glance; the node that answered is marked with ``*``."""
    wide = width >= WIDE_COLUMNS
    counts = {state: sum(n.state is state for n in view.nodes) for state in PeerState}
    summary = ", ".join(f"{counts[s]} {s}" for s in PeerState if counts[s])
    table = Table(
        title=f"cluster {view.cluster!r}: {len(view.nodes)} nodes ({summary})",
        caption=f"asked {view.queried}; * = the node that answered",
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    columns = [
        ("name", "left", True),
        ("state", "left", True),
        ("address", "left", True),
        ("free/total", "right", True),
        ("chip", "left", False),
        *([("bw", "right", True), ("os", "left", False), ("mlx", "left", True)] if wide else []),
        ("seen", "right", True),
        *([("id", "left", True)] if wide else []),
    ]
    for header, justify, no_wrap in columns:
        table.add_column(header, justify=justify, no_wrap=no_wrap, overflow="fold")  # type: ignore[arg-type]
    for n in view.nodes:
        row: list[str | Text] = [
            n.name + (" *" if n.local else ""),
            Text(str(n.state), style=_STATE_STYLE[n.state]),
            n.address,
            _memory(n),
            n.chip or "?",
        ]
        if wide:
            bw = f"{n.memory_bandwidth_gbps:.0f} GB/s" if n.memory_bandwidth_gbps else "?"
            row += [bw, n.os or "?", n.mlx_device or "?"]
        row.append("now" if n.local else _ago(n.seconds_since_seen))
        if wide:
            row.append(n.id[:8])
        table.add_row(*row)
    return table


def _memory(n: ClusterNode) -> str:
    gib = 1024**3
    return f"{n.available_memory_bytes / gib:.1f}/{n.total_memory_bytes / gib:.1f} GiB"


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


_ENGINE_STYLE = {
    "native_mtp": "green",
    "local": "cyan",
    "pipeline": "magenta",
    "pipeline_mtp": "bright_magenta",
}
_INSTANCE_STATE_STYLE = {"ready": "green", "loading": "yellow", "failed": "red"}


def render_instances(
    view: ClusterView, instances: list[Any] | None, width: int = WIDE_COLUMNS
) -> RenderableType:
    """One row per instance (state, engine, stages as node: layers, recent tok/s), then why
    each engine was chosen, one line per instance (reasons are sentences, not cells)."""
    if instances is None:
        return Text("instances: unknown (the daemon serves no InferenceService)", style="yellow")
    if not instances:
        return Text("no instances launched (macmesh launch MODEL)", style="dim")
    names = {n.id: n.name for n in view.nodes}
    wide = width >= WIDE_COLUMNS
    # Instance ids are "<model>-<hash>": a model column would only repeat them.
    show_model = wide and not all(i.instance_id.startswith(f"{i.model}-") for i in instances)
    table = Table(
        title=f"{len(instances)} instance{'s' if len(instances) != 1 else ''}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("instance", no_wrap=True)
    if show_model:
        table.add_column("model", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("engine", no_wrap=True)
    table.add_column("stages (node: layers)", no_wrap=True)
    table.add_column("tok/s", justify="right", no_wrap=True)
    table.add_column("reqs", justify="right", no_wrap=True)
    if wide:  # narrow: "reqs" already counts what computes and waits (served+in flight)
        table.add_column("batch/q", justify="right", no_wrap=True)
    reasons = Text()
    for i in instances:
        # Narrow: one stage per line, so a list is split between stages, never inside one.
        separator, colon = (" → ", ": ") if wide else ("\n→", ":")
        stages = separator.join(
            f"{names.get(s.node_id, s.node_id[:8])}{colon}{_layers(s.start_layer, s.end_layer)}"
            for s in i.stages
        )
        busy = f"{i.requests_served}" + (f"+{i.in_flight}" if i.in_flight else "")
        row: list[str | Text] = [i.instance_id]
        if show_model:
            row.append(i.model)
        row += [
            Text(i.state, style=_INSTANCE_STATE_STYLE.get(i.state, "")),
            Text(
                i.engine + (f" K={i.current_mtp_k}" if i.current_mtp_k is not None else ""),
                style=_ENGINE_STYLE.get(i.engine, ""),
            ),
            stages,
            f"{i.recent_generation_tps:.1f}" if i.recent_generation_tps else "-",
            busy,
        ]
        if wide:
            row.append(f"{i.batch_size}/{i.queued}")
        table.add_row(*row)
        coordinator = names.get(i.coordinator_node_id, i.coordinator_node_id[:8])
        reasons.append(f"{i.instance_id} (via {coordinator}): ", style="bold")
        reasons.append(f"{i.engine_reason}\n")
    reasons.rstrip()
    return Group(table, reasons)


def _layers(start: int, end: int) -> str:
    return f"{start}" if end - start == 1 else f"{start}-{end - 1}"
