"""Run requests against one loaded checkpoint, choosing the engine per request.

``generate`` runs one request on the caller's thread (the CLI's ``--local`` mode);
``submit`` hands it to the instance's batch scheduler (a single-node daemon instance), which
runs every request of the instance on one worker thread: ``local`` requests decode together
in one batch of up to ``max_batch``, ``native_mtp`` requests draft and verify together in
another (``MtpBatchStep``), both within the instance's ``max_batch``. The MTP head
is recovered the first time a request selects ``native_mtp``; if recovery fails although the
probe looked fine, ``auto`` requests fall back to ``local`` with the reason and explicit
``native_mtp`` requests get the ``MtpUnavailable`` error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from node.inference.batching.mtp_step import MtpBatchStep
from node.inference.batching.scheduler import DEFAULT_MAX_BATCH, BatchScheduler, Cancel
from node.inference.batching.steps import LocalBatchStep
from node.inference.engine import LocalEngine
from node.inference.events import GenerationEvent
from node.inference.loading import LoadedModel
from node.inference.mtp.engine import MtpEngine, Rollback
from node.inference.mtp.recovery import MtpUnavailable
from node.inference.prompt_cache import DEFAULT_PROMPT_CACHE_MB, PromptCache
from node.inference.requests import GenerateRequest, RequestedEngine
from node.inference.selector import DEFAULT_DISABLED_BY, select_engine
from node.inference.stats import EngineKind
from node.logging import get_logger

log = get_logger(__name__)


class LocalRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        native_mtp_enabled: bool = True,
        disabled_by: str = DEFAULT_DISABLED_BY,
        rollback: Rollback = "capture",
        max_batch: int = DEFAULT_MAX_BATCH,
        context_tokens: int | None = None,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_MB * 2**20,
    ) -> None:
        self.loaded = loaded
        self.native_mtp_enabled = native_mtp_enabled
        self.disabled_by = disabled_by
        self.local = LocalEngine(loaded)
        self._rollback = rollback
        self._mtp: MtpEngine | None = None
        self._mtp_failure: str | None = None
        self.max_batch = max_batch
        # The memory the launch budgeted: KV and GatedDeltaNet state for max_batch sequences
        # of context_tokens each (None: the model's context). Batched generations stop there.
        self.context_tokens = context_tokens
        self._scheduler: BatchScheduler | None = None
        self._scheduler_lock = threading.Lock()
        # Snapshots of earlier requests' caches a later prompt can start from (0 disables).
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None

    def select(self, requested: RequestedEngine = "auto") -> tuple[EngineKind, str]:
        """(engine, reason) for a request asking for ``requested``; may load the MTP head."""
        kind, reason = select_engine(
            self.loaded.mtp_probe,
            requested,
            self.native_mtp_enabled,
            card=self.loaded.card,
            disabled_by=self.disabled_by,
        )
        if kind != "native_mtp":
            return kind, reason
        if self._mtp is None and self._mtp_failure is None:
            try:
                self._mtp = MtpEngine(self.loaded, rollback=self._rollback)
            except MtpUnavailable as exc:
                self._mtp_failure = exc.reason
                log.warning("mtp head not recovered", reason=exc.reason)
        if self._mtp_failure is not None:
            if requested == "native_mtp":
                raise MtpUnavailable(self._mtp_failure)
            return "local", f"local: {self._mtp_failure}"
        return kind, reason

    @property
    def mtp_current_k(self) -> int | None:
        """The K of the latest native-MTP cycle (status shows it): the batch's, once it ran."""
        step = self._scheduler.steps.get("native_mtp") if self._scheduler is not None else None
        if isinstance(step, MtpBatchStep) and step.current_k is not None:
            return step.current_k
        return self._mtp.current_k if self._mtp is not None else None

    def generate(self, request: GenerateRequest) -> Iterator[GenerationEvent]:
        kind, reason = self.select(request.engine)
        if kind == "native_mtp":
            assert self._mtp is not None
            return self._mtp.generate(request, reason=reason)
        return self.local.generate(request, reason=reason)

    @property
    def scheduler(self) -> BatchScheduler:
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = BatchScheduler(
                    {
                        "local": LocalBatchStep(
                            self.loaded,
                            self.max_batch,
                            context_tokens=self.context_tokens,
                            prompt_cache=self.prompt_cache,
                        ),
                        # The head loads when the first native-MTP request joins (select
                        # recovered it by then); instances that never select MTP never do.
                        "native_mtp": MtpBatchStep(
                            self.loaded,
                            None,
                            self.max_batch,
                            context_tokens=self.context_tokens,
                            prompt_cache=self.prompt_cache,
                        ),
                    },
                    max_batch=self.max_batch,
                    name=f"batch-{self.loaded.card.id}" if self.loaded.card else "batch",
                )
            return self._scheduler

    def submit(
        self, request: GenerateRequest, cancel: Cancel | None = None
    ) -> Iterator[GenerationEvent]:
        """Queue ``request`` on the batch scheduler; iterate the result for its events."""
        kind, reason = self.select(request.engine)
        return self.scheduler.submit(request, kind, reason, cancel)

    @property
    def batch_size(self) -> int:
        return self._scheduler.batch_size if self._scheduler is not None else 0

    @property
    def queued(self) -> int:
        return self._scheduler.queued if self._scheduler is not None else 0

    def close(self) -> None:
        """End every request and stop the scheduler's worker (the instance is unloading)."""
        with self._scheduler_lock:
            scheduler = self._scheduler
        if scheduler is not None:
            scheduler.close()
