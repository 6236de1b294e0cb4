"""One upstream Forward stream into a stage: frame validation, and the link to the next hop.

A ``StageSession`` validates frames as they arrive (unknown request, wrong width or dtype,
oversized, out-of-order positions all become a per-request INVALID_ARGUMENT ``StageError``,
positions beyond the stage's budgeted context RESOURCE_EXHAUSTED; the stream and the other
requests go on; a bad row of an ``ActivationBatch`` fails that row's request alone), hands
complete work to its ``StageRuntime`` as jobs (``node.inference.stage_batch.Job``), and
owns the session's ``ForwardLink`` to the next hop. Responses from downstream (tokens of
requests without a return route, release acks, errors) are relayed back up unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from node.inference import stage_mtp
from node.inference.codec import (
    DEFAULT_MAX_TENSOR_BYTES,
    FrameError,
    RawTensor,
    TensorAssembler,
    dtype_name,
    wire_dtype,
)
from node.inference.link import ForwardLink
from node.inference.sampling import SamplingParams
from node.inference.stage_batch import Job, Row
from node.inference.stage_runtime import Emit, StageRuntime
from node.inference.stage_wire import (
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    error_response,
    sampling_from_proto,
)
from node.logging import get_logger
from node.proto.macmesh.v1 import stage_pb2 as pb

log = get_logger(__name__)


class BudgetError(FrameError):
    """Positions beyond the context this stage budgeted memory for."""


@dataclass
class _PendingBatch:
    """A chunked ``ActivationBatch`` tensor in progress (batches of a stream come in order)."""

    rows: list[Row]
    assembler: TensorAssembler


@dataclass
class _Inbound:
    """What the session's reader knows about a request (owned by the reader)."""

    position: int = 0  # positions accepted so far
    assembler: TensorAssembler | None = None  # a chunked hidden tensor in progress
    header: pb.Activation | None = None  # the first frame of that tensor
    failed: bool = False
    verify_positions: int = 0  # pipeline_mtp: positions of the verify frame awaiting its verdict
    mtp: bool = False  # pipeline_mtp: opened with OpenRequest.mtp


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
        self.batch: _PendingBatch | None = None
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
        kind = frame.WhichOneof("kind")
        if kind == "batch":
            self._batch(frame.batch)
            return
        if kind == "forget":  # prompt cache: no request of its own
            runtime = self.runtime
            self._submit("forget", "", run=lambda: runtime.forget_snapshots(self, frame))
            return
        try:
            if not rid:
                raise FrameError("frame has an empty request_id")
            if kind == "open":
                self._open(rid, frame)
            elif kind == "activation":
                self._activation(rid, frame.activation)
            elif kind == "release":
                self._release(rid, frame)
            elif kind == "probe":
                self._probe(rid, frame.probe)
            elif kind == "snapshot":
                self._known(rid)
                runtime = self.runtime
                self._submit("snapshot", rid, run=lambda: runtime.store_snapshot(self, rid, frame))
            else:
                raise FrameError(
                    f"frame for request {rid!r} carries nothing (no open, activation, release or probe)"
                )
        except FrameError as exc:
            self._reject(rid, exc)

    def _reject(self, rid: str, exc: FrameError) -> None:
        self.runtime.frames_rejected += 1
        inbound = self.inbound.get(rid)
        if inbound is not None:
            inbound.failed = True
            inbound.assembler = inbound.header = None
        code = RESOURCE_EXHAUSTED if isinstance(exc, BudgetError) else INVALID_ARGUMENT
        self.emit_error(rid, code, str(exc))

    def _submit(
        self,
        kind: str,
        rid: str,
        run: Callable[[], None] | None = None,
        rows: list[Row] | None = None,
        tensor: RawTensor | None = None,
    ) -> None:
        self.runtime.submit(
            Job(kind, self.session_id, rid, rows or [], session=self, tensor=tensor, run=run)
        )

    def _rows_job(self, rows: list[Row], tensor: RawTensor | None) -> None:
        self._submit("rows", "", rows=rows, tensor=tensor)

    def _activation_job(
        self, rid: str, inbound: _Inbound, act: pb.Activation, tensor: RawTensor | None
    ) -> None:
        self._rows_job([_row(rid, act)], tensor)

    def _open(self, rid: str, frame: pb.ForwardRequest) -> None:
        if rid in self.inbound:
            raise FrameError(f"request {rid!r} is already open on this stream")
        sampling = (
            sampling_from_proto(frame.open.sampling)
            if frame.open.HasField("sampling")
            else SamplingParams()
        )
        if frame.open.resume_length and not frame.open.resume_snapshot:
            raise FrameError(
                f"open for request {rid!r} resumes {frame.open.resume_length} positions "
                "but names no snapshot"
            )
        if frame.open.resume_length >= self.runtime.context_tokens:
            raise BudgetError(
                f"open for request {rid!r} resumes {frame.open.resume_length} positions, beyond "
                f"the {self.runtime.context_tokens} tokens per sequence this stage budgeted"
            )
        # Resuming a prompt-cache snapshot: its positions are cached already.
        self.inbound[rid] = _Inbound(mtp=frame.open.mtp, position=frame.open.resume_length)
        runtime = self.runtime
        self._submit("open", rid, run=lambda: runtime.open_request(self, rid, sampling, frame))

    def _known(self, rid: str) -> _Inbound:
        inbound = self.inbound.get(rid)
        if inbound is None:
            raise FrameError(
                f"unknown request id {rid!r} (never opened on this stream, or released)"
            )
        return inbound

    def _check_row(self, rid: str, start: int, token_ids: Sequence[int]) -> _Inbound:
        """A row's header against what the stage holds for its request; advances its position."""
        inbound = self._known(rid)
        shard = self.runtime.shard
        count = len(token_ids)
        if count == 0:
            raise FrameError(f"activation for request {rid!r} has no token_ids")
        if start != inbound.position:
            raise FrameError(
                f"activation for request {rid!r} starts at position {start} but "
                f"the stage has {inbound.position} positions cached"
            )
        if start + count > self.runtime.context_length:
            raise FrameError(
                f"activation for request {rid!r} covers positions up to {start + count}, "
                f"beyond the model's context of {self.runtime.context_length}"
            )
        if start + count > self.runtime.context_tokens:
            raise BudgetError(
                f"activation for request {rid!r} covers positions up to {start + count}, beyond "
                f"the {self.runtime.context_tokens} tokens per sequence stage "
                f"{self.runtime.position} budgeted memory for (max_batch "
                f"{self.runtime.max_batch} x {self.runtime.context_tokens} tokens)"
            )
        if shard.has_embedding:
            bad = next((t for t in token_ids if t >= shard.vocab_size), None)
            if bad is not None:
                raise FrameError(
                    f"token id {bad} is outside the vocabulary [0, {shard.vocab_size})"
                )
        return inbound

    def _check_hidden(self, chunk: pb.TensorChunk, rows: int, count: int) -> TensorAssembler:
        shard = self.runtime.shard
        expected_dtype = wire_dtype(shard.activation_dtype)
        if chunk.dtype != expected_dtype:
            raise FrameError(
                f"hidden tensor is {dtype_name(chunk.dtype)} but stage {self.runtime.position} "
                f"runs {dtype_name(expected_dtype)}"
            )
        shape = list(chunk.shape)
        if shape != [rows, count, shard.hidden_size]:
            raise FrameError(
                f"hidden tensor has shape {shape}; stage {self.runtime.position} expects "
                f"[{rows}, {count}, {shard.hidden_size}] (batch {rows}, {count} token ids, "
                f"width {shard.hidden_size})"
            )
        return TensorAssembler(self.runtime.max_activation_bytes)

    def _activation(self, rid: str, act: pb.Activation) -> None:
        inbound = self._known(rid)
        if inbound.failed:
            return  # the request already got its error; wait for its release quietly
        if inbound.assembler is not None:  # the next chunk of a tensor in progress
            tensor = inbound.assembler.add(act.hidden)
            if tensor is not None:
                header, inbound.assembler, inbound.header = inbound.header, None, None
                self._activation_job(rid, inbound, header, tensor)
            return
        shard = self.runtime.shard
        if shard.has_embedding and act.HasField("hidden"):
            raise FrameError("the first stage takes token ids, not a hidden tensor")
        stage_mtp.rewind(rid, inbound, act)  # --- pipeline_mtp hook ---
        self._check_row(rid, act.start_position, act.token_ids)
        count = len(act.token_ids)
        if shard.has_embedding:
            inbound.position += count
            self._activation_job(rid, inbound, act, None)
            return
        if not act.HasField("hidden"):
            raise FrameError(f"activation for request {rid!r} has no hidden tensor")
        assembler = self._check_hidden(act.hidden, 1, count)
        tensor = assembler.add(act.hidden)
        inbound.position += count
        if tensor is None:
            inbound.assembler, inbound.header = assembler, act
        else:
            self._activation_job(rid, inbound, act, tensor)

    def _batch(self, batch: pb.ActivationBatch) -> None:
        """An ``ActivationBatch`` frame: the rows' headers (and first chunk), or a next chunk."""
        if self.batch is not None:  # the next chunk of a batch tensor in progress
            pending = self.batch
            try:
                tensor = pending.assembler.add(batch.hidden)
            except FrameError as exc:
                self.batch = None
                for row in pending.rows:
                    self._reject(row.rid, exc)
                return
            if tensor is not None:
                self.batch = None
                self._rows_job(pending.rows, tensor)
            return
        rows: list[Row] = []
        for index, header in enumerate(batch.rows):
            rid = header.request_id
            try:
                if not rid:
                    raise FrameError("a batch row has an empty request_id")
                stage_mtp.rewind(rid, self._known(rid), header)  # --- pipeline_mtp hook ---
                inbound = self._check_row(rid, header.start_position, header.token_ids)
            except FrameError as exc:
                self._reject(rid, exc)
                continue
            if not inbound.failed:
                rows.append(_row(rid, header, index))
        counts = {len(h.token_ids) for h in batch.rows}
        shard = self.runtime.shard
        try:
            if not batch.rows:
                raise FrameError("a batch frame has no rows and no batch in progress")
            if len({h.sample for h in batch.rows}) != 1:
                raise FrameError("the rows of a batch must carry the same sample flag")
            if len(counts) != 1 and batch.rows[0].sample:
                raise FrameError(
                    "the rows of a batch that samples must carry the same number of token ids "
                    "(only prefill rows may differ)"
                )
            if shard.has_embedding and batch.HasField("hidden"):
                raise FrameError("the first stage takes token ids, not a hidden tensor")
            if not shard.has_embedding and not batch.HasField("hidden"):
                raise FrameError("a batch frame for a later stage has no hidden tensor")
            assembler = (
                None
                if shard.has_embedding
                else self._check_hidden(batch.hidden, len(batch.rows), max(counts))
            )
        except FrameError as exc:
            for row in rows:
                self._reject(row.rid, exc)
            return
        for row in rows:
            self.inbound[row.rid].position += len(row.token_ids)
        if assembler is None:
            if rows:
                self._rows_job(rows, None)
            return
        tensor = assembler.add(batch.hidden)
        if tensor is None:
            self.batch = _PendingBatch(rows, assembler)
        elif rows:
            self._rows_job(rows, tensor)

    def _release(self, rid: str, frame: pb.ForwardRequest) -> None:
        self._known(rid)
        del self.inbound[rid]
        runtime = self.runtime
        self._submit("release", rid, run=lambda: runtime.release_request(self, rid, frame))

    def _probe(self, rid: str, probe: pb.Probe) -> None:
        assembler = self.probes.setdefault(rid, TensorAssembler(DEFAULT_MAX_TENSOR_BYTES))
        try:
            tensor = assembler.add(probe.tensor)
        except FrameError:
            del self.probes[rid]
            raise
        if tensor is not None:
            del self.probes[rid]
            runtime = self.runtime
            self._submit("probe", "", run=lambda: runtime.echo_probe(self, rid, tensor))

    def end(self, on_finished: Callable[[], None] | None = None) -> None:
        """The upstream stream ended: free this session's caches everywhere, then finish."""
        self._on_finished = on_finished
        self.inbound.clear()
        self.probes.clear()
        self.batch = None
        runtime = self.runtime
        self._submit("end", "", run=lambda: runtime.drop_session(self))

    # -- worker side --

    def emit_error(self, rid: str, code: int, message: str) -> None:
        self.emit(error_response(rid, code, message, self.runtime.position))

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
        self.runtime.responses_relayed += 1
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


def _row(rid: str, header: pb.Activation | pb.BatchRow, index: int = 0) -> Row:
    verify = header.verify if header.HasField("verify") else None
    return Row(
        rid,
        header.start_position,
        list(header.token_ids),
        header.sample,
        index,
        None if verify is None else (verify.keep_previous, verify.draft_k),
    )
