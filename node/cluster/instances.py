"""Instances: what runs where, as every node sees it.

Design: **the coordinator owns its instances; every other node asks it.** An instance lives in
exactly one registry — the coordinator's, in memory — and ``ClusterStatus(local_only=true)``
returns a node's own instances. A node answering a cluster-wide question (status, "which node
serves MODEL?") asks every live peer in parallel and merges the answers with its own.

Why not replicate (gossip on heartbeats, or a replicated table)? An instance is only usable
while its coordinator is alive — it tokenizes, drives the pipeline and streams the text — so
the coordinator is the one source of truth that can never be stale, and there is no second
copy to disagree with. Its stage holders keep the record it sent with their shard only to
take over when it dies (node.cluster.failover): the successor then becomes the one source of
truth under the same instance id. The cost is one parallel round of small RPCs per
cluster-wide query, which for the handful of Macs macmesh targets is a millisecond on a LAN;
peers that do not answer within the timeout are skipped, so one sick node cannot stall
``macmesh status``.

This module holds the typed record (``InstanceInfo``, converted to and from the wire here),
the throughput meter behind "recent tok/s", and the thread-safe local registry.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from node.cluster.selector import ENGINE_PREFERENCE, EngineRefused, compatible, request_engine
from node.inference.stats import StageStats
from node.messages import InstanceInfo

LOADING = "loading"
READY = "ready"
FAILED = "failed"
UNLOADING = "unloading"


def layers_text(start: int, end: int) -> str:
    """``[start, end)`` as people write it: "layer 3", "layers 0-11"."""
    return f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"


class InstanceUnavailable(Exception):
    """The instance exists but cannot take requests now (loading, failed, unloading)."""


# One stage of an instance: a node and its layer range [start_layer, end_layer); the same
# record a request's stats list (node.inference.stats.StageStats).
StageRef = StageStats


class RecentRate:
    """Decode tokens per second over the requests that finished in the last ``window_s``.

    Tokens and decode seconds are summed, so a long request weighs more than a short one (a
    plain mean of per-request rates would let a 2-token request swing the figure). With no
    request in the window the figure is 0: an idle instance is not "doing 40 tok/s"."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int, float]] = deque()
        self._lock = threading.Lock()

    def record(self, tokens: int, seconds: float, now: float | None = None) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            self._samples.append((time.monotonic() if now is None else now, tokens, seconds))

    def value(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._samples and now - self._samples[0][0] > self.window_s:
                self._samples.popleft()
            tokens = sum(t for _, t, _ in self._samples)
            seconds = sum(s for _, _, s in self._samples)
        return tokens / seconds if seconds > 0 else 0.0


class HasInfo(Protocol):
    instance_id: str

    def info(self) -> InstanceInfo: ...


InstanceT = TypeVar("InstanceT", bound=HasInfo)


class InstanceRegistry(Generic[InstanceT]):
    """The instances this node coordinates. Thread-safe; holds live objects, hands out infos."""

    def __init__(self) -> None:
        self._items: dict[str, InstanceT] = {}
        self._lock = threading.Lock()

    def add(self, instance: InstanceT, *, replacing: InstanceT | None = None) -> None:
        """Register ``instance``; with ``replacing``, in that record's place (a failed instance
        placed again: its id never disappears in between). ``ValueError`` when the id is taken
        (or, replacing, when that record is gone)."""
        with self._lock:
            current = self._items.get(instance.instance_id)
            if current is not replacing:
                what = "is already registered" if replacing is None else "was unloaded meanwhile"
                raise ValueError(f"instance {instance.instance_id!r} {what}")
            self._items[instance.instance_id] = instance

    def remove(self, instance_id: str) -> InstanceT | None:
        with self._lock:
            return self._items.pop(instance_id, None)

    def get(self, instance_id: str) -> InstanceT | None:
        with self._lock:
            return self._items.get(instance_id)

    def all(self) -> list[InstanceT]:
        with self._lock:
            return list(self._items.values())

    def infos(self) -> list[InstanceInfo]:
        return [item.info() for item in self.all()]

    def matching(self, name: str) -> list[InstanceT]:
        """Instances that answer to ``name`` (an instance id, MODEL as launched, or an alias)."""
        return [item for item in self.all() if item.info().answers_to(name)]


def merge(local: Iterable[InstanceInfo], remote: Iterable[InstanceInfo]) -> list[InstanceInfo]:
    """One list, each instance once (a peer may have been asked twice under two addresses; a
    coordinator cut off for a while may still hold the failed record of an instance its
    successor serves: the ready one wins)."""
    seen: dict[str, InstanceInfo] = {}
    for info in [*local, *remote]:
        kept = seen.get(info.instance_id)
        if kept is None or (kept.state != READY and info.state == READY):
            seen[info.instance_id] = info
    return sorted(seen.values(), key=lambda i: (i.model, i.instance_id))


def pick_instance(
    candidates: list[InstanceInfo], requested: str, local_node_id: str
) -> InstanceInfo:
    """The instance a request for one model goes to. Pure.

    Among the candidates (every instance that answers to the model) keep those whose engine
    can serve ``requested`` (``EngineRefused`` with the first one's reason if none can), then
    those ready (``InstanceUnavailable`` if none is), then prefer this node's (no extra hop),
    the faster engine when the request left the choice to us, and the least busy.
    ``LookupError`` when there is no candidate at all."""
    if not candidates:
        raise LookupError("no instance")
    usable = [c for c in candidates if compatible(requested, c.engine)]  # type: ignore[arg-type]
    if not usable:
        first = candidates[0]
        request_engine(requested, first.engine, first.engine_reason, len(first.stages))  # type: ignore[arg-type]
        raise EngineRefused(f"no instance can run engine={requested}")  # pragma: no cover
    ready = [c for c in usable if c.state == READY]
    if not ready:
        states = ", ".join(_state_text(c) for c in usable)
        raise InstanceUnavailable(f"no instance is ready ({states}); retry shortly or relaunch")
    auto = requested in ("", "auto")
    return min(
        ready,
        key=lambda c: (
            c.coordinator_node_id != local_node_id,
            ENGINE_PREFERENCE.get(c.engine, 9) if auto else 0,
            c.in_flight,
            c.instance_id,
        ),
    )


def _state_text(info: InstanceInfo) -> str:
    """ "X is loading", or for a failed instance what failed (its reason's ``[failed: ...]``)."""
    _, marker, failure = info.engine_reason.partition("[failed: ")
    if info.state == FAILED and marker:
        return f"{info.instance_id} failed: {failure.removesuffix(']')}"
    return f"{info.instance_id} is {info.state}"
