"""Run requests against one loaded checkpoint, choosing the engine per request.

This is what the CLI's ``--local`` mode and a single-node daemon instance call.  The MTP head
is recovered the first time a request selects ``native_mtp``; if recovery fails although the
probe looked fine, ``auto`` requests fall back to ``local`` with the reason and explicit
``native_mtp`` requests get the ``MtpUnavailable`` error.
"""

from __future__ import annotations

from collections.abc import Iterator

from node.inference.engine import LocalEngine
from node.inference.events import GenerationEvent
from node.inference.loading import LoadedModel
from node.inference.mtp.engine import MtpEngine, Rollback
from node.inference.mtp.recovery import MtpUnavailable
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
    ) -> None:
        self.loaded = loaded
        self.native_mtp_enabled = native_mtp_enabled
        self.disabled_by = disabled_by
        self.local = LocalEngine(loaded)
        self._rollback = rollback
        self._mtp: MtpEngine | None = None
        self._mtp_failure: str | None = None

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

    def generate(self, request: GenerateRequest) -> Iterator[GenerationEvent]:
        kind, reason = self.select(request.engine)
        if kind == "native_mtp":
            assert self._mtp is not None
            return self._mtp.generate(request, reason=reason)
        return self.local.generate(request, reason=reason)
