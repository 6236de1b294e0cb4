"""Calls to other nodes' InferenceService: from one daemon to its peers (instance lookups,
forwarding, unloads), over one pooled channel per peer, and from ``macmesh status`` to any
daemon (``status_instances``, a one-shot CLI call with its own channel).

``PeerChannels`` keeps one gRPC channel (one HTTP/2 connection, one TLS handshake) per peer
address for the daemon's lifetime: a request that a node forwards, or a lookup it makes,
opens no connection once the peer has been reached once. gRPC multiplexes concurrent calls
over the channel and reconnects it by itself after a peer restarts.

A call a node makes on behalf of a client carries the ``x-macmesh-forwarded`` metadata; the
receiving node then answers from its own instances only and never forwards again, so a stale
view can cost one extra hop but never a loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from node import rpc
from node.cluster.instances import InstanceInfo
from node.logging import get_logger
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import inference_pb2_grpc as pb_grpc

log = get_logger(__name__)

FORWARDED_KEY = "x-macmesh-forwarded"
FORWARDED = ((FORWARDED_KEY, "1"),)
LOOKUP_TIMEOUT_S = 2.0


def is_forwarded(context: grpc.ServicerContext) -> bool:
    return any(key == FORWARDED_KEY for key, _ in context.invocation_metadata() or ())


class PeerChannels(rpc.ChannelPool):
    """One InferenceService channel per peer address, opened on first use."""

    def stub(self, address: str) -> pb_grpc.InferenceServiceStub:
        return pb_grpc.InferenceServiceStub(self.get(address))


def peer_instances(
    channels: PeerChannels, address: str, timeout_s: float = LOOKUP_TIMEOUT_S
) -> list[InstanceInfo]:
    """The instances the node at ``address`` coordinates; raises ``grpc.RpcError``."""
    reply = channels.stub(address).ClusterStatus(
        pb.ClusterStatusRequest(local_only=True), timeout=timeout_s, metadata=FORWARDED
    )
    return [InstanceInfo.from_proto(i) for i in reply.instances]


def gather_instances(
    channels: PeerChannels, addresses: Sequence[str], timeout_s: float = LOOKUP_TIMEOUT_S
) -> list[InstanceInfo]:
    """Every instance the peers at ``addresses`` coordinate, asked in parallel. A peer that
    does not answer in time (or runs no InferenceService) is skipped and logged."""
    answers = gather_by_peer(channels, addresses, timeout_s)
    return [info for infos in answers.values() for info in infos or []]


def gather_by_peer(
    channels: PeerChannels, addresses: Sequence[str], timeout_s: float = LOOKUP_TIMEOUT_S
) -> dict[str, list[InstanceInfo] | None]:
    """Address -> the instances that peer coordinates, or None when it did not answer."""

    def ask(address: str) -> list[InstanceInfo] | None:
        try:
            return peer_instances(channels, address, timeout_s)
        except grpc.RpcError as exc:
            log.info("peer skipped in instance lookup", peer=address, code=exc.code().name)
        except ValueError as exc:  # a malformed record: say so, do not fail the whole view
            log.warning("peer sent an invalid instance", peer=address, error=str(exc))
            return []
        return None

    if len(addresses) <= 1:
        return {address: ask(address) for address in addresses}
    with ThreadPoolExecutor(max_workers=min(16, len(addresses))) as pool:
        return dict(zip(addresses, pool.map(ask, addresses), strict=True))


def unload_on(
    channels: PeerChannels, address: str, instance_ids: Iterable[str], timeout_s: float
) -> int:
    """Ask the coordinator at ``address`` to unload these instances; returns how many it did."""
    count = 0
    stub = channels.stub(address)
    for instance_id in instance_ids:
        try:
            reply = stub.Unload(
                pb.UnloadRequest(instance_id=instance_id), timeout=timeout_s, metadata=FORWARDED
            )
            count += reply.unloaded
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:  # gone meanwhile: fine
                raise
    return count


def status_instances(address: str, timeout_s: float = 3.0) -> list[InstanceInfo] | None:
    """Every instance of the cluster as the daemon at ``address`` sees it; None when that
    daemon serves no InferenceService. Raises ``grpc.RpcError`` for anything else."""
    with rpc.channel(address) as channel:
        try:
            reply = pb_grpc.InferenceServiceStub(channel).ClusterStatus(
                pb.ClusterStatusRequest(), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise
    return [InstanceInfo.from_proto(i) for i in reply.instances]
