from node.proto.macmesh.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_DTYPE_UNSPECIFIED: _ClassVar[TensorDType]
    TENSOR_DTYPE_FLOAT32: _ClassVar[TensorDType]
    TENSOR_DTYPE_FLOAT16: _ClassVar[TensorDType]
    TENSOR_DTYPE_BFLOAT16: _ClassVar[TensorDType]
TENSOR_DTYPE_UNSPECIFIED: TensorDType
TENSOR_DTYPE_FLOAT32: TensorDType
TENSOR_DTYPE_FLOAT16: TensorDType
TENSOR_DTYPE_BFLOAT16: TensorDType

class TensorChunk(_message.Message):
    __slots__ = ("dtype", "shape", "offset", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: TensorDType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, dtype: _Optional[_Union[TensorDType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size", "presence_penalty", "frequency_penalty", "penalty_context_size", "logit_bias", "seed")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PENALTY_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    repetition_context_size: int
    presence_penalty: float
    frequency_penalty: float
    penalty_context_size: int
    logit_bias: _containers.ScalarMap[int, float]
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., repetition_context_size: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., penalty_context_size: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., seed: _Optional[int] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("instance_id", "model", "start_layer", "end_layer", "position", "num_stages", "next_hop", "instance", "max_batch", "context_tokens", "mtp_head")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MTP_HEAD_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    start_layer: int
    end_layer: int
    position: int
    num_stages: int
    next_hop: str
    instance: _inference_pb2.Instance
    max_batch: int
    context_tokens: int
    mtp_head: bool
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., position: _Optional[int] = ..., num_stages: _Optional[int] = ..., next_hop: _Optional[str] = ..., instance: _Optional[_Union[_inference_pb2.Instance, _Mapping]] = ..., max_batch: _Optional[int] = ..., context_tokens: _Optional[int] = ..., mtp_head: _Optional[bool] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("instance_id", "model", "start_layer", "end_layer", "position", "num_stages", "next_hop", "num_layers", "hidden_size", "activation_dtype", "has_embedding", "has_head", "weight_bytes", "resident_bytes", "load_seconds", "has_mtp_head", "mtp_head_bytes")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_DTYPE_FIELD_NUMBER: _ClassVar[int]
    HAS_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HAS_HEAD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HAS_MTP_HEAD_FIELD_NUMBER: _ClassVar[int]
    MTP_HEAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    start_layer: int
    end_layer: int
    position: int
    num_stages: int
    next_hop: str
    num_layers: int
    hidden_size: int
    activation_dtype: TensorDType
    has_embedding: bool
    has_head: bool
    weight_bytes: int
    resident_bytes: int
    load_seconds: float
    has_mtp_head: bool
    mtp_head_bytes: int
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., position: _Optional[int] = ..., num_stages: _Optional[int] = ..., next_hop: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., activation_dtype: _Optional[_Union[TensorDType, str]] = ..., has_embedding: _Optional[bool] = ..., has_head: _Optional[bool] = ..., weight_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., load_seconds: _Optional[float] = ..., has_mtp_head: _Optional[bool] = ..., mtp_head_bytes: _Optional[int] = ...) -> None: ...

class LoadShardResponse(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardInfo
    def __init__(self, shard: _Optional[_Union[ShardInfo, _Mapping]] = ...) -> None: ...

class UnloadShardRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class UnloadShardResponse(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: bool
    def __init__(self, unloaded: _Optional[bool] = ...) -> None: ...

class StageStatusRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("shard", "cached_requests", "request_ids", "open_streams", "frames_processed", "frames_rejected", "tokens_returned", "responses_relayed", "batch_size", "max_batch_seen", "batched_forwards", "max_batch", "context_tokens", "batched_prefills", "prompt_cache_snapshots", "prompt_cache_bytes")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CACHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    OPEN_STREAMS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_RETURNED_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_RELAYED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_PREFILLS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    shard: ShardInfo
    cached_requests: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    open_streams: int
    frames_processed: int
    frames_rejected: int
    tokens_returned: int
    responses_relayed: int
    batch_size: int
    max_batch_seen: int
    batched_forwards: int
    max_batch: int
    context_tokens: int
    batched_prefills: int
    prompt_cache_snapshots: int
    prompt_cache_bytes: int
    def __init__(self, shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., cached_requests: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ..., open_streams: _Optional[int] = ..., frames_processed: _Optional[int] = ..., frames_rejected: _Optional[int] = ..., tokens_returned: _Optional[int] = ..., responses_relayed: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_batch_seen: _Optional[int] = ..., batched_forwards: _Optional[int] = ..., max_batch: _Optional[int] = ..., context_tokens: _Optional[int] = ..., batched_prefills: _Optional[int] = ..., prompt_cache_snapshots: _Optional[int] = ..., prompt_cache_bytes: _Optional[int] = ...) -> None: ...

class StageStatusResponse(_message.Message):
    __slots__ = ("stages",)
    STAGES_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    def __init__(self, stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("sampling", "return_route", "mtp", "resume_snapshot", "resume_length")
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RETURN_ROUTE_FIELD_NUMBER: _ClassVar[int]
    MTP_FIELD_NUMBER: _ClassVar[int]
    RESUME_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    RESUME_LENGTH_FIELD_NUMBER: _ClassVar[int]
    sampling: SamplingOptions
    return_route: str
    mtp: bool
    resume_snapshot: int
    resume_length: int
    def __init__(self, sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., return_route: _Optional[str] = ..., mtp: _Optional[bool] = ..., resume_snapshot: _Optional[int] = ..., resume_length: _Optional[int] = ...) -> None: ...

class Activation(_message.Message):
    __slots__ = ("start_position", "token_ids", "hidden", "sample", "verify")
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    start_position: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hidden: TensorChunk
    sample: bool
    verify: Verify
    def __init__(self, start_position: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[TensorChunk, _Mapping]] = ..., sample: _Optional[bool] = ..., verify: _Optional[_Union[Verify, _Mapping]] = ...) -> None: ...

class Verify(_message.Message):
    __slots__ = ("keep_previous", "draft_k")
    KEEP_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_K_FIELD_NUMBER: _ClassVar[int]
    keep_previous: int
    draft_k: int
    def __init__(self, keep_previous: _Optional[int] = ..., draft_k: _Optional[int] = ...) -> None: ...

class BatchRow(_message.Message):
    __slots__ = ("request_id", "start_position", "token_ids", "sample", "verify")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start_position: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    verify: Verify
    def __init__(self, request_id: _Optional[str] = ..., start_position: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., verify: _Optional[_Union[Verify, _Mapping]] = ...) -> None: ...

class ActivationBatch(_message.Message):
    __slots__ = ("rows", "hidden")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[BatchRow]
    hidden: TensorChunk
    def __init__(self, rows: _Optional[_Iterable[_Union[BatchRow, _Mapping]]] = ..., hidden: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: int
    def __init__(self, snapshot: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class ForgetSnapshots(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Probe(_message.Message):
    __slots__ = ("tensor",)
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorChunk
    def __init__(self, tensor: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("request_id", "open", "activation", "release", "probe", "batch", "snapshot", "forget")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    FORGET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    open: OpenRequest
    activation: Activation
    release: ReleaseRequest
    probe: Probe
    batch: ActivationBatch
    snapshot: SnapshotRequest
    forget: ForgetSnapshots
    def __init__(self, request_id: _Optional[str] = ..., open: _Optional[_Union[OpenRequest, _Mapping]] = ..., activation: _Optional[_Union[Activation, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ..., probe: _Optional[_Union[Probe, _Mapping]] = ..., batch: _Optional[_Union[ActivationBatch, _Mapping]] = ..., snapshot: _Optional[_Union[SnapshotRequest, _Mapping]] = ..., forget: _Optional[_Union[ForgetSnapshots, _Mapping]] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("token_id", "position", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    position: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., position: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("token_ids", "accepted", "drafts", "position")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    accepted: int
    drafts: _containers.RepeatedScalarFieldContainer[int]
    position: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., accepted: _Optional[int] = ..., drafts: _Optional[_Iterable[int]] = ..., position: _Optional[int] = ...) -> None: ...

class Released(_message.Message):
    __slots__ = ("stages",)
    STAGES_FIELD_NUMBER: _ClassVar[int]
    stages: int
    def __init__(self, stages: _Optional[int] = ...) -> None: ...

class BatchToken(_message.Message):
    __slots__ = ("request_id", "token", "verdict")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: SampledToken
    verdict: Verdict
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[_Union[SampledToken, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[BatchToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[BatchToken, _Mapping]]] = ...) -> None: ...

class StageError(_message.Message):
    __slots__ = ("code", "message", "position")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    position: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("request_id", "token", "released", "error", "probe", "tokens", "verdict")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: SampledToken
    released: Released
    error: StageError
    probe: Probe
    tokens: TokenBatch
    verdict: Verdict
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[_Union[SampledToken, _Mapping]] = ..., released: _Optional[_Union[Released, _Mapping]] = ..., error: _Optional[_Union[StageError, _Mapping]] = ..., probe: _Optional[_Union[Probe, _Mapping]] = ..., tokens: _Optional[_Union[TokenBatch, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...
