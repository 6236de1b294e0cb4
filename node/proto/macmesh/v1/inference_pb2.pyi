from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed")
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
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., seed: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "text", "prompt_ids", "messages", "max_tokens", "sampling", "engine", "mtp_k", "ignore_eos", "raw", "stop", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MTP_K_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    prompt_ids: TokenIds
    messages: ChatMessages
    max_tokens: int
    sampling: SamplingParams
    engine: str
    mtp_k: int
    ignore_eos: bool
    raw: bool
    stop: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., prompt_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., engine: _Optional[str] = ..., mtp_k: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., raw: _Optional[bool] = ..., stop: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class StageStats(_message.Message):
    __slots__ = ("node_id", "address", "start_layer", "end_layer")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    start_layer: int
    end_layer: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("engine", "engine_reason", "drafter_kind", "num_draft_tokens", "proposed_draft_tokens", "accepted_draft_tokens", "acceptance_rate", "prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps", "stages", "finish_reason", "stop_sequence", "queue_seconds", "time_to_first_token_seconds", "draft_k_histogram", "cached_prompt_tokens")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_REASON_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TPS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TPS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_K_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    engine: str
    engine_reason: str
    drafter_kind: str
    num_draft_tokens: float
    proposed_draft_tokens: int
    accepted_draft_tokens: int
    acceptance_rate: float
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    stages: _containers.RepeatedCompositeFieldContainer[StageStats]
    finish_reason: str
    stop_sequence: str
    queue_seconds: float
    time_to_first_token_seconds: float
    draft_k_histogram: _containers.RepeatedScalarFieldContainer[int]
    cached_prompt_tokens: int
    def __init__(self, engine: _Optional[str] = ..., engine_reason: _Optional[str] = ..., drafter_kind: _Optional[str] = ..., num_draft_tokens: _Optional[float] = ..., proposed_draft_tokens: _Optional[int] = ..., accepted_draft_tokens: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., generation_tokens: _Optional[int] = ..., prompt_tps: _Optional[float] = ..., generation_tps: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[StageStats, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., stop_sequence: _Optional[str] = ..., queue_seconds: _Optional[float] = ..., time_to_first_token_seconds: _Optional[float] = ..., draft_k_histogram: _Optional[_Iterable[int]] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: TextDelta
    final: GenerationStats
    def __init__(self, delta: _Optional[_Union[TextDelta, _Mapping]] = ..., final: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class NativeMtp(_message.Message):
    __slots__ = ("default_k", "max_k")
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    default_k: int
    max_k: int
    def __init__(self, default_k: _Optional[int] = ..., max_k: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "model_type", "num_layers", "bytes", "context_length", "native_mtp", "launched", "has_weights", "download_from", "source", "mtp_note")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NATIVE_MTP_FIELD_NUMBER: _ClassVar[int]
    LAUNCHED_FIELD_NUMBER: _ClassVar[int]
    HAS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_FROM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MTP_NOTE_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_type: str
    num_layers: int
    bytes: int
    context_length: int
    native_mtp: NativeMtp
    launched: bool
    has_weights: bool
    download_from: _containers.RepeatedScalarFieldContainer[str]
    source: str
    mtp_note: str
    def __init__(self, id: _Optional[str] = ..., model_type: _Optional[str] = ..., num_layers: _Optional[int] = ..., bytes: _Optional[int] = ..., context_length: _Optional[int] = ..., native_mtp: _Optional[_Union[NativeMtp, _Mapping]] = ..., launched: _Optional[bool] = ..., has_weights: _Optional[bool] = ..., download_from: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., mtp_note: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class PlaceRequest(_message.Message):
    __slots__ = ("model", "min_nodes", "context_length")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_NODES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    min_nodes: int
    context_length: int
    def __init__(self, model: _Optional[str] = ..., min_nodes: _Optional[int] = ..., context_length: _Optional[int] = ...) -> None: ...

class PlannedStage(_message.Message):
    __slots__ = ("node_id", "start_layer", "end_layer", "bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    start_layer: int
    end_layer: int
    bytes: int
    def __init__(self, node_id: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("model", "stages", "total_bytes", "explanation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    stages: _containers.RepeatedCompositeFieldContainer[PlannedStage]
    total_bytes: int
    explanation: str
    def __init__(self, model: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[PlannedStage, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., explanation: _Optional[str] = ...) -> None: ...

class LaunchRequest(_message.Message):
    __slots__ = ("model", "min_nodes", "context_length", "pull", "mtp_across_pipeline")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_NODES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    MTP_ACROSS_PIPELINE_FIELD_NUMBER: _ClassVar[int]
    model: str
    min_nodes: int
    context_length: int
    pull: bool
    mtp_across_pipeline: bool
    def __init__(self, model: _Optional[str] = ..., min_nodes: _Optional[int] = ..., context_length: _Optional[int] = ..., pull: _Optional[bool] = ..., mtp_across_pipeline: _Optional[bool] = ...) -> None: ...

class LaunchProgress(_message.Message):
    __slots__ = ("message", "instance")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    message: str
    instance: Instance
    def __init__(self, message: _Optional[str] = ..., instance: _Optional[_Union[Instance, _Mapping]] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("instance_id", "model", "coordinator_node_id", "stages", "engine", "engine_reason", "state", "recent_generation_tps", "aliases", "in_flight", "requests_served", "coordinator_address", "batch_size", "queued", "current_mtp_k", "min_nodes", "context_length", "mtp_opted_in_by")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RECENT_GENERATION_TPS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_MTP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_NODES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MTP_OPTED_IN_BY_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    coordinator_node_id: str
    stages: _containers.RepeatedCompositeFieldContainer[StageStats]
    engine: str
    engine_reason: str
    state: str
    recent_generation_tps: float
    aliases: _containers.RepeatedScalarFieldContainer[str]
    in_flight: int
    requests_served: int
    coordinator_address: str
    batch_size: int
    queued: int
    current_mtp_k: int
    min_nodes: int
    context_length: int
    mtp_opted_in_by: str
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., coordinator_node_id: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageStats, _Mapping]]] = ..., engine: _Optional[str] = ..., engine_reason: _Optional[str] = ..., state: _Optional[str] = ..., recent_generation_tps: _Optional[float] = ..., aliases: _Optional[_Iterable[str]] = ..., in_flight: _Optional[int] = ..., requests_served: _Optional[int] = ..., coordinator_address: _Optional[str] = ..., batch_size: _Optional[int] = ..., queued: _Optional[int] = ..., current_mtp_k: _Optional[int] = ..., min_nodes: _Optional[int] = ..., context_length: _Optional[int] = ..., mtp_opted_in_by: _Optional[str] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("model", "instance_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    instance_id: str
    def __init__(self, model: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: int
    def __init__(self, unloaded: _Optional[int] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ("local_only",)
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    local_only: bool
    def __init__(self, local_only: _Optional[bool] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("nodes", "instances")
    NODES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[ClusterNode]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, nodes: _Optional[_Iterable[_Union[ClusterNode, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class ClusterNode(_message.Message):
    __slots__ = ("node_id", "name", "address", "state", "memory_total_bytes", "memory_available_bytes", "chip", "last_seen_seconds_ago")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    address: str
    state: str
    memory_total_bytes: int
    memory_available_bytes: int
    chip: str
    last_seen_seconds_ago: float
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., chip: _Optional[str] = ..., last_seen_seconds_ago: _Optional[float] = ...) -> None: ...
