"""One loaded shard of one instance on this node, and its per-request caches.

A ``StageRuntime`` runs every forward pass of its shard. Jobs (opens, activations, releases,
probes) arrive already validated by a ``StageSession`` (node.inference.stage_session) and
wait in the runtime's queue; each time the runtime is free it takes everything that waited
(``node.inference.stage_batch.plan_drain``): the rows that sample a token, of all requests
of one upstream stream, go through one batched [B, T] forward on batch caches, and travel on
as one ``ActivationBatch`` frame; prefill chunks go one request at a time after them. It
computes on its own worker thread (stage 0, where requests meet: its queue is where their
decode steps line up) or inline on the upstream stream's reader thread (later stages: a
batched frame already is the batch; one thread handoff less per hop).

The last stage applies the final norm + LM head to the final position of every row marked
``sample`` and draws each row's token with its own request's sampling parameters, mlx-lm style
(history = every token id the request has fed so far, one PRNG subkey per sampled token). It
sends the tokens on each request's return route — the coordinator's own stream to this stage
— when the coordinator opened one, so tokens travel home in one hop (a ring); otherwise back
up the stream the request came in on: one ``TokenBatch`` per route for a batch, one
``SampledToken`` for a row alone.

Pipeline MTP plugs in at ``_forward`` and ``_sample_rows`` (node.inference.stage_mtp): a
verify row is a row like any other, batched with the rows of the same T; rows with drafts
run in verify mode, earlier stages commit each row's previous frame by the verdict it
carries, and the last stage answers each with a ``Verdict`` (in a ``TokenBatch`` for a batch).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import mlx.core as mx
import mlx.nn as nn

from node.inference import stage_mtp
from node.inference.codec import (
    DEFAULT_CHUNK_BYTES,
    FrameError,
    RawTensor,
    encode_tensor,
    wire_dtype,
)
from node.inference.link import stage_channel
from node.inference.mtp.gdn import verify_forward
from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    greedy_tokens,
    processed_logprobs,
    sample_tokens,
)
from node.inference.shard import Shard, ShardError
from node.inference.stage_batch import (
    PREFILL_BATCH_TOKENS,
    BatchCaches,
    BatchEntry,
    Job,
    Key,
    Row,
    plan_drain,
)
from node.inference.stage_cache import StageSnapshots
from node.inference.stage_wire import (
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    error_response,
)
from node.logging import get_logger
from node.proto.macmesh.v1 import stage_pb2 as pb

if TYPE_CHECKING:
    from node.inference.stage_session import StageSession

log = get_logger(__name__)

Emit = Callable[[pb.ForwardResponse], None]


@dataclass
class RequestState:
    sampling: SamplingParams
    reply: Emit  # where this request's tokens, acks and errors go (see ``open_request``)
    direct: bool = False  # reply is the coordinator's return stream, not the upstream stage
    history: list[int] = field(default_factory=list)
    keys: KeyStream | None = None
    failed: bool = False
    mtp: Any = None  # pipeline_mtp: node.inference.stage_mtp's per-request state


class StageRuntime:
    """One loaded shard of one instance, its job queue, and its per-request caches."""

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
        max_batch: int = 0,
        context_tokens: int = 0,
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
        # The memory the plan budgeted here: caches for max_batch sequences (0: no limit) of
        # context_tokens positions (0: the model's context).
        self.max_batch = max_batch
        self.context_tokens = min(context_tokens or shard.context_length, shard.context_length)
        # inline: the caller's thread (a session's reader) computes what it queued. Otherwise
        # a worker thread drains the queue: what waited meanwhile is batched.
        self.inline = inline
        # Padded positions of prefill rows one drain runs together (0: one request at a time,
        # the benchmarks' control).
        self.prefill_batch_tokens = PREFILL_BATCH_TOKENS
        self._jobs: deque[Job] = deque()
        self._jobs_cond = threading.Condition()
        self._compute_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.states: dict[Key, RequestState] = {}
        self.caches = BatchCaches(shard.make_cache)
        self.snapshots = StageSnapshots()  # this stage's part of the prompt cache (stage_cache)
        self.sessions: set[int] = set()
        self.frames_processed = 0
        self.frames_rejected = 0
        self.tokens_returned = 0  # tokens sent straight to a coordinator's return stream
        self.responses_relayed = 0  # responses passed up from the next stage
        self.batch_size = 0  # rows of the latest forward of sampled positions
        self.max_batch_seen = 0
        self.batched_forwards = 0
        self.batched_prefills = 0  # ragged forwards of several requests' prefill rows
        self.routes: dict[str, Emit] = {}  # return route -> that return stream's emit
        self._routes_lock = threading.Lock()
        self.closed = False
        self.closed_reason = ""
        self._channel: grpc.Channel | None = None
        self._session_ids = itertools.count(1)
        if not inline:
            self._worker = threading.Thread(
                target=self._work, name=f"stage-{instance_id}-{position}", daemon=True
            )
            self._worker.start()
        # pipeline_mtp: the MTP head on the last stage (node.inference.stage_mtp.load_head).
        self.mtp_head: Any = None
        self.mtp_head_bytes = 0

    # -- facts --

    @property
    def max_activation_bytes(self) -> int:
        itemsize = 2 if self.shard.activation_dtype in (mx.float16, mx.bfloat16) else 4
        rows = max(self.max_batch, 1) if self.max_batch else 256
        return max(self.context_length, rows) * self.shard.hidden_size * itemsize

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
            has_mtp_head=self.mtp_head is not None,
            mtp_head_bytes=self.mtp_head_bytes,
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
            batch_size=self.batch_size if self.states else 0,
            max_batch_seen=self.max_batch_seen,
            batched_forwards=self.batched_forwards,
            batched_prefills=self.batched_prefills,
            max_batch=self.max_batch,
            context_tokens=self.context_tokens,
            prompt_cache_snapshots=len(self.snapshots),
            prompt_cache_bytes=self.snapshots.nbytes,
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

    # -- the job queue --

    def submit(self, job: Job) -> None:
        """Queue a job; it runs in order with this request's other jobs (inline: now)."""
        with self._jobs_cond:
            self._jobs.append(job)
            self._jobs_cond.notify()
        if self.inline:
            with self._compute_lock:
                while self._drain_once():
                    pass

    def _work(self) -> None:
        while True:
            with self._jobs_cond:
                while not self._jobs and not self.closed:
                    self._jobs_cond.wait()
                if not self._jobs and self.closed:
                    return
            with self._compute_lock:
                self._drain_once()

    def _drain_once(self) -> bool:
        """Run what waited: cheap jobs, the batches, one held-back job. False: nothing waited."""
        with self._jobs_cond:
            jobs, self._jobs = list(self._jobs), deque()
        if not jobs:
            return False
        plan = plan_drain(jobs, self.prefill_batch_tokens)
        if plan.requeue:
            with self._jobs_cond:
                self._jobs.extendleft(reversed(plan.requeue))
        for job in plan.now:
            self._run_job(job)
        for entries in plan.batches:
            self._run_rows(entries)
        for wave in plan.prefill:
            self._run_rows(wave)
        if plan.chunk is not None:
            self._run_job(plan.chunk)
        return True

    def _run_job(self, job: Job) -> None:
        try:
            if job.kind == "rows":
                self._run_rows([BatchEntry(job, row) for row in job.rows])
            elif job.run is not None:
                job.run()
        except Exception:
            log.exception("stage job failed", job=job.kind, stage=self.position)

    # -- control --

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
        self.submit(Job("control", 0, run=self._clear))
        with self._jobs_cond:
            self._jobs_cond.notify_all()
        if self._worker is not None and threading.current_thread() is not self._worker:
            self._worker.join(10.0)
        if self._channel is not None:
            self._channel.close()
        self._free_weights_if_unused()

    def _clear(self) -> None:
        self.states.clear()
        self.caches.clear()
        self.snapshots.clear()

    def _free_weights_if_unused(self) -> None:
        if self.closed and not self.sessions:
            self.shard.model = nn.Module()  # drop the arrays now, not when the runtime goes
            mx.clear_cache()  # and hand MLX's cached buffers back to the system

    # -- jobs --

    def open_request(
        self, session: StageSession, rid: str, sampling: SamplingParams, frame: pb.ForwardRequest
    ) -> None:
        # The last stage answers on the request's return route when its coordinator has one
        # open here (a ring: one hop home instead of one per stage); otherwise back upstream.
        route = frame.open.return_route
        with self._routes_lock:
            direct = self.routes.get(route) if route and self.shard.has_head else None
        reply = direct or session.emit
        if self.max_batch and len(self.states) >= self.max_batch:
            # Over the memory the plan budgeted here: refuse this one; the others go on.
            session.emit(
                error_response(
                    rid,
                    RESOURCE_EXHAUSTED,
                    f"stage {self.position} of {self.instance_id!r} already holds caches for "
                    f"{len(self.states)} sequences, its budget (max_batch {self.max_batch} x "
                    f"{self.context_tokens} tokens)",
                    self.position,
                )
            )
            return
        key = (session.session_id, rid)
        state = self.states[key] = RequestState(
            sampling=sampling,
            reply=reply,
            direct=direct is not None,
            keys=None if sampling.is_greedy else KeyStream(sampling.seed),
        )
        self.caches.open(key)
        if frame.open.resume_snapshot:  # --- prompt cache hook (node.inference.stage_cache) ---
            resumed = self.snapshots.resume(frame.open.resume_snapshot, frame.open.resume_length)
            if resumed is None:
                state.failed = True
                state.reply(
                    error_response(
                        rid,
                        FAILED_PRECONDITION,
                        f"stage {self.position} holds no prompt-cache snapshot "
                        f"{frame.open.resume_snapshot} of {frame.open.resume_length} positions",
                        self.position,
                    )
                )
            else:
                caches, history = resumed
                self.caches.open(key, caches)
                state.history = history
        if frame.open.mtp:  # --- pipeline_mtp hook (node.inference.stage_mtp) ---
            try:
                state.mtp = stage_mtp.open_state(self, sampling)
            except FrameError as exc:
                state.failed = True
                state.reply(error_response(rid, INVALID_ARGUMENT, str(exc), self.position))
        if not self.shard.has_head:
            session.send_downstream([frame])

    def release_request(self, session: StageSession, rid: str, frame: pb.ForwardRequest) -> None:
        key = (session.session_id, rid)
        if frame.release.snapshot:
            self._store_snapshot(key, frame.release.snapshot)
        state = self.states.pop(key, None)
        self.caches.release(key)
        if self.shard.has_head:
            reply = state.reply if state is not None else session.emit
            reply(pb.ForwardResponse(request_id=rid, released=pb.Released(stages=1)))
        else:
            session.send_downstream([frame])

    def store_snapshot(self, session: StageSession, rid: str, frame: pb.ForwardRequest) -> None:
        """--- prompt cache hook: keep the request's caches as they are now (stage_cache) ---"""
        self._store_snapshot((session.session_id, rid), frame.snapshot.id)
        if not self.shard.has_head:
            session.send_downstream([frame])

    def _store_snapshot(self, key: Key, snapshot_id: int) -> None:
        state = self.states.get(key)
        if state is None or state.failed or key not in self.caches:
            return
        try:
            self.snapshots.store(snapshot_id, self.caches.copy_of(key), state.history)
        except Exception:  # a snapshot is an optimisation: the request goes on
            log.exception("storing a prompt-cache snapshot failed", stage=self.position)

    def forget_snapshots(self, session: StageSession, frame: pb.ForwardRequest) -> None:
        self.snapshots.forget(frame.forget.ids)
        if not self.shard.has_head:
            session.send_downstream([frame])

    def echo_probe(self, session: StageSession, rid: str, tensor: RawTensor) -> None:
        array = tensor.to_mx()
        for chunk in encode_tensor(array, self.max_chunk_bytes):
            session.emit(pb.ForwardResponse(request_id=rid, probe=pb.Probe(tensor=chunk)))

    def drop_session(self, session: StageSession) -> None:
        for key in [k for k in self.states if k[0] == session.session_id]:
            del self.states[key]
        self.caches.drop_session(session.session_id)
        self.sessions.discard(session.session_id)
        session.close_downstream()
        self._free_weights_if_unused()

    # -- forwards --

    def _run_rows(self, entries: list[BatchEntry]) -> None:
        """One forward for rows of one session with the same number of positions."""
        live = []
        for entry in entries:
            state = self.states.get(entry.key)
            if state is not None and not state.failed:
                live.append((entry, state))
        if not live:
            return
        session: StageSession = live[0][0].job.session
        try:
            self._forward(session, live)
        except Exception as exc:
            log.exception(
                "stage forward failed", requests=[e.row.rid for e, _ in live], stage=self.position
            )
            for entry, state in live:
                state.failed = True
                state.reply(
                    error_response(
                        entry.row.rid,
                        INTERNAL,
                        f"stage {self.position} failed: {exc}",
                        self.position,
                    )
                )

    def _inputs(self, live: list[tuple[BatchEntry, RequestState]], width: int) -> mx.array:
        """Token ids [B, T] (first stage) or the rows' hidden states [B, T, D], each row
        right-padded to ``width`` positions (a ragged prefill; the padding is masked)."""
        if self.shard.has_embedding:
            return mx.array(
                [e.row.token_ids + [0] * (width - len(e.row.token_ids)) for e, _ in live],
                dtype=mx.uint32,
            )
        tensors: dict[int, mx.array] = {}
        rows = []
        for entry, _ in live:
            job = entry.job
            if id(job) not in tensors:
                tensors[id(job)] = job.tensor.to_mx()
            row = tensors[id(job)][entry.row.index, : len(entry.row.token_ids)]
            if row.shape[0] < width:
                row = mx.pad(row, [(0, width - row.shape[0]), (0, 0)])
            rows.append(row)
        return mx.stack(rows) if len(rows) > 1 else rows[0][None]

    def _forward(self, session: StageSession, live: list[tuple[BatchEntry, RequestState]]) -> None:
        if self.shard.has_head:  # --- pipeline_mtp hook: drafts must be the ones proposed here
            live = stage_mtp.check_rows(self, live)
            if not live:
                return
        if len(live) == 1:
            cache = self.caches.solo(live[0][0].key)
        else:
            order, cache = self.caches.batch([e.key for e, _ in live])
            by_key = {e.key: (e, s) for e, s in live}
            live = [by_key[k] for k in order]  # the group's row order
        lengths = [len(e.row.token_ids) for e, _ in live]
        width = max(lengths)
        ragged = min(lengths) < width
        # pipeline_mtp: verify rows with drafts run in verify mode (every position's
        # GatedDeltaNet state kept aside); their verdicts commit the previous frames first.
        verify = width > 1 and any(e.row.verify is not None for e, _ in live)
        if not self.shard.has_head:
            stage_mtp.commit_before(cache, live)
        if ragged:  # mlx-lm's own ragged prefill (BatchGenerator.prompt): masked right padding
            for c in cache:
                c.prepare(lengths=lengths, right_padding=[width - n for n in lengths])
        inputs = self._inputs(live, width)
        if verify:
            h, pending = verify_forward(self.shard.text_model, inputs, cache)
        else:
            h, pending = self.shard.forward(inputs, cache), None
        if ragged:  # the padding moves to the left, where batch caches keep it
            for c in cache:
                c.finalize()
        self.frames_processed += 1
        if live[0][0].row.sample:
            self.batch_size = len(live)
            self.max_batch_seen = max(self.max_batch_seen, len(live))
            if len(live) > 1:
                self.batched_forwards += 1
        elif len(live) > 1:
            self.batched_prefills += 1
        rows = [e.row for e, _ in live]
        if not self.shard.has_head:
            stage_mtp.keep_pending(cache, live, pending, width)
            mx.eval(h, [c.state for c in cache])
            session.send_downstream(self._frames(rows, h))
            return
        for row, (_, state) in zip(rows, live, strict=True):
            if state.mtp is None:
                state.history.extend(row.token_ids)
        if not rows[0].sample:
            stage_mtp.prefill_rows(self, live, h)  # --- pipeline_mtp hook: the head's pairs
            mx.eval([c.state for c in cache])
            return
        self._sample_rows(live, h, cache, pending)

    def _frames(self, rows: list[Row], h: mx.array) -> list[pb.ForwardRequest]:
        """The next stage's frames: one ``Activation`` for a row alone, else one batch."""
        chunks = encode_tensor(h, self.max_chunk_bytes)
        if len(rows) == 1:
            (row,) = rows
            first = pb.Activation(
                start_position=row.start_position,
                token_ids=row.token_ids,
                sample=row.sample,
                verify=_verify(row),
                hidden=chunks[0],
            )
            frames = [pb.ForwardRequest(request_id=row.rid, activation=first)]
            return frames + [
                pb.ForwardRequest(request_id=row.rid, activation=pb.Activation(hidden=chunk))
                for chunk in chunks[1:]
            ]
        header = pb.ActivationBatch(
            rows=[
                pb.BatchRow(
                    request_id=r.rid,
                    start_position=r.start_position,
                    token_ids=r.token_ids,
                    sample=r.sample,
                    verify=_verify(r),
                )
                for r in rows
            ],
            hidden=chunks[0],
        )
        frames = [pb.ForwardRequest(batch=header)]
        return frames + [
            pb.ForwardRequest(batch=pb.ActivationBatch(hidden=chunk)) for chunk in chunks[1:]
        ]

    def _sample_rows(
        self,
        live: list[tuple[BatchEntry, RequestState]],
        h: mx.array,
        cache: list[Any],
        pending: Any = None,
    ) -> None:
        """The last stage: each row's token from its final position, with its own sampling.

        (Pipeline MTP's hook: a verify row's positions all need logits, and its acceptance
        decides what it commits — ``stage_mtp.verify_rows``; the other rows are plain decode.)"""
        verifying = [j for j, (_, state) in enumerate(live) if state.mtp is not None]
        answers = (
            stage_mtp.verify_rows(self, live, verifying, h, cache, pending) if verifying else []
        )
        plain = [j for j in range(len(live)) if live[j][1].mtp is None]
        picks = []
        if plain:
            rows = h if len(plain) == len(live) else h[mx.array(plain)]
            logits = self.shard.logits(rows[:, -1:, :])  # [B, 1, V]
            for b, j in enumerate(plain):
                state = live[j][1]
                # Penalties look at the trailing window only; mlx-lm's processors see the same.
                history = state.history[-state.sampling.max_context_size :]
                logprobs = processed_logprobs(logits[b], state.sampling, history)
                if state.keys is None:
                    token = greedy_tokens(logprobs)
                else:
                    token = sample_tokens(logprobs, state.keys.next())
                picks.append((token, logprobs[0, token[0]]))
        mx.eval(picks, [c.state for c in cache])
        for j, (token, logprob) in zip(plain, picks, strict=True):
            entry, state = live[j]
            row = entry.row
            sampled = pb.SampledToken(
                token_id=int(token.item()),
                position=row.start_position + len(row.token_ids),
                logprob=float(logprob.item()),
            )
            if state.direct:
                self.tokens_returned += 1
            answers.append((state, pb.BatchToken(request_id=row.rid, token=sampled)))
        replies: dict[int, tuple[Emit, list[pb.BatchToken]]] = {}
        for state, answer in answers:
            replies.setdefault(id(state.reply), (state.reply, []))[1].append(answer)
        for reply, tokens in replies.values():
            if len(tokens) > 1:
                reply(pb.ForwardResponse(tokens=pb.TokenBatch(tokens=tokens)))
            elif tokens[0].HasField("verdict"):
                reply(
                    pb.ForwardResponse(request_id=tokens[0].request_id, verdict=tokens[0].verdict)
                )
            else:
                reply(pb.ForwardResponse(request_id=tokens[0].request_id, token=tokens[0].token))


def _verify(row: Row) -> pb.Verify | None:
    if row.verify is None:
        return None
    return pb.Verify(keep_previous=row.verify[0], draft_k=row.verify[1])
