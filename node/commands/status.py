"""`macmesh status`: every node of the cluster, as seen from any one daemon."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich import box
from rich.console import Console
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
    """Show every node of the cluster: state, address, memory, chip, last seen."""
    from node.discovery.client import DaemonUnreachable, cluster_view

    address = node or _local_daemon_address()
    if watch:
        _watch(address, json_output, timeout)
        return
    try:
        view = cluster_view(address, timeout_s=timeout)
    except (DaemonUnreachable, ValueError) as exc:
        typer.echo(f"macmesh status: {exc}", err=True)
        raise typer.Exit(code=1) from None
    if json_output:
        typer.echo(json.dumps(view.model_dump(mode="json"), indent=2))
    else:
        console = Console()
        console.print(render(view, console.width))


def _watch(address: str, json_output: bool, timeout: float) -> None:
    from rich.live import Live

    from node.discovery.client import DaemonUnreachable, cluster_view

    width = Console().width

    def frame() -> tuple[Table | Text, dict]:
        try:
            view = cluster_view(address, timeout_s=timeout)
        except (DaemonUnreachable, ValueError) as exc:
            return Text(f"{exc} (retrying)", style="red"), {"error": str(exc), "queried": address}
        return render(view, width), view.model_dump(mode="json")

    try:
        if json_output:
            while True:
                typer.echo(json.dumps(frame()[1]))
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
