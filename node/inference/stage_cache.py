"""A pipeline stage's share of the instance's prompt cache: snapshot payloads by id.

The coordinator keeps the instance's ``PromptCache`` (which token prefixes are cached, the
byte budget, LRU order) with entries that hold no arrays, only a snapshot id; each stage keeps
the payload for its own layers here: a frozen copy of the request's caches and, on the last
stage, the sampling history (penalties look back at earlier tokens). The coordinator names
the snapshot to take (``SnapshotRequest`` after a prompt's last prefill chunk, or
``ReleaseRequest.snapshot`` when a generation ends), to resume from (``OpenRequest``) and to
forget (``ForgetSnapshots``, when its store evicts one); frames of one stream arrive in
order, so a stage never needs to decide anything.

A forget can overtake the store it refers to (a stage runs cheap jobs before held-back
prefill chunks), so a forgotten id that is not here yet is remembered and its store dropped.
Pure bookkeeping plus ``freeze``/``thaw``; the stage's job thread is the only caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from node.inference.prompt_cache import Hit, Snapshot, freeze, thaw


@dataclass(frozen=True)
class Payload:
    snapshot: Snapshot
    history: list[int]  # the last stage's sampling history (empty elsewhere)


class StageSnapshots:
    def __init__(self) -> None:
        self._payloads: dict[int, Payload] = {}
        self._forgotten: set[int] = set()
        self.nbytes = 0  # kept as a sum: status reads it from other threads

    def __len__(self) -> int:
        return len(self._payloads)

    def store(self, snapshot_id: int, caches: list[Any], history: list[int]) -> None:
        if snapshot_id in self._forgotten:
            self._forgotten.discard(snapshot_id)
            return
        frozen = freeze(caches)
        if frozen is None:
            raise ValueError("these caches cannot be snapshotted (rotating or quantized KV)")
        self._drop(snapshot_id)
        self._payloads[snapshot_id] = Payload(frozen, list(history))
        self.nbytes += frozen.nbytes

    def resume(self, snapshot_id: int, length: int) -> tuple[list[Any], list[int]] | None:
        """Fresh caches holding the snapshot's ``length`` positions (what the coordinator
        stored it under), and its history; None if unknown here or of another length."""
        payload = self._payloads.get(snapshot_id)
        if payload is None:
            return None
        if any(getattr(c, "offset", length) != length for c in payload.snapshot.caches):
            return None
        return thaw(Hit(length, payload.snapshot, length)), list(payload.history)

    def forget(self, snapshot_ids: Iterable[int]) -> None:
        for snapshot_id in snapshot_ids:
            if not self._drop(snapshot_id):
                self._forgotten.add(snapshot_id)

    def clear(self) -> None:
        self._payloads.clear()
        self._forgotten.clear()
        self.nbytes = 0

    def _drop(self, snapshot_id: int) -> bool:
        payload = self._payloads.pop(snapshot_id, None)
        if payload is None:
            return False
        self.nbytes -= payload.snapshot.nbytes
        return True
