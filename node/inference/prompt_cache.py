"""The prompt cache of one instance: reuse the state of the longest cached prefix of a prompt.

A follow-up turn of a chat sends the whole conversation again; everything up to the new user
message was computed before. ``PromptCache`` keeps snapshots of per-layer cache state keyed
by the tokens they hold, finds the longest one a new prompt can start from, and evicts the
least recently used snapshots beyond a memory budget in bytes.

What a snapshot can be reused for depends on its caches:

- KV caches (full attention, the MTP head) hold one entry per position and trim: a snapshot
  of tokens ``T`` serves any prompt sharing a prefix of ``c`` tokens with ``T``, trimmed to
  ``c``.
- GatedDeltaNet's ``ArraysCache`` holds one recurrent state for the whole prefix and cannot be
  trimmed: a snapshot serves only prompts that start with *all* of ``T``. So the engines store
  snapshots at the boundaries a later prompt is likely to extend: the end of each prompt (its
  first n-1 tokens, which is also what a repeat of the same prompt needs) and the end of each
  generation (prompt + answer: the next turn's prompt starts with it when the chat template
  renders the answer back as the same tokens).

A hit always leaves at least one prompt token to compute: the logits of the last one are what
the first generated token is sampled from.

The store (``PromptCache``) is pure bookkeeping over opaque per-layer cache lists — a radix
trie over token ids plus an LRU order, no MLX, no I/O — so any engine can use it with its own
cache layout: the local batch (the model's caches), native MTP (the model's caches followed by
the head's KV cache), a pipeline stage (its own layers' caches). ``freeze`` and ``thaw`` turn
mlx-lm caches of one sequence into a detached snapshot and back into fresh caches.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PROMPT_CACHE_MB = 1024


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Per-layer cache state of one sequence after exactly the tokens it is stored under."""

    caches: list[Any]  # the owner's layout, opaque to the store
    nbytes: int
    trimmable: bool  # every cache can be cut back to a shorter prefix (KV caches only)
    # What else the owner needs to continue from here, e.g. native MTP's last hidden state
    # (the head's next input pair); arrays are never written in place, so hits share them.
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """A snapshot a prompt can start from: its first ``length`` tokens need no compute."""

    length: int
    snapshot: Snapshot
    stored_length: int  # the tokens the snapshot holds; ``stored_length - length`` get trimmed


@dataclass(frozen=True)
class CacheStats:
    entries: int
    nbytes: int
    budget_bytes: int
    lookups: int
    hits: int
    hit_tokens: int  # prompt tokens served from snapshots, summed over hits
    stored: int
    evicted: int


@dataclass(eq=False)
class _Node:
    edge: tuple[int, ...]  # the tokens from the parent to here
    depth: int  # tokens from the root to here
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)  # keyed by the edge's first token
    entry: Snapshot | None = None


def _any(_: Snapshot) -> bool:
    return True


def _common(edge: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    """How many leading tokens of ``edge`` equal ``tokens[start:]``."""
    n = min(len(edge), len(tokens) - start)
    i = 0
    while i < n and edge[i] == tokens[start + i]:
        i += 1
    return i


class PromptCache:
    """Snapshots keyed by token prefix, within ``budget_bytes``, least recently used out first.

    One store holds one model's snapshots (one layout). Thread-safe: a daemon's status and
    metrics read the counters while the instance's worker looks up and stores."""

    def __init__(
        self, budget_bytes: int, on_evict: Callable[[Snapshot], None] | None = None
    ) -> None:
        """``on_evict`` sees every snapshot the store lets go of (evicted, replaced, made
        redundant, cleared): an owner whose payload lives elsewhere (a pipeline's stages)
        frees it there. It runs under the store's lock: it must not call the store."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._on_evict = on_evict
        self._root = _Node(edge=(), depth=0, parent=None)
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # oldest first
        self._nbytes = 0
        self._trimmable = 0  # stored snapshots that trim
        self._lock = threading.Lock()
        self._lookups = self._hits = self._hit_tokens = self._stored = self._evicted = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._lru),
                nbytes=self._nbytes,
                budget_bytes=self.budget_bytes,
                lookups=self._lookups,
                hits=self._hits,
                hit_tokens=self._hit_tokens,
                stored=self._stored,
                evicted=self._evicted,
            )

    # -- lookup ------------------------------------------------------------------------------

    def lookup(
        self, tokens: Sequence[int], usable: Callable[[Snapshot], bool] | None = None
    ) -> Hit | None:
        """The snapshot covering the longest prefix of ``tokens`` (at most ``len - 1``).

        ``usable`` narrows it to the snapshots an owner can continue from: native MTP needs
        the head's state in ``extras``, which the local engine's snapshots lack (while the
        local engine can use native MTP's: the model's caches are the same)."""
        with self._lock:
            self._lookups += 1
            hit = self._find(tokens, usable or _any)
            if hit is None:
                return None
            self._hits += 1
            self._hit_tokens += hit.length
            return hit

    def _find(self, tokens: Sequence[int], usable: Callable[[Snapshot], bool]) -> Hit | None:
        limit = len(tokens) - 1  # the last prompt token is always computed
        if limit < 1:
            return None
        node, depth = self._root, 0
        full: _Node | None = None  # the deepest entry that is a whole prefix of tokens
        while True:
            if node.entry is not None and 0 < depth <= limit and usable(node.entry):
                full = node
            if depth >= len(tokens):
                below, common = node, depth
                break
            child = node.children.get(tokens[depth])
            if child is None:
                below, common = node, depth
                break
            m = _common(child.edge, tokens, depth)
            if m < len(child.edge):
                below, common = child, depth + m
                break
            node, depth = child, depth + m
        best = full.depth if full is not None else 0
        trimmed = self._trimmed(below, common, limit, best, usable) if self._trimmable else None
        if trimmed is not None:
            return trimmed
        if full is None:
            return None
        self._lru.move_to_end(full)
        assert full.entry is not None
        return Hit(full.depth, full.entry, full.depth)

    def _trimmed(
        self,
        below: _Node,
        common: int,
        limit: int,
        best: int,
        usable: Callable[[Snapshot], bool],
    ) -> Hit | None:
        """The trimmable snapshot sharing the most tokens with the prompt, if that beats
        ``best``: entries under ``below`` share ``common`` tokens; going up the path, the
        rest of an ancestor's subtree shares the ancestor's depth."""
        node: _Node | None = below
        searched: _Node | None = None
        shared = common
        while node is not None:
            length = min(shared, limit)
            if length <= best:
                return None
            stack = [node]
            while stack:
                n = stack.pop()
                if n.entry is not None and n.entry.trimmable and usable(n.entry):
                    self._lru.move_to_end(n)
                    return Hit(length, n.entry, n.depth)
                stack.extend(c for c in n.children.values() if c is not searched)
            searched, node = node, node.parent
            shared = node.depth if node is not None else 0
        return None

    # -- storing -----------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], snapshot: Snapshot) -> bool:
        """Store ``snapshot`` under ``tokens`` (replacing one stored there); evict the least
        recently used beyond the budget. False when it alone exceeds the budget."""
        if not tokens or snapshot.nbytes > self.budget_bytes:
            return False
        with self._lock:
            node = self._node_for(tokens)
            if node.entry is not None:
                self._nbytes -= node.entry.nbytes
                self._trimmable -= node.entry.trimmable
                self._released(node.entry)
            node.entry = snapshot
            self._nbytes += snapshot.nbytes
            self._trimmable += snapshot.trimmable
            self._lru[node] = None
            self._lru.move_to_end(node)
            self._stored += 1
            if snapshot.trimmable:
                # A trimmable snapshot serves every prefix of itself: stored prefixes that
                # trim too only take memory.
                ancestor = node.parent
                while ancestor is not None:
                    if ancestor.entry is not None and ancestor.entry.trimmable:
                        self._drop(ancestor)
                    ancestor = ancestor.parent
            while self._nbytes > self.budget_bytes:
                oldest = next(iter(self._lru))
                self._drop(oldest)
                self._evicted += 1
            return True

    def clear(self) -> None:
        with self._lock:
            for node in list(self._lru):
                self._drop(node)

    def _released(self, snapshot: Snapshot) -> None:
        if self._on_evict is not None:
            self._on_evict(snapshot)

    def _node_for(self, tokens: Sequence[int]) -> _Node:
        """The node at exactly ``tokens``, splitting an edge or adding a leaf as needed."""
        node, depth = self._root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                leaf = _Node(edge=tuple(tokens[depth:]), depth=len(tokens), parent=node)
                node.children[tokens[depth]] = leaf
                return leaf
            m = _common(child.edge, tokens, depth)
            if m < len(child.edge):  # split the edge at m
                mid = _Node(edge=child.edge[:m], depth=depth + m, parent=node)
                node.children[tokens[depth]] = mid
                child.edge = child.edge[m:]
                child.parent = mid
                mid.children[child.edge[0]] = child
                child = mid
            node, depth = child, depth + m
        return node

    def _drop(self, node: _Node) -> None:
        """Forget ``node``'s snapshot and prune the branch it leaves empty."""
        assert node.entry is not None
        self._nbytes -= node.entry.nbytes
        self._trimmable -= node.entry.trimmable
        self._released(node.entry)
        node.entry = None
        del self._lru[node]
        while node.parent is not None and node.entry is None and not node.children:
            del node.parent.children[node.edge[0]]
            node = node.parent


# ----------------------------------------------------------------------------- mlx-lm caches


def freeze(caches: list[Any], extras: dict[str, Any] | None = None) -> Snapshot | None:
    """A detached copy of one sequence's caches (batch size 1) as they are now.

    Copies, so the snapshot keeps no batch buffer alive and no later forward can change it.
    ``extras`` (arrays, or caches of their own such as the MTP head's) are copied too and
    count in the snapshot's bytes. None for a cache type the store cannot restore exactly
    (rotating windows, quantized KV)."""
    import mlx.core as mx

    frozen = [_frozen(c) for c in caches]
    kept = {
        name: mx.array(a) if isinstance(a, mx.array) else _frozen(a)
        for name, a in (extras or {}).items()
    }
    if any(c is None for c in [*frozen, *kept.values()]):
        return None
    mx.eval([c.state for c in frozen], [getattr(a, "state", a) for a in kept.values()])
    return Snapshot(
        caches=frozen,
        nbytes=sum(c.nbytes for c in [*frozen, *kept.values()]),
        # A snapshot with extras (a hidden state at its last position) cannot be cut back.
        trimmable=all(c.is_trimmable() for c in frozen) and not kept,
        extras=kept,
    )


def store_snapshot(
    store: PromptCache,
    tokens: Sequence[int],
    caches: list[Any],
    extras: dict[str, Any] | None = None,
) -> None:
    """Freeze ``caches`` (and ``extras``) and store them under ``tokens``. A snapshot is an
    optimisation: a failure is logged, never raised into the batch that took it."""
    try:
        snapshot = freeze(caches, extras)
        if snapshot is not None:
            store.insert(list(tokens), snapshot)
    except Exception:
        from node.logging import get_logger

        get_logger(__name__).exception("storing a prompt-cache snapshot failed", tokens=len(tokens))


def _frozen(c: Any) -> Any | None:
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    if type(c) is KVCache:
        copy = KVCache()
        if c.keys is not None:
            copy.keys = mx.array(c.keys[..., : c.offset, :])
            copy.values = mx.array(c.values[..., : c.offset, :])
            copy.offset = c.offset
        return copy
    if type(c) is ArraysCache:
        copy = ArraysCache(len(c.cache))
        copy.cache = [mx.array(a) if a is not None else None for a in c.cache]
        return copy
    return None


def thaw(hit: Hit) -> list[Any]:
    """Fresh caches for a new sequence, seeded with ``hit``'s first ``hit.length`` tokens.

    New cache objects and new array objects: what the sequence's forwards write (KV slice
    updates, re-bound recurrent states) never reaches the stored snapshot."""
    trim = hit.stored_length - hit.length
    if trim and not hit.snapshot.trimmable:
        raise ValueError(f"cannot trim {trim} tokens from a snapshot with recurrent state")
    return [_fresh(c, hit.length) for c in hit.snapshot.caches]


def thaw_extras(snapshot: Snapshot) -> dict[str, Any]:
    """``snapshot.extras`` for a new sequence: caches among them fresh (as ``thaw`` makes
    them, whole: a snapshot with extras is never trimmed), arrays shared."""
    from mlx_lm.models.cache import ArraysCache, KVCache

    return {
        name: _fresh(a, a.offset if isinstance(a, KVCache) else 0)
        if isinstance(a, KVCache | ArraysCache)
        else a
        for name, a in snapshot.extras.items()
    }


def _fresh(c: Any, length: int) -> Any:
    from mlx_lm.models.cache import ArraysCache, KVCache

    if isinstance(c, KVCache):
        copy = KVCache()
        if c.keys is not None:
            copy.keys = c.keys[..., :length, :]
            copy.values = c.values[..., :length, :]
            copy.offset = length
        return copy
    assert isinstance(c, ArraysCache)
    copy = ArraysCache(len(c.cache))
    copy.cache = list(c.cache)
    return copy
