"""gRPC plumbing shared by every macmesh server and client.

Every server registers the standard gRPC health-checking service and server reflection, so
`grpcurl` and load balancers can talk to any node. Message limits are raised on purpose: a
prefill activation (8k tokens x 5120 wide x 2 bytes = 80 MiB) must fit in one frame or be
chunked; the tensor codec chunks above ``MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from node import security

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Server side: accept the pings above. gRPC's default (one ping per 5 min without data)
    # answers them with GOAWAY "too_many_pings", which killed idle pipeline streams and a
    # 1500-token prefill after ~2 minutes.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def make_server(
    max_workers: int = 32,
    *,
    interceptors: Sequence[grpc.ServerInterceptor] | None = None,
    max_message_bytes: int | None = None,
) -> tuple[grpc.Server, health.HealthServicer]:
    """A thread-pool server with the message limits above and the health service registered.

    ``interceptors`` default to the process's security (``node.security.current()``): with a
    cluster secret every call but health checks must be signed. A message above
    ``max_message_bytes`` is refused by gRPC itself with RESOURCE_EXHAUSTED naming both sizes."""
    if interceptors is None:
        interceptors = security.current().server_interceptors()
    limit = max_message_bytes or MAX_MESSAGE_BYTES
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=list(interceptors),
        # gRPC sets SO_REUSEPORT by default: a second daemon on a taken port would bind silently.
        options=[
            *CHANNEL_OPTIONS,
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def enable_reflection(server: grpc.Server, service_names: Iterable[str]) -> None:
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)


def mark_serving(health_servicer: health.HealthServicer, service_names: Iterable[str]) -> None:
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def bind(server: grpc.Server, host: str, port: int) -> int:
    """Bind insecurely to host:port; return the real port (port 0 picks a free one)."""
    try:
        bound = add_port(server, f"{host}:{port}", security.current())
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (address in use or not local)")
    return bound


def add_port(server: grpc.Server, address: str, sec: Any) -> int:
    """Listen on ``address`` with TLS when ``sec`` (a ``node.security.Security``) has a cert."""
    if sec.tls.serves_tls:
        return server.add_secure_port(address, security.server_credentials(sec.tls))
    return server.add_insecure_port(address)


def channel(address: str, options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A channel to a macmesh node: TLS and the cluster secret as this process is configured
    (``node.security``)."""
    return security.current().secure_channel(address, options or CHANNEL_OPTIONS)


class ChannelPool:
    """One channel per address, opened by ``open`` on first use and kept until ``forget`` or
    ``close``: a peer costs one HTTP/2 connection (and one TLS handshake), not one per call."""

    def __init__(self, open: Callable[[str], grpc.Channel] = channel) -> None:
        self._open = open
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            found = self._channels.get(address)
            if found is None:
                found = self._channels[address] = self._open(address)
            return found

    def forget(self, address: str) -> None:
        """Close the channel of a peer that left (a new one opens if it comes back)."""
        with self._lock:
            found = self._channels.pop(address, None)
        if found is not None:
            found.close()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for found in channels:
            found.close()
