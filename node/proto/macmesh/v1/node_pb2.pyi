from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeResources(_message.Message):
    __slots__ = ("memory_total_bytes", "memory_available_bytes", "chip", "memory_bandwidth_gbps", "os", "mlx_device")
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    MLX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    memory_total_bytes: int
    memory_available_bytes: int
    chip: str
    memory_bandwidth_gbps: float
    os: str
    mlx_device: str
    def __init__(self, memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., chip: _Optional[str] = ..., memory_bandwidth_gbps: _Optional[float] = ..., os: _Optional[str] = ..., mlx_device: _Optional[str] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "cluster", "protocol_version", "version", "grpc_address", "resources")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    cluster: str
    protocol_version: int
    version: str
    grpc_address: str
    resources: NodeResources
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., cluster: _Optional[str] = ..., protocol_version: _Optional[int] = ..., version: _Optional[str] = ..., grpc_address: _Optional[str] = ..., resources: _Optional[_Union[NodeResources, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("sender",)
    SENDER_FIELD_NUMBER: _ClassVar[int]
    sender: NodeInfo
    def __init__(self, sender: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("receiver",)
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    receiver: NodeInfo
    def __init__(self, receiver: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...
