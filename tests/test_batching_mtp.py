"""Batched native MTP: every sequence of a batch drafts and verifies with the others, and its
greedy output is its output alone.

The reference is mlx-lm's own target-only ``generate_step`` on each prompt alone (penalties
and logit bias through mlx-lm's ``make_logits_processors``) — independent of our caches,
sampling and rollback. Requests are all submitted up front and read afterwards, with
``max_batch`` below their number: sequences join as earlier ones finish (different budgets),
one leaves early (its reader cancels), so every sequence shares cycles with rows that accept
different prefix lengths, join and leave. The "partial" checkpoints accept ~40-70% of drafts
(accept, partial-accept and reject paths in the same cycle); prompts of 1 to 310 tokens cross
prefill chunks (64 here). The negative controls break one piece of the per-row rollback and
show the same comparison fails.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from helpers.mlx_lm_reference import PENALTIES
from mlx_lm.models.cache import BatchKVCache
from test_batching import ids, loaded, reference  # the same references

from node.cluster.live import CancelToken
from node.inference import forward
from node.inference.batching import mtp_step
from node.inference.batching.mtp_step import MtpBatchStep
from node.inference.batching.scheduler import BatchScheduler, Sequence
from node.inference.engine import LocalEngine
from node.inference.events import GenerationDone, TokenDelta
from node.inference.mtp.kpolicy import (
    FLAT,
    AcceptanceEstimate,
    AcceptancePrior,
    BatchKPolicy,
    CostTable,
)
from node.inference.requests import GenerateRequest
from node.inference.runner import LocalRunner
from node.inference.sampling import SamplingParams

LENGTHS = [1, 310, 5, 64, 2, 120, 30, 17]
BUDGETS = [12, 20, 6, 16, 9, 14, 5, 11]


def frozen_costs(max_k: int) -> CostTable:
    """A cost table where drafting pays only while acceptance is high (~0.5 is break-even
    for K = 1): with the partial heads the policy moves between K = 0 and deeper K. Frozen
    (``ewma_weight=0``), so the K sequence does not depend on this machine's timings."""
    verify = [1.0 + 0.3 * t for t in range(max_k + 1)]
    draft = [0.0] + [0.15 * k for k in range(1, max_k + 1)]
    return CostTable(
        verify={1: verify, 4: [2 * v for v in verify]},
        draft={1: draft, 4: [2 * d for d in draft]},
        ewma_weight=0.0,
    )


class RecordingStep(MtpBatchStep):
    """The real batched MTP step, noting each cycle's batch size and K."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cycles: list[tuple[int, int]] = []

    def _cycle(self, out) -> None:
        batch = len(self._rows)
        super()._cycle(out)
        self.cycles.append((batch, self.current_k or 0))


def request(prompt: list[int], max_tokens: int, penalties: bool, k: int | None) -> GenerateRequest:
    sampling = SamplingParams(**PENALTIES) if penalties else SamplingParams()
    return GenerateRequest(
        prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True, sampling=sampling, mtp_k=k
    )


def run_batch(name: str, mode: str) -> tuple[list[tuple[list[int], GenerationDone]], RecordingStep]:
    """Every case through one batch of 3; returns (expected, final event) per case."""
    lm = loaded(name)
    max_k = lm.mtp_k_limits[1]
    fixed = int(mode[1:]) if mode.startswith("K") else None
    step = RecordingStep(
        lm, lm.mtp_head(), 3, prefill_chunk=64, costs=frozen_costs(max_k), fixed_k=fixed
    )
    scheduler = BatchScheduler({"native_mtp": step}, max_batch=3)
    cases = []
    for seed, n in enumerate(LENGTHS):
        # "pinned": requests pin different K (1..4 and unpinned) in the same batch.
        k = [1, 4, None, 2, 3, None, 4, 1][seed] if mode == "pinned" else None
        cases.append((ids(n, seed), BUDGETS[seed], seed % 2 == 1, k))
    # The references first: mlx-lm on the same model in this thread while the worker verifies
    # would run through the verify pass's swapped-in mixers (gdn.verify_forward).
    expected = [reference(name, tuple(p), budget, pen) for p, budget, pen, _ in cases]
    results = []
    try:
        cancel = CancelToken()
        leaving = scheduler.submit(
            request(ids(40, 99), 200, False, None), "native_mtp", "native_mtp", cancel
        )
        streams = [scheduler.submit(request(*case), "native_mtp", "native_mtp") for case in cases]
        next(leaving)
        cancel.set()
        assert not any(isinstance(e, GenerationDone) for e in leaving)
        for want, stream in zip(expected, streams, strict=True):
            events = list(stream)
            done = events[-1]
            assert isinstance(done, GenerationDone)
            deltas = [t for e in events if isinstance(e, TokenDelta) for t in e.token_ids]
            assert deltas == done.token_ids
            results.append((want, done))
    finally:
        scheduler.close()
    assert len(step) == 0  # every sequence left, the cancelled one included
    return results, step


MATRIX = [
    ("dense-partial", "K1"),
    ("dense-partial", "K2"),
    ("dense-partial", "K3"),
    ("dense-partial", "K4"),
    ("dense-partial", "adaptive"),
    ("dense-partial", "pinned"),
    ("dense-none", "adaptive"),  # long K = 0 stretches: the pipelined decode path
    ("moe-partial", "K3"),
    ("moe-partial", "adaptive"),
]


@pytest.mark.parametrize(("name", "mode"), MATRIX, ids=[f"{n}-{m}" for n, m in MATRIX])
def test_each_sequence_in_an_mtp_batch_equals_mlx_lm_alone(name: str, mode: str) -> None:
    results, step = run_batch(name, mode)
    for i, (expected, done) in enumerate(results):
        assert done.token_ids == expected, f"case {i} (prompt of {LENGTHS[i]} tokens)"
        stats = done.stats
        assert (stats.engine, done.finish_reason) == ("native_mtp", "length")
        assert stats.generation_tokens == BUDGETS[i]
        hist = stats.draft_k_histogram
        assert stats.num_draft_tokens == pytest.approx(
            sum(k * c for k, c in enumerate(hist)) / sum(hist)
        )
        assert 0 <= stats.accepted_draft_tokens <= stats.proposed_draft_tokens
        if mode.startswith("K"):
            assert hist[int(mode[1:])] == sum(hist)  # every cycle at the forced K
    assert max(b for b, _ in step.cycles) == 3  # really batched, never above max_batch
    ks = {k for _, k in step.cycles}
    if mode == "adaptive" and name != "dense-none":
        assert 0 in ks and len(ks) > 1  # the policy moved K, to 0 and back up
    if name == "dense-none":
        assert sum(k == 0 for _, k in step.cycles) > len(step.cycles) / 2
    if name.endswith("partial"):
        accepted = sum(d.stats.accepted_draft_tokens for _, d in results)
        proposed = sum(d.stats.proposed_draft_tokens for _, d in results)
        assert 0.2 < accepted / proposed < 0.95  # accept and reject paths both ran


def test_pinned_rows_accept_at_most_their_own_k() -> None:
    results, step = run_batch("dense-high", "pinned")
    pins = [1, 4, None, 2, 3, None, 4, 1]
    for (expected, done), pin in zip(results, pins, strict=True):
        assert done.token_ids == expected
        hist = done.stats.draft_k_histogram
        if pin is not None:
            assert hist[pin] == sum(hist)
            # A high-agreement head: a pinned row takes its K drafts and a bonus per cycle,
            # never the batch's deeper drafts.
            cycles = sum(hist)
            assert done.stats.accepted_draft_tokens <= cycles * pin
            assert done.stats.generation_tokens <= 1 + cycles * (pin + 1)
    assert {k for _, k in step.cycles} >= {4}


_original_drop_tail = mtp_step._drop_tail


def _target_uniform_trim(cache, drop: list[int]) -> None:
    if getattr(cache, "is_head", False):
        _original_drop_tail(cache, drop)
    else:
        cache.trim(min(drop))  # wrong: rows that accepted less keep their rejected entries


def _head_uniform_trim(cache, drop: list[int]) -> None:
    if getattr(cache, "is_head", False):
        cache.trim(min(drop))  # wrong: short rows keep the padding pairs in the head's cache
    else:
        _original_drop_tail(cache, drop)


def _commit_longest(cache, pending, n_accepted: list[int]) -> None:
    # wrong: every row commits the state after the longest accepted prefix
    _original_commit(cache, pending, [max(n_accepted)] * len(n_accepted))


_original_commit = mtp_step.commit_rows


@pytest.mark.parametrize("broken", ["kv", "gdn"])
def test_a_wrong_per_row_rollback_is_caught(monkeypatch, broken: str) -> None:
    """Negative controls: the same comparison fails when one cache's rollback ignores rows."""
    if broken == "kv":
        monkeypatch.setattr(mtp_step, "_drop_tail", _target_uniform_trim)
    else:
        monkeypatch.setattr(mtp_step, "commit_rows", _commit_longest)
    results, _ = run_batch("dense-partial", "K3")
    assert any(done.token_ids != expected for expected, done in results)


_original_compact = mtp_step._drop_common_padding


def _compact_wrong_end(caches) -> None:
    # wrong: the shared padding count comes off the newest end (the rows' latest entries)
    least = min(caches[0].left_padding.tolist())
    if least >= mtp_step.COMPACT_PADDING:
        for c in caches:
            c._idx -= least
            c.left_padding = c.left_padding - least


@pytest.mark.parametrize("broken", [False, True], ids=["exact", "negative-control"])
def test_padding_every_row_shares_is_dropped(monkeypatch, broken: bool) -> None:
    """Rows that keep the longest prefix in different cycles all gain left padding; the
    columns every row pads are dropped (here as soon as there is one), and every sequence is
    still its output alone. Dropping them from the wrong end is caught by the same comparison."""
    monkeypatch.setattr(mtp_step, "COMPACT_PADDING", 1)
    dropped: list[int] = []
    compact = _compact_wrong_end if broken else _original_compact

    def counting(caches) -> None:
        before = caches[0]._idx
        compact(caches)
        dropped.append(before - caches[0]._idx)

    monkeypatch.setattr(mtp_step, "_drop_common_padding", counting)
    results, _ = run_batch("dense-partial", "K3")
    assert sum(dropped) > 0  # it really compacted
    same = [done.token_ids == expected for expected, done in results]
    assert not all(same) if broken else all(same)


def head_cache_error(compacted: bool = False) -> float:
    """Largest difference between each row's head cache (its valid entries) and the head run
    afresh over that row's true pairs ``(h_j, x_{j+1})`` (target hiddens of its own tokens);
    inf when a row's target or head cache holds the wrong number of entries, or (``compacted``)
    when both still carry padding every row shares."""
    lm = loaded("dense-partial")
    model, head = lm.model, lm.mtp_head()
    step = MtpBatchStep(lm, head, 3, prefill_chunk=64, fixed_k=3)
    for uid, n in enumerate([3, 70, 12]):
        req = GenerateRequest(prompt_ids=ids(n, uid), max_tokens=40, ignore_eos=True)
        step.join(Sequence(uid, req, "native_mtp", "native_mtp", CancelToken()))
    for _ in range(8):
        step.step()
    cache = step._mtp_cache
    assert cache is not None and len(step._rows) == 3
    padding = cache.left_padding.tolist()
    target = next(c for c in step._cache if isinstance(c, BatchKVCache))
    target_padding = target.left_padding.tolist()
    if compacted and min(padding) + min(target_padding) > 0:
        return float("inf")  # the padding every row shares should be gone
    worst = 0.0
    for r, row in enumerate(step._rows):
        if target._idx - target_padding[r] != len(row.history) - 1:  # all but the newest token
            return float("inf")
        fed = cache._idx - padding[r]
        if fed + len(row.pending_tokens) != len(row.history) - 1:  # every pair, once
            return float("inf")
        tokens = mx.array(row.history)[None]
        hidden = forward.hidden_states(model, tokens[:, :fed], model.make_cache())
        fresh = head.make_cache()
        head(forward.embed(model, tokens[:, 1 : fed + 1]), hidden, fresh)
        got = cache.keys[r : r + 1, :, padding[r] : cache._idx]
        worst = max(worst, mx.abs(got - fresh.keys[..., :fed, :]).max().item())
    return worst


@pytest.mark.parametrize(
    ("broken", "compacted"),
    [(False, False), (False, True), (True, False)],
    ids=["rolled", "rolled-compacted", "negative-control"],
)
def test_each_rows_head_cache_holds_its_true_pairs(
    monkeypatch, broken: bool, compacted: bool
) -> None:
    """The head's cache only shapes the drafts (a wrong one keeps the output exact and costs
    acceptance), so it is checked directly: rows whose pending pairs were padded to the
    longest must drop the padding, and so must the padding every row shares."""
    if broken:
        monkeypatch.setattr(mtp_step, "_drop_tail", _head_uniform_trim)
    if compacted:
        monkeypatch.setattr(mtp_step, "COMPACT_PADDING", 1)
    error = head_cache_error(compacted)
    if broken:
        assert error > 1e-2
    else:
        assert error < 1e-4  # cross-shape rounding only


def test_seeded_sampling_does_not_depend_on_the_batch() -> None:
    """A seeded row's token at each position is the target's own draw with that position's
    key (the coupled rule): the batch's other rows, the K they pin, the K the policy picks and
    queued K = 0 steps undone do not change what it emits — it is what the local engine draws
    with that seed."""
    lm = loaded("dense-partial")
    params = [
        (SamplingParams(temperature=0.9, seed=5), 2),
        (SamplingParams(temperature=0.7, top_p=0.9, seed=6, **PENALTIES), 1),
        (SamplingParams(temperature=1.2, top_k=40, min_p=0.05, seed=7), 3),
        (SamplingParams(temperature=0.8, seed=8, **PENALTIES), None),
    ]
    reqs = [
        GenerateRequest(
            prompt_ids=ids(20 + 9 * i, i), max_tokens=16, ignore_eos=True, sampling=p, mtp_k=k
        )
        for i, (p, k) in enumerate(params)
    ]

    def generate(batch: list[GenerateRequest]) -> list[list[int]]:
        step = MtpBatchStep(lm, lm.mtp_head(), 4, costs=frozen_costs(lm.mtp_k_limits[1]))
        scheduler = BatchScheduler({"native_mtp": step}, max_batch=4)
        try:
            streams = [scheduler.submit(r, "native_mtp", "native_mtp") for r in batch]
            return [list(s)[-1].token_ids for s in streams]
        finally:
            scheduler.close()

    alone = [generate([r])[0] for r in reqs]
    assert generate(reqs) == alone
    assert len({tuple(t) for t in alone}) == 4
    local = [list(LocalEngine(lm).generate(r))[-1].token_ids for r in reqs]
    assert alone == local


def test_runner_batches_native_mtp_within_the_memory_budget() -> None:
    """Through the runner (what a daemon instance runs): native-MTP requests share one batch,
    status' current K follows it, and generation stops at the instance's per-sequence budget
    (``context_tokens``) as local requests do."""
    lm = loaded("dense-high")
    runner = LocalRunner(lm, max_batch=4, context_tokens=40)
    try:
        streams = [
            runner.submit(GenerateRequest(prompt_ids=ids(30, s), max_tokens=30, ignore_eos=True))
            for s in range(3)
        ]
        dones = [list(s)[-1] for s in streams]
    finally:
        runner.close()
    for s, done in enumerate(dones):
        assert done.stats.engine == "native_mtp"
        assert (done.finish_reason, done.stats.generation_tokens) == ("length", 10)
        assert done.token_ids == reference("dense-high", tuple(ids(30, s)), 10, False)
        assert done.stats.acceptance_rate is not None and done.stats.acceptance_rate > 0.8
    assert runner.mtp_current_k is not None


def design_costs() -> CostTable:
    """DESIGN.md's measured [B, T] forward costs (relative to [1, 1]) on the ~200M model:
    batched drafting pays at small B and not at large B."""
    verify = {
        1: [1.0, 1.2, 1.4, 1.6],
        4: [1.35, 1.8, 2.4, 3.0],
        16: [1.9, 6.0, 9.0, 12.0],
    }
    draft = {b: [0.0, 0.1 * f, 0.2 * f, 0.3 * f] for b, f in ((1, 1.0), (4, 1.3), (16, 1.8))}
    return CostTable(verify=verify, draft=draft, ewma_weight=0.0)


def estimates(rate: float, rows: int) -> list[AcceptanceEstimate]:
    out = []
    for _ in range(rows):
        e = AcceptanceEstimate(3)
        for _ in range(20):
            e.observe(3, 3 if rate == 1.0 else 0)
        out.append(e)
    return out


def test_the_batch_policy_follows_the_batch_size_and_acceptance() -> None:
    costs = design_costs()
    policy = BatchKPolicy(max_k=3, start_k=2)
    prior = [AcceptanceEstimate(3)]  # no evidence: the prior (0.5)
    assert BatchKPolicy(max_k=3, start_k=1).next_k(prior * 1, costs, 3, 1) == 1  # the default
    # Nothing known: the card's default K, where drafting pays at the prior at all.
    assert BatchKPolicy(max_k=3, start_k=3).next_k(prior * 4, costs, 3, 4) == 3
    # A pooled prior is something known: the costs and the prior choose (here K = 1 at B = 4,
    # the prior's 0.5), the card's default no longer does.
    served = AcceptanceEstimate(3)  # an earlier request: every other draft accepted
    for i in range(20):
        served.observe(1, i % 2)
    pool = AcceptancePrior()
    pool.learn("greedy", served)
    informed = [AcceptanceEstimate(3, prior=pool.for_class("greedy"))]
    assert informed[0].informed and not prior[0].informed
    assert BatchKPolicy(max_k=3, start_k=3).next_k(informed * 4, costs, 3, 4) == 1
    assert BatchKPolicy(max_k=3, start_k=2).next_k(prior * 16, costs, 3, 16) == 0  # not worth it
    assert policy.next_k(estimates(1.0, 4), costs, 3, 4) == 3  # always accepted: deep K
    assert policy.next_k(estimates(1.0, 16), costs, 3, 16) == 0  # [16, K+1] too dear
    assert policy.next_k(estimates(1.0, 4), costs, 1, 4) == 1  # bounded by what rows may use
    never = BatchKPolicy(max_k=3, start_k=2)
    ks = [never.next_k(estimates(0.0, 4), costs, 3, 4) for _ in range(6)]
    for k in ks:
        never.observe(k, [(k, 0)] * 4)
    assert ks[:1] == [0] and 1 in ks  # K = 0, with a K = 1 probe after a K = 0 stretch


def test_an_instance_s_finished_requests_seed_its_newcomers_estimates() -> None:
    """The real step: a finished greedy request's depth-1 estimate becomes the pool a later
    greedy newcomer starts from; a sampled newcomer starts from the flat prior (its own
    class is empty); the greedy output is the same with or without a pool."""
    lm = loaded("dense-partial")
    step = MtpBatchStep(lm, lm.mtp_head(), 4, costs=frozen_costs(lm.mtp_k_limits[1]))
    scheduler = BatchScheduler({"native_mtp": step}, max_batch=4)
    first = GenerateRequest(prompt_ids=ids(24, 1), max_tokens=24, ignore_eos=True)
    second = GenerateRequest(prompt_ids=ids(30, 2), max_tokens=16, ignore_eos=True)
    try:
        assert step.acceptance_prior.pools == {}
        list(scheduler.submit(first, "native_mtp", "native_mtp"))
        assert set(step.acceptance_prior.pools) == {"greedy"}
        pooled = step.acceptance_prior.for_class("greedy")
        assert pooled != FLAT
        seen: list[tuple[tuple[float, ...], bool]] = []  # each newcomer's (prior, informed)
        original = step.join

        def join(seq: Sequence) -> None:
            original(seq)
            estimate = step._prefilling[-1].estimate
            assert estimate is not None
            seen.append((tuple(estimate.prior), estimate.informed))

        step.join = join  # type: ignore[method-assign]
        tokens = list(scheduler.submit(second, "native_mtp", "native_mtp"))[-1].token_ids
        sampled = second.model_copy(update={"sampling": SamplingParams(temperature=0.8)})
        list(scheduler.submit(sampled, "native_mtp", "native_mtp"))
    finally:
        scheduler.close()
    assert seen == [(pooled, True), (FLAT, False)]
    assert tokens == list(LocalEngine(lm).generate(second))[-1].token_ids
