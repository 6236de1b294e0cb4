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

from typing import Literal, Self

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
    s = options.sampling
    sampling = pb.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logit_bias=s.logit_bias,
    )
    if s.seed is not None:
        sampling.seed = s.seed
    request = pb.GenerateRequest(
        model=options.model,
        max_tokens=options.max_tokens,
        sampling=sampling,
        engine="" if options.engine == "auto" else options.engine,
        mtp_k=options.mtp_k,
        ignore_eos=options.ignore_eos,
        raw=options.raw,
        stop=options.stop,
        request_id=options.request_id,
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
    return pb.GenerationStats(
        engine=stats.engine,
        engine_reason=stats.engine_reason,
        drafter_kind=stats.drafter_kind or "",
        num_draft_tokens=stats.num_draft_tokens,
        draft_k_histogram=stats.draft_k_histogram,
        proposed_draft_tokens=stats.proposed_draft_tokens,
        accepted_draft_tokens=stats.accepted_draft_tokens,
        acceptance_rate=stats.acceptance_rate or 0.0,  # unset on the wire when None
        prompt_tokens=stats.prompt_tokens,
        cached_prompt_tokens=stats.cached_prompt_tokens,
        generation_tokens=stats.generation_tokens,
        prompt_tps=stats.prompt_tps,
        generation_tps=stats.generation_tps,
        stages=[stage_to_proto(s) for s in stats.stages],
        finish_reason=stats.finish_reason,
        queue_seconds=stats.queue_seconds,
        time_to_first_token_seconds=stats.time_to_first_token_seconds,
        stop_sequence=stats.stop_sequence or "",
    )


def stats_from_proto(msg: pb.GenerationStats) -> FinalStats:
    """``ValueError`` naming the field when a node sends what the contract does not allow
    (an unknown engine is an error, never silently another engine)."""
    if msg.engine not in ENGINE_KINDS:
        raise ValueError(f"engine={msg.engine!r} is not one of {', '.join(ENGINE_KINDS)}")
    try:
        return FinalStats(
            engine=msg.engine,  # type: ignore[arg-type]
            engine_reason=msg.engine_reason,
            drafter_kind=msg.drafter_kind or None,  # type: ignore[arg-type]
            num_draft_tokens=msg.num_draft_tokens,
            draft_k_histogram=list(msg.draft_k_histogram),
            proposed_draft_tokens=msg.proposed_draft_tokens,
            accepted_draft_tokens=msg.accepted_draft_tokens,
            acceptance_rate=msg.acceptance_rate if msg.proposed_draft_tokens else None,
            prompt_tokens=msg.prompt_tokens,
            cached_prompt_tokens=msg.cached_prompt_tokens,
            generation_tokens=msg.generation_tokens,
            prompt_tps=msg.prompt_tps,
            generation_tps=msg.generation_tps,
            stages=[stage_from_proto(s) for s in msg.stages],
            finish_reason=msg.finish_reason,  # type: ignore[arg-type]
            queue_seconds=max(0.0, msg.queue_seconds),
            time_to_first_token_seconds=max(0.0, msg.time_to_first_token_seconds),
            stop_sequence=msg.stop_sequence or None,
        )
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


def stage_to_proto(stage: StageStats) -> pb.StageStats:
    return pb.StageStats(
        node_id=stage.node_id,
        address=stage.address,
        start_layer=stage.start_layer,
        end_layer=stage.end_layer,
    )


def stage_from_proto(msg: pb.StageStats) -> StageStats:
    return StageStats(
        node_id=msg.node_id,
        address=msg.address,
        start_layer=msg.start_layer,
        end_layer=msg.end_layer,
    )


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
        return pb.Instance(
            instance_id=self.instance_id,
            model=self.model,
            coordinator_node_id=self.coordinator_node_id,
            stages=[stage_to_proto(s) for s in self.stages],
            engine=self.engine,
            engine_reason=self.engine_reason,
            state=self.state,
            recent_generation_tps=self.recent_generation_tps,
            aliases=self.aliases,
            in_flight=self.in_flight,
            requests_served=self.requests_served,
            coordinator_address=self.coordinator_address,
            batch_size=self.batch_size,
            queued=self.queued,
            current_mtp_k=self.current_mtp_k,
            min_nodes=self.min_nodes,
            context_length=self.context_length or 0,
            mtp_opted_in_by=self.mtp_opted_in_by,
        )

    @classmethod
    def from_proto(cls, msg: pb.Instance) -> InstanceInfo:
        return cls(
            instance_id=msg.instance_id,
            model=msg.model,
            aliases=list(msg.aliases),
            coordinator_node_id=msg.coordinator_node_id,
            coordinator_address=msg.coordinator_address,
            stages=[stage_from_proto(s) for s in msg.stages],
            engine=msg.engine,
            engine_reason=msg.engine_reason,
            state=msg.state,
            recent_generation_tps=msg.recent_generation_tps,
            in_flight=msg.in_flight,
            requests_served=msg.requests_served,
            batch_size=msg.batch_size,
            queued=msg.queued,
            current_mtp_k=msg.current_mtp_k if msg.HasField("current_mtp_k") else None,
            min_nodes=max(1, msg.min_nodes),
            context_length=msg.context_length or None,
            mtp_opted_in_by=msg.mtp_opted_in_by,
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
    return ModelInfo(
        id=msg.id,
        model_type=msg.model_type,
        num_layers=msg.num_layers,
        bytes=msg.bytes,
        context_length=msg.context_length,
        native_mtp=NativeMtp(default_k=mtp.default_k, max_k=mtp.max_k) if mtp else None,
        launched=msg.launched,
        has_weights=msg.has_weights,
        download_from=list(msg.download_from),
        source=msg.source,
        mtp_note=msg.mtp_note,
    )


def cluster_status_from_proto(msg: pb.ClusterStatusResponse) -> ClusterStatus:
    nodes = [
        ClusterNode(
            node_id=n.node_id,
            name=n.name,
            address=n.address,
            state=n.state,
            memory_total_bytes=n.memory_total_bytes,
            memory_available_bytes=n.memory_available_bytes,
            chip=n.chip,
            last_seen_seconds_ago=n.last_seen_seconds_ago,
        )
        for n in msg.nodes
    ]
    return ClusterStatus(nodes=nodes, instances=[InstanceInfo.from_proto(i) for i in msg.instances])


def placement_from_proto(msg: pb.Placement) -> Placement:
    stages = [
        PlannedStage(
            node_id=s.node_id, start_layer=s.start_layer, end_layer=s.end_layer, bytes=s.bytes
        )
        for s in msg.stages
    ]
    return Placement(
        model=msg.model, stages=stages, total_bytes=msg.total_bytes, explanation=msg.explanation
    )


def launch_event_from_proto(msg: pb.LaunchProgress) -> LaunchMessage | Launched:
    if msg.WhichOneof("event") == "instance":
        return Launched(instance=InstanceInfo.from_proto(msg.instance))
    return LaunchMessage(message=msg.message)
