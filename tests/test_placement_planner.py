"""The placement planner: properties over random cards and clusters, real-model tables, bad input.

The checks recompute every stage's memory with their own arithmetic (``stage_need``) and, for
small cases, search every possible placement by brute force, so they do not trust the planner's
own bookkeeping.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from node.placement import (
    InsufficientMemoryError,
    ModelCard,
    NativeMtpSpec,
    NodeCapacity,
    PlacementError,
    PlanOptions,
    get_card,
    plan,
)
from node.placement.planner import (
    DEFAULT_CONTEXT_TOKENS,
    ORDER_WORDS,
    SPLIT_WORDS,
    proportional_counts,
)

GIB = 1 << 30
MIB = 1 << 20


# --- an independent model of the memory rules -----------------------------------------------------


def stage_need(
    card: ModelCard,
    start: int,
    end: int,
    first: bool,
    last: bool,
    tokens: int,
    seqs: int,
    mtp=False,
) -> int:
    need = sum(card.layer_bytes[start:end])
    full = sum(1 for t in card.layer_types[start:end] if t == "full_attention")
    linear = (end - start) - full
    n_full = card.layer_types.count("full_attention")
    n_linear = card.num_layers - n_full
    kv_layer = card.kv_bytes_per_token // n_full if n_full else 0
    state_layer = card.linear_state_bytes // n_linear if n_linear else 0
    need += full * kv_layer * tokens * seqs + linear * state_layer * seqs
    if first:
        need += card.embedding_bytes
    if last:
        need += card.head_bytes
        if card.tie_word_embeddings and not first:
            need += card.embedding_bytes
    if mtp:
        need += card.native_mtp.head_bytes + card.native_mtp.num_layers * kv_layer * tokens * seqs
    return need


def usable(node: NodeCapacity, headroom: float) -> int:
    return math.floor(node.available_memory_bytes * (1 - headroom))


def tokens_for(card: ModelCard, options: PlanOptions) -> int:
    return options.context_length or min(card.context_length, DEFAULT_CONTEXT_TOKENS)


def any_placement_fits(card, nodes, options, n_stages: int) -> bool:
    """Brute force: every choice of n nodes, every order, every split into contiguous ranges."""
    tokens, seqs = tokens_for(card, options), options.max_concurrent_sequences
    pinned = set(options.pinned_nodes or [])
    cuts_all = list(itertools.combinations(range(1, card.num_layers), n_stages - 1))
    for chosen in itertools.permutations(nodes, n_stages):
        if not pinned <= {n.id for n in chosen}:
            continue
        for cuts in cuts_all:
            bounds = [0, *cuts, card.num_layers]
            if all(
                stage_need(card, bounds[i], bounds[i + 1], i == 0, i == n_stages - 1, tokens, seqs)
                <= usable(chosen[i], options.headroom_fraction)
                for i in range(n_stages)
            ):
                return True
    return False


def check_placement(card: ModelCard, nodes, options: PlanOptions, placement) -> None:
    """Every invariant a placement must satisfy, recomputed from scratch."""
    by_id = {n.id: n for n in nodes}
    stages = placement.stages
    tokens, seqs = tokens_for(card, options), options.max_concurrent_sequences
    # every layer exactly once, in contiguous ordered ranges, on distinct nodes
    assert stages[0].start_layer == 0
    assert stages[-1].end_layer == card.num_layers
    for a, b in itertools.pairwise(stages):
        assert a.end_layer == b.start_layer
    assert all(s.end_layer > s.start_layer for s in stages)
    layers = [i for s in stages for i in range(s.start_layer, s.end_layer)]
    assert layers == list(range(card.num_layers))
    assert len({s.node_id for s in stages}) == len(stages)
    # memory respected, with the planner's bytes matching an independent count
    for i, s in enumerate(stages):
        first, last = i == 0, i == len(stages) - 1
        need = stage_need(
            card, s.start_layer, s.end_layer, first, last, tokens, seqs, s.has_mtp_head
        )
        share = s.prompt_cache_bytes  # its part of the prompt cache (checked on its own)
        assert share <= options.prompt_cache_bytes
        assert s.bytes == need + share == s.weight_bytes + s.cache_bytes + share
        assert s.bytes <= usable(by_id[s.node_id], options.headroom_fraction)
        assert (s.has_embedding, s.has_head) == (first, last)
    assert placement.total_bytes == sum(s.bytes for s in stages)
    assert len(stages) >= options.min_nodes
    assert set(options.pinned_nodes or []) <= {s.node_id for s in stages}
    assert placement.single_node == (len(stages) == 1)
    assert placement.explanation


# --- random cards and clusters ------------------------------------------------------------------


@st.composite
def cards(draw, max_layers: int = 48) -> ModelCard:
    n = draw(st.integers(1, max_layers))
    interval = draw(st.sampled_from([None, 1, 2, 3, 4]))
    kinds = ["full_attention"] * n
    if interval is not None:
        kinds = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)
        ]
    # near-uniform layers as in real models, or any sizes at all
    base = draw(st.sampled_from([MIB, 300 * MIB, GIB, 2 * GIB]) | st.integers(1, 2 * GIB))
    jitter = st.integers(0, base // 4)
    layer_bytes = draw(
        st.lists(jitter.map(lambda j: base + j), min_size=n, max_size=n)
        | st.lists(st.integers(1, 2 * GIB), min_size=n, max_size=n)
    )
    n_full, n_linear = kinds.count("full_attention"), kinds.count("linear_attention")
    kv = n_full * draw(st.integers(0, 16_384))
    state = n_linear * draw(st.integers(0, 8_000_000))
    embedding, head = draw(st.integers(0, 3 * GIB)), draw(st.integers(0, 3 * GIB))
    mtp = None
    if draw(st.booleans()):
        mtp = NativeMtpSpec(default_k=1, max_k=3, head_bytes=draw(st.integers(0, 2 * GIB)))
    return ModelCard(
        id="random",
        model_type="qwen3_5",
        num_layers=n,
        hidden_size=64,
        bytes=sum(layer_bytes) + embedding + head + (mtp.head_bytes if mtp else 0),
        layer_bytes=layer_bytes,
        layer_types=kinds,
        embedding_bytes=embedding,
        head_bytes=head,
        tie_word_embeddings=draw(st.booleans()),
        kv_bytes_per_token=kv,
        linear_state_bytes=state,
        context_length=draw(st.integers(1, 300_000)),
        bits=16,
        native_mtp=mtp,
    )


@st.composite
def clusters(draw, max_nodes: int = 6, max_bytes: int = 192 * GIB) -> list[NodeCapacity]:
    k = draw(st.integers(1, max_nodes))
    return [
        NodeCapacity(
            id=f"node-{i}",
            available_memory_bytes=draw(
                st.sampled_from([8, 16, 24, 36, 48, 64, 96, 128, 192]).map(
                    lambda g: min(g * GIB, max_bytes)
                )
                | st.integers(0, max_bytes)
            ),
            memory_bandwidth_gbps=draw(st.sampled_from([None, 100.0, 400.0, 800.0])),
        )
        for i in range(k)
    ]


@st.composite
def scenarios(draw, max_layers: int = 48, max_nodes: int = 6, max_bytes: int = 192 * GIB):
    card = draw(cards(max_layers))
    nodes = draw(clusters(max_nodes, max_bytes))
    options = PlanOptions(
        min_nodes=draw(st.integers(1, min(len(nodes), card.num_layers))),
        context_length=draw(st.none() | st.integers(1, min(card.context_length, 32_768))),
        headroom_fraction=draw(st.sampled_from([0.0, 0.1, 0.25])),
        max_concurrent_sequences=draw(st.integers(1, 3)),
    )
    return card, nodes, options


PROPERTY_SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_placement_covers_each_layer_once_and_fits(scenario) -> None:
    card, nodes, options = scenario
    try:
        placement = plan(card, nodes, options)
    except InsufficientMemoryError as exc:
        assert "needed" in str(exc) and "offers" in str(exc)
        return
    check_placement(card, nodes, options, placement)


@PROPERTY_SETTINGS
@given(scenarios(), st.randoms(use_true_random=False))
def test_same_input_same_placement_whatever_the_node_order(scenario, rnd: random.Random) -> None:
    card, nodes, options = scenario
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    try:
        first = plan(card, nodes, options)
    except InsufficientMemoryError as exc:
        with pytest.raises(InsufficientMemoryError) as again:
            plan(card, shuffled, options)
        assert str(again.value) == str(exc)
        return
    assert plan(card, nodes, options) == first
    assert plan(card, shuffled, options) == first


@PROPERTY_SETTINGS
@given(scenarios())
def test_single_node_whenever_one_fits(scenario) -> None:
    card, nodes, options = scenario
    tokens, seqs = tokens_for(card, options), options.max_concurrent_sequences
    whole = stage_need(card, 0, card.num_layers, True, True, tokens, seqs)
    best = max(usable(n, options.headroom_fraction) for n in nodes)
    if options.min_nodes == 1 and whole <= best:
        placement = plan(card, nodes, options)
        assert placement.single_node
        # on a node with the most usable memory
        assert (
            usable(
                next(n for n in nodes if n.id == placement.stages[0].node_id),
                options.headroom_fraction,
            )
            == best
        )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(max_layers=7, max_nodes=4, max_bytes=24 * GIB))
def test_fewest_nodes_and_fails_only_when_nothing_fits(scenario) -> None:
    """Brute force over every node subset, order and split of a small model."""
    card, nodes, options = scenario
    smallest = options.min_nodes
    try:
        placement = plan(card, nodes, options)
    except InsufficientMemoryError:
        for n in range(smallest, min(len(nodes), card.num_layers) + 1):
            assert not any_placement_fits(card, nodes, options, n)
        return
    check_placement(card, nodes, options, placement)
    for n in range(smallest, len(placement.stages)):
        assert not any_placement_fits(card, nodes, options, n), f"{n} nodes would have done"


@settings(max_examples=60, deadline=None)
@given(scenarios(max_nodes=5), st.data())
def test_pinned_nodes_are_always_used(scenario, data) -> None:
    card, nodes, options = scenario
    pinned = data.draw(st.lists(st.sampled_from([n.id for n in nodes]), unique=True, max_size=2))
    if len(pinned) > card.num_layers:
        return
    options = options.model_copy(update={"pinned_nodes": pinned})
    try:
        placement = plan(card, nodes, options)
    except InsufficientMemoryError:
        return
    check_placement(card, nodes, options, placement)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=8), st.data())
def test_proportional_counts_are_exact_largest_remainder(weights, data) -> None:
    total = data.draw(st.integers(len(weights), 200))
    counts = proportional_counts(total, weights)
    assert sum(counts) == total
    assert all(c >= 1 for c in counts)
    denominator = sum(weights)
    if denominator and all(total * w >= denominator for w in weights):
        # no share was lifted to 1, so each count is its quota rounded up or down
        for c, w in zip(counts, weights, strict=True):
            assert abs(c - total * w / denominator) < 1


def test_proportional_counts_follow_memory() -> None:
    assert proportional_counts(64, [100, 100]) == [32, 32]
    assert proportional_counts(64, [192, 64]) == [48, 16]
    assert proportional_counts(10, [1, 1, 1]) == [4, 3, 3]  # ties go to the earlier stage
    assert proportional_counts(3, [10**9, 0, 0]) == [1, 1, 1]


# --- real models on real Macs ---------------------------------------------------------------------


def macs(*sizes_gib: float, names=("studio", "mbp", "mini", "air")) -> list[NodeCapacity]:
    return [
        NodeCapacity(
            id=name, available_memory_bytes=int(size * GIB), total_memory_bytes=int(size * GIB)
        )
        for name, size in zip(names, sizes_gib, strict=False)
    ]


HETEROGENEOUS = macs(192, 64, 36)


def test_27b_8bit_fits_on_the_192gb_studio_alone_with_its_mtp_head() -> None:
    card = get_card("Qwen3.6-27B-8bit")
    placement = plan(card, HETEROGENEOUS)
    check_placement(card, HETEROGENEOUS, PlanOptions(), placement)
    assert placement.single_node and placement.node_ids == ["studio"]
    assert placement.mtp_head_included and placement.stages[0].has_mtp_head
    assert "native MTP" in placement.explanation


def test_122b_a10b_4bit_fits_on_the_studio_and_splits_when_the_studio_is_busy() -> None:
    card = get_card("Qwen3.5-122B-A10B-4bit")
    assert plan(card, HETEROGENEOUS).node_ids == ["studio"]
    busy = macs(60, 64, 36)  # the studio has only 60 GiB free
    placement = plan(card, busy)
    check_placement(card, busy, PlanOptions(), placement)
    assert placement.node_ids == ["mbp", "studio"]  # most usable memory first
    assert not placement.mtp_head_included
    # one layer of the proportional split is worth ~1.3 GiB: the two shares stay within one
    share = [s.num_layers for s in placement.stages]
    assert sum(share) == 48 and abs(share[0] - share[1]) <= 4


def test_three_64gb_macs_with_52gb_free_need_two_nodes_for_27b_bf16() -> None:
    card = get_card("Qwen3.6-27B")
    nodes = macs(52, 52, 52, names=("m1", "m2", "m3"))
    placement = plan(card, nodes)
    check_placement(card, nodes, PlanOptions(), placement)
    assert len(placement.stages) == 2
    assert [(s.start_layer, s.end_layer) for s in placement.stages] == [(0, 32), (32, 64)]
    assert placement.node_ids == ["m1", "m2"]  # equal memory: ties broken by id


def test_35b_a3b_bf16_needs_two_full_64gb_macs() -> None:
    card = get_card("Qwen3.6-35B-A3B")
    nodes = macs(64, 64, 64, names=("m1", "m2", "m3"))
    placement = plan(card, nodes)
    check_placement(card, nodes, PlanOptions(), placement)
    assert len(placement.stages) == 2


def test_min_nodes_spreads_over_the_heterogeneous_cluster_by_memory() -> None:
    card = get_card("Qwen3.6-35B-A3B")
    options = PlanOptions(min_nodes=3)
    placement = plan(card, HETEROGENEOUS, options)
    check_placement(card, HETEROGENEOUS, options, placement)
    assert placement.node_ids == ["studio", "mbp", "mini"]
    counts = [s.num_layers for s in placement.stages]
    assert counts[0] > counts[1] > counts[2]
    assert "min_nodes 3" in placement.explanation


def test_a_long_context_budget_can_push_a_model_onto_two_nodes() -> None:
    card = get_card("Qwen3.6-27B-8bit")
    nodes = macs(44, 44, names=("a", "b"))
    assert plan(card, nodes).single_node
    long = PlanOptions(context_length=262_144)  # 16 GiB of KV cache on top of ~27 GiB
    placement = plan(card, nodes, long)
    check_placement(card, nodes, long, placement)
    assert len(placement.stages) == 2
    assert "262,144 tokens" in placement.explanation


def test_bandwidth_breaks_ties_between_equal_nodes() -> None:
    card = get_card("Qwen3.6-27B-4bit")
    nodes = [
        NodeCapacity(id="a-slow", available_memory_bytes=64 * GIB, memory_bandwidth_gbps=400),
        NodeCapacity(id="z-fast", available_memory_bytes=64 * GIB, memory_bandwidth_gbps=800),
    ]
    assert plan(card, nodes).node_ids == ["z-fast"]


def test_tied_embeddings_put_a_copy_of_the_embedding_on_the_last_stage() -> None:
    base = get_card("Qwen3.6-27B")
    tied = base.model_copy(
        update={
            "tie_word_embeddings": True,
            "head_bytes": 10240,
            "bytes": base.bytes - base.head_bytes + 10240,
        }
    )
    options = PlanOptions(min_nodes=2)
    placement = plan(tied, HETEROGENEOUS, options)
    check_placement(tied, HETEROGENEOUS, options, placement)
    assert placement.stages[-1].weight_bytes >= tied.embedding_bytes
    assert "tied" in placement.explanation


def test_the_mtp_head_is_left_out_when_only_the_model_fits() -> None:
    card = get_card("Qwen3.6-27B")
    tokens = DEFAULT_CONTEXT_TOKENS
    whole = stage_need(card, 0, 64, True, True, tokens, 1)
    with_mtp = stage_need(card, 0, 64, True, True, tokens, 1, mtp=True)
    node = [NodeCapacity(id="tight", available_memory_bytes=(whole + with_mtp) // 2)]
    placement = plan(card, node, PlanOptions(headroom_fraction=0.0))
    assert placement.single_node and not placement.mtp_head_included
    assert placement.stages[0].bytes == whole
    assert "does not fit as well" in placement.explanation


def test_the_prompt_cache_budget_counts_in_the_nodes_memory() -> None:
    """A single node budgets the whole prompt cache on top of weights and KV: the same node
    that fits without it is one byte short with it, and the plan says what it counted."""
    card = get_card("Qwen3.6-27B-4bit")
    cache = 1024 * 2**20
    options = PlanOptions(headroom_fraction=0.0, include_mtp_head=False, prompt_cache_bytes=cache)
    need = stage_need(card, 0, 64, True, True, DEFAULT_CONTEXT_TOKENS, 1)
    fits = plan(card, [NodeCapacity(id="x", available_memory_bytes=need + cache)], options)
    assert fits.stages[0].prompt_cache_bytes == cache
    assert fits.stages[0].bytes == need + cache
    assert "prompt cache 1.0 GiB" in fits.explanation
    with pytest.raises(InsufficientMemoryError):
        plan(card, [NodeCapacity(id="x", available_memory_bytes=need + cache - 1)], options)
    without = options.model_copy(update={"prompt_cache_bytes": 0})
    assert plan(card, [NodeCapacity(id="x", available_memory_bytes=need)], without).single_node


def test_a_pipelines_stages_share_the_prompt_cache_by_the_state_they_hold() -> None:
    """Each stage keeps its own layers' part of every snapshot: its share of the budget is
    its share of the per-sequence KV and GatedDeltaNet state, and the shares add up."""
    card = get_card("Qwen3.6-27B")
    cache = 4 * GIB
    options = PlanOptions(min_nodes=3, prompt_cache_bytes=cache)
    placement = plan(card, HETEROGENEOUS, options)
    check_placement(card, HETEROGENEOUS, options, placement)
    stages = placement.stages
    assert len(stages) == 3
    total_state = sum(s.cache_bytes for s in stages)
    for s in stages:
        assert s.prompt_cache_bytes == cache * s.cache_bytes // total_state
        assert s.bytes == s.weight_bytes + s.cache_bytes + s.prompt_cache_bytes
    assert cache - len(stages) < sum(s.prompt_cache_bytes for s in stages) <= cache


def test_headroom_is_respected_to_the_byte() -> None:
    card = get_card("Qwen3.6-27B-4bit")
    options = PlanOptions(headroom_fraction=0.2, include_mtp_head=False)
    need = stage_need(card, 0, 64, True, True, DEFAULT_CONTEXT_TOKENS, 1)
    exact = math.ceil(need / 0.8)
    assert plan(card, [NodeCapacity(id="x", available_memory_bytes=exact)], options).single_node
    with pytest.raises(InsufficientMemoryError):
        plan(card, [NodeCapacity(id="x", available_memory_bytes=exact - 2)], options)


def test_manual_layer_counts_are_followed_in_the_order_given() -> None:
    card = get_card("Qwen3.6-27B")
    options = PlanOptions(layer_counts={"mini": 10, "studio": 50, "mbp": 4})
    placement = plan(card, HETEROGENEOUS, options)
    check_placement(card, HETEROGENEOUS, options, placement)
    assert [(s.node_id, s.num_layers) for s in placement.stages] == [
        ("mini", 10),
        ("studio", 50),
        ("mbp", 4),
    ]


def test_manual_layer_counts_that_overflow_a_node_name_it() -> None:
    card = get_card("Qwen3.6-27B")
    with pytest.raises(InsufficientMemoryError, match="'mini' cannot hold layers 0-59"):
        plan(card, HETEROGENEOUS, PlanOptions(layer_counts={"mini": 60, "studio": 4}))


def test_a_model_that_cannot_fit_says_needed_and_offered() -> None:
    card = get_card("Qwen3.6-35B-A3B")
    with pytest.raises(InsufficientMemoryError) as exc:
        plan(card, macs(32, 16, names=("a", "b")))
    message = str(exc.value)
    assert "Qwen3.6-35B-A3B does not fit" in message
    assert "66.4 GiB needed" in message or "GiB needed" in message
    assert "cluster offers 43.2 GiB usable" in message
    assert "2 nodes" in message and "10% headroom" in message


def tiny_card(layer_bytes: list[int], embedding: int = 0, head: int = 0) -> ModelCard:
    n = len(layer_bytes)
    return ModelCard(
        id="tiny",
        model_type="qwen3_5",
        num_layers=n,
        hidden_size=8,
        bytes=sum(layer_bytes) + embedding + head,
        layer_bytes=layer_bytes,
        layer_types=["full_attention"] * n,
        embedding_bytes=embedding,
        head_bytes=head,
        kv_bytes_per_token=0,
        linear_state_bytes=0,
        context_length=16,
        bits=16,
    )


def exact_nodes(*available: int) -> list[NodeCapacity]:
    return [NodeCapacity(id=f"n{i}", available_memory_bytes=a) for i, a in enumerate(available)]


@pytest.mark.parametrize(
    ("card", "nodes", "min_nodes", "expected", "words"),
    [
        # a proportional share (2 + 2) overflows the second node: one layer moves to the first
        (
            tiny_card([10, 10, 10, 30]),
            exact_nodes(30, 35),
            2,
            [("n1", 0, 3), ("n0", 3, 4)],
            "repaired",
        ),
        # no proportional split settles; the least-full exact split is taken
        (
            tiny_card([4, 26, 5, 1, 2], embedding=3),
            exact_nodes(13, 29, 26),
            3,
            [("n1", 0, 1), ("n2", 1, 2), ("n0", 2, 5)],
            "balanced",
        ),
        # largest-first puts the head on a node too small for it: the ends are swapped
        (
            tiny_card([1, 1, 2, 1], embedding=1, head=1),
            exact_nodes(1, 3, 4),
            3,
            [("n1", 0, 1), ("n0", 1, 2), ("n2", 2, 4)],
            "reordered",
        ),
    ],
)
def test_splits_that_need_more_than_a_proportional_share(
    card: ModelCard, nodes, min_nodes: int, expected, words: str
) -> None:
    options = PlanOptions(min_nodes=min_nodes, headroom_fraction=0.0)
    placement = plan(card, nodes, options)
    check_placement(card, nodes, options, placement)
    assert [(s.node_id, s.start_layer, s.end_layer) for s in placement.stages] == expected
    if words == "reordered":
        assert ORDER_WORDS[True] in placement.explanation
    else:
        assert ORDER_WORDS[False] in placement.explanation
        assert SPLIT_WORDS[words] in placement.explanation


def test_a_node_too_small_for_the_head_goes_in_the_middle() -> None:
    card = get_card("Qwen3.6-27B")
    nodes = macs(192, 64, 2.5, names=("studio", "mbp", "small"))
    options = PlanOptions(min_nodes=3)
    placement = plan(card, nodes, options)
    check_placement(card, nodes, options, placement)
    assert placement.node_ids == ["studio", "small", "mbp"]
    assert ORDER_WORDS[True] in placement.explanation
    # the proportional split still holds in the new order: about 3:1 between studio and mbp
    assert [s.num_layers for s in placement.stages] == [48, 1, 15]


# --- bad input ------------------------------------------------------------------------------------


def test_empty_cluster_is_refused() -> None:
    with pytest.raises(PlacementError, match="no nodes"):
        plan(get_card("Qwen3.6-27B"), [])


def test_negative_memory_is_refused_by_the_node_model() -> None:
    with pytest.raises(ValidationError, match="available_memory_bytes"):
        NodeCapacity(id="x", available_memory_bytes=-1)
    with pytest.raises(ValidationError, match="exceeds total_memory_bytes 10"):
        NodeCapacity(id="x", available_memory_bytes=11, total_memory_bytes=10)
    with pytest.raises(ValidationError, match="id"):
        NodeCapacity(id="", available_memory_bytes=1)


def test_min_nodes_above_the_cluster_size_is_refused() -> None:
    with pytest.raises(PlacementError, match="min_nodes 4 is above the cluster size 3"):
        plan(get_card("Qwen3.6-27B"), HETEROGENEOUS, PlanOptions(min_nodes=4))


def test_min_nodes_above_the_layer_count_is_refused() -> None:
    card = get_card("Qwen3.6-27B").model_copy()
    nodes = [NodeCapacity(id=f"n{i}", available_memory_bytes=GIB) for i in range(70)]
    with pytest.raises(PlacementError, match="above the 64 layers"):
        plan(card, nodes, PlanOptions(min_nodes=65))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (PlanOptions(pinned_nodes=["ghost"]), "node 'ghost' is not in the cluster"),
        (PlanOptions(layer_counts={"studio": 60, "mbp": 3}), "add up to 63 but Qwen3.6-27B has 64"),
        (PlanOptions(layer_counts={"studio": 64, "mbp": 0}), "'mbp' must be >= 1, got 0"),
        (PlanOptions(context_length=300_000), "context length 300000 is above"),
    ],
)
def test_bad_options_are_named(options: PlanOptions, message: str) -> None:
    with pytest.raises(PlacementError, match=message) as exc:
        plan(get_card("Qwen3.6-27B"), HETEROGENEOUS, options)
    assert not isinstance(exc.value, InsufficientMemoryError)


def test_duplicate_node_ids_are_refused() -> None:
    nodes = [NodeCapacity(id="a", available_memory_bytes=GIB)] * 2
    with pytest.raises(PlacementError, match="listed twice: a"):
        plan(get_card("Qwen3.6-27B"), nodes)


def test_options_validate_their_own_ranges() -> None:
    with pytest.raises(ValidationError):
        PlanOptions(min_nodes=0)
    with pytest.raises(ValidationError):
        PlanOptions(headroom_fraction=1.0)
    with pytest.raises(ValidationError, match="either layer_counts or pinned_nodes"):
        PlanOptions(layer_counts={"a": 1}, pinned_nodes=["a"])
