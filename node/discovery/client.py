"""Ask any running daemon about the cluster. Used by ``macmesh status``, placement and gateways.

Every function takes the daemon's ``HOST:PORT`` and raises ``DaemonUnreachable`` (naming the
address) when no macmesh daemon answers there in time (``DaemonRefused``, a kind of it, when one
answers but the two sides do not share the cluster secret), and ``ValueError`` for a malformed
address.
"""

from __future__ import annotations

import grpc

from node.discovery.heartbeat import peer_channel
from node.discovery.models import (
    ClusterNode,
    ClusterView,
    NodeInfo,
    info_from_proto,
    view_from_proto,
)
from node.discovery.static import parse_peer
from node.proto.macmesh.v1 import node_pb2, node_pb2_grpc
from node.security import SECRET_ENV, SECRET_FILE_ENV

DEFAULT_TIMEOUT_S = 3.0


class DaemonUnreachable(ConnectionError):
    def __init__(self, address: str, reason: str, message: str = "") -> None:
        super().__init__(message or f"no macmesh daemon reachable at {address} ({reason})")
        self.address = address
        self.reason = reason


class DaemonRefused(DaemonUnreachable):
    """A daemon answers at the address, but it and this process do not share a secret."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(
            address,
            reason,
            f"the macmesh daemon at {address} and this client do not share the cluster "
            f"secret: {reason}. Set {SECRET_ENV} or {SECRET_FILE_ENV} to the cluster's secret",
        )


def _call(address: str, method: str, request: object, timeout_s: float):
    target = str(parse_peer(address))
    with peer_channel(target) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        try:
            return getattr(stub, method)(request, timeout=timeout_s, wait_for_ready=False)
        except grpc.RpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.UNAUTHENTICATED:
                raise DaemonRefused(address, exc.details() or "refused") from None
            if code is grpc.StatusCode.UNAVAILABLE:
                reason = "nothing answers there; is `macmesh run` running?"
            elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = f"no answer within {timeout_s:g} s"
            elif code is grpc.StatusCode.UNIMPLEMENTED:
                reason = "the server there is not a macmesh node"
            else:
                reason = f"{code.name}: {exc.details()}"
            raise DaemonUnreachable(address, reason) from None


def get_info(address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> NodeInfo:
    """Who the daemon at ``address`` is, with its current resources."""
    return info_from_proto(_call(address, "GetInfo", node_pb2.GetInfoRequest(), timeout_s))


def cluster_view(address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ClusterView:
    """Every node the daemon at ``address`` knows (itself first), with state and resources."""
    response = _call(address, "ClusterView", node_pb2.ClusterViewRequest(), timeout_s)
    return view_from_proto(response, queried=address)


def cluster_nodes(address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[ClusterNode]:
    """The live (``up``) nodes of the cluster as seen from ``address``, the asked node first.

    Each node carries ``id``, ``name``, ``address``, ``available_memory_bytes``,
    ``total_memory_bytes``, ``chip``, ``memory_bandwidth_gbps``, ``os``, ``mlx_device``;
    ``node.model_dump()`` gives the ``macmesh place --nodes`` JSON shape.
    """
    return cluster_view(address, timeout_s).live()
