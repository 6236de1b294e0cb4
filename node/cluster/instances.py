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

from pydantic import BaseModel, Field

from node.cluster.selector import ENGINE_PREFERENCE, EngineRefused, compatible, request_engine
from node.inference.stats import StageStats
from node.messages import stage_from_proto, stage_to_proto
from node.proto.macmesh.v1 import inference_pb2 as pb

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


class InstanceInfo(BaseModel):
    """An instance as status shows it and as peers see it."""

    instance_id: str
    model: str  # MODEL as given to launch
    aliases: list[str] = Field(default_factory=list)  # other names that reach it
    coordinator_node_id: str
    coordinator_address: str = ""
    stages: list[StageRef]
    engine: str
    engine_reason: str
    state: str
    recent_generation_tps: float = 0.0
    in_flight: int = 0
    requests_served: int = 0
    batch_size: int = 0  # requests computing together now
    queued: int = 0  # admitted, waiting for a place in the batch
    current_mtp_k: int | None = None  # native MTP: the K policy's latest choice
    min_nodes: int = 1  # as launched: a re-placement or a takeover honours them
    context_length: int | None = None

    def answers_to(self, name: str) -> bool:
        """Whether ``GenerateRequest.model == name`` reaches this instance."""
        return name in (self.instance_id, self.model) or name in self.aliases

    def to_proto(self) -> pb.Instance:
        return pb.Instance(
            instance_id=self.instance_id,
            model=self.model,
            coordinator_node_id=self.coordinator_node_id,
            stages=[stage_to_proto(s) for s in self.stages],
            engine=self.engine,
            engine_reason=self.engine_reason,
            state=self.state,
            recent_generation_tps=self.recent_generation_tps,
            aliases=self.aliases,
            in_flight=self.in_flight,
            requests_served=self.requests_served,
            coordinator_address=self.coordinator_address,
            batch_size=self.batch_size,
            queued=self.queued,
            current_mtp_k=self.current_mtp_k,
            min_nodes=self.min_nodes,
            context_length=self.context_length or 0,
        )

    @classmethod
    def from_proto(cls, msg: pb.Instance) -> InstanceInfo:
        return cls(
            instance_id=msg.instance_id,
            model=msg.model,
            aliases=list(msg.aliases),
            coordinator_node_id=msg.coordinator_node_id,
            coordinator_address=msg.coordinator_address,
            stages=[stage_from_proto(s) for s in msg.stages],
            engine=msg.engine,
            engine_reason=msg.engine_reason,
            state=msg.state,
            recent_generation_tps=msg.recent_generation_tps,
            in_flight=msg.in_flight,
            requests_served=msg.requests_served,
            batch_size=msg.batch_size,
            queued=msg.queued,
            current_mtp_k=msg.current_mtp_k if msg.HasField("current_mtp_k") else None,
            min_nodes=max(1, msg.min_nodes),
            context_length=msg.context_length or None,
        )


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
