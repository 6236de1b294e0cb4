"""gRPC calls from one node to its peers: heartbeats and goodbyes, never blocking the caller.

Each peer address gets one long-lived channel. Calls are issued as futures so one slow or dead
peer never delays the heartbeats of the others; results arrive on a callback.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from node import rpc, security
from node.proto.macmesh.v1 import node_pb2, node_pb2_grpc
from node.rpc import CHANNEL_OPTIONS

# A restarted peer must be redialled within a heartbeat or two; gRPC's default reconnect backoff
# grows to two minutes. Peers are dialled directly, never through an HTTP proxy from the env.
PEER_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]

ResponseCallback = Callable[[str, grpc.Future], None]


def peer_channel(address: str) -> grpc.Channel:
    """Signed with the cluster secret and over TLS when the process is configured so: a node
    without the secret cannot heartbeat, so it never becomes "up" anywhere."""
    return security.current().secure_channel(address, PEER_CHANNEL_OPTIONS)


class PeerDialer:
    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._pool = rpc.ChannelPool(peer_channel)

    def _stub(self, address: str) -> node_pb2_grpc.NodeServiceStub:
        return node_pb2_grpc.NodeServiceStub(self._pool.get(address))

    def heartbeat(
        self, address: str, request: node_pb2.HeartbeatRequest, on_done: ResponseCallback
    ) -> None:
        future = self._stub(address).Heartbeat.future(request, timeout=self._timeout_s)
        future.add_done_callback(lambda f: on_done(address, f))

    def goodbye(
        self, address: str, request: node_pb2.GoodbyeRequest, timeout_s: float
    ) -> grpc.Future:
        return self._stub(address).Goodbye.future(request, timeout=timeout_s)

    def forget(self, address: str) -> None:
        self._pool.forget(address)

    def close(self) -> None:
        self._pool.close()
