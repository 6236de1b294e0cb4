"""The placement planner: which nodes hold which contiguous layers of a model. Pure: no I/O.

Rules, in order:

1. One node whenever one fits: the model, its KV cache and recurrent state, and (when the card
   declares native MTP) the MTP head. A single-node placement is what enables native MTP.
2. Otherwise the fewest nodes that fit, taking the nodes with the most usable memory (ties: more
   memory bandwidth first, then node id). Among n nodes, the n largest fit whenever any n do.
3. Stages are ordered by usable memory, largest first, so the embedding (stage 0) lands on the
   biggest node and the final norm + LM head on the last. If that order cannot fit (say the
   smallest node cannot hold the head), the ends are swapped for other nodes, deterministically.
4. Layers are split in proportion to the memory each node has left for layers (usable memory
   minus the embedding or head it carries), with the largest-remainder method, so counts are
   integers that add up exactly. A stage that would overflow gives layers, one at a time, to
   wherever the total overflow shrinks most. If that cannot settle, an exact search finds the
   fitting split that fills the nodes most evenly. Every stage fits within
   ``(1 - headroom_fraction)`` of its node's available memory.
5. Memory per stage = its layers' weights + KV cache for its full-attention layers (context ×
   sequences) + GatedDeltaNet state for its linear layers (per sequence) + the embedding on the
   first stage + final norm and LM head on the last (and the embedding matrix again on the last
   stage of a multi-node placement when embeddings are tied, since the head reuses it).

The same input always gives the same placement.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from node.placement.architecture import FULL, LINEAR
from node.placement.cards import ModelCard
from node.placement.errors import InsufficientMemoryError, PlacementError
from node.placement.units import format_bytes

DEFAULT_CONTEXT_TOKENS = 8192  # KV budget when neither the caller nor a smaller card limit says


class NodeCapacity(BaseModel):
    """What the planner needs to know about one node."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(min_length=1)
    available_memory_bytes: int = Field(ge=0, description="memory free for models right now")
    total_memory_bytes: int | None = Field(default=None, ge=0)
    memory_bandwidth_gbps: float | None = Field(default=None, ge=0)
    link_gbps: float | None = Field(default=None, ge=0, description="network link, if known")
    name: str | None = None
    chip: str | None = None

    @model_validator(mode="after")
    def _available_within_total(self) -> NodeCapacity:
        total = self.total_memory_bytes
        if total is not None and self.available_memory_bytes > total:
            raise ValueError(
                f"available_memory_bytes {self.available_memory_bytes} exceeds "
                f"total_memory_bytes {total}"
            )
        return self


class PlanOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    min_nodes: int = Field(default=1, ge=1)
    context_length: int | None = Field(
        default=None, ge=1, description="tokens of KV cache to budget; None: min(card, 8192)"
    )
    headroom_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    pinned_nodes: list[str] | None = Field(
        default=None, description="nodes that must be part of the placement"
    )
    layer_counts: dict[str, int] | None = Field(
        default=None, description="manual split: node id -> layers, stages in this order"
    )
    max_concurrent_sequences: int = Field(default=1, ge=1)
    prompt_cache_bytes: int = Field(
        default=0,
        ge=0,
        description="the instance's prompt-cache budget (--prompt-cache-mb); a pipeline's "
        "stages each hold their layers' part of every snapshot, so each budgets its share",
    )
    include_mtp_head: bool = Field(
        default=True, description="budget the native-MTP head on a single node when it fits"
    )
    mtp_across_pipeline: bool = Field(
        default=False,
        description="pipeline_mtp: budget the MTP head (and the embedding it drafts with) on the "
        "last stage of a multi-node placement",
    )

    @model_validator(mode="after")
    def _manual_or_pinned(self) -> PlanOptions:
        if self.layer_counts is not None and self.pinned_nodes:
            raise ValueError("give either layer_counts or pinned_nodes, not both")
        return self


class Stage(BaseModel):
    model_config = ConfigDict(frozen=True)

    node_id: str
    start_layer: int = Field(ge=0)
    end_layer: int = Field(ge=1, description="exclusive")
    bytes: int = Field(ge=0, description="weights + KV cache + recurrent state on this node")
    weight_bytes: int = Field(ge=0)
    cache_bytes: int = Field(ge=0, description="KV cache + GatedDeltaNet state at the budget")
    prompt_cache_bytes: int = Field(default=0, ge=0, description="its share of the prompt cache")
    has_embedding: bool
    has_head: bool
    has_mtp_head: bool = False
    node_available_bytes: int = Field(ge=0)
    node_usable_bytes: int = Field(ge=0, description="available memory minus headroom")

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer


class Placement(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_id: str
    stages: list[Stage]
    total_bytes: int
    context_length: int
    max_concurrent_sequences: int
    headroom_fraction: float
    mtp_head_included: bool
    explanation: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def single_node(self) -> bool:
        return len(self.stages) == 1

    @property
    def node_ids(self) -> list[str]:
        return [s.node_id for s in self.stages]


# --- memory arithmetic ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Budget:
    """Per-stage memory costs of one card at one KV budget, in O(1) per range."""

    card: ModelCard
    tokens: int
    sequences: int
    weight_prefix: tuple[int, ...]
    full_prefix: tuple[int, ...]
    linear_prefix: tuple[int, ...]
    kv_per_full_layer: int  # KV bytes one full-attention layer needs at this budget
    state_per_linear_layer: int  # GatedDeltaNet state one linear layer needs at this budget
    mtp_on_last: bool = False  # pipeline_mtp: the last stage of a pipeline holds the MTP head
    prompt_cache: int = 0  # the instance's prompt-cache budget, over all its stages

    @classmethod
    def of(
        cls,
        card: ModelCard,
        tokens: int,
        sequences: int,
        mtp_on_last: bool = False,
        prompt_cache: int = 0,
    ) -> _Budget:
        return cls(
            card,
            tokens,
            sequences,
            (0, *accumulate(card.layer_bytes)),
            (0, *accumulate(int(t == FULL) for t in card.layer_types)),
            (0, *accumulate(int(t == LINEAR) for t in card.layer_types)),
            card.kv_bytes_per_token_per_layer * tokens * sequences,
            card.linear_state_bytes_per_layer * sequences,
            mtp_on_last and card.native_mtp is not None and card.mtp_bytes > 0,
            prompt_cache,
        )

    def mtp_on(self, first: bool, last: bool) -> bool:
        """Whether a pipeline stage (not a single node) holds the MTP head."""
        return self.mtp_on_last and last and not first

    def cost(
        self, start: int, end: int, first: bool, last: bool, mtp: bool = False
    ) -> tuple[int, int]:
        """(weight bytes, cache bytes with the prompt-cache share) of layers [start, end)."""
        weights, cache, share = self.parts(start, end, first, last, mtp)
        return weights, cache + share

    def parts(
        self, start: int, end: int, first: bool, last: bool, mtp: bool = False
    ) -> tuple[int, int, int]:
        """(weight bytes, KV + GatedDeltaNet bytes, prompt-cache share) of layers [start,
        end). A snapshot holds every layer's state for its tokens, each stage its own
        layers': a stage's share of the budget is its share of the per-sequence state."""
        card = self.card
        weights = self.weight_prefix[end] - self.weight_prefix[start]
        if first:
            weights += card.embedding_bytes
        if last:
            weights += card.head_bytes
            if card.tie_word_embeddings and not first:
                weights += card.embedding_bytes  # the tied LM head is the embedding matrix
        if self.mtp_on(first, last):
            # pipeline_mtp: the head drafts on the last stage and embeds each draft there, so
            # that stage also keeps the embedding (already there when tied).
            mtp = True
            if not card.tie_word_embeddings:
                weights += card.embedding_bytes
        full = self.full_prefix[end] - self.full_prefix[start]
        linear = self.linear_prefix[end] - self.linear_prefix[start]
        cache = full * self.kv_per_full_layer + linear * self.state_per_linear_layer
        if mtp and card.native_mtp is not None:
            weights += card.native_mtp.head_bytes
            cache += card.native_mtp.num_layers * self.kv_per_full_layer
        whole = (
            self.full_prefix[-1] * self.kv_per_full_layer
            + self.linear_prefix[-1] * self.state_per_linear_layer
        )
        share = min(self.prompt_cache, self.prompt_cache * cache // whole) if whole else 0
        return weights, cache, share

    def total(self, start: int, end: int, first: bool, last: bool, mtp: bool = False) -> int:
        return sum(self.cost(start, end, first, last, mtp))

    def whole_model(self) -> int:
        """Everything one copy of the model needs, without the MTP head."""
        return self.total(0, self.card.num_layers, True, True)


def usable_bytes(node: NodeCapacity, headroom_fraction: float) -> int:
    return math.floor(node.available_memory_bytes * (1.0 - headroom_fraction))


def rank_key(node: NodeCapacity, usable: int) -> tuple[int, float, str]:
    """Most usable memory first, then most bandwidth, then id: a total, deterministic order."""
    return (-usable, -(node.memory_bandwidth_gbps or 0.0), node.id)


# --- splitting layers ------------------------------------------------------------------------------


def proportional_counts(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` by the largest-remainder method, every share
    at least 1 (requires ``total >= len(weights)``). Exact integer arithmetic."""
    n = len(weights)
    if n == 0 or total < n:
        raise ValueError(f"cannot give {n} shares of at least 1 out of {total}")
    clean = [max(w, 0) for w in weights]
    denominator = sum(clean)
    if denominator == 0:
        clean, denominator = [1] * n, n
    counts = [total * w // denominator for w in clean]
    remainders = [total * w % denominator for w in clean]
    for i in sorted(range(n), key=lambda i: (-remainders[i], i))[: total - sum(counts)]:
        counts[i] += 1
    for i in range(n):  # every stage holds at least one layer
        while counts[i] == 0:
            donor = max(range(n), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    ends = list(accumulate(counts))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _overflows(budget: _Budget, counts: Sequence[int], usable: Sequence[int]) -> list[int]:
    n = len(counts)
    return [
        budget.total(start, end, i == 0, i == n - 1) - usable[i]
        for i, (start, end) in enumerate(_ranges(counts))
    ]


def _repair(budget: _Budget, counts: list[int], usable: Sequence[int]) -> list[int] | None:
    """Move layers out of overflowing stages, one at a time, to wherever the total overflow
    shrinks most; None when no move helps any more."""
    counts = list(counts)
    n = len(counts)

    def badness(c: Sequence[int]) -> tuple[int, int]:
        over = _overflows(budget, c, usable)
        return sum(max(o, 0) for o in over), max(over)

    current = badness(counts)
    for _ in range(budget.card.num_layers * n):
        if current[0] == 0:
            return counts
        over = _overflows(budget, counts, usable)
        worst = max(range(n), key=lambda i: (over[i], -i))
        if counts[worst] <= 1:
            return None
        best: tuple[tuple[int, int], int] | None = None
        for j in range(n):
            if j == worst:
                continue
            trial = list(counts)
            trial[worst] -= 1
            trial[j] += 1
            score = badness(trial)
            if best is None or (score, j) < best:
                best = (score, j)
        if best is None or best[0] >= current:
            return None
        counts[worst] -= 1
        counts[best[1]] += 1
        current = best[0]
    return counts if current[0] == 0 else None


def _fits_in_order(budget: _Budget, usable: Sequence[int]) -> bool:
    """Whether any split fits in this stage order: O(stages x layers) cost look-ups.

    ``reach[e]`` says the stages so far can cover exactly layers [0, e). From a start ``s`` a
    stage can end anywhere in ``[s + 1, furthest(s)]``, and ``furthest`` never decreases with
    ``s`` (fewer layers, less memory), so one forward pointer finds every interval.
    """
    n, total = len(usable), budget.card.num_layers
    reach = [True] + [False] * total
    for i in range(n):
        first, last = i == 0, i == n - 1
        cap = total - (n - 1 - i)  # leave a layer for every later stage
        marks = [0] * (total + 2)
        end = 0
        for start in range(total):
            if not reach[start]:
                continue
            end = max(end, start)
            while end < cap and budget.total(start, end + 1, first, last) <= usable[i]:
                end += 1
            if end > start:
                marks[start + 1] += 1
                marks[end + 1] -= 1
        reach = list(itertools.accumulate(marks[: total + 1]))
        reach = [r > 0 for r in reach]
    return reach[total]


def _balanced(budget: _Budget, usable: Sequence[int]) -> list[int] | None:
    """The fitting split in this stage order that fills the nodes most evenly, or None when
    none fits. It minimises the sum over stages of bytes^2 / usable, whose unconstrained
    optimum is every node equally full (the proportional split). Exact dynamic programme over
    (stage, end): O(stages x layers^2) cost look-ups, each O(1)."""
    n, total = len(usable), budget.card.num_layers
    inf = math.inf

    def penalty(cost: int, room: int) -> float:
        return cost * cost / room if room else 0.0

    # best[e]: lowest penalty of stages 0..i covering layers [0, e); back[i][e]: stage i's start.
    best = [inf] * (total + 1)
    back: list[dict[int, int]] = []
    for e in range(1, total - n + 2):
        cost = budget.total(0, e, True, n == 1)
        if cost <= usable[0]:
            best[e] = penalty(cost, usable[0])
    back.append({})
    for i in range(1, n):
        last = i == n - 1
        ends = [total] if last else range(i + 1, total - (n - 1 - i) + 1)
        new = [inf] * (total + 1)
        starts: dict[int, int] = {}
        for e in ends:
            # a later start means fewer layers and less memory: stop at the first that overflows
            for start in range(e - 1, i - 1, -1):
                if best[start] == inf:
                    continue
                cost = budget.total(start, e, False, last)
                if cost > usable[i]:
                    break
                value = best[start] + penalty(cost, usable[i])
                if value < new[e]:
                    new[e], starts[e] = value, start
        best = new
        back.append(starts)
    if best[total] == inf:
        return None
    bounds = [total]
    for i in range(n - 1, 0, -1):
        bounds.append(back[i][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return [b - a for a, b in itertools.pairwise(bounds)]


# Beyond this many stages only the two ends (embedding, head) are varied, not the whole order.
EXHAUSTIVE_ORDER_LIMIT = 4


def _orders(n: int) -> list[list[int]]:
    """Stage orders to try, as indices into the ranked nodes: largest first; then other nodes
    at the two ends (embedding and head) with the middle in rank order; for small clusters,
    every remaining order. Deterministic."""
    ranked = list(range(n))
    orders = [ranked]
    for first in ranked:
        for last in ranked:
            if first != last and (first, last) != (0, n - 1):
                middle = [x for x in ranked if x not in (first, last)]
                orders.append([first, *middle, last])
    if n <= EXHAUSTIVE_ORDER_LIMIT:
        seen = {tuple(o) for o in orders}
        orders += [list(p) for p in itertools.permutations(ranked) if p not in seen]
    return orders


SplitHow = Literal["proportional", "repaired", "balanced", "single", "manual"]


def _split(
    budget: _Budget, ranked_usable: Sequence[int]
) -> tuple[list[int], list[int], SplitHow] | None:
    """(order as indices into ranked_usable, layer counts, how the counts were found) or None.
    The first stage order in which any split fits wins; in it, the proportional split (repaired
    if it overflows a node), else the most even split that fits."""
    n = len(ranked_usable)
    card = budget.card
    tied_copy = card.embedding_bytes if card.tie_word_embeddings else 0
    if sum(ranked_usable) < budget.whole_model() + tied_copy:
        return None  # not even the total is there: no order can fit
    for order in _orders(n):
        usable = [ranked_usable[i] for i in order]
        if not _fits_in_order(budget, usable):
            continue
        fixed = [0] * n
        fixed[0] += card.embedding_bytes
        fixed[-1] += card.head_bytes + tied_copy
        room = [u - f for u, f in zip(usable, fixed, strict=True)]
        share = proportional_counts(card.num_layers, room)
        repaired = _repair(budget, share, usable)
        if repaired is not None:
            return order, repaired, "proportional" if repaired == share else "repaired"
        balanced = _balanced(budget, usable)
        assert balanced is not None  # _fits_in_order said a split exists
        return order, balanced, "balanced"
    return None


# --- the planner -----------------------------------------------------------------------------------


def plan(
    card: ModelCard, nodes: Sequence[NodeCapacity], options: PlanOptions | None = None
) -> Placement:
    """Place ``card`` on ``nodes``; raises PlacementError with a human message when it cannot."""
    options = options or PlanOptions()
    _validate(card, nodes, options)
    tokens = options.context_length or min(card.context_length, DEFAULT_CONTEXT_TOKENS)
    budget = _Budget.of(
        card,
        tokens,
        options.max_concurrent_sequences,
        mtp_on_last=options.mtp_across_pipeline,
        prompt_cache=options.prompt_cache_bytes,
    )
    usable = {node.id: usable_bytes(node, options.headroom_fraction) for node in nodes}
    by_id = {node.id: node for node in nodes}

    if options.layer_counts is not None:
        return _manual(card, budget, options, by_id, usable)

    ranked = sorted(nodes, key=lambda node: rank_key(node, usable[node.id]))
    pinned = set(options.pinned_nodes or [])
    free = [node for node in ranked if node.id not in pinned]
    smallest = max(options.min_nodes, len(pinned), 1)
    for n in range(smallest, min(len(nodes), card.num_layers) + 1):
        chosen_ids = pinned | {node.id for node in free[: n - len(pinned)]}
        chosen = [node for node in ranked if node.id in chosen_ids]
        if n == 1:
            placement = _single(card, budget, options, chosen[0], usable)
            if placement is not None:
                return placement
            continue
        found = _split(budget, [usable[node.id] for node in chosen])
        if found is not None:
            order, counts, how = found
            ordered = [chosen[i] for i in order]
            reordered = order != sorted(order)
            return _build(card, budget, options, ordered, counts, usable, how, reordered=reordered)
    raise InsufficientMemoryError(_no_fit_message(card, budget, options, nodes, usable))


def _validate(card: ModelCard, nodes: Sequence[NodeCapacity], options: PlanOptions) -> None:
    if not nodes:
        raise PlacementError("the cluster has no nodes; nothing to place the model on")
    ids = [node.id for node in nodes]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise PlacementError(f"node id(s) listed twice: {', '.join(duplicates)}")
    if options.min_nodes > len(nodes):
        raise PlacementError(
            f"min_nodes {options.min_nodes} is above the cluster size {len(nodes)}"
        )
    if options.min_nodes > card.num_layers:
        raise PlacementError(
            f"min_nodes {options.min_nodes} is above the {card.num_layers} layers of {card.id}: "
            "every stage needs at least one layer"
        )
    known = set(ids)
    for node_id in [*(options.pinned_nodes or []), *(options.layer_counts or {})]:
        if node_id not in known:
            raise PlacementError(
                f"node {node_id!r} is not in the cluster ({', '.join(sorted(ids))})"
            )
    if options.pinned_nodes and len(set(options.pinned_nodes)) > card.num_layers:
        raise PlacementError(
            f"{len(set(options.pinned_nodes))} pinned nodes but {card.id} has only "
            f"{card.num_layers} layers"
        )
    if options.context_length is not None and options.context_length > card.context_length:
        raise PlacementError(
            f"context length {options.context_length} is above {card.id}'s maximum "
            f"{card.context_length}"
        )


def _single(
    card: ModelCard,
    budget: _Budget,
    options: PlanOptions,
    node: NodeCapacity,
    usable: dict[str, int],
) -> Placement | None:
    wants_mtp = options.include_mtp_head and card.native_mtp is not None and card.mtp_bytes > 0
    for mtp in [True, False] if wants_mtp else [False]:
        need = budget.total(0, card.num_layers, True, True, mtp)
        if need <= usable[node.id]:
            return _build(card, budget, options, [node], [card.num_layers], usable, "single", mtp)
    return None


def _manual(
    card: ModelCard,
    budget: _Budget,
    options: PlanOptions,
    by_id: dict[str, NodeCapacity],
    usable: dict[str, int],
) -> Placement:
    layer_counts = options.layer_counts or {}
    for node_id, count in layer_counts.items():
        if count < 1:
            raise PlacementError(f"layer count for node {node_id!r} must be >= 1, got {count}")
    if sum(layer_counts.values()) != card.num_layers:
        raise PlacementError(
            f"layer counts add up to {sum(layer_counts.values())} but {card.id} has "
            f"{card.num_layers} layers"
        )
    if len(layer_counts) < options.min_nodes:
        raise PlacementError(
            f"layer counts name {len(layer_counts)} node(s), fewer than min_nodes {options.min_nodes}"
        )
    nodes = [by_id[node_id] for node_id in layer_counts]
    counts = list(layer_counts.values())
    if len(nodes) == 1:
        placement = _single(card, budget, options, nodes[0], usable)
        if placement is not None:
            return placement
    for i, (start, end) in enumerate(_ranges(counts)):
        need = budget.total(start, end, i == 0, i == len(nodes) - 1)
        if need > usable[nodes[i].id]:
            raise InsufficientMemoryError(
                f"node {nodes[i].id!r} cannot hold layers {start}-{end - 1} of {card.id}: "
                f"{format_bytes(need)} needed, {format_bytes(usable[nodes[i].id])} usable "
                f"({_headroom(options)} headroom)"
            )
    return _build(card, budget, options, nodes, counts, usable, "manual")


def _build(
    card: ModelCard,
    budget: _Budget,
    options: PlanOptions,
    nodes: Sequence[NodeCapacity],
    counts: Sequence[int],
    usable: dict[str, int],
    how: SplitHow,
    mtp: bool = False,
    reordered: bool = False,
) -> Placement:
    n = len(nodes)
    stages = []
    for i, (node, (start, end)) in enumerate(zip(nodes, _ranges(counts), strict=True)):
        weights, cache, share = budget.parts(start, end, i == 0, i == n - 1, mtp)
        stages.append(
            Stage(
                node_id=node.id,
                start_layer=start,
                end_layer=end,
                bytes=weights + cache + share,
                weight_bytes=weights,
                cache_bytes=cache,
                prompt_cache_bytes=share,
                has_embedding=i == 0,
                has_head=i == n - 1,
                has_mtp_head=mtp or budget.mtp_on(i == 0, i == n - 1),
                node_available_bytes=node.available_memory_bytes,
                node_usable_bytes=usable[node.id],
            )
        )
    placement = Placement(
        model_id=card.id,
        stages=stages,
        total_bytes=sum(s.bytes for s in stages),
        context_length=budget.tokens,
        max_concurrent_sequences=budget.sequences,
        headroom_fraction=options.headroom_fraction,
        mtp_head_included=mtp or (n > 1 and budget.mtp_on_last),
        explanation="",
    )
    text = _explain(card, budget, options, placement, usable, how, reordered)
    return placement.model_copy(update={"explanation": text})


# --- words -----------------------------------------------------------------------------------------

ORDER_WORDS = {
    False: "Stages run from the largest node down (the embedding on the biggest).",
    True: "Largest-first cannot fit (a node too small for the embedding or head it would "
    "carry), so the stages were reordered.",
}
SPLIT_WORDS = {
    "proportional": "Layers are split in proportion to the memory each node has left for layers.",
    "repaired": "The proportional split overflowed a node, so layers moved to the nodes with room.",
    "balanced": "No proportional split fits, so the fitting split that fills the nodes most "
    "evenly was taken.",
}


def _headroom(options: PlanOptions) -> str:
    return f"{options.headroom_fraction:.0%}"


def _budget_words(card: ModelCard, budget: _Budget) -> str:
    seqs = budget.sequences
    parts = [
        f"KV cache for {budget.tokens:,} tokens × {seqs} sequence{'s' if seqs != 1 else ''}"
        f" ({format_bytes(card.kv_bytes_per_token * budget.tokens * seqs)})"
    ]
    if card.linear_state_bytes:
        parts.append(f"GatedDeltaNet state {format_bytes(card.linear_state_bytes * seqs)}")
    if budget.prompt_cache:
        parts.append(f"prompt cache {format_bytes(budget.prompt_cache)}")
    return ", ".join(parts)


def _explain(
    card: ModelCard,
    budget: _Budget,
    options: PlanOptions,
    placement: Placement,
    usable: dict[str, int],
    how: SplitHow,
    reordered: bool,
) -> str:
    stages = placement.stages
    precision = (
        "bf16/fp16" if card.bits == 16 else ("fp32" if card.bits == 32 else f"{card.bits}-bit")
    )
    lines = [
        f"{card.id}: {format_bytes(card.bytes - card.mtp_bytes)} of {precision} weights, "
        f"{card.num_layers} layers; budget {_budget_words(card, budget)}; "
        f"{_headroom(options)} of each node's available memory kept free."
    ]
    if len(stages) == 1:
        stage = stages[0]
        why = "as requested" if how == "manual" else "one node fits, so no pipeline is needed"
        lines.append(
            f"Single node {stage.node_id} ({format_bytes(stage.bytes)} of "
            f"{format_bytes(stage.node_usable_bytes)} usable): {why}."
        )
        if card.native_mtp is not None:
            if placement.mtp_head_included:
                lines.append(
                    f"The native MTP head ({format_bytes(card.mtp_bytes)}) is included: native MTP "
                    f"can draft K={card.native_mtp.default_k} (max {card.native_mtp.max_k})."
                )
            elif card.mtp_bytes == 0:
                lines.append("The card declares native MTP but has no MTP weights to load.")
            else:
                lines.append(
                    f"The native MTP head ({format_bytes(card.mtp_bytes)}) does not fit as well: "
                    "plain decode."
                )
        return "\n".join(lines)

    largest = max(usable.values())
    if how == "manual":
        lines.append(f"Split over {len(stages)} nodes with the layer counts given, in that order.")
    else:
        if options.min_nodes > 1 or options.pinned_nodes:
            asked = [f"min_nodes {options.min_nodes}"] if options.min_nodes > 1 else []
            if options.pinned_nodes:
                asked.append(f"pinned {', '.join(options.pinned_nodes)}")
            lines.append(
                f"Split over {len(stages)} nodes ({'; '.join(asked)}), adding the nodes with the "
                "most memory as needed."
            )
        else:
            lines.append(
                f"No single node fits {format_bytes(budget.whole_model())} (largest usable: "
                f"{format_bytes(largest)}); {len(stages)} nodes is the fewest that do, taking "
                "the nodes with the most memory."
            )
        lines.append(ORDER_WORDS[reordered] + " " + SPLIT_WORDS[how])
    if card.tie_word_embeddings:
        lines.append(
            "Embeddings are tied: the last stage keeps a copy of the embedding as LM head."
        )
    for i, stage in enumerate(stages):
        extras = []
        if stage.has_embedding:
            extras.append("embedding")
        if stage.has_head:
            extras.append("final norm + LM head")
        if stage.has_mtp_head:
            extras.append("MTP head")
        with_extras = f" + {' and '.join(extras)}" if extras else ""
        lines.append(
            f"  stage {i}: {stage.node_id} layers {stage.start_layer}-{stage.end_layer - 1}"
            f"{with_extras}: {format_bytes(stage.bytes)} of {format_bytes(stage.node_usable_bytes)} usable"
        )
    if budget.mtp_on_last:
        embedding = (
            ""
            if card.tie_word_embeddings
            else (
                f" and a copy of the embedding ({format_bytes(card.embedding_bytes)}) to embed its drafts"
            )
        )
        lines.append(
            f"Native MTP across the pipeline (pipeline_mtp): the MTP head "
            f"({format_bytes(card.mtp_bytes)}){embedding} lives on the last stage with the LM "
            f"head, budgeted there with its KV cache; it drafts up to K={card.native_mtp.max_k}."
        )
    elif card.native_mtp is not None:
        lines.append(
            "Native MTP needs a single-node placement; this instance decodes as a pipeline"
            + (
                " (--mtp-across-pipeline asked for it, but the card has no MTP weights)."
                if options.mtp_across_pipeline
                else "."
            )
        )
    return "\n".join(lines)


def _no_fit_message(
    card: ModelCard,
    budget: _Budget,
    options: PlanOptions,
    nodes: Sequence[NodeCapacity],
    usable: dict[str, int],
) -> str:
    need = budget.whole_model()
    offered = sum(usable.values())
    weights, _ = budget.cost(0, card.num_layers, True, True)
    head = (
        f"{card.id} does not fit: {format_bytes(need)} needed (weights {format_bytes(weights)} + "
        f"{_budget_words(card, budget)}), the cluster offers {format_bytes(offered)} usable "
        f"({len(nodes)} node{'s' if len(nodes) != 1 else ''}, {_headroom(options)} headroom)"
    )
    if offered >= need:
        head += (
            "; the total would do, but no split into contiguous layer ranges fits every node "
            f"(largest node: {format_bytes(max(usable.values()))} usable)"
        )
    return head + "."
