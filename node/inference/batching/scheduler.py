"""The per-instance batch scheduler: one worker thread owns the model and runs every request.

Requests are submitted from any thread and wait in a FIFO queue. Between two steps the worker
lets waiting requests join the running batch while it holds fewer than ``max_batch``
sequences, drops the ones whose caller left (cancelled, deadline passed, stop string matched),
then runs one step of every step function that holds sequences. A sequence leaves the batch
the moment its step function reports it done; its caches go with it.

What a step computes is pluggable (``StepFunction``): the scheduler knows nothing about
models, caches or sampling — it only admits, orders, times and delivers. A step function
turns the sequences it holds into engine events (``TokenDelta`` / ``GenerationDone``), so a
new engine (batched native MTP) is one more step function under the same scheduler.

Admission beyond the queue (``RESOURCE_EXHAUSTED``) stays with the instance, which counts
requests before they reach here.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any, Protocol

from node.inference.events import GenerationDone, GenerationEvent
from node.inference.requests import GenerateRequest
from node.logging import get_logger

log = get_logger(__name__)

DEFAULT_MAX_BATCH = 8
POLL_S = 0.05  # how often a waiting caller checks its cancel token


class Cancel(Protocol):
    def is_set(self) -> bool: ...


class _NeverCancelled:
    def is_set(self) -> bool:
        return False


class SchedulerClosed(RuntimeError):
    """The instance is being unloaded: it takes no more requests."""


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler and its step function see it."""

    uid: int
    request: GenerateRequest
    kind: str  # the step function that runs it
    reason: str  # the engine selector's reason, for the final stats
    cancel: Cancel
    submitted: float = field(default_factory=time.perf_counter)
    joined: float | None = None
    first_token: float | None = None
    abandoned: bool = False  # the caller stopped reading
    outbox: SimpleQueue[tuple[str, Any]] = field(default_factory=SimpleQueue)

    @property
    def gone(self) -> bool:
        return self.abandoned or self.cancel.is_set()


# What a step returns per sequence: an event, or the exception that ended that sequence alone.
StepOutput = list[tuple[Sequence, GenerationEvent | Exception]]


class StepFunction(Protocol):
    """One engine's batched step. Called from the scheduler's worker thread only."""

    def join(self, seq: Sequence) -> None:
        """Take ``seq`` into the batch (its prefill may run over the following steps)."""

    def leave(self, seq: Sequence) -> None:
        """Drop ``seq`` and free its caches; a no-op for a sequence it does not hold."""

    def step(self) -> StepOutput:
        """Advance every held sequence by one step; a ``GenerationDone`` ends a sequence."""
        ...

    def reset(self) -> None:
        """Drop every sequence (after a step raised): the next join starts afresh."""

    def __len__(self) -> int: ...


def with_timing(done: GenerationDone, seq: Sequence) -> GenerationDone:
    """The final event with the sequence's queue wait and time to first token."""
    joined = seq.joined or seq.submitted
    first = seq.first_token or time.perf_counter()
    stats = done.stats.model_copy(
        update={
            "queue_seconds": max(0.0, joined - seq.submitted),
            "time_to_first_token_seconds": max(0.0, first - seq.submitted),
        }
    )
    return done.model_copy(update={"stats": stats})


class BatchScheduler:
    def __init__(
        self, steps: dict[str, StepFunction], max_batch: int = DEFAULT_MAX_BATCH, name: str = ""
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.steps = steps
        self.max_batch = max_batch
        self.name = name or "batch"
        self._uids = itertools.count()
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}  # written by the worker only
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- what status shows -------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Sequences in the running batch (prefilling or decoding)."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Requests waiting for a place in the batch."""
        with self._cond:
            return sum(1 for s in self._waiting if not s.gone)

    # -- callers -------------------------------------------------------------------------------

    def submit(
        self, request: GenerateRequest, kind: str, reason: str, cancel: Cancel | None = None
    ) -> Iterator[GenerationEvent]:
        """Queue ``request`` for step function ``kind``; iterate the result for its events.

        The iterator ends after ``GenerationDone``, when ``cancel`` is set, or when the
        scheduler closes (then without a ``GenerationDone``); closing it early makes the
        sequence leave the batch at the next step."""
        if kind not in self.steps:
            raise ValueError(f"no step function {kind!r} (have: {', '.join(self.steps)})")
        seq = Sequence(
            uid=next(self._uids),
            request=request,
            kind=kind,
            reason=reason,
            cancel=cancel or _NeverCancelled(),
        )
        with self._cond:
            if self._closed:
                raise SchedulerClosed(f"{self.name} is closed")
            self._waiting.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return self._events(seq)

    def _events(self, seq: Sequence) -> Iterator[GenerationEvent]:
        try:
            while True:
                try:
                    what, payload = seq.outbox.get(timeout=POLL_S)
                except Empty:
                    if seq.cancel.is_set():
                        return
                    continue
                if what == "error":
                    raise payload
                if what == "end":
                    return
                yield payload
                if payload.kind == "done":
                    return
        finally:
            seq.abandoned = True
            with self._cond:
                self._cond.notify_all()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, end every sequence (running or waiting), stop the worker."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._admit():
                self._drop_gone()
                for kind, step in self.steps.items():
                    if len(step):
                        self._step(kind, step)
        finally:
            self._end_all()

    def _admit(self) -> bool:
        """Wait for work; move waiting sequences into the batch. False once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return False
                self._waiting = deque(s for s in self._waiting if not s.gone)
                if self._waiting or self._running:
                    break
                self._cond.wait()
            joining = []
            while self._waiting and len(self._running) + len(joining) < self.max_batch:
                joining.append(self._waiting.popleft())
        for seq in joining:
            seq.joined = time.perf_counter()
            try:
                self.steps[seq.kind].join(seq)
            except Exception as exc:  # a request the engine refuses ends alone
                seq.outbox.put(("error", exc))
                continue
            self._running[seq.uid] = seq
        return True

    def _drop_gone(self) -> None:
        for seq in [s for s in self._running.values() if s.gone]:
            self._leave(seq)
            seq.outbox.put(("end", None))

    def _leave(self, seq: Sequence) -> None:
        self._running.pop(seq.uid, None)
        try:
            self.steps[seq.kind].leave(seq)
        except Exception:
            log.exception("leaving the batch failed", scheduler=self.name, uid=seq.uid)

    def _step(self, kind: str, step: StepFunction) -> None:
        try:
            outputs = step.step()
        except Exception as exc:
            # The batch's caches are in an unknown state: every sequence in it fails, the
            # step starts afresh, and the daemon keeps serving.
            log.exception("batch step failed", scheduler=self.name, kind=kind)
            for seq in [s for s in self._running.values() if s.kind == kind]:
                self._running.pop(seq.uid, None)
                seq.outbox.put(("error", exc))
            step.reset()
            return
        now = time.perf_counter()
        for seq, event in outputs:
            if isinstance(event, Exception):
                self._leave(seq)
                seq.outbox.put(("error", event))
                continue
            if seq.first_token is None:
                seq.first_token = now
            if isinstance(event, GenerationDone):
                self._leave(seq)
                event = with_timing(event, seq)
            seq.outbox.put(("event", event))

    def _end_all(self) -> None:
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
        for seq in [*self._running.values(), *waiting]:
            self._leave(seq)
            seq.outbox.put(("end", None))
        for step in self.steps.values():
            try:
                step.reset()
            except Exception:
                log.exception("resetting a step failed", scheduler=self.name)
