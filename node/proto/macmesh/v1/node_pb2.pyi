from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PeerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PEER_STATE_UNSPECIFIED: _ClassVar[PeerState]
    PEER_STATE_UP: _ClassVar[PeerState]
    PEER_STATE_SUSPECT: _ClassVar[PeerState]
    PEER_STATE_DOWN: _ClassVar[PeerState]
PEER_STATE_UNSPECIFIED: PeerState
PEER_STATE_UP: PeerState
PEER_STATE_SUSPECT: PeerState
PEER_STATE_DOWN: PeerState

class NodeResources(_message.Message):
    __slots__ = ("memory_total_bytes", "memory_available_bytes", "chip", "memory_bandwidth_gbps", "os", "mlx_device", "cpu_count")
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    MLX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    memory_total_bytes: int
    memory_available_bytes: int
    chip: str
    memory_bandwidth_gbps: float
    os: str
    mlx_device: str
    cpu_count: int
    def __init__(self, memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., chip: _Optional[str] = ..., memory_bandwidth_gbps: _Optional[float] = ..., os: _Optional[str] = ..., mlx_device: _Optional[str] = ..., cpu_count: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "cluster", "protocol_version", "version", "grpc_address", "resources", "incarnation", "started_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    cluster: str
    protocol_version: int
    version: str
    grpc_address: str
    resources: NodeResources
    incarnation: str
    started_unix_ms: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., cluster: _Optional[str] = ..., protocol_version: _Optional[int] = ..., version: _Optional[str] = ..., grpc_address: _Optional[str] = ..., resources: _Optional[_Union[NodeResources, _Mapping]] = ..., incarnation: _Optional[str] = ..., started_unix_ms: _Optional[int] = ...) -> None: ...

class PeerRef(_message.Message):
    __slots__ = ("node_id", "grpc_address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    grpc_address: str
    def __init__(self, node_id: _Optional[str] = ..., grpc_address: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("sender", "known_peers")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    KNOWN_PEERS_FIELD_NUMBER: _ClassVar[int]
    sender: NodeInfo
    known_peers: _containers.RepeatedCompositeFieldContainer[PeerRef]
    def __init__(self, sender: _Optional[_Union[NodeInfo, _Mapping]] = ..., known_peers: _Optional[_Iterable[_Union[PeerRef, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("receiver", "known_peers")
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    KNOWN_PEERS_FIELD_NUMBER: _ClassVar[int]
    receiver: NodeInfo
    known_peers: _containers.RepeatedCompositeFieldContainer[PeerRef]
    def __init__(self, receiver: _Optional[_Union[NodeInfo, _Mapping]] = ..., known_peers: _Optional[_Iterable[_Union[PeerRef, _Mapping]]] = ...) -> None: ...

class GoodbyeRequest(_message.Message):
    __slots__ = ("node_id", "incarnation", "cluster")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: str
    cluster: str
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., cluster: _Optional[str] = ...) -> None: ...

class GoodbyeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("info", "state", "seconds_since_seen", "last_seen_unix_ms", "sources", "address")
    INFO_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    info: NodeInfo
    state: PeerState
    seconds_since_seen: float
    last_seen_unix_ms: int
    sources: _containers.RepeatedScalarFieldContainer[str]
    address: str
    def __init__(self, info: _Optional[_Union[NodeInfo, _Mapping]] = ..., state: _Optional[_Union[PeerState, str]] = ..., seconds_since_seen: _Optional[float] = ..., last_seen_unix_ms: _Optional[int] = ..., sources: _Optional[_Iterable[str]] = ..., address: _Optional[str] = ...) -> None: ...

class ClusterViewRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterViewResponse(_message.Message):
    __slots__ = ("local", "peers")
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    local: NodeInfo
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    def __init__(self, local: _Optional[_Union[NodeInfo, _Mapping]] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ...) -> None: ...
