"""The typed gRPC client for a macmesh node's InferenceService.

Callers get pydantic models (node.messages), never raw protobuf, and typed exceptions, never
``grpc.RpcError``:

    with MacmeshClient("127.0.0.1:52700") as client:
        for event in client.generate("qwen3.6-27b", "Hello", max_tokens=32):
            if isinstance(event, Delta):
                print(event.text, end="")
            else:  # FinalStats, always the last event
                print(event.engine, event.acceptance_rate)

Streams (``generate``, ``launch``) are iterators with ``close()``: closing one, leaving its
``with`` block, or dropping it cancels the RPC, so the node frees the request's caches.
``timeout`` is a gRPC deadline the server sees; an exceeded deadline raises ``DeadlineExceeded``.

``AsyncMacmeshClient`` (``grpc.aio``, what the gateway uses) is the one implementation.
``MacmeshClient`` is a thin blocking wrapper: it runs an ``AsyncMacmeshClient`` on a private
event loop thread and waits for each result, so both have the same calls, checks and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, Generic, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from node.messages import (
    ChatMessage,
    ClusterNode,
    ClusterStatus,
    Delta,
    FinalStats,
    GenerateOptions,
    InstanceInfo,
    Launched,
    LaunchMessage,
    ModelInfo,
    NativeMtp,
    Placement,
    PlannedStage,
    Sampling,
    StageInfo,
    cluster_status_from_proto,
    describe,
    event_from_proto,
    launch_event_from_proto,
    model_info_from_proto,
    options_to_proto,
    placement_from_proto,
)
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import inference_pb2_grpc as pb_grpc
from node.rpc import CHANNEL_OPTIONS
from node.security import Security
from node.security import current as current_security

__all__ = [
    "AsyncMacmeshClient",
    "ChatMessage",
    "ClusterNode",
    "ClusterStatus",
    "Delta",
    "FinalStats",
    "GenerateOptions",
    "InstanceInfo",
    "LaunchMessage",
    "Launched",
    "MacmeshClient",
    "MacmeshError",
    "ModelInfo",
    "NativeMtp",
    "Placement",
    "PlannedStage",
    "Sampling",
    "StageInfo",
]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
DEFAULT_TIMEOUT = 600.0

_UINT32 = 2**32 - 1
T = TypeVar("T")


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


def _uint32(name: str, value: int) -> int:
    if not 0 <= value <= _UINT32:
        raise InvalidRequest(
            f"{name}={value!r} is not in [0, {_UINT32}]", grpc.StatusCode.INVALID_ARGUMENT
        )
    return value


def _received(convert: Callable[[Any], T]) -> Callable[[Any], T]:
    """``convert`` for what a node sent; a message outside the contract is the node's fault."""

    def checked(message: Any) -> T:
        try:
            return convert(message)
        except ValueError as exc:
            raise InternalError(f"the node sent an invalid message: {exc}") from None

    return checked


def generate_options(
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
) -> GenerateOptions:
    """A Generate call's arguments as validated options; bad ones raise InvalidRequest."""
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
        raise InvalidRequest(describe(exc), grpc.StatusCode.INVALID_ARGUMENT) from None


# ----------------------------------------------------------------------------- the implementation


class AsyncStream(Generic[T]):
    """A server-streaming call: ``async for``; ``aclose()`` / ``async with`` cancel the call."""

    def __init__(self, call: Any, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._convert = _received(convert)

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            message = await self._call.read()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # our caller is being cancelled
                raise
            # The call was cancelled (close() / cancel()): the blocking client's error.
            raise Cancelled("the call was cancelled", grpc.StatusCode.CANCELLED) from None
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return self._convert(message)

    async def wait_started(self) -> None:
        """Return once the server accepted the call; raise its error if it refused it.

        A node sends its response headers (gRPC initial metadata) once it has validated and
        admitted the request, or with the first message at the latest."""
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

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncMacmeshClient:
    """The client on ``grpc.aio``; create it inside the running event loop (grpc.aio's rule).
    ``timeout`` (seconds, None = no deadline) is every call's default."""

    def __init__(
        self,
        address: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        security: Security | None = None,
    ) -> None:
        """``security`` (cluster secret, TLS CA) defaults to ``MACMESH_CLUSTER_SECRET`` /
        ``MACMESH_CLUSTER_SECRET_FILE`` / ``MACMESH_TLS_CA`` from the environment."""
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        self.address = address
        self.timeout = timeout
        sec = security or current_security()
        self._channel = sec.aio_channel(address, CHANNEL_OPTIONS)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(
        self, model: str, prompt: str | None = None, *, timeout: float | None = None, **options: Any
    ) -> AsyncStream[Delta | FinalStats]:
        """Stream Delta events, then one FinalStats. ``options`` are GenerateOptions' fields
        (messages, prompt_ids, max_tokens, sampling, engine, mtp_k, ignore_eos, raw, stop,
        request_id); bad ones raise InvalidRequest here, before anything is sent."""
        return self.generate_with(generate_options(model, prompt, **options), timeout=timeout)

    def generate_with(
        self, options: GenerateOptions, *, timeout: float | None = None
    ) -> AsyncStream[Delta | FinalStats]:
        """Generate from already-validated options (what the gateway builds)."""
        call = self._stub.Generate(options_to_proto(options), timeout=self._deadline(timeout))
        return AsyncStream(call, event_from_proto)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_received(model_info_from_proto)(m) for m in reply.models]

    async def cluster_status(self, *, timeout: float | None = None) -> ClusterStatus:
        reply = await self._unary(self._stub.ClusterStatus, pb.ClusterStatusRequest(), timeout)
        return _received(cluster_status_from_proto)(reply)

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
        return _received(placement_from_proto)(
            await self._unary(self._stub.Place, request, timeout)
        )

    def launch(
        self,
        model: str,
        *,
        min_nodes: int = 0,
        context_length: int = 0,
        pull: bool = False,
        mtp_across_pipeline: bool = False,
        timeout: float | None = None,
    ) -> AsyncStream[LaunchMessage | Launched]:
        """Stream progress lines, then the instance; ``pull`` downloads what is missing;
        ``mtp_across_pipeline`` gives a multi-node instance native MTP (``pipeline_mtp``)."""
        request = pb.LaunchRequest(
            model=model,
            min_nodes=_uint32("min_nodes", min_nodes),
            context_length=_uint32("context_length", context_length),
            pull=pull,
            mtp_across_pipeline=mtp_across_pipeline,
        )
        call = self._stub.Launch(request, timeout=self._deadline(timeout))
        return AsyncStream(call, launch_event_from_proto)

    async def unload(
        self, model: str = "", *, instance_id: str = "", timeout: float | None = None
    ) -> int:
        """Unload a model's instances (or one instance); returns how many were unloaded."""
        request = pb.UnloadRequest(model=model, instance_id=instance_id)
        return (await self._unary(self._stub.Unload, request, timeout)).unloaded

    async def check_health(self, *, timeout: float = 2.0) -> None:
        """Return when the node serves InferenceService; raise Unavailable (or NotFound) if not."""
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

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None


# ----------------------------------------------------------------------------- the sync wrapper


class _Loop:
    """A private event loop on a daemon thread, where a blocking client runs the async one."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="macmesh-client", daemon=True
        )
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the loop soon, without waiting (a no-op once the loop is closed)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        self.call(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(10)
            self._loop.close()


async def _step(stream: AsyncStream[T]) -> tuple[bool, T | None]:
    try:
        return True, await stream.__anext__()
    except StopAsyncIteration:
        return False, None


class Stream(Generic[T]):
    """The blocking view of an ``AsyncStream``: an iterator; close() (or ``with``) cancels."""

    def __init__(self, stream: AsyncStream[T], loop: _Loop) -> None:
        self._stream = stream
        self._loop = loop

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        more, event = self._loop.run(_step(self._stream))
        if not more:
            raise StopIteration
        return event  # type: ignore[return-value]

    def wait_started(self) -> None:
        """Block until the server accepted the call; raise its error if it refused it."""
        self._loop.run(self._stream.wait_started())

    def cancel(self) -> None:
        """Cancel the call; a no-op when it has already finished."""
        self._loop.call(self._stream.cancel)

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A dropped stream frees the server's request too.
        with contextlib.suppress(Exception):
            self.cancel()


class MacmeshClient:
    """The blocking client: the same calls as ``AsyncMacmeshClient``, waited for."""

    def __init__(
        self,
        address: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        security: Security | None = None,
    ) -> None:
        self._loop = _Loop()

        async def make() -> AsyncMacmeshClient:
            return AsyncMacmeshClient(address, timeout, security=security)

        try:
            self._client = self._loop.run(make())
        except BaseException:
            self._loop.stop()
            raise
        self.address = address
        self.timeout = timeout

    def generate(
        self, model: str, prompt: str | None = None, *, timeout: float | None = None, **options: Any
    ) -> Stream[Delta | FinalStats]:
        """See ``AsyncMacmeshClient.generate``."""
        return self.generate_with(generate_options(model, prompt, **options), timeout=timeout)

    def generate_with(
        self, options: GenerateOptions, *, timeout: float | None = None
    ) -> Stream[Delta | FinalStats]:
        return self._stream(self._client.generate_with, options, timeout=timeout)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return self._loop.run(self._client.list_models(timeout=timeout))

    def cluster_status(self, *, timeout: float | None = None) -> ClusterStatus:
        return self._loop.run(self._client.cluster_status(timeout=timeout))

    def place(self, model: str, **kwargs: Any) -> Placement:
        """See ``AsyncMacmeshClient.place`` (min_nodes, context_length, timeout)."""
        return self._loop.run(self._client.place(model, **kwargs))

    def launch(self, model: str, **kwargs: Any) -> Stream[LaunchMessage | Launched]:
        """See ``AsyncMacmeshClient.launch`` (min_nodes, context_length, pull,
        mtp_across_pipeline, timeout)."""
        return self._stream(self._client.launch, model, **kwargs)

    def unload(self, model: str = "", **kwargs: Any) -> int:
        """Unload a model's instances (or one: ``instance_id=``); returns how many."""
        return self._loop.run(self._client.unload(model, **kwargs))

    def check_health(self, *, timeout: float = 2.0) -> None:
        self._loop.run(self._client.check_health(timeout=timeout))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self._client.close())
        self._loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stream(self, start: Callable[..., AsyncStream[T]], *args: Any, **kwargs: Any) -> Stream[T]:
        async def begin() -> AsyncStream[T]:  # grpc.aio calls start on their loop
            return start(*args, **kwargs)

        return Stream(self._loop.run(begin()), self._loop)
