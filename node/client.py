"""A small typed client for a macmesh node's InferenceService.

Callers get pydantic models, never raw protobuf, and typed exceptions, never ``grpc.RpcError``:

    with MacmeshClient("127.0.0.1:52700") as client:
        for event in client.generate("qwen3.6-27b", "Hello", max_tokens=32):
            if isinstance(event, Delta):
                print(event.text, end="")
            else:  # FinalStats, always the last event
                print(event.engine, event.acceptance_rate)

Streams (``generate``, ``launch``) are iterators with ``close()``: closing one, leaving its
``with`` block, or dropping it cancels the RPC, so the node frees the request's caches.
``timeout`` is a gRPC deadline the server sees; an exceeded deadline raises ``DeadlineExceeded``.
``AsyncMacmeshClient`` is the same API on ``grpc.aio`` for asyncio programs (the gateway).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import inference_pb2_grpc as pb_grpc
from node.rpc import CHANNEL_OPTIONS, channel
from node.security import Security
from node.security import current as current_security
from node.validation import describe

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
DEFAULT_TIMEOUT = 600.0

_UINT32 = 2**32 - 1
_INT32 = 2**31 - 1


# ----------------------------------------------------------------------------- errors


class MacmeshError(Exception):
    """A failed call. ``code`` is the gRPC status, ``message`` the server's explanation."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidRequest(MacmeshError):
    """The request is wrong (INVALID_ARGUMENT / OUT_OF_RANGE, or rejected before sending)."""


class NotFound(MacmeshError):
    """The model or instance does not exist (NOT_FOUND)."""


class FailedPrecondition(MacmeshError):
    """The cluster is not in a state to do this (FAILED_PRECONDITION)."""


class ResourceExhausted(MacmeshError):
    """Not enough memory, or too many requests in flight (RESOURCE_EXHAUSTED)."""


class Unavailable(MacmeshError):
    """The node or a stage cannot be reached (UNAVAILABLE)."""


class DeadlineExceeded(MacmeshError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""


class Cancelled(MacmeshError):
    """The call was cancelled (CANCELLED), usually by closing its stream."""


class Unimplemented(MacmeshError):
    """The node does not implement this call (UNIMPLEMENTED)."""


class Unauthenticated(MacmeshError):
    """The node wants the cluster secret, or a different one (UNAUTHENTICATED)."""


class InternalError(MacmeshError):
    """The server failed (INTERNAL, UNKNOWN, DATA_LOSS, ...)."""


_ERRORS_BY_CODE: dict[grpc.StatusCode, type[MacmeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_for(code: grpc.StatusCode, details: str | None) -> MacmeshError:
    """The typed exception for a gRPC status, carrying the server's message."""
    message = details or f"call failed with {code.name}"
    return _ERRORS_BY_CODE.get(code, InternalError)(message, code)


def error_from_rpc(error: grpc.RpcError) -> MacmeshError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    return error_for(code, details)


def _invalid(exc: ValidationError) -> InvalidRequest:
    return InvalidRequest(describe(exc), grpc.StatusCode.INVALID_ARGUMENT)


# ----------------------------------------------------------------------------- messages


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Delta(_Model):
    """New text and the token ids it came from."""

    kind: Literal["delta"] = "delta"
    text: str
    token_ids: list[int] = Field(default_factory=list)


class StageInfo(_Model):
    node_id: str
    address: str
    start_layer: int
    end_layer: int


class FinalStats(_Model):
    """The last event of every generation."""

    kind: Literal["final"] = "final"
    engine: str
    engine_reason: str
    drafter_kind: str | None  # None when no drafter ran
    num_draft_tokens: int
    proposed_draft_tokens: int
    accepted_draft_tokens: int
    acceptance_rate: float
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    stages: list[StageInfo]
    finish_reason: str  # stop | length | cancelled
    stop_sequence: str | None = None  # the stop string that ended it (finish_reason "stop")


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


class Instance(_Model):
    instance_id: str
    model: str
    coordinator_node_id: str
    stages: list[StageInfo]
    engine: str
    engine_reason: str
    state: str
    recent_generation_tps: float


class ClusterStatus(_Model):
    nodes: list[ClusterNode]
    instances: list[Instance]


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
    instance: Instance


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(_Model):
    """Sampling options; the defaults are greedy decoding with every filter off."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=_INT32)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = Field(default_factory=dict)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)

    @model_validator(mode="after")
    def _bias_ids_fit_the_wire(self) -> Self:
        for token in self.logit_bias:
            if not 0 <= token <= _INT32:
                raise ValueError(f"logit_bias token id {token} is not in [0, {_INT32}]")
        return self


class GenerateOptions(_Model):
    """Everything a Generate call carries; exactly one of prompt / messages / prompt_ids."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int = Field(0, ge=0, le=_UINT32)  # 0 = the server default
    sampling: Sampling = Field(default_factory=Sampling)
    engine: Literal["auto", "native_mtp", "local", "pipeline"] = "auto"
    mtp_k: int = Field(0, ge=0, le=_UINT32)  # 0 = the card's default_k
    ignore_eos: bool = False
    raw: bool = False
    stop: list[str] = Field(default_factory=list)
    request_id: str = ""

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        given = [
            name for name in ("prompt", "messages", "prompt_ids") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of prompt, messages, prompt_ids (got {given or 'none'})"
            )
        bad = next((i for i, t in enumerate(self.prompt_ids or ()) if not 0 <= t <= _UINT32), None)
        if bad is not None:  # the first bad one, not the whole list
            raise ValueError(
                f"prompt_ids[{bad}]={self.prompt_ids[bad]!r} is not a token id in [0, 2**32)"
            )
        return self


# ----------------------------------------------------------------------------- conversions


def to_generate_request(options: GenerateOptions) -> pb.GenerateRequest:
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


def _stage(msg: pb.StageStats) -> StageInfo:
    return StageInfo(
        node_id=msg.node_id,
        address=msg.address,
        start_layer=msg.start_layer,
        end_layer=msg.end_layer,
    )


def final_stats(msg: pb.GenerationStats) -> FinalStats:
    return FinalStats(
        engine=msg.engine,
        engine_reason=msg.engine_reason,
        drafter_kind=msg.drafter_kind or None,
        num_draft_tokens=msg.num_draft_tokens,
        proposed_draft_tokens=msg.proposed_draft_tokens,
        accepted_draft_tokens=msg.accepted_draft_tokens,
        acceptance_rate=msg.acceptance_rate,
        prompt_tokens=msg.prompt_tokens,
        generation_tokens=msg.generation_tokens,
        prompt_tps=msg.prompt_tps,
        generation_tps=msg.generation_tps,
        stages=[_stage(s) for s in msg.stages],
        finish_reason=msg.finish_reason,
        stop_sequence=msg.stop_sequence or None,
    )


def generate_event(msg: pb.GenerateResponse) -> Delta | FinalStats:
    if msg.WhichOneof("event") == "final":
        return final_stats(msg.final)
    return Delta(text=msg.delta.text, token_ids=list(msg.delta.token_ids))


def model_info(msg: pb.ModelInfo) -> ModelInfo:
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


def instance(msg: pb.Instance) -> Instance:
    return Instance(
        instance_id=msg.instance_id,
        model=msg.model,
        coordinator_node_id=msg.coordinator_node_id,
        stages=[_stage(s) for s in msg.stages],
        engine=msg.engine,
        engine_reason=msg.engine_reason,
        state=msg.state,
        recent_generation_tps=msg.recent_generation_tps,
    )


def cluster_status(msg: pb.ClusterStatusResponse) -> ClusterStatus:
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
    return ClusterStatus(nodes=nodes, instances=[instance(i) for i in msg.instances])


def placement(msg: pb.Placement) -> Placement:
    stages = [
        PlannedStage(
            node_id=s.node_id, start_layer=s.start_layer, end_layer=s.end_layer, bytes=s.bytes
        )
        for s in msg.stages
    ]
    return Placement(
        model=msg.model, stages=stages, total_bytes=msg.total_bytes, explanation=msg.explanation
    )


def launch_event(msg: pb.LaunchProgress) -> LaunchMessage | Launched:
    if msg.WhichOneof("event") == "instance":
        return Launched(instance=instance(msg.instance))
    return LaunchMessage(message=msg.message)


def generate_options(
    model: str,
    prompt: str | None,
    *,
    messages: Sequence[ChatMessage | Mapping[str, str]] | None,
    prompt_ids: Sequence[int] | None,
    max_tokens: int,
    sampling: Sampling | Mapping[str, Any] | None,
    engine: str,
    mtp_k: int,
    ignore_eos: bool,
    raw: bool,
    stop: Sequence[str],
    request_id: str,
) -> GenerateOptions:
    """Validate a Generate call's arguments locally; bad ones raise InvalidRequest."""
    try:
        return GenerateOptions.model_validate(
            {
                "model": model,
                "prompt": prompt,
                "messages": None if messages is None else list(messages),
                "prompt_ids": None if prompt_ids is None else list(prompt_ids),
                "max_tokens": max_tokens,
                "sampling": sampling if sampling is not None else Sampling(),
                "engine": engine or "auto",
                "mtp_k": mtp_k,
                "ignore_eos": ignore_eos,
                "raw": raw,
                "stop": list(stop),
                "request_id": request_id,
            }
        )
    except ValidationError as exc:
        raise _invalid(exc) from None


# ----------------------------------------------------------------------------- streams

T = TypeVar("T")


class Stream(Generic[T]):
    """An iterator over a server-streaming call; close() (or ``with``) cancels the call."""

    def __init__(self, call: Any, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._convert = convert

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            message = next(self._call)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return self._convert(message)

    def wait_started(self) -> None:
        """Block until the server accepted the call; raise its error if it refused it.

        A server sends its response headers (gRPC initial metadata) once it has validated and
        admitted the request, or with the first message at the latest."""
        try:
            self._call.initial_metadata()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        if self._call.done() and self._call.code() != grpc.StatusCode.OK:
            raise error_for(self._call.code(), self._call.details())

    def cancel(self) -> None:
        """Cancel the call; a no-op when it has already finished."""
        self._call.cancel()

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A dropped stream frees the server's request too (gRPC may be half torn down at exit).
        with contextlib.suppress(Exception):
            self._call.cancel()


class AsyncStream(Generic[T]):
    """The asyncio twin of Stream: ``async for``, ``aclose()`` / ``async with`` cancel the call."""

    def __init__(self, call: Any, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._convert = convert

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            message = await self._call.read()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return self._convert(message)

    async def wait_started(self) -> None:
        """Return once the server accepted the call; raise its error if it refused it
        (see ``Stream.wait_started``)."""
        try:
            await self._call.initial_metadata()
            if self._call.done():
                code = await self._call.code()
                if code != grpc.StatusCode.OK:
                    raise error_for(code, await self._call.details())
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def cancel(self) -> None:
        """Cancel the call; a no-op when it has already finished."""
        self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


# ----------------------------------------------------------------------------- clients


class _ClientBase:
    def __init__(self, address: str, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        self.address = address
        self.timeout = timeout

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class MacmeshClient(_ClientBase):
    """A blocking client. ``timeout`` (seconds, None = no deadline) is every call's default."""

    def __init__(
        self,
        address: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        security: Security | None = None,
    ) -> None:
        """``security`` (cluster secret, TLS CA) defaults to ``MACMESH_CLUSTER_SECRET`` /
        ``MACMESH_CLUSTER_SECRET_FILE`` / ``MACMESH_TLS_CA`` from the environment."""
        super().__init__(address, timeout)
        self._channel = (
            channel(address)
            if security is None
            else security.secure_channel(address, CHANNEL_OPTIONS)
        )
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | Mapping[str, str]] | None = None,
        prompt_ids: Sequence[int] | None = None,
        max_tokens: int = 0,
        sampling: Sampling | Mapping[str, Any] | None = None,
        engine: str = "auto",
        mtp_k: int = 0,
        ignore_eos: bool = False,
        raw: bool = False,
        stop: Sequence[str] = (),
        request_id: str = "",
        timeout: float | None = None,
    ) -> Stream[Delta | FinalStats]:
        """Stream Delta events, then one FinalStats. Bad arguments raise InvalidRequest here."""
        options = generate_options(
            model,
            prompt,
            messages=messages,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling,
            engine=engine,
            mtp_k=mtp_k,
            ignore_eos=ignore_eos,
            raw=raw,
            stop=stop,
            request_id=request_id,
        )
        call = self._stub.Generate(to_generate_request(options), timeout=self._deadline(timeout))
        return Stream(call, generate_event)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [model_info(m) for m in reply.models]

    def cluster_status(self, *, timeout: float | None = None) -> ClusterStatus:
        return cluster_status(
            self._unary(self._stub.ClusterStatus, pb.ClusterStatusRequest(), timeout)
        )

    def place(
        self,
        model: str,
        *,
        min_nodes: int = 0,
        context_length: int = 0,
        timeout: float | None = None,
    ) -> Placement:
        request = pb.PlaceRequest(
            model=model,
            min_nodes=_uint32("min_nodes", min_nodes),
            context_length=_uint32("context_length", context_length),
        )
        return placement(self._unary(self._stub.Place, request, timeout))

    def launch(
        self,
        model: str,
        *,
        min_nodes: int = 0,
        context_length: int = 0,
        pull: bool = False,
        timeout: float | None = None,
    ) -> Stream[LaunchMessage | Launched]:
        request = pb.LaunchRequest(
            model=model,
            min_nodes=_uint32("min_nodes", min_nodes),
            context_length=_uint32("context_length", context_length),
            pull=pull,
        )
        return Stream(self._stub.Launch(request, timeout=self._deadline(timeout)), launch_event)

    def unload(
        self, model: str = "", *, instance_id: str = "", timeout: float | None = None
    ) -> int:
        """Unload a model's instances (or one instance); returns how many were unloaded."""
        request = pb.UnloadRequest(model=model, instance_id=instance_id)
        return self._unary(self._stub.Unload, request, timeout).unloaded

    def check_health(self, *, timeout: float = 2.0) -> None:
        """Return when the node serves InferenceService; raise Unavailable (or NotFound) if not."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        reply = self._unary(self._health.Check, request, timeout)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise Unavailable(f"{SERVICE_NAME} on {self.address} is not serving")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None


class AsyncMacmeshClient(_ClientBase):
    """The asyncio client; create it inside the running event loop (grpc.aio's rule)."""

    def __init__(
        self,
        address: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        security: Security | None = None,
    ) -> None:
        super().__init__(address, timeout)
        sec = security or current_security()
        self._channel = sec.aio_channel(address, CHANNEL_OPTIONS)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | Mapping[str, str]] | None = None,
        prompt_ids: Sequence[int] | None = None,
        max_tokens: int = 0,
        sampling: Sampling | Mapping[str, Any] | None = None,
        engine: str = "auto",
        mtp_k: int = 0,
        ignore_eos: bool = False,
        raw: bool = False,
        stop: Sequence[str] = (),
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncStream[Delta | FinalStats]:
        options = generate_options(
            model,
            prompt,
            messages=messages,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling,
            engine=engine,
            mtp_k=mtp_k,
            ignore_eos=ignore_eos,
            raw=raw,
            stop=stop,
            request_id=request_id,
        )
        return self.generate_with(options, timeout=timeout)

    def generate_with(
        self, options: GenerateOptions, *, timeout: float | None = None
    ) -> AsyncStream[Delta | FinalStats]:
        """Generate from already-validated options (what the gateway builds)."""
        call = self._stub.Generate(to_generate_request(options), timeout=self._deadline(timeout))
        return AsyncStream(call, generate_event)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [model_info(m) for m in reply.models]

    async def cluster_status(self, *, timeout: float | None = None) -> ClusterStatus:
        reply = await self._unary(self._stub.ClusterStatus, pb.ClusterStatusRequest(), timeout)
        return cluster_status(reply)

    async def place(
        self,
        model: str,
        *,
        min_nodes: int = 0,
        context_length: int = 0,
        timeout: float | None = None,
    ) -> Placement:
        request = pb.PlaceRequest(
            model=model,
            min_nodes=_uint32("min_nodes", min_nodes),
            context_length=_uint32("context_length", context_length),
        )
        return placement(await self._unary(self._stub.Place, request, timeout))

    def launch(
        self,
        model: str,
        *,
        min_nodes: int = 0,
        context_length: int = 0,
        pull: bool = False,
        timeout: float | None = None,
    ) -> AsyncStream[LaunchMessage | Launched]:
        request = pb.LaunchRequest(
            model=model,
            min_nodes=_uint32("min_nodes", min_nodes),
            context_length=_uint32("context_length", context_length),
            pull=pull,
        )
        call = self._stub.Launch(request, timeout=self._deadline(timeout))
        return AsyncStream(call, launch_event)

    async def unload(
        self, model: str = "", *, instance_id: str = "", timeout: float | None = None
    ) -> int:
        request = pb.UnloadRequest(model=model, instance_id=instance_id)
        return (await self._unary(self._stub.Unload, request, timeout)).unloaded

    async def check_health(self, *, timeout: float = 2.0) -> None:
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        reply = await self._unary(self._health.Check, request, timeout)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise Unavailable(f"{SERVICE_NAME} on {self.address} is not serving")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None


def _uint32(name: str, value: int) -> int:
    if not 0 <= value <= _UINT32:
        raise InvalidRequest(
            f"{name}={value!r} is not in [0, {_UINT32}]", grpc.StatusCode.INVALID_ARGUMENT
        )
    return value
