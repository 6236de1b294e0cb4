"""The InferenceService's messages as typed models, and their one conversion to protobuf and back.

One model per wire message: ``GenerateOptions`` is a ``GenerateRequest``, ``Delta`` a
``TextDelta``, ``FinalStats`` a ``GenerationStats``. The client converts with ``*_to_proto``
before sending and ``*_from_proto`` on what it receives; the node does the reverse at its
edge. Validation lives in the models, so the client (before sending) and the node (on
arrival, whoever sent the message) run the same checks with the same messages, and a bad
value always comes back as ``ValueError`` naming the field and the value.

Pure: no gRPC calls, no MLX.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.inference.events import TokenDelta
from node.inference.stats import ENGINE_KINDS, FinalStats, StageStats
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.validation import describe

UINT32 = 2**32 - 1
INT32 = 2**31 - 1

Delta = TokenDelta  # new text and its token ids: what engines stream is what callers get
StageInfo = StageStats


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# A model and its wire message mostly share their fields, name for name: those are copied
# here, once, and each converter names only the fields that change on the way (nested
# messages, None <-> the wire's zero value, floors). A field added to both needs no edit.


def _shared(model_type: type[BaseModel], message_type: Any) -> list[str]:
    fields = message_type.DESCRIPTOR.fields_by_name
    return [name for name in model_type.model_fields if name in fields]


def fields_to_proto(model: BaseModel, message_type: Any, **converted: Any) -> Any:
    """``model`` as ``message_type``: the fields both declare, as they are (None: unset),
    and ``converted`` for the rest."""
    values = {n: getattr(model, n) for n in _shared(type(model), message_type)}
    values.update(converted)
    return message_type(**{n: v for n, v in values.items() if v is not None})


def fields_from_proto(msg: Any, model_type: type[BaseModel], **converted: Any) -> dict[str, Any]:
    """The values ``model_type`` takes from ``msg``: the fields both declare (an unset
    optional field is None, repeated and map fields plain lists and dicts), and
    ``converted`` for the rest."""
    values: dict[str, Any] = {}
    for name in _shared(model_type, type(msg)):
        if name in converted:
            continue
        field = msg.DESCRIPTOR.fields_by_name[name]
        value = getattr(msg, name)
        if field.is_repeated:
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            value = dict(value) if is_map else list(value)
        elif field.has_presence and not msg.HasField(name):
            value = None
        values[name] = value
    values.update(converted)
    return values


# ----------------------------------------------------------------------------- the request


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(_Model):
    """Sampling options; the defaults are greedy decoding with every filter off."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=INT32)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = Field(default_factory=dict)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)

    @model_validator(mode="after")
    def _bias_ids_fit_the_wire(self) -> Self:
        for token in self.logit_bias:
            if not 0 <= token <= INT32:
                raise ValueError(f"logit_bias token id {token} is not in [0, {INT32}]")
        return self


class GenerateOptions(_Model):
    """Everything a Generate call carries; exactly one of prompt / messages / prompt_ids."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int = Field(0, ge=0, le=UINT32)  # 0 = the node's default
    sampling: Sampling = Field(default_factory=Sampling)
    engine: Literal["auto", "native_mtp", "local", "pipeline", "pipeline_mtp"] = "auto"
    mtp_k: int = Field(0, ge=0, le=UINT32)  # 0 = the card's default_k
    ignore_eos: bool = False
    raw: bool = False
    stop: list[str] = Field(default_factory=list)
    request_id: str = ""

    @field_validator("model")
    @classmethod
    def _model_named(cls, model: str) -> str:
        if not model:
            raise ValueError("model is empty: name a launched model or instance id")
        return model

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        given = [
            name for name in ("prompt", "messages", "prompt_ids") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of prompt, messages, prompt_ids (got {given or 'none'})"
            )
        if self.prompt == "":
            raise ValueError("prompt is empty")
        if self.messages == []:
            raise ValueError("messages is empty")
        if self.prompt_ids is not None:
            if not self.prompt_ids:
                raise ValueError("prompt_ids is empty")
            for i, token in enumerate(self.prompt_ids):
                if not 0 <= token <= UINT32:
                    raise ValueError(f"prompt_ids[{i}]={token} is not a token id in [0, 2**32)")
        return self


def options_to_proto(options: GenerateOptions) -> pb.GenerateRequest:
    request = fields_to_proto(
        options,
        pb.GenerateRequest,
        sampling=fields_to_proto(options.sampling, pb.SamplingParams),
        engine="" if options.engine == "auto" else options.engine,
        messages=None,  # the prompt's oneof: set below
        prompt_ids=None,
    )
    if options.prompt is not None:
        request.text = options.prompt
    elif options.messages is not None:
        request.messages.messages.extend(
            pb.ChatMessage(role=m.role, content=m.content) for m in options.messages
        )
    else:
        request.prompt_ids.ids.extend(options.prompt_ids or [])
    return request


def options_from_proto(msg: pb.GenerateRequest) -> GenerateOptions:
    """The typed request; ``ValueError`` naming every bad field. Proto zeros mean "unset"
    for top_p and repetition_penalty (see inference.proto)."""
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise ValueError("the request has no prompt: set text, prompt_ids or messages")
    s = msg.sampling
    fields: dict[str, object] = {
        "model": msg.model,
        "max_tokens": msg.max_tokens,
        "sampling": {
            "temperature": s.temperature,
            "top_p": s.top_p or 1.0,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "repetition_penalty": s.repetition_penalty or 1.0,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "logit_bias": dict(s.logit_bias),
            "seed": s.seed if s.HasField("seed") else None,
        },
        "engine": msg.engine or "auto",
        "mtp_k": msg.mtp_k,
        "ignore_eos": msg.ignore_eos,
        "raw": msg.raw,
        "stop": list(msg.stop),
        "request_id": msg.request_id,
    }
    if kind == "text":
        fields["prompt"] = msg.text
    elif kind == "prompt_ids":
        fields["prompt_ids"] = list(msg.prompt_ids.ids)
    else:
        fields["messages"] = [{"role": m.role, "content": m.content} for m in msg.messages.messages]
    try:
        return GenerateOptions.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


# ----------------------------------------------------------------------------- the events


def stats_to_proto(stats: FinalStats) -> pb.GenerationStats:
    return fields_to_proto(
        stats,
        pb.GenerationStats,
        stages=[stage_to_proto(s) for s in stats.stages],
        acceptance_rate=stats.acceptance_rate or 0.0,  # unset on the wire when None
    )


def stats_from_proto(msg: pb.GenerationStats) -> FinalStats:
    """``ValueError`` naming the field when a node sends what the contract does not allow
    (an unknown engine is an error, never silently another engine)."""
    if msg.engine not in ENGINE_KINDS:
        raise ValueError(f"engine={msg.engine!r} is not one of {', '.join(ENGINE_KINDS)}")
    try:
        return FinalStats(
            **fields_from_proto(
                msg,
                FinalStats,
                drafter_kind=msg.drafter_kind or None,
                acceptance_rate=msg.acceptance_rate if msg.proposed_draft_tokens else None,
                stages=[stage_from_proto(s) for s in msg.stages],
                queue_seconds=max(0.0, msg.queue_seconds),
                time_to_first_token_seconds=max(0.0, msg.time_to_first_token_seconds),
                stop_sequence=msg.stop_sequence or None,
            )
        )
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


def stage_to_proto(stage: StageStats) -> pb.StageStats:
    return fields_to_proto(stage, pb.StageStats)


def stage_from_proto(msg: pb.StageStats) -> StageStats:
    return StageStats(**fields_from_proto(msg, StageStats))


def event_to_proto(event: Delta | FinalStats) -> pb.GenerateResponse:
    if isinstance(event, FinalStats):
        return pb.GenerateResponse(final=stats_to_proto(event))
    return pb.GenerateResponse(delta=pb.TextDelta(text=event.text, token_ids=event.token_ids))


def event_from_proto(msg: pb.GenerateResponse) -> Delta | FinalStats:
    if msg.WhichOneof("event") == "final":
        return stats_from_proto(msg.final)
    return Delta(text=msg.delta.text, token_ids=list(msg.delta.token_ids))


# ----------------------------------------------------------------------------- the rest


class NativeMtp(_Model):
    default_k: int
    max_k: int


class ModelInfo(_Model):
    id: str
    model_type: str
    num_layers: int
    bytes: int
    context_length: int
    native_mtp: NativeMtp | None
    launched: bool
    has_weights: bool = False
    download_from: list[str] = []
    source: str = ""
    mtp_note: str = ""


class ClusterNode(_Model):
    node_id: str
    name: str
    address: str
    state: str
    memory_total_bytes: int
    memory_available_bytes: int
    chip: str
    last_seen_seconds_ago: float


class InstanceInfo(_Model):
    """An instance as status shows it, as peers see it and as clients receive it."""

    instance_id: str
    model: str  # MODEL as given to launch
    aliases: list[str] = Field(default_factory=list)  # other names that reach it
    coordinator_node_id: str
    coordinator_address: str = ""
    stages: list[StageStats]  # each stage's node and layer range
    engine: str
    engine_reason: str
    state: str
    recent_generation_tps: float = 0.0
    in_flight: int = 0
    requests_served: int = 0
    batch_size: int = 0  # requests computing together now
    queued: int = 0  # admitted, waiting for a place in the batch
    current_mtp_k: int | None = None  # native MTP: the K policy's latest choice
    min_nodes: int = 1  # as launched: a re-placement or a takeover honours them
    context_length: int | None = None
    # as launched: what opted it in to pipeline_mtp (--mtp-across-pipeline, MACMESH_PIPELINE_MTP=1)
    mtp_opted_in_by: str = ""

    def answers_to(self, name: str) -> bool:
        """Whether ``GenerateRequest.model == name`` reaches this instance."""
        return name in (self.instance_id, self.model) or name in self.aliases

    def to_proto(self) -> pb.Instance:
        return fields_to_proto(
            self,
            pb.Instance,
            stages=[stage_to_proto(s) for s in self.stages],
            context_length=self.context_length or 0,
        )

    @classmethod
    def from_proto(cls, msg: pb.Instance) -> InstanceInfo:
        return cls(
            **fields_from_proto(
                msg,
                cls,
                stages=[stage_from_proto(s) for s in msg.stages],
                min_nodes=max(1, msg.min_nodes),
                context_length=msg.context_length or None,
            )
        )


class ClusterStatus(_Model):
    nodes: list[ClusterNode]
    instances: list[InstanceInfo]


class PlannedStage(_Model):
    node_id: str
    start_layer: int
    end_layer: int  # exclusive
    bytes: int


class Placement(_Model):
    model: str
    stages: list[PlannedStage]
    total_bytes: int
    explanation: str


class LaunchMessage(_Model):
    """A human progress line while a launch loads."""

    kind: Literal["message"] = "message"
    message: str


class Launched(_Model):
    """The final launch event: the instance as it now runs."""

    kind: Literal["instance"] = "instance"
    instance: InstanceInfo


def model_info_from_proto(msg: pb.ModelInfo) -> ModelInfo:
    mtp = msg.native_mtp if msg.HasField("native_mtp") else None
    native_mtp = NativeMtp(default_k=mtp.default_k, max_k=mtp.max_k) if mtp else None
    return ModelInfo(**fields_from_proto(msg, ModelInfo, native_mtp=native_mtp))


def cluster_status_from_proto(msg: pb.ClusterStatusResponse) -> ClusterStatus:
    return ClusterStatus(
        nodes=[ClusterNode(**fields_from_proto(n, ClusterNode)) for n in msg.nodes],
        instances=[InstanceInfo.from_proto(i) for i in msg.instances],
    )


def placement_from_proto(msg: pb.Placement) -> Placement:
    stages = [PlannedStage(**fields_from_proto(s, PlannedStage)) for s in msg.stages]
    return Placement(**fields_from_proto(msg, Placement, stages=stages))


def launch_event_from_proto(msg: pb.LaunchProgress) -> LaunchMessage | Launched:
    if msg.WhichOneof("event") == "instance":
        return Launched(instance=InstanceInfo.from_proto(msg.instance))
    return LaunchMessage(message=msg.message)
