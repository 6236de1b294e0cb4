"""Batched forwards at a pipeline stage: which waiting rows run together, and their caches.

A stage takes every job that waited while it computed (``plan_drain``): the rows that sample a
token (decode steps, a prompt's last token; a row may carry T > 1 positions, e.g. a verify
step) of all requests of one upstream stream run as one [B, T] forward per T; after them the
prefill chunks (rows that do not sample) of the requests that arrived together run as ragged
forwards (right-padded to the longest, as mlx-lm's ``BatchGenerator.prompt``): every
request's first waiting piece in one, their second pieces in the next, and so on, at most
``PREFILL_BATCH_TOKENS`` padded positions per drain in all. So running streams wait about one
chunk for newcomers however many start at once, and prompts that fit the budget finish in the
same drain: their first sampled rows meet in one batch (groups that start apart stay apart
while stage 0 keeps up). A request's jobs keep their order: once one of its jobs is held
back, its later ones are too.

``BatchCaches`` holds every request's caches. A request alone uses mlx-lm's own per-request
caches (``make_prompt_cache``: ``KVCache``, GatedDeltaNet ``ArraysCache``); requests that step
together share batch caches built with mlx-lm's own ``merge`` / ``extend`` (``BatchKVCache``
with per-row offsets and left padding; ``ArraysCache`` with one state row per request), as
mlx-lm's ``BatchGenerator`` does. A group is kept as long as the same requests keep arriving
together (a batched frame travels the whole pipeline as one, so every stage sees the same
groups); a leaving request is filtered out of its group; a group that would be split is
taken apart (``extract``) into per-request caches first. Pure MLX; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

Key = tuple[int, str]  # (upstream session id, request id)

# Padded positions (rows x the longest row) of the prefill rows one drain runs together: about
# the coordinator's prefill piece (PipelineEngine's PREFILL_STEP_SIZE), so the decode rows
# behind it wait about as long as for one newcomer's chunk. A longer row still runs, alone.
PREFILL_BATCH_TOKENS = 2048


@dataclass
class Row:
    """One request's positions in an activation job: a single frame or one row of a batch."""

    rid: str
    start_position: int
    token_ids: list[int]
    sample: bool
    index: int = 0  # its row in the job's hidden tensor
    # pipeline_mtp: a verify row's (keep_previous, draft_k) (node.inference.stage_mtp)
    verify: tuple[int, int] | None = None


@dataclass
class Job:
    """One unit of a stage's work, in arrival order. ``kind``: open, rows, release, probe, end."""

    kind: str
    session_id: int
    rid: str = ""
    rows: list[Row] = field(default_factory=list)
    session: Any = None  # the StageSession the rows came in on (their way downstream)
    tensor: Any = None  # the rows' hidden states (a RawTensor; None for a first stage)
    run: Callable[[], None] | None = None  # what executes a non-rows job

    def keys(self) -> list[Key]:
        if self.kind == "rows":
            return [(self.session_id, r.rid) for r in self.rows]
        return [(self.session_id, self.rid)] if self.rid else []


@dataclass
class BatchEntry:
    """A row picked for a batched forward, with the job (its tensor) it came in."""

    job: Job
    row: Row

    @property
    def key(self) -> Key:
        return (self.job.session_id, self.row.rid)


@dataclass
class DrainPlan:
    now: list[Job]  # cheap jobs (open, release, probe), in arrival order, before the batches
    batches: list[list[BatchEntry]]  # one forward each: rows of one session with the same T
    prefill: list[list[BatchEntry]]  # prefill rows of one session: ragged forwards, in order
    chunk: Job | None  # the one held-back job run last (only when no prefill rows run)
    requeue: list[Job]  # the rest of the held-back jobs, back to the front of the queue


def plan_drain(jobs: Iterable[Job], prefill_tokens: int = PREFILL_BATCH_TOKENS) -> DrainPlan:
    """Split the waiting jobs into what runs now, batched, next, and later (pure)."""
    now: list[Job] = []
    batches: dict[tuple[int, int], list[BatchEntry]] = {}
    batched: dict[Key, tuple[int, int]] = {}
    # Prefill rows of one session in waves: one ragged forward each, a request's k-th piece
    # of this drain in wave k; padded positions (rows x longest, summed) within the budget.
    waves: list[list[BatchEntry]] = []
    wides: list[int] = []
    pieces: dict[Key, int] = {}
    spent = 0
    held: list[Job] = []
    blocked: set[Key] = set()
    ended: set[int] = set()  # sessions whose end is held back: all their later jobs wait too
    for job in jobs:
        keys = job.keys()
        waits = job.session_id in ended or any(k in blocked for k in keys)
        if job.kind == "end":
            held.append(job)
            ended.add(job.session_id)
            continue
        if job.kind == "rows":
            lengths = {len(r.token_ids) for r in job.rows}
            fresh = not waits and not any(k in batched for k in keys)
            if any(r.sample for r in job.rows) and any(k in pieces for k in keys):
                fresh = False  # its prompt runs in this drain: it samples in the next
            if fresh and len(lengths) == 1 and all(r.sample for r in job.rows):
                where = (job.session_id, lengths.pop())
                for row in job.rows:
                    batches.setdefault(where, []).append(BatchEntry(job, row))
                    batched[(job.session_id, row.rid)] = where
                continue
            one_session = not waves or waves[0][0].job.session_id == job.session_id
            if fresh and one_session and not any(r.sample for r in job.rows):
                # Rows of one job may split across drains; each keeps its own order.
                taken = []
                for row in job.rows:
                    key = (job.session_id, row.rid)
                    w = pieces.get(key, 0)  # a request's next piece goes one wave later
                    wave = waves[w] if w < len(waves) else []
                    cost = (len(wave) + 1) * max([len(row.token_ids), *wides[w : w + 1]])
                    grown = spent - (len(wave) * wides[w] if wave else 0) + cost
                    if spent and grown > prefill_tokens:
                        break
                    if not wave:
                        waves.append(wave)
                        wides.append(0)
                    wave.append(BatchEntry(job, row))
                    wides[w] = max(wides[w], len(row.token_ids))
                    spent = grown
                    pieces[key] = w + 1
                    taken.append(row)
                if len(taken) == len(job.rows):
                    continue
                job = Job(
                    "rows",
                    job.session_id,
                    rows=job.rows[len(taken) :],
                    session=job.session,
                    tensor=job.tensor,
                )
                keys = job.keys()
            held.append(job)
            blocked.update(keys)
            continue
        if waits or (job.kind == "snapshot" and any(k in pieces or k in batched for k in keys)):
            # A prompt-cache snapshot is of the caches after every earlier job of its
            # request: it waits for the pieces this drain computes.
            held.append(job)
            blocked.update(keys)
            continue
        if job.kind == "release":
            key = (job.session_id, job.rid)
            where = batched.pop(key, None)
            if where is not None:  # the request is gone: its pending row need not run
                batches[where] = [e for e in batches[where] if e.key != key]
            if pieces.pop(key, None) is not None:
                waves = [[e for e in wave if e.key != key] for wave in waves]
        now.append(job)
    prefill = [wave for wave in waves if wave]
    chunk = held[0] if held and not prefill else None
    return DrainPlan(
        now=now,
        batches=[entries for entries in batches.values() if entries],
        prefill=prefill,
        chunk=chunk,
        requeue=held[1:] if chunk is not None else held,
    )


# ---- caches ----


@dataclass(eq=False)
class _Group:
    keys: list[Key]
    cache: list[Any]  # one batch cache per layer; row i belongs to keys[i]


def _as_batch(cache: list[Any]) -> list[Any]:
    """A request's own caches as batch caches of one row (mlx-lm's ``merge``)."""
    return [c.merge([c]) for c in cache]


class BatchCaches:
    """Every request's caches on one stage, alone or in the batch group it steps with."""

    def __init__(self, make_cache: Callable[[], list[Any]]) -> None:
        self._make_cache = make_cache
        self._solo: dict[Key, list[Any]] = {}
        self._group: dict[Key, _Group] = {}

    def __len__(self) -> int:
        return len(self._solo) + len(self._group)

    def __contains__(self, key: Key) -> bool:
        return key in self._solo or key in self._group

    def open(self, key: Key, caches: list[Any] | None = None) -> None:
        """New caches for ``key``: empty, or ``caches`` (a prompt-cache snapshot's)."""
        self._solo[key] = caches if caches is not None else self._make_cache()

    def copy_of(self, key: Key) -> list[Any]:
        """The request's caches as one sequence's (a row of its group extracted, the group
        left as it is): what a prompt-cache snapshot freezes."""
        group = self._group.get(key)
        if group is None:
            return self._solo[key]
        index = group.keys.index(key)
        return [c.extract(index) for c in group.cache]

    def solo(self, key: Key) -> list[Any]:
        """The request's own caches (taken out of its group if it is in one)."""
        group = self._group.get(key)
        if group is not None:
            self._split(group)
        return self._solo[key]

    def batch(self, keys: list[Key]) -> tuple[list[Key], list[Any]]:
        """Batch caches for ``keys`` stepping together: (the row order to use, the caches).

        The same requests as last time: their group as it is. Otherwise whole groups are
        joined with ``extend`` and lone requests merged in; a group only partly here is taken
        apart first."""
        wanted = set(keys)
        groups: list[_Group] = []
        for key in keys:
            group = self._group.get(key)
            if group is not None and all(g is not group for g in groups):
                groups.append(group)
        if len(groups) == 1 and set(groups[0].keys) == wanted:
            return groups[0].keys, groups[0].cache
        for group in groups:
            if not set(group.keys) <= wanted:
                self._split(group)
        pieces: list[tuple[list[Key], list[Any]]] = []
        seen: set[int] = set()
        for key in keys:
            group = self._group.get(key)
            if group is None:
                pieces.append(([key], _as_batch(self._solo.pop(key))))
            elif id(group) not in seen:
                seen.add(id(group))
                pieces.append((group.keys, group.cache))
        order, cache = list(pieces[0][0]), pieces[0][1]
        for more_keys, more in pieces[1:]:
            for layer, other in zip(cache, more, strict=True):
                layer.extend(other)
            order += more_keys
        joined = _Group(order, cache)
        for key in order:
            self._group[key] = joined
        return order, cache

    def release(self, key: Key) -> None:
        """Free the request's caches; its group goes on without its row."""
        if self._solo.pop(key, None) is not None:
            return
        group = self._group.pop(key, None)
        if group is None:
            return
        index = group.keys.index(key)
        keep = [i for i in range(len(group.keys)) if i != index]
        group.keys = [group.keys[i] for i in keep]
        if len(keep) == 1:  # one left: back to its own caches, as if it had run alone
            (only,) = group.keys
            self._solo[only] = [c.extract(keep[0]) for c in group.cache]
            del self._group[only]
            return
        if keep:
            rows = mx.array(keep)
            for layer in group.cache:
                layer.filter(rows)

    def drop_session(self, session_id: int) -> None:
        for key in [k for k in [*self._solo, *self._group] if k[0] == session_id]:
            self._solo.pop(key, None)
            self._group.pop(key, None)

    def clear(self) -> None:
        self._solo.clear()
        self._group.clear()

    def _split(self, group: _Group) -> None:
        for i, key in enumerate(group.keys):
            self._solo[key] = [c.extract(i) for c in group.cache]
            del self._group[key]

    def groups(self) -> list[int]:
        """Sizes of the batch groups (for status)."""
        seen: dict[int, int] = {}
        for group in self._group.values():
            seen[id(group)] = len(group.keys)
        return sorted(seen.values(), reverse=True)
