"""Instances as their coordinator holds them: admission, cancellation, and the engines.

``LocalInstance`` runs the whole model in this daemon (up to ``max_batch`` requests decode
together in one batch, the others wait their turn); ``PipelineInstance`` drives a ``PipelineEngine`` whose stages sit on
several nodes (many requests in flight at once). Both generate on the caller's thread, stop at
the request's ``CancelToken``, and free the request's caches when they stop. ``release_instance``
frees the weights on every stage and hands the memory back to the system.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.cluster.instances import (
    FAILED,
    LOADING,
    READY,
    UNLOADING,
    InstanceInfo,
    InstanceUnavailable,
    RecentRate,
    StageRef,
)
from node.cluster.selector import EngineChoice
from node.logging import get_logger
from node.placement import ModelCard

log = get_logger(__name__)

DEFAULT_MAX_QUEUED = 16  # requests admitted per instance (running + waiting)


class Busy(Exception):
    """The instance has as many requests as it admits."""


# ---- cancellation ------------------------------------------------------------------------------


class CancelToken:
    """Set once (client gone, deadline passed, instance unloading); callbacks run at that point."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("cancel callback failed")

    def is_set(self) -> bool:
        return self._event.is_set()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


# ---- instances ---------------------------------------------------------------------------------


@dataclass
class Instance:
    """What every instance has; subclasses run the requests."""

    instance_id: str
    model: str
    aliases: list[str]
    card: ModelCard
    checkpoint: Path
    stages: list[StageRef]
    choice: EngineChoice
    coordinator_node_id: str
    coordinator_address: str
    max_queued: int = DEFAULT_MAX_QUEUED
    state: str = LOADING
    failure: str = ""
    min_nodes: int = 1  # as launched: a re-placement honours them
    context_length: int | None = None
    mtp_across_pipeline: bool = False  # launched with native MTP across the pipeline asked for
    mtp_opted_in_by: str = ""  # ... and by what (the flag or the coordinator's environment)
    created: float = field(default_factory=time.time)
    rate: RecentRate = field(default_factory=RecentRate)
    served: int = 0
    _in_flight: int = 0
    _cancels: set[CancelToken] = field(default_factory=set)
    _count_lock: threading.Lock = field(default_factory=threading.Lock)
    _idle: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._idle = threading.Condition(self._count_lock)

    @property
    def single_node(self) -> bool:
        return len(self.stages) == 1

    def info(self) -> InstanceInfo:
        reason = self.choice.reason
        if self.state == FAILED and self.failure:
            reason = f"{reason} [failed: {self.failure}]"
        return InstanceInfo(
            instance_id=self.instance_id,
            model=self.model,
            aliases=self.aliases,
            coordinator_node_id=self.coordinator_node_id,
            coordinator_address=self.coordinator_address,
            stages=self.stages,
            engine=self.choice.engine,
            engine_reason=reason,
            state=self.state,
            recent_generation_tps=self.rate.value(),
            in_flight=self._in_flight,
            requests_served=self.served,
            batch_size=self.batch_size,
            queued=self.queued,
            current_mtp_k=self.current_mtp_k(),
            min_nodes=self.min_nodes,
            context_length=self.context_length,
            mtp_opted_in_by=self.mtp_opted_in_by if self.mtp_across_pipeline else "",
        )

    def current_mtp_k(self) -> int | None:
        """The K the native-MTP engine chose last (None: no MTP cycle ran here)."""
        return None

    def admit(self, cancel: CancelToken) -> Callable[[], None]:
        """Count a request in (``Busy`` beyond ``max_queued``, ``InstanceUnavailable`` unless
        ready); returns the idempotent release. Unloading sets every admitted ``cancel``."""
        with self._count_lock:
            if self.state != READY:
                raise InstanceUnavailable(self.unavailable_reason())
            if self._in_flight >= self.max_queued:
                raise Busy(
                    f"instance {self.instance_id} already has {self._in_flight} requests "
                    f"(its limit is {self.max_queued}); retry later"
                )
            self._in_flight += 1
            self._cancels.add(cancel)
        released = False

        def release() -> None:
            nonlocal released
            with self._count_lock:
                if released:
                    return
                released = True
                self._in_flight -= 1
                self._cancels.discard(cancel)
                self._idle.notify_all()

        return release

    def mark_ready(self) -> bool:
        """Loading -> ready; False when an unload came first."""
        with self._count_lock:
            if self.state != LOADING:
                return False
            self.state = READY
            return True

    def mark_unloading(self) -> bool:
        """-> unloading; False when the instance is still loading (its launch cleans up)."""
        with self._count_lock:
            was, self.state = self.state, UNLOADING
            return was != LOADING

    def unavailable_reason(self) -> str:
        if self.state == LOADING:
            return f"instance {self.instance_id} of {self.model} is still loading; retry shortly"
        if self.state == FAILED:
            return (
                f"instance {self.instance_id} of {self.model} failed ({self.failure}); "
                f"unload it and launch {self.model} again"
            )
        return f"instance {self.instance_id} of {self.model} is being unloaded"

    def record(self, stats: Any) -> None:
        """Feed the recent-throughput meter with a finished request's decode."""
        with self._count_lock:
            self.served += 1
        decoded = max(stats.generation_tokens - 1, 0)
        if stats.generation_tps > 0 and decoded:
            self.rate.record(decoded, decoded / stats.generation_tps)

    def cancel_all_and_wait(self, timeout_s: float = 10.0) -> None:
        with self._count_lock:
            cancels = list(self._cancels)
        for cancel in cancels:
            cancel.set()
        with self._count_lock:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)

    def stage_stats(self) -> list[StageRef]:
        return list(self.stages)

    # -- what subclasses implement --

    @property
    def batch_size(self) -> int:
        """Requests computing together right now."""
        return 0

    @property
    def queued(self) -> int:
        """Admitted requests waiting for a place in the batch."""
        return 0

    @property
    def tokenizer(self) -> Any:
        raise NotImplementedError

    def validate(self, request: Any, choice: EngineChoice) -> list[int]:
        """Prompt ids of ``request``; ``RequestError`` naming the bad value."""
        raise NotImplementedError

    def generate(self, request: Any, choice: EngineChoice, cancel: CancelToken) -> Iterator[Any]:
        raise NotImplementedError

    def release(self) -> None:
        """Free the weights (every stage)."""
        raise NotImplementedError


@dataclass
class LocalInstance(Instance):
    """The whole model in this daemon: requests decode together in the runner's batch."""

    runner: Any = None  # node.inference.runner.LocalRunner

    @property
    def tokenizer(self) -> Any:
        runner = self.runner
        if runner is None:
            raise InstanceUnavailable(self.unavailable_reason())
        return runner.loaded.tokenizer

    def current_mtp_k(self) -> int | None:
        runner = self.runner
        return runner.mtp_current_k if runner is not None else None

    def validate(self, request: Any, choice: EngineChoice) -> list[int]:
        from node.inference.requests import check_against_model, prompt_token_ids

        runner = self.runner
        if runner is None:
            raise InstanceUnavailable(self.unavailable_reason())
        loaded = runner.loaded
        ids = prompt_token_ids(request, loaded.tokenizer)
        max_k = loaded.mtp_k_limits[1] if choice.engine == "native_mtp" else None
        check_against_model(
            request,
            ids,
            vocab_size=loaded.vocab_size,
            context_length=loaded.context_length,
            max_k=max_k,
        )
        budget = runner.context_tokens
        if budget is not None and len(ids) >= budget:
            raise Busy(
                f"the prompt has {len(ids)} tokens; instance {self.instance_id} budgets memory "
                f"for {budget} tokens per sequence x {runner.max_batch} sequences (launched "
                f"with context_length {budget}); launch it with a larger --context-length"
            )
        return ids

    def generate(self, request: Any, choice: EngineChoice, cancel: CancelToken) -> Iterator[Any]:
        runner = self.runner
        if runner is None or cancel.is_set():
            return
        engine = "native_mtp" if choice.engine == "native_mtp" else "local"
        # The runner's batch scheduler runs it with the instance's other requests.
        events = runner.submit(request.model_copy(update={"engine": engine}), cancel)
        try:
            yield from events
        finally:
            events.close()  # a request that stops early leaves the batch at the next step

    @property
    def batch_size(self) -> int:
        runner = self.runner
        return runner.batch_size if runner is not None else 0

    @property
    def queued(self) -> int:
        runner = self.runner
        return runner.queued if runner is not None else 0

    def release(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()  # the scheduler ends every request and stops computing


@dataclass
class PipelineInstance(Instance):
    """Stages on several nodes; many requests in flight at once, at different stages."""

    engine: Any = None  # node.inference.pipeline.PipelineEngine

    @property
    def tokenizer(self) -> Any:
        engine = self.engine
        if engine is None:
            raise InstanceUnavailable(self.unavailable_reason())
        return engine.tokenizer

    def validate(self, request: Any, choice: EngineChoice) -> list[int]:
        engine = self.engine
        if engine is None:
            raise InstanceUnavailable(self.unavailable_reason())
        return engine.prompt_ids(request)

    @property
    def batch_size(self) -> int:
        engine = self.engine
        return engine.batch_size if engine is not None else 0

    @property
    def queued(self) -> int:
        engine = self.engine
        return engine.queued if engine is not None else 0

    def generate(self, request: Any, choice: EngineChoice, cancel: CancelToken) -> Iterator[Any]:
        engine = self.engine
        if engine is None or cancel.is_set():
            return
        request_id = uuid.uuid4().hex
        # A pipeline_mtp instance runs plain pipelined decode for engine=pipeline requests.
        engine_name = "pipeline" if choice.engine == "pipeline" else "auto"
        events = engine.generate(
            request.model_copy(update={"engine": engine_name}),
            reason=choice.reason,
            request_id=request_id,
        )
        cancel.on_cancel(lambda: engine.cancel(request_id))
        try:
            for event in events:
                if cancel.is_set():
                    return
                yield event
        finally:
            events.close()  # releases the request on every stage

    def release(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()  # UnloadShard on every remote stage, local stage 0 shut down


def release_instance(instance: Instance) -> None:
    try:
        instance.release()
    finally:
        gc.collect()  # the model graph has reference cycles; free it now, not eventually
        import mlx.core as mx

        mx.clear_cache()
