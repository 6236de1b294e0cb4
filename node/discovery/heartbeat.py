"""gRPC calls from one node to its peers: heartbeats and goodbyes, never blocking the caller.

Each peer address gets one long-lived channel. Calls are issued as futures so one slow or dead
peer never delays the heartbeats of the others; results arrive on a callback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from node import security
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
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> node_pb2_grpc.NodeServiceStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = peer_channel(address)
        return node_pb2_grpc.NodeServiceStub(channel)

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
        with self._lock:
            channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
