"""`macmesh gateway`: HTTP in front of a node's gRPC InferenceService: the OpenAI, Anthropic and
Ollama APIs, Prometheus ``/metrics`` and the dashboard at ``/`` (docs/apis.md).

Prints one line, ``macmesh gateway on http://HOST:PORT -> node ADDRESS``, once it listens
(with ``--port 0`` that line carries the port picked), and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path
from typing import Annotated

import typer

from node.logging import get_logger

log = get_logger(__name__)

SHUTDOWN_SECONDS = 5.0


def gateway(
    port: Annotated[
        int, typer.Option(help="HTTP port (0 picks a free one)", min=0, max=65535)
    ] = 8000,
    host: Annotated[str, typer.Option(help="HTTP address to listen on")] = "127.0.0.1",
    node: Annotated[
        str | None,
        typer.Option(
            help="the node's gRPC address HOST:PORT (default: this machine's daemon)",
            show_default=False,
        ),
    ] = None,
    request_timeout: Annotated[
        float, typer.Option(help="deadline of each call to the node, seconds (0 = none)", min=0)
    ] = 600.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MACMESH_API_KEY",
            help="require the key (Bearer, x-api-key or Basic password) on every path but /health",
            show_default=False,
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="serve HTTPS with this certificate (PEM)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="private key for --tls-cert (PEM)")] = None,
) -> None:
    """Serve HTTP APIs over a node: OpenAI (/v1/chat/completions, /v1/completions,
    /v1/responses, /v1/models), Anthropic (/v1/messages), Ollama (/api/*), /metrics and the
    dashboard at /."""
    if node is None:
        from node.commands.status import _local_daemon_address

        node = _local_daemon_address()
    host_part, sep, port_part = node.rpartition(":")
    if not sep or not host_part or not port_part.isdigit() or not 0 < int(port_part) < 65536:
        typer.echo(f"macmesh gateway: --node {node!r} is not HOST:PORT", err=True)
        raise typer.Exit(code=2)
    if (tls_cert is None) != (tls_key is None):
        typer.echo("macmesh gateway: HTTPS needs both --tls-cert and --tls-key", err=True)
        raise typer.Exit(code=2)
    ssl_context = None
    if tls_cert is not None and tls_key is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            typer.echo(f"macmesh gateway: cannot use {tls_cert} / {tls_key}: {exc}", err=True)
            raise typer.Exit(code=2) from None
    try:
        asyncio.run(_serve(host, port, node, request_timeout or None, api_key or None, ssl_context))
    except OSError as exc:
        typer.echo(f"macmesh gateway: cannot listen on {host}:{port}: {exc}", err=True)
        raise typer.Exit(code=1) from None


async def _serve(
    host: str,
    port: int,
    node: str,
    request_timeout: float | None,
    api_key: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    from aiohttp import web

    from node.gateway import create_app

    app = create_app(node, request_timeout=request_timeout, api_key=api_key)
    # handler_cancellation: a client that disconnects cancels its handler, and so its gRPC call.
    # On shutdown, streams still open get a few seconds, then are cancelled (and so their calls).
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        scheme = "https" if ssl_context is not None else "http"
        typer.echo(f"macmesh gateway on {scheme}://{host}:{bound} -> node {node}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("gateway.stopping")
    finally:
        await runner.cleanup()
