"""Which gRPC status an exception goes out with, in one place for every InferenceService call.

INVALID_ARGUMENT (a malformed request, a value outside the model's limits), NOT_FOUND (unknown
model, model not launched, no such instance), FAILED_PRECONDITION (an engine the instance
cannot run, weights missing on a stage node), RESOURCE_EXHAUSTED (the model does not fit, the
instance's queue is full), UNAVAILABLE (instance loading/failed, a stage or peer unreachable),
CANCELLED / DEADLINE_EXCEEDED from gRPC itself; hub errors of a ``launch --pull`` as the
HubService maps them (NOT_FOUND for a repo or revision, FAILED_PRECONDITION otherwise). Anything else is INTERNAL, and logged.
"""

from __future__ import annotations

import grpc

from node.cluster.coordinator import LaunchCancelled
from node.cluster.instances import InstanceUnavailable
from node.cluster.live import Busy
from node.cluster.selector import EngineRefused
from node.logging import get_logger
from node.placement import InsufficientMemoryError, UnknownModelError

log = get_logger(__name__)

Code = grpc.StatusCode


class Refusal(Exception):
    """An error with the status code it goes out with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message an exception goes out with."""
    from node.hub.remote import HubError, RepoNotFound, RevisionNotFound
    from node.inference.errors import EngineUnavailable

    if isinstance(exc, Refusal):
        return exc.code, exc.message
    if isinstance(exc, grpc.RpcError):  # a peer's answer, relayed as it was
        return exc.code(), exc.details() or exc.code().name  # type: ignore[attr-defined]
    if isinstance(exc, UnknownModelError):  # NoCheckpointError too
        return Code.NOT_FOUND, str(exc)
    if isinstance(exc, InsufficientMemoryError | Busy):
        return Code.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineRefused):
        return Code.FAILED_PRECONDITION, exc.reason
    if isinstance(exc, EngineUnavailable):
        return Code.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, InstanceUnavailable):
        return Code.UNAVAILABLE, str(exc)
    if isinstance(exc, LaunchCancelled):
        return Code.CANCELLED, str(exc)
    if isinstance(exc, RepoNotFound | RevisionNotFound):  # as node.hub.service maps them
        return Code.NOT_FOUND, str(exc)
    if isinstance(exc, HubError):  # not a repo id, offline, no space, a bad download
        return Code.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ValueError):  # PlacementError, RequestError, bad fields
        return Code.INVALID_ARGUMENT, str(exc)
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):  # PipelineError
        if code is Code.CANCELLED:  # the engine closed under the request: it was unloaded
            return Code.UNAVAILABLE, f"the instance was unloaded while the request ran ({exc})"
        return code, str(exc)
    log.error("internal error", error=repr(exc), exc_info=exc)
    return Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    context.abort(code, message)
