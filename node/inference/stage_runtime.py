"""One loaded shard of one instance on this node, and its per-request caches.

A ``StageRuntime`` runs every forward pass of its shard, in arrival order: inline on the
upstream stream's reader thread (a daemon's stages: one thread handoff less per hop, a lock
serializes streams) or on a ``SerialWorker`` (the coordinator's in-process stage 0, whose
callers must not block). Frames reach it already validated by a ``StageSession``
(node.inference.stage_session).

The last stage applies the final norm + LM head to the final position of a frame marked
``sample`` and draws the token with the request's sampling parameters, mlx-lm style (history =
every token id the request has fed so far, one PRNG subkey per sampled token). It sends the
token on the request's return route — the coordinator's own stream to this stage — when the
coordinator opened one, so tokens travel home in one hop (a ring); otherwise back up the
stream the request came in on.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import mlx.core as mx
import mlx.nn as nn

from node.inference.codec import DEFAULT_CHUNK_BYTES, RawTensor, encode_tensor, wire_dtype
from node.inference.link import SerialWorker, stage_channel
from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    greedy_tokens,
    processed_logprobs,
    sample_tokens,
)
from node.inference.shard import Shard, ShardError
from node.inference.stage_wire import INTERNAL, error_response
from node.logging import get_logger
from node.proto.macmesh.v1 import stage_pb2 as pb

if TYPE_CHECKING:
    from node.inference.stage_session import StageSession

log = get_logger(__name__)

Emit = Callable[[pb.ForwardResponse], None]


@dataclass
class RequestState:
    cache: list[Any]
    sampling: SamplingParams
    reply: Emit  # where this request's tokens, acks and errors go (see ``open_request``)
    direct: bool = False  # reply is the coordinator's return stream, not the upstream stage
    history: list[int] = field(default_factory=list)
    keys: KeyStream | None = None
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
        self.tokens_returned = 0  # tokens sent straight to a coordinator's return stream
        self.responses_relayed = 0  # responses passed up from the next stage
        self.routes: dict[str, Emit] = {}  # return route -> that return stream's emit
        self._routes_lock = threading.Lock()
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
            tokens_returned=self.tokens_returned,
            responses_relayed=self.responses_relayed,
        )

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = stage_channel(self.next_hop)
        return self._channel

    def retarget(self, next_hop: str) -> None:
        """Send to ``next_hop`` from the next upstream stream on: a new coordinator took the
        instance over and placed the following stage elsewhere (the weights stay loaded)."""
        if next_hop == self.next_hop:
            return
        channel, self._channel = self._channel, None
        self.next_hop = next_hop
        if channel is not None:
            channel.close()

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

    def add_route(self, route: str, emit: Emit) -> None:
        """A coordinator's return stream (last stage only): requests opened with this route
        send their tokens, acks and errors on it, straight to the coordinator."""
        with self._routes_lock:
            self.routes[route] = emit

    def drop_route(self, route: str, emit: Emit) -> None:
        with self._routes_lock:
            if self.routes.get(route) is emit:
                del self.routes[route]

    def new_session(self, emit: Emit) -> StageSession:
        from node.inference.stage_session import StageSession

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
        # The last stage answers on the request's return route when its coordinator has one
        # open here (a ring: one hop home instead of one per stage); otherwise back upstream.
        route = frame.open.return_route
        with self._routes_lock:
            direct = self.routes.get(route) if route and self.shard.has_head else None
        self.states[(session.session_id, rid)] = RequestState(
            cache=self.shard.make_cache(),
            sampling=sampling,
            reply=direct or session.emit,
            direct=direct is not None,
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
            state.reply(
                error_response(rid, INTERNAL, f"stage {self.position} failed: {exc}", self.position)
            )

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
        if state.direct:
            self.tokens_returned += 1
        state.reply(
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
        state = self.states.pop((session.session_id, rid), None)
        if self.shard.has_head:
            reply = state.reply if state is not None else session.emit
            reply(pb.ForwardResponse(request_id=rid, released=pb.Released(stages=1)))
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
