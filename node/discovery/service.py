"""The NodeService gRPC servicer: a thin adapter from the wire to ``Membership``.

Bad requests get INVALID_ARGUMENT or FAILED_PRECONDITION with a message naming the problem; no
request can raise out of a handler into the server.
"""

from __future__ import annotations

import grpc

from node.discovery.membership import Membership, Rejected
from node.discovery.models import info_from_proto, info_to_proto
from node.proto.macmesh.v1 import node_pb2, node_pb2_grpc

SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "mismatch": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


def observed_host(peer: str) -> str:
    """The host part of ``context.peer()`` (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``), or ""."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    host = rest.rpartition(":")[0]
    return host.strip("[]")


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, membership: Membership) -> None:
        self._membership = membership

    def GetInfo(self, request: node_pb2.GetInfoRequest, context: grpc.ServicerContext):
        return info_to_proto(self._membership.local_info())

    def Heartbeat(self, request: node_pb2.HeartbeatRequest, context: grpc.ServicerContext):
        try:
            sender = info_from_proto(request.sender)
            receiver, refs = self._membership.handle_heartbeat(
                sender, request.known_peers, observed_host(context.peer())
            )
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad heartbeat sender: {exc}")
        except Rejected as exc:
            context.abort(_CODES[exc.kind], exc.message)
        return node_pb2.HeartbeatResponse(receiver=info_to_proto(receiver), known_peers=refs)

    def Goodbye(self, request: node_pb2.GoodbyeRequest, context: grpc.ServicerContext):
        try:
            self._membership.handle_goodbye(request.node_id, request.incarnation, request.cluster)
        except Rejected as exc:
            context.abort(_CODES[exc.kind], exc.message)
        return node_pb2.GoodbyeResponse()

    def ClusterView(self, request: node_pb2.ClusterViewRequest, context: grpc.ServicerContext):
        return self._membership.cluster_view_proto()
