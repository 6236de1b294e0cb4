"""Typed membership messages and their conversion to and from the wire (``node.proto``).

Everything that crosses a process boundary is validated here once, so the peer table and the
CLI only ever see well-formed values. ``*_from_proto`` raise ``ValueError`` naming the bad field.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from node.proto.macmesh.v1 import node_pb2
from node.validation import describe

NODE_ID_RE = re.compile(r"^[0-9A-Za-z._-]{1,64}$")
MAX_NAME_CHARS = 128


class PeerState(StrEnum):
    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"


_STATE_TO_PROTO = {
    PeerState.UP: node_pb2.PEER_STATE_UP,
    PeerState.SUSPECT: node_pb2.PEER_STATE_SUSPECT,
    PeerState.DOWN: node_pb2.PEER_STATE_DOWN,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


class Resources(BaseModel):
    """What a node offers: filled by ``node.discovery.resources`` and sent in every heartbeat."""

    model_config = ConfigDict(frozen=True)

    memory_total_bytes: int = Field(default=0, ge=0)
    memory_available_bytes: int = Field(default=0, ge=0)
    chip: str = ""
    memory_bandwidth_gbps: float = Field(default=0.0, ge=0.0)
    os: str = ""
    mlx_device: str = ""
    cpu_count: int = Field(default=0, ge=0)


class NodeInfo(BaseModel):
    """Who a node is; ``incarnation`` changes on every process start, ``node_id`` never."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    cluster: str = Field(min_length=1, max_length=63)
    protocol_version: int = Field(ge=1)
    version: str = ""
    grpc_address: str = ""
    incarnation: str = ""
    started_unix_ms: int = Field(default=0, ge=0)
    resources: Resources = Resources()

    @field_validator("node_id")
    @classmethod
    def _node_id_shape(cls, value: str) -> str:
        if not NODE_ID_RE.match(value):
            raise ValueError(f"node id {value!r} is not 1-64 characters of [0-9A-Za-z._-]")
        return value


class ClusterNode(BaseModel):
    """One node as the asked daemon sees it; the shape placement and ``macmesh status`` use.

    ``id`` and ``available_memory_bytes`` match the ``macmesh place --nodes FILE`` format.
    """

    id: str
    name: str
    cluster: str
    address: str
    state: PeerState
    local: bool = Field(description="true for the daemon that answered")
    available_memory_bytes: int
    total_memory_bytes: int
    chip: str
    memory_bandwidth_gbps: float
    os: str
    mlx_device: str
    cpu_count: int
    version: str
    seconds_since_seen: float
    last_seen_unix_ms: int
    sources: list[str] = Field(default_factory=list)


class ClusterView(BaseModel):
    """The answer of ``ClusterView``: the asked node first, then every peer it knows."""

    cluster: str
    queried: str
    nodes: list[ClusterNode]

    @property
    def local(self) -> ClusterNode:
        return self.nodes[0]

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.state is PeerState.UP]


def resources_to_proto(r: Resources) -> node_pb2.NodeResources:
    return node_pb2.NodeResources(**r.model_dump())


def resources_from_proto(msg: node_pb2.NodeResources) -> Resources:
    return Resources(
        memory_total_bytes=msg.memory_total_bytes,
        memory_available_bytes=msg.memory_available_bytes,
        chip=msg.chip,
        memory_bandwidth_gbps=max(0.0, msg.memory_bandwidth_gbps),
        os=msg.os,
        mlx_device=msg.mlx_device,
        cpu_count=msg.cpu_count,
    )


def info_to_proto(info: NodeInfo) -> node_pb2.NodeInfo:
    data = info.model_dump(exclude={"resources"})
    return node_pb2.NodeInfo(**data, resources=resources_to_proto(info.resources))


def info_from_proto(msg: node_pb2.NodeInfo) -> NodeInfo:
    """Validate a NodeInfo received from the network; ``ValueError`` names the bad field."""
    try:
        return NodeInfo(
            node_id=msg.node_id,
            name=msg.name,
            cluster=msg.cluster,
            protocol_version=msg.protocol_version,
            version=msg.version,
            grpc_address=msg.grpc_address,
            incarnation=msg.incarnation,
            started_unix_ms=msg.started_unix_ms,
            resources=resources_from_proto(msg.resources),
        )
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None


def state_to_proto(state: PeerState) -> int:
    return _STATE_TO_PROTO[state]


def cluster_node(
    info: NodeInfo,
    *,
    address: str,
    state: PeerState,
    local: bool,
    seconds_since_seen: float,
    last_seen_unix_ms: int,
    sources: list[str],
) -> ClusterNode:
    r = info.resources
    return ClusterNode(
        id=info.node_id,
        name=info.name,
        cluster=info.cluster,
        address=address or info.grpc_address,
        state=state,
        local=local,
        available_memory_bytes=r.memory_available_bytes,
        total_memory_bytes=r.memory_total_bytes,
        chip=r.chip,
        memory_bandwidth_gbps=r.memory_bandwidth_gbps,
        os=r.os,
        mlx_device=r.mlx_device,
        cpu_count=r.cpu_count,
        version=info.version,
        seconds_since_seen=seconds_since_seen,
        last_seen_unix_ms=last_seen_unix_ms,
        sources=sources,
    )


def view_from_proto(msg: node_pb2.ClusterViewResponse, queried: str) -> ClusterView:
    local = info_from_proto(msg.local)
    nodes = [
        cluster_node(
            local,
            address=local.grpc_address or queried,
            state=PeerState.UP,
            local=True,
            seconds_since_seen=0.0,
            last_seen_unix_ms=0,
            sources=[],
        )
    ]
    for peer in msg.peers:
        state = _STATE_FROM_PROTO.get(peer.state)
        if state is None:
            raise ValueError(f"peer state {peer.state} is not up, suspect or down")
        nodes.append(
            cluster_node(
                info_from_proto(peer.info),
                address=peer.address,
                state=state,
                local=False,
                seconds_since_seen=peer.seconds_since_seen,
                last_seen_unix_ms=peer.last_seen_unix_ms,
                sources=list(peer.sources),
            )
        )
    return ClusterView(cluster=local.cluster, queried=queried, nodes=nodes)


def _describe(exc: ValidationError) -> str:
    return describe(exc, whole="message")
