"""`macmesh run`: start this machine's node daemon and keep it running until SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from node.config import SettingsError, load_settings
from node.logging import configure_logging, get_logger

log = get_logger(__name__)


def run(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="node name (default: hostname)")] = None,
    # A string, so a bad value is reported with the value by the settings validation.
    grpc_port: Annotated[
        str | None,
        typer.Option(metavar="PORT", help="gRPC port (default 52700; 0 picks a free one)"),
    ] = None,
    interface: Annotated[
        str | None,
        typer.Option(help="serve and advertise only on this address (or interface name)"),
    ] = None,
    cluster: Annotated[str | None, typer.Option(help="cluster name (default: default)")] = None,
    peer: Annotated[
        list[str] | None,
        typer.Option(help="static peer HOST:PORT (repeatable), for networks without multicast"),
    ] = None,
    models_dir: Annotated[Path | None, typer.Option(help="where checkpoints live")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="node id and runtime state")] = None,
    mdns: Annotated[
        bool | None, typer.Option("--mdns/--no-mdns", help="mDNS discovery (default on)")
    ] = None,
    native_mtp: Annotated[
        bool | None,
        typer.Option("--native-mtp/--no-native-mtp", help="native MTP decoding (default on)"),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
    cluster_secret_file: Annotated[
        Path | None,
        typer.Option(
            help="file holding the cluster secret every peer and client must sign calls with "
            "(or MACMESH_CLUSTER_SECRET); without one anyone on the network can use the node"
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="serve gRPC over TLS with this certificate (PEM)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="private key for --tls-cert (PEM)")] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA certificate (PEM) that peers' certificates chain to")
    ] = None,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="refuse longer prompts (default 131072)")
    ] = None,
    max_tokens_limit: Annotated[
        int | None, typer.Option(help="refuse requests asking for more tokens (default 32768)")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="MACMESH_METRICS_PORT",
            min=0,
            max=65535,
            help="serve Prometheus /metrics on this port (0 picks one; default: off)",
        ),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(help="requests an instance on this node decodes together (default 8)"),
    ] = None,
    prompt_cache_mb: Annotated[
        int | None,
        typer.Option(
            help="MiB each instance keeps for cached prompt prefixes a later request (a chat's "
            "next turn) starts from; 0 disables (default 1024)"
        ),
    ] = None,
) -> None:
    """Start this machine's node: serve gRPC, find peers, exchange heartbeats."""
    try:
        settings = load_settings(
            config,
            name=name,
            grpc_port=grpc_port,
            interface=interface,
            cluster=cluster,
            peers=peer or None,
            models_dir=models_dir,
            state_dir=state_dir,
            mdns=mdns,
            native_mtp=native_mtp,
            cluster_secret_file=cluster_secret_file,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            max_prompt_tokens=max_prompt_tokens,
            max_tokens_limit=max_tokens_limit,
            max_batch=max_batch,
            prompt_cache_mb=prompt_cache_mb,
        )
    except SettingsError as exc:
        typer.echo(f"macmesh run: {exc}", err=True)
        raise typer.Exit(code=2) from None
    _apply_logging_settings(ctx, settings.log_level, settings.log_format)
    log.debug("effective settings", **settings.model_dump(mode="json"))

    from node.daemon import Daemon, DaemonError  # after settings: a typo fails fast

    shutdown = _ShutdownSignals()  # before start: a SIGTERM while starting still stops cleanly
    daemon = Daemon(settings)
    from node.cluster.service import install

    servicer = install(daemon)  # InferenceService + the pipeline's StageService
    try:
        if metrics_port is not None:
            from node import metrics

            metrics.install(daemon, servicer, metrics_port)
        daemon.start()
    except DaemonError as exc:
        typer.echo(f"macmesh run: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except (OSError, ValueError) as exc:  # the metrics port, or an --interface it cannot use
        typer.echo(f"macmesh run: cannot serve metrics on port {metrics_port}: {exc}", err=True)
        raise typer.Exit(code=1) from None

    discovery = f"mDNS on {daemon.interface or 'all interfaces'}" if settings.mdns else "mDNS off"
    if settings.peers:
        discovery += f", static peers {', '.join(settings.peers)}"
    typer.echo(
        f"macmesh node {settings.name!r} (id {daemon.node_id}) in cluster {settings.cluster!r}\n"
        f"  listening on {daemon.bind_address} (gRPC); peers dial {daemon.address}, "
        f"clients on this machine {daemon.client_address()}\n"
        f"  discovery: {discovery}\n"
        f"{_metrics_line(daemon)}"
        "  stop with Ctrl-C"
    )
    sys.stdout.flush()
    signum = shutdown.wait()
    log.info("shutting down", signal=signal.Signals(signum).name)
    daemon.stop()
    # Everything is stopped and saved. Leave without interpreter finalization: MLX's
    # thread-local destructors take the GIL, so a worker thread that ran MLX and exits while
    # the interpreter finalizes aborts the process ("terminate called without an active
    # exception", exit -6); ml-explore/mlx#3126, #4110.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _metrics_line(daemon: object) -> str:
    port = getattr(daemon, "metrics_port", None)
    if not port:
        return ""
    host = daemon.client_address().rsplit(":", 1)[0]  # type: ignore[attr-defined]
    return f"  metrics: http://{host}:{port}/metrics\n"


class _ShutdownSignals:
    """SIGINT/SIGTERM request a clean shutdown; a second one exits at once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._received: list[int] = []
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self._received:
            raise SystemExit(128 + signum)
        self._received.append(signum)
        self._event.set()

    def wait(self) -> int:
        while not self._event.wait(0.5):  # short waits keep the main thread responsive
            pass
        return self._received[0]


def _apply_logging_settings(ctx: typer.Context, level: str, fmt: str) -> None:
    """The global ``--log-level``/``--log-format`` (flag or env) win; otherwise the config
    file's values apply (settings resolved env > file > default already)."""
    parent = ctx.parent
    if parent is None:
        return

    def pick(param: str, from_settings: str) -> str:
        source = parent.get_parameter_source(param)
        # Compared by name: typer vendors its own copy of click's ParameterSource.
        if source is None or source.name == "DEFAULT":
            return from_settings
        return str(parent.params[param])

    configure_logging(pick("log_level", level), pick("log_format", fmt))  # type: ignore[arg-type]
