"""Pipeline stages: a loaded layer range, its per-request caches, and the Forward stream.

A ``StageRuntime`` is one loaded shard of one instance on this node. Its ``SerialWorker`` runs
every forward pass and every downstream send, in arrival order. A ``StageSession`` is one
upstream Forward stream into the runtime: it validates frames as they arrive (unknown request,
wrong width or dtype, oversized, out-of-order positions all become a per-request
INVALID_ARGUMENT ``StageError``; the stream and the other requests go on), hands complete work
to the worker, and owns the session's ``ForwardLink`` to the next hop. Responses from
downstream (tokens, release acks, errors) are relayed back up the session unchanged.

The last stage applies the final norm + LM head to the final position of a frame marked
``sample`` and draws the token with the request's sampling parameters, mlx-lm style (history =
every token id the request has fed so far, one PRNG subkey per sampled token).

``StageService`` is the gRPC servicer; ``python -m node.inference.stage --port N`` serves it
alone (benchmarks, tests); `macmesh run` hosts the same servicer (node.cluster.service).
"""

from __future__ import annotations

import argparse
import itertools
import queue
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import mlx.core as mx
import mlx.nn as nn
from pydantic import ValidationError

from node import rpc
from node.inference.codec import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_TENSOR_BYTES,
    FrameError,
    RawTensor,
    TensorAssembler,
    dtype_name,
    encode_tensor,
    wire_dtype,
)
from node.inference.integrity import CorruptCheckpoint
from node.inference.link import INSTANCE_METADATA_KEY, ForwardLink, SerialWorker, stage_channel
from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    greedy_tokens,
    processed_logprobs,
    sample_tokens,
)
from node.inference.shard import Shard, ShardError, load_shard
from node.logging import get_logger
from node.placement.resolve import checkpoint_resolver
from node.proto.macmesh.v1 import stage_pb2 as pb
from node.proto.macmesh.v1 import stage_pb2_grpc as pb_grpc

log = get_logger(__name__)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]

ModelResolver = Callable[[str], Path]
Emit = Callable[[pb.ForwardResponse], None]


# ---- sampling options on the wire ----


def sampling_to_proto(params: SamplingParams) -> pb.SamplingOptions:
    options = pb.SamplingOptions(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        penalty_context_size=params.penalty_context_size,
        logit_bias=params.logit_bias,
    )
    if params.seed is not None:
        options.seed = params.seed
    return options


def sampling_from_proto(options: pb.SamplingOptions) -> SamplingParams:
    """SamplingParams from the wire; raises FrameError naming an invalid value."""
    try:
        return SamplingParams(
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            repetition_penalty=options.repetition_penalty,
            repetition_context_size=options.repetition_context_size,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            penalty_context_size=options.penalty_context_size,
            logit_bias=dict(options.logit_bias),
            seed=options.seed if options.HasField("seed") else None,
        )
    except ValidationError as exc:
        raise FrameError(
            f"invalid sampling options: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}"
        ) from None


def models_dir_resolver(models_dir: Path | None) -> ModelResolver:
    """MODEL as a checkpoint directory: a path, or a name under ``models_dir``."""

    def resolve(model: str) -> Path:
        candidates = [Path(model).expanduser()]
        if models_dir is not None:
            candidates += [models_dir / model, models_dir / model.replace("/", "--")]
        for candidate in candidates:
            if (candidate / "config.json").is_file():
                return candidate
        where = f" or under {models_dir}" if models_dir is not None else ""
        raise ShardError(f"model {model!r} is not a checkpoint directory on this node{where}")

    return resolve


default_model_resolver = checkpoint_resolver(None)  # node.placement.resolve: the one resolver


# ---- per-request state (owned by the worker thread) ----


@dataclass
class RequestState:
    cache: list[Any]
    sampling: SamplingParams
    history: list[int] = field(default_factory=list)
    keys: KeyStream | None = None
    failed: bool = False


@dataclass
class _Inbound:
    """What the session's reader knows about a request (owned by the reader)."""

    position: int = 0  # positions accepted so far
    assembler: TensorAssembler | None = None  # a chunked hidden tensor in progress
    header: pb.Activation | None = None  # the first frame of that tensor
    failed: bool = False


class StageRuntime:
    """One loaded shard of one instance, its worker, and its per-request caches."""

    def __init__(
        self,
        shard: Shard,
        *,
        instance_id: str,
        model: str,
        position: int,
        num_stages: int,
        next_hop: str,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        inline: bool = False,
    ) -> None:
        if shard.has_head != (next_hop == ""):
            raise ShardError(
                f"stage [{shard.start_layer}, {shard.end_layer}) of {shard.num_layers} layers "
                + (
                    "is the last stage but was given next hop " + repr(next_hop)
                    if shard.has_head
                    else "is not the last stage but has no next hop"
                )
            )
        self.shard = shard
        self.instance_id = instance_id
        self.model = model
        self.position = position
        self.num_stages = num_stages
        self.next_hop = next_hop
        self.max_chunk_bytes = max_chunk_bytes
        self.context_length = shard.context_length
        # inline: a session's reader thread computes (one thread handoff less per hop; the
        # lock serializes sessions). Otherwise a worker thread does, which callers that must
        # not block (the coordinator's token callback) need.
        self.inline = inline
        self.worker = None if inline else SerialWorker(f"stage-{instance_id}-{position}")
        self._compute_lock = threading.Lock()
        self.states: dict[tuple[int, str], RequestState] = {}
        self.sessions: set[int] = set()
        self.frames_processed = 0
        self.frames_rejected = 0
        self.closed = False
        self.closed_reason = ""
        self._channel: grpc.Channel | None = None
        self._session_ids = itertools.count(1)

    # -- facts --

    @property
    def max_activation_bytes(self) -> int:
        itemsize = 2 if self.shard.activation_dtype in (mx.float16, mx.bfloat16) else 4
        return self.context_length * self.shard.hidden_size * itemsize

    def info(self) -> pb.ShardInfo:
        s = self.shard
        return pb.ShardInfo(
            instance_id=self.instance_id,
            model=self.model,
            start_layer=s.start_layer,
            end_layer=s.end_layer,
            position=self.position,
            num_stages=self.num_stages,
            next_hop=self.next_hop,
            num_layers=s.num_layers,
            hidden_size=s.hidden_size,
            activation_dtype=wire_dtype(s.activation_dtype),
            has_embedding=s.has_embedding,
            has_head=s.has_head,
            weight_bytes=s.weight_bytes,
            resident_bytes=s.resident_bytes,
            load_seconds=s.load_seconds,
        )

    def status(self) -> pb.StageStatus:
        request_ids = sorted(rid for _, rid in list(self.states))
        return pb.StageStatus(
            shard=self.info(),
            cached_requests=len(request_ids),
            request_ids=request_ids,
            open_streams=len(self.sessions),
            frames_processed=self.frames_processed,
            frames_rejected=self.frames_rejected,
        )

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = stage_channel(self.next_hop)
        return self._channel

    def dispatch(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a job in order with this runtime's other jobs: inline or on the worker."""
        if self.worker is not None:
            self.worker.submit(fn, *args)
            return
        with self._compute_lock:
            try:
                fn(*args)
            except Exception:
                log.exception("stage job failed", job=getattr(fn, "__name__", fn))

    def new_session(self, emit: Emit) -> StageSession:
        session = StageSession(self, next(self._session_ids), emit)
        self.sessions.add(session.session_id)
        return session

    def shutdown(self, reason: str = "") -> None:
        """Unload: refuse new frames, free every cache; weights go with the last stream.
        ``reason`` (the node is stopping) makes refused frames UNAVAILABLE saying so: the
        request may be retried once the instance is placed again."""
        self.closed_reason = reason
        self.closed = True
        self.dispatch(self.states.clear)
        if self.worker is not None:
            self.worker.stop()
        if self._channel is not None:
            self._channel.close()
        self._free_weights_if_unused()

    def _free_weights_if_unused(self) -> None:
        if self.closed and not self.sessions:
            self.shard.model = nn.Module()  # drop the arrays now, not when the runtime goes
            mx.clear_cache()  # and hand MLX's cached buffers back to the system

    # -- jobs, run on the worker thread --

    def open_request(
        self, session: StageSession, rid: str, sampling: SamplingParams, frame: pb.ForwardRequest
    ) -> None:
        self.states[(session.session_id, rid)] = RequestState(
            cache=self.shard.make_cache(),
            sampling=sampling,
            keys=None if sampling.is_greedy else KeyStream(sampling.seed),
        )
        if not self.shard.has_head:
            session.send_downstream([frame])

    def run_activation(
        self,
        session: StageSession,
        rid: str,
        header: pb.Activation,
        hidden: RawTensor | None,
    ) -> None:
        state = self.states.get((session.session_id, rid))
        if state is None or state.failed:
            return
        try:
            self._forward(session, rid, state, header, hidden)
        except Exception as exc:
            state.failed = True
            log.exception("stage forward failed", request_id=rid, stage=self.position)
            session.emit_error(rid, INTERNAL, f"stage {self.position} failed: {exc}")

    def _forward(
        self,
        session: StageSession,
        rid: str,
        state: RequestState,
        header: pb.Activation,
        hidden: RawTensor | None,
    ) -> None:
        token_ids = list(header.token_ids)
        inputs = mx.array([token_ids], dtype=mx.uint32) if hidden is None else hidden.to_mx()
        h = self.shard.forward(inputs, state.cache)
        self.frames_processed += 1
        if not self.shard.has_head:
            mx.eval(h, [c.state for c in state.cache])
            chunks = encode_tensor(h, self.max_chunk_bytes)
            out = pb.Activation(
                start_position=header.start_position,
                token_ids=token_ids,
                sample=header.sample,
                hidden=chunks[0],
            )
            frames = [pb.ForwardRequest(request_id=rid, activation=out)]
            frames += [
                pb.ForwardRequest(request_id=rid, activation=pb.Activation(hidden=chunk))
                for chunk in chunks[1:]
            ]
            session.send_downstream(frames)
            return
        state.history.extend(token_ids)
        if not header.sample:
            mx.eval([c.state for c in state.cache])
            return
        logits = self.shard.logits(h[:, -1:, :])[0]
        # Penalties look at the trailing window only; mlx-lm's processors see the same tokens.
        history = state.history[-state.sampling.max_context_size :]
        logprobs = processed_logprobs(logits, state.sampling, history)
        if state.keys is None:
            token = greedy_tokens(logprobs)
        else:
            token = sample_tokens(logprobs, state.keys.next())
        logprob = logprobs[0, token[0]]
        mx.eval(token, logprob, [c.state for c in state.cache])
        session.emit(
            pb.ForwardResponse(
                request_id=rid,
                token=pb.SampledToken(
                    token_id=int(token.item()),
                    position=header.start_position + len(token_ids),
                    logprob=float(logprob.item()),
                ),
            )
        )

    def release_request(self, session: StageSession, rid: str, frame: pb.ForwardRequest) -> None:
        self.states.pop((session.session_id, rid), None)
        if self.shard.has_head:
            session.emit(pb.ForwardResponse(request_id=rid, released=pb.Released(stages=1)))
        else:
            session.send_downstream([frame])

    def echo_probe(self, session: StageSession, rid: str, tensor: RawTensor) -> None:
        array = tensor.to_mx()
        for chunk in encode_tensor(array, self.max_chunk_bytes):
            session.emit(pb.ForwardResponse(request_id=rid, probe=pb.Probe(tensor=chunk)))

    def drop_session(self, session: StageSession) -> None:
        for key in [k for k in self.states if k[0] == session.session_id]:
            del self.states[key]
        self.sessions.discard(session.session_id)
        session.close_downstream()
        self._free_weights_if_unused()


class StageSession:
    """One upstream Forward stream into a runtime.

    ``handle`` is the reader: call it for each incoming frame, from one thread at a time.
    ``emit`` sends a response upstream; it may be called from the worker or the downstream
    link's receiver thread.
    """

    def __init__(self, runtime: StageRuntime, session_id: int, emit: Emit) -> None:
        self.runtime = runtime
        self.session_id = session_id
        self.emit = emit
        self.inbound: dict[str, _Inbound] = {}
        self.probes: dict[str, TensorAssembler] = {}
        self._link: ForwardLink | None = None
        self._closing = False
        self._finished = threading.Event()
        self._on_finished: Callable[[], None] | None = None

    # -- reader side --

    def handle(self, frame: pb.ForwardRequest) -> None:
        rid = frame.request_id
        if self.runtime.closed:
            instance = self.runtime.instance_id
            if self.runtime.closed_reason:
                self.emit_error(rid, UNAVAILABLE, f"{self.runtime.closed_reason} ({instance!r})")
            else:
                self.emit_error(rid, FAILED_PRECONDITION, f"instance {instance!r} was unloaded")
            return
        try:
            if not rid:
                raise FrameError("frame has an empty request_id")
            kind = frame.WhichOneof("kind")
            if kind == "open":
                self._open(rid, frame)
            elif kind == "activation":
                self._activation(rid, frame.activation)
            elif kind == "release":
                self._release(rid, frame)
            elif kind == "probe":
                self._probe(rid, frame.probe)
            else:
                raise FrameError(
                    f"frame for request {rid!r} carries nothing (no open, activation, release or probe)"
                )
        except FrameError as exc:
            self.runtime.frames_rejected += 1
            inbound = self.inbound.get(rid)
            if inbound is not None:
                inbound.failed = True
                inbound.assembler = inbound.header = None
            self.emit_error(rid, INVALID_ARGUMENT, str(exc))

    def _open(self, rid: str, frame: pb.ForwardRequest) -> None:
        if rid in self.inbound:
            raise FrameError(f"request {rid!r} is already open on this stream")
        sampling = (
            sampling_from_proto(frame.open.sampling)
            if frame.open.HasField("sampling")
            else SamplingParams()
        )
        self.inbound[rid] = _Inbound()
        self.runtime.dispatch(self.runtime.open_request, self, rid, sampling, frame)

    def _known(self, rid: str) -> _Inbound:
        inbound = self.inbound.get(rid)
        if inbound is None:
            raise FrameError(
                f"unknown request id {rid!r} (never opened on this stream, or released)"
            )
        return inbound

    def _activation(self, rid: str, act: pb.Activation) -> None:
        inbound = self._known(rid)
        if inbound.failed:
            return  # the request already got its error; wait for its release quietly
        if inbound.assembler is not None:  # the next chunk of a tensor in progress
            tensor = inbound.assembler.add(act.hidden)
            if tensor is not None:
                header, inbound.assembler, inbound.header = inbound.header, None, None
                self.runtime.dispatch(self.runtime.run_activation, self, rid, header, tensor)
            return
        shard = self.runtime.shard
        count = len(act.token_ids)
        if count == 0:
            raise FrameError(f"activation for request {rid!r} has no token_ids")
        if act.start_position != inbound.position:
            raise FrameError(
                f"activation for request {rid!r} starts at position {act.start_position} but "
                f"the stage has {inbound.position} positions cached"
            )
        if act.start_position + count > self.runtime.context_length:
            raise FrameError(
                f"activation for request {rid!r} covers positions up to {act.start_position + count}, "
                f"beyond the model's context of {self.runtime.context_length}"
            )
        if shard.has_embedding:
            if act.HasField("hidden"):
                raise FrameError("the first stage takes token ids, not a hidden tensor")
            bad = next((t for t in act.token_ids if t >= shard.vocab_size), None)
            if bad is not None:
                raise FrameError(
                    f"token id {bad} is outside the vocabulary [0, {shard.vocab_size})"
                )
            inbound.position += count
            self.runtime.dispatch(self.runtime.run_activation, self, rid, act, None)
            return
        if not act.HasField("hidden"):
            raise FrameError(f"activation for request {rid!r} has no hidden tensor")
        chunk = act.hidden
        expected_dtype = wire_dtype(shard.activation_dtype)
        if chunk.dtype != expected_dtype:
            raise FrameError(
                f"hidden tensor is {dtype_name(chunk.dtype)} but stage {self.runtime.position} "
                f"runs {dtype_name(expected_dtype)}"
            )
        shape = list(chunk.shape)
        if shape != [1, count, shard.hidden_size]:
            raise FrameError(
                f"hidden tensor has shape {shape}; stage {self.runtime.position} expects "
                f"[1, {count}, {shard.hidden_size}] (batch 1, {count} token ids, width {shard.hidden_size})"
            )
        assembler = TensorAssembler(self.runtime.max_activation_bytes)
        tensor = assembler.add(chunk)
        inbound.position += count
        if tensor is None:
            inbound.assembler, inbound.header = assembler, act
        else:
            self.runtime.dispatch(self.runtime.run_activation, self, rid, act, tensor)

    def _release(self, rid: str, frame: pb.ForwardRequest) -> None:
        self._known(rid)
        del self.inbound[rid]
        self.runtime.dispatch(self.runtime.release_request, self, rid, frame)

    def _probe(self, rid: str, probe: pb.Probe) -> None:
        assembler = self.probes.setdefault(rid, TensorAssembler(DEFAULT_MAX_TENSOR_BYTES))
        try:
            tensor = assembler.add(probe.tensor)
        except FrameError:
            del self.probes[rid]
            raise
        if tensor is not None:
            del self.probes[rid]
            self.runtime.dispatch(self.runtime.echo_probe, self, rid, tensor)

    def end(self, on_finished: Callable[[], None] | None = None) -> None:
        """The upstream stream ended: free this session's caches everywhere, then finish."""
        self._on_finished = on_finished
        self.inbound.clear()
        self.probes.clear()
        self.runtime.dispatch(self.runtime.drop_session, self)

    # -- worker side --

    def emit_error(self, rid: str, code: int, message: str) -> None:
        self.emit(
            pb.ForwardResponse(
                request_id=rid,
                error=pb.StageError(code=code, message=message, position=self.runtime.position),
            )
        )

    def send_downstream(self, frames: list[pb.ForwardRequest]) -> None:
        if self._link is None:
            self._link = ForwardLink(
                self.runtime.channel(),
                self.runtime.instance_id,
                on_response=self._relay,
                on_closed=self._downstream_closed,
                name=f"stage-{self.runtime.position}-relay",
            )
        self._link.send_all(frames)

    def close_downstream(self) -> None:
        self._closing = True
        if self._link is None:
            self._finish()
        else:
            self._link.close()  # _downstream_closed finishes once the peer ends the stream

    def _relay(self, response: pb.ForwardResponse) -> None:
        if response.WhichOneof("kind") == "released":
            response.released.stages += 1
        self.emit(response)

    def _downstream_closed(self, error: grpc.RpcError | None) -> None:
        self._link = None
        if self._closing:
            self._finish()
            return
        detail = error.details() if error is not None else "stream ended"
        log.warning("downstream stream closed", stage=self.runtime.position, error=detail)
        # This stage closed the link itself (its node is stopping): say so, not that the
        # next stage, which is fine, went away.
        problem = self.runtime.closed_reason or (
            f"next stage {self.runtime.next_hop} is unreachable: {detail}"
        )
        for rid in list(self.inbound):
            self.emit_error(rid, UNAVAILABLE, problem)

    def _finish(self) -> None:
        if not self._finished.is_set():
            self._finished.set()
            if self._on_finished is not None:
                self._on_finished()


# ---- the gRPC servicer ----

_END = object()


class StageService(pb_grpc.StageServiceServicer):
    """Hosts the stages of every instance this node takes part in."""

    def __init__(
        self,
        resolve_model: ModelResolver = default_model_resolver,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.resolve_model = resolve_model
        self.max_chunk_bytes = max_chunk_bytes
        self.runtimes: dict[str, StageRuntime] = {}
        self._lock = threading.Lock()

    def LoadShard(
        self, request: pb.LoadShardRequest, context: grpc.ServicerContext
    ) -> pb.LoadShardResponse:
        if not request.instance_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "instance_id is empty")
        if request.num_stages < 1 or request.position >= request.num_stages:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"position {request.position} is not inside a pipeline of {request.num_stages} stages",
            )
        with self._lock:
            if request.instance_id in self.runtimes:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"instance {request.instance_id!r} already has a stage on this node; unload it first",
                )
        try:
            path = self.resolve_model(request.model)
            shard = load_shard(path, request.start_layer, request.end_layer)
            runtime = StageRuntime(
                shard,
                instance_id=request.instance_id,
                model=request.model,
                position=request.position,
                num_stages=request.num_stages,
                next_hop=request.next_hop,
                max_chunk_bytes=self.max_chunk_bytes,
                inline=True,
            )
        except CorruptCheckpoint as exc:  # the request is fine; this node's files are not
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (ShardError, FileNotFoundError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._lock:
            self.runtimes[request.instance_id] = runtime
        return pb.LoadShardResponse(shard=runtime.info())

    def shutdown(self, reason: str = "") -> None:
        """Unload every stage (the daemon is stopping; ``reason`` says so to callers)."""
        with self._lock:
            runtimes, self.runtimes = list(self.runtimes.values()), {}
        for runtime in runtimes:
            runtime.shutdown(reason)

    def UnloadShard(
        self, request: pb.UnloadShardRequest, context: grpc.ServicerContext
    ) -> pb.UnloadShardResponse:
        with self._lock:
            runtime = self.runtimes.pop(request.instance_id, None)
        if runtime is not None:
            runtime.shutdown()
            log.info("shard unloaded", instance=request.instance_id)
        return pb.UnloadShardResponse(unloaded=runtime is not None)

    def Status(
        self, request: pb.StageStatusRequest, context: grpc.ServicerContext
    ) -> pb.StageStatusResponse:
        with self._lock:
            runtimes = list(self.runtimes.values())
        return pb.StageStatusResponse(
            stages=[
                r.status()
                for r in runtimes
                if not request.instance_id or r.instance_id == request.instance_id
            ]
        )

    def Forward(
        self, request_iterator: Iterator[pb.ForwardRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ForwardResponse]:
        instance_id = dict(context.invocation_metadata()).get(INSTANCE_METADATA_KEY, "")
        runtime = self.runtimes.get(instance_id)
        if runtime is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"instance {instance_id!r} has no stage on this node (metadata {INSTANCE_METADATA_KEY})",
            )
        if runtime.shard.has_head:
            yield from self._forward_last(runtime, request_iterator)
            return
        outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        session = runtime.new_session(outbox.put)

        def read() -> None:
            try:
                for frame in request_iterator:
                    session.handle(frame)
            except Exception as exc:  # the upstream went away; clean up below
                log.info("upstream stream ended", instance=instance_id, reason=str(exc))
            session.end(on_finished=lambda: outbox.put(_END))

        threading.Thread(target=read, name=f"stage-{runtime.position}-reader", daemon=True).start()
        while (response := outbox.get()) is not _END:
            yield response

    @staticmethod
    def _forward_last(
        runtime: StageRuntime, request_iterator: Iterator[pb.ForwardRequest]
    ) -> Iterator[pb.ForwardResponse]:
        """The last stage answers every frame while handling it (tokens, acks, errors, probe
        echoes; nothing arrives from downstream), so one thread reads, computes and replies:
        no handoff between a reader and the responding thread on the hot path."""
        replies: deque[pb.ForwardResponse] = deque()
        session = runtime.new_session(replies.append)
        try:
            for frame in request_iterator:
                session.handle(frame)
                while replies:
                    yield replies.popleft()
        except grpc.RpcError as exc:  # the upstream went away
            log.info("upstream stream ended", instance=runtime.instance_id, reason=str(exc))
        finally:
            session.end()


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StageService"].full_name


def add_stage_service(
    server: grpc.Server, resolve_model: ModelResolver = default_model_resolver
) -> StageService:
    """Register a StageService on ``server`` (before it starts) and return it."""
    service = StageService(resolve_model)
    pb_grpc.add_StageServiceServicer_to_server(service, server)
    return service


def main(argv: list[str] | None = None) -> int:
    """Serve the StageService alone: ``python -m node.inference.stage --port 0 --port-file F``."""
    parser = argparse.ArgumentParser(description="macmesh stage server (no discovery)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    args = parser.parse_args(argv)
    server, health = rpc.make_server()
    add_stage_service(server)
    port = rpc.bind(server, args.host, args.port)
    rpc.mark_serving(health, [SERVICE_NAME])
    server.start()
    if args.port_file is not None:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    print(f"stage server on {args.host}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
