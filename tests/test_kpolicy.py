"""The K policy on synthetic cost tables and acceptance histories (pure code, no model).

A simulated request draws each draft's acceptance from a per-depth probability that the test
controls (and changes mid-request); "speed" is the policy's own cost model evaluated on what
really happened, so the comparisons against fixed K are exact and not timing-dependent.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable

import pytest

from node.inference.mtp.costs import fastest_interleaved
from node.inference.mtp.kpolicy import (
    EWMA_UP,
    FLAT,
    LEAVE_ZERO_MARGIN,
    LEVELS,
    PAID_PROBE_BUDGET,
    POOL_MIN_TRIES,
    PRIOR_ACCEPTANCE,
    PROBE_BUDGET,
    AcceptanceEstimate,
    AcceptancePrior,
    BatchKPolicy,
    CostTable,
    CycleTimer,
    KPolicy,
    choose_k,
    expected_tokens,
    probe_interval_cap,
)

MAX_K = 8


def cpu_like(max_k: int = MAX_K, batch_sizes: tuple[int, ...] = (1,)) -> CostTable:
    """Verify of T positions costs 1 + 0.12 (T-1) decode steps at B=1, each draft 0.06; a
    batch of B scales the multi-position part by B (the [B, T] shapes of DESIGN.md roughly)."""
    return CostTable(
        verify={b: [1.0 + 0.12 * b * t for t in range(max_k + 1)] for b in batch_sizes},
        draft={b: [0.06 * k * (1 + 0.1 * b) for k in range(max_k + 1)] for b in batch_sizes},
    )


def simulate(
    policy: KPolicy, costs: CostTable, acceptance, cycles: int, seed: int = 0
) -> tuple[list[int], float, float]:
    """Run ``cycles`` cycles; ``acceptance(cycle)`` is the per-depth probability.
    Returns (K per cycle, tokens emitted, modelled seconds)."""
    rng = random.Random(seed)
    ks, tokens, seconds = [], 0.0, 0.0
    for c in range(cycles):
        k = policy.next_k(costs)
        p = acceptance(c)
        n = 0
        while n < k and rng.random() < p:
            n += 1
        policy.observe(k, n)
        ks.append(k)
        tokens += n + 1
        seconds += costs.cycle_s(1, k)
    return ks, tokens, seconds


def fixed_speed(costs: CostTable, k: int, acceptance, cycles: int, seed: int = 0) -> float:
    policy = KPolicy(max_k=MAX_K, start_k=k, pin=k)
    _, tokens, seconds = simulate(policy, costs, acceptance, cycles, seed)
    return tokens / seconds


def test_expected_tokens_counts_each_depth_given_the_ones_before() -> None:
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([1.0] * 4, 4) == 5.0
    assert expected_tokens([0.9, 0.0, 1.0], 3) == pytest.approx(1.9)


def test_never_matching_drafts_give_k_zero_with_rare_probes() -> None:
    costs = cpu_like()
    policy = KPolicy(max_k=MAX_K, start_k=2)
    ks, _, _ = simulate(policy, costs, lambda c: 0.0, 600)
    assert ks[0] == 2  # the card's default_k starts
    # Backed off to the interval at which probes cost PROBE_BUDGET of the time.
    cap = probe_interval_cap(costs)
    assert ks[8:].count(0) >= (1 - 1 / cap) * len(ks[8:]) - 2
    assert set(ks[8:]) <= {0, 1}  # only K=1 probes
    assert 5 <= cap <= 20  # probes cost ~0.19 of a K=0 cycle here
    probes = ks[100:].count(1)
    assert 0 < probes <= len(ks[100:]) / cap + 1
    extra = probes * (costs.cycle_s(1, 1) - costs.cycle_s(1, 0))
    assert extra <= 1.1 * PROBE_BUDGET * len(ks[100:]) * costs.cycle_s(1, 0)


def test_a_draft_passing_now_and_then_does_not_restart_the_probe_schedule() -> None:
    # The EPYC's shape (sessions 5-6): one more verify position and a draft cost ~0.45 of a
    # step, so K = 1 pays above ~45% acceptance. At a steady 25% a quarter of the probes
    # pass; each is followed by one more probe, but the interval must stay long (it was reset
    # to 2, and probes ran ~1 in 6 cycles, each breaking plain decode's pipelining).
    costs = CostTable(
        verify={1: [1.0 + 0.4 * t for t in range(MAX_K + 1)]},
        draft={1: [0.05 * k for k in range(MAX_K + 1)]},
    )
    cap = probe_interval_cap(costs)
    assert cap >= 20
    policy = KPolicy(max_k=MAX_K, start_k=2)
    ks, _, _ = simulate(policy, costs, lambda c: 0.25, 3000, seed=3)
    late = ks[300:]
    assert set(late) <= {0, 1}
    assert late.count(1) <= 1.5 * len(late) / cap  # one follow-up per passing probe at most
    # Passing probes are not drafting that paid: the budget stays at its floor.
    assert policy.probe.budget == pytest.approx(PROBE_BUDGET, abs=1e-3)


def test_always_matching_drafts_give_the_deepest_k() -> None:
    costs = cpu_like()
    policy = KPolicy(max_k=MAX_K, start_k=2)
    ks, _, _ = simulate(policy, costs, lambda c: 1.0, 60)
    assert ks[-20:] == [MAX_K] * 20
    bounded = KPolicy(max_k=3, start_k=2)
    assert simulate(bounded, cpu_like(), lambda c: 1.0, 30)[0][-10:] == [3] * 10


@pytest.mark.parametrize("p", [0.9, 0.75, 0.5, 0.3, 0.15])
def test_steady_acceptance_is_as_fast_as_the_best_fixed_k(p: float) -> None:
    costs = cpu_like()
    acceptance = lambda c: p  # noqa: E731
    best = max(fixed_speed(costs, k, acceptance, 2000, seed=k) for k in range(MAX_K + 1))
    _, tokens, seconds = simulate(KPolicy(max_k=MAX_K, start_k=2), costs, acceptance, 2000)
    assert tokens / seconds >= 0.95 * best


def test_changing_acceptance_is_followed_within_a_few_cycles() -> None:
    costs = cpu_like()
    policy = KPolicy(max_k=MAX_K, start_k=2)

    def acceptance(c: int) -> float:
        return 1.0 if c < 100 or c >= 300 else 0.0

    ks, tokens, seconds = simulate(policy, costs, acceptance, 400)
    assert ks[99] == MAX_K
    assert 0 in ks[100:108]  # drafts stopped matching: K falls to 0 within 8 cycles
    assert ks[150:300].count(0) > 0.85 * 150
    back = next(i for i in range(300, 400) if ks[i] >= MAX_K - 1)
    # One probe interval, then the climb: after 200 hard cycles depth 1 believes the text
    # is hard, and depths 2+ follow depth 1 up one K at a time (~13 cycles here).
    assert back - 300 <= probe_interval_cap(costs) + 14
    # Beats every fixed K on this text (the steady halves each favour a different K).
    best = max(fixed_speed(costs, k, acceptance, 400) for k in range(MAX_K + 1))
    assert tokens / seconds >= 1.2 * best


def test_limit_and_pin_bound_k() -> None:
    costs = cpu_like()
    policy = KPolicy(max_k=MAX_K, start_k=2)
    simulate(policy, costs, lambda c: 1.0, 30)
    assert policy.next_k(costs) == MAX_K
    assert policy.next_k(costs, limit=3) == 3  # the request may emit only 4 more tokens
    assert policy.next_k(costs, limit=0) == 0
    pinned = KPolicy(max_k=MAX_K, start_k=2, pin=3)
    ks, _, _ = simulate(pinned, costs, lambda c: 0.0, 50)
    assert ks == [3] * 50  # an explicit mtp_k is kept even when drafts never match
    assert pinned.next_k(costs, limit=1) == 1
    assert KPolicy(max_k=3, start_k=5).next_k(costs) == 3  # start_k is bounded too


def test_without_a_cost_table_the_start_k_is_kept() -> None:
    policy = KPolicy(max_k=4, start_k=2)
    for _ in range(5):
        assert policy.next_k(None) == 2
        policy.observe(2, 0)


def test_no_gain_means_no_drafting() -> None:
    # Verifying T positions costs T decode steps (no parallelism): drafting can never pay,
    # even when every draft is accepted (ties go to the smaller K).
    costs = CostTable(verify={1: [1.0, 2.0, 3.0]}, draft={1: [0.0, 0.0, 0.0]})
    assert choose_k([[1.0, 1.0]], costs, max_k=2) == 0
    free = CostTable(verify={1: [1.0, 1.0, 1.0]}, draft={1: [0.0, 0.01, 0.02]})
    assert choose_k([[0.2, 0.2]], free, max_k=2) == 2


def test_batch_size_changes_the_choice() -> None:
    costs = cpu_like(batch_sizes=(1, 4, 16))
    rates = [0.7] * MAX_K
    one = choose_k([rates], costs, MAX_K)
    four = choose_k([rates] * 4, costs, MAX_K)
    sixteen = choose_k([rates] * 16, costs, MAX_K)
    assert one > four > sixteen >= 0
    # A batch of 8 sits between the measured 4 and 16.
    assert costs.modelled_s(8, 2) == pytest.approx(
        (2 / 3) * costs.modelled_s(4, 2) + (1 / 3) * costs.modelled_s(16, 2)
    )
    assert costs.modelled_s(32, 2) == costs.modelled_s(16, 2)  # beyond: the nearest
    # Sequences with different acceptance: the batch's K serves their sum.
    good, bad = [1.0] * MAX_K, [0.0] * MAX_K
    assert choose_k([good] * 4, costs, MAX_K) == MAX_K
    assert choose_k([good] + [bad] * 3, costs, MAX_K) == 0


def test_live_timings_refresh_the_table() -> None:
    costs = cpu_like(max_k=4)
    modelled = costs.modelled_s(1, 2)
    assert costs.cycle_s(1, 2) == modelled  # nothing measured live yet
    costs.observe(1, 2, 0.5 * modelled)
    assert costs.cycle_s(1, 2) == pytest.approx(0.5 * modelled)  # the first one is taken as is
    costs.observe(1, 2, 20 * modelled)  # one cycle preempted by another process
    assert costs.cycle_s(1, 2) < 1.5 * modelled  # moves the estimate little
    for _ in range(150):
        costs.observe(1, 2, 2 * modelled)  # K=2 cycles really take twice the model
    assert costs.cycle_s(1, 2) == pytest.approx(2 * modelled, rel=0.01)
    # Ks that have not run yet follow the overall ratio, except that K = 0 is never guessed
    # dearer than its model (drafting's overheads are not plain decode's).
    assert costs.cycle_s(1, 3) == pytest.approx(2 * costs.modelled_s(1, 3), rel=0.01)
    assert costs.cycle_s(1, 0) == costs.modelled_s(1, 0)
    # A K that ran at another batch size: that K's ratio.
    assert costs.cycle_s(4, 2) == pytest.approx(2 * costs.modelled_s(4, 2), rel=0.01)
    # Overheads measured live move the choice: K=2 wins on the load-time table, but not
    # once its cycles are measured at twice the model while K=0 cycles match it.
    assert choose_k([[0.8] * 4], cpu_like(max_k=4), max_k=2) == 2
    for _ in range(30):
        costs.observe(1, 0, costs.modelled_s(1, 0))
    assert choose_k([[0.8] * 4], costs, max_k=2) != 2


def test_acceptance_estimate_is_conditional_per_depth() -> None:
    est = AcceptanceEstimate(max_k=3, hazard=0.005)
    for _ in range(100):
        est.observe(3, 3)  # all accepted
        est.observe(3, 1)  # depth 1 accepted, depth 2 rejected, depth 3 not tried
    rates = est.rates()
    assert rates[0] > 0.95
    assert rates[1] == pytest.approx(0.5, abs=0.05)
    assert rates[2] > 0.95  # given depth 2 accepted, depth 3 always was
    untried = AcceptanceEstimate(max_k=3)
    assert untried.rates() == pytest.approx([PRIOR_ACCEPTANCE] * 3)
    untried.observe(1, 1)
    r = untried.rates()
    assert r[0] > 0.5 and r[1] == pytest.approx(r[0]) and r[2] == pytest.approx(r[0])


def test_a_steady_acceptance_gives_a_steady_estimate() -> None:
    # Acceptance 0.5 at every depth: the estimate must not swing across the range where the
    # best K changes (the old decayed counts, ~3 cycles of memory, had a spread of ~0.17-0.19
    # per depth and ranged 0.13-0.94 on this history).
    rng = random.Random(1)
    est = AcceptanceEstimate(max_k=3)
    seen = []
    for _ in range(600):
        n = 0
        while n < 3 and rng.random() < 0.5:
            n += 1
        est.observe(3, n)
        seen.append(est.rates())
    for d, bound in enumerate([0.13, 0.1, 0.1]):
        values = [r[d] for r in seen[50:]]
        assert statistics.mean(values) == pytest.approx(0.5, abs=0.05)
        assert statistics.pstdev(values) < bound


def test_misses_after_a_run_of_hits_move_the_estimate_at_once() -> None:
    # An always-accepted stretch ends (one depth-1 miss per cycle from then on): two misses
    # put the depth-1 estimate below 0.4 (decayed counts: 0.49) and K reaches 0 at the fifth
    # (decayed counts: the seventh; every cycle in between drafts for nothing).
    est = AcceptanceEstimate(max_k=MAX_K)
    for _ in range(30):
        est.observe(MAX_K, MAX_K)
    assert est.rates()[0] > 0.9
    ks = []
    for _ in range(6):
        est.observe(MAX_K, 0)
        ks.append(choose_k([est.rates()], cpu_like(), MAX_K))
        if len(ks) == 2:
            assert est.rates()[0] < 0.4
    assert ks[4:] == [0, 0]


def test_cheap_probes_come_often() -> None:
    metal_like = CostTable(verify={1: [1.0, 1.01, 1.02]}, draft={1: [0.0, 0.02, 0.04]})
    assert probe_interval_cap(metal_like) == 2  # 3% per probe: probe every other K=0 cycle
    dear = CostTable(verify={1: [1.0, 2.0, 3.0]}, draft={1: [0.0, 0.5, 1.0]})
    assert probe_interval_cap(dear) == 32  # the ceiling


def test_bad_cost_tables_are_refused() -> None:
    with pytest.raises(ValueError, match="same batch sizes"):
        CostTable(verify={1: [1.0, 1.1]}, draft={2: [0.0, 0.1]})
    with pytest.raises(ValueError, match="batch 1"):
        CostTable(verify={1: [1.0, 1.1, 1.2]}, draft={1: [0.0, 0.1]})


def test_load_time_outliers_are_capped_by_longer_shapes() -> None:
    from node.inference.mtp.costs import no_dearer_than_longer

    # T=5 measured while another process held the core: capped by T=6's cost.
    assert no_dearer_than_longer([1.0, 1.1, 1.2, 3.5, 1.4, 1.5]) == [1.0, 1.1, 1.2, 1.4, 1.4, 1.5]
    assert no_dearer_than_longer([0.0, 0.1, 0.2]) == [0.0, 0.1, 0.2]


def test_probes_come_sooner_in_a_request_whose_drafts_have_paid() -> None:
    # The same hard stretch, after 60 always-accepted cycles vs from the start: the text was
    # easy before, so it probably becomes easy again, and the probes come more often.
    costs = cpu_like()
    easy_first = KPolicy(max_k=MAX_K, start_k=2)
    ks, _, _ = simulate(easy_first, costs, lambda c: 1.0 if c < 60 else 0.0, 100)
    never = KPolicy(max_k=MAX_K, start_k=2)
    never_ks, _, _ = simulate(never, costs, lambda c: 0.0, 100)
    assert never.probe.budget == pytest.approx(PROBE_BUDGET, abs=1e-3)
    assert ks[70:].count(1) > never_ks[70:].count(1)  # 10-40 cycles into the hard stretch
    # ... and still cost at most the larger budget.
    extra = ks[70:].count(1) * (costs.cycle_s(1, 1) - costs.cycle_s(1, 0))
    assert extra <= 1.1 * PAID_PROBE_BUDGET * 30 * costs.cycle_s(1, 0)
    # Once the hard stretch has lasted, the budget falls back toward PROBE_BUDGET.
    simulate(easy_first, costs, lambda c: 0.0, 400)
    assert easy_first.probe.budget < 1.5 * PROBE_BUDGET


def test_cost_shapes_are_timed_in_rounds_so_a_burst_of_load_skews_no_ratio() -> None:
    """measure_costs times every shape once per round: a burst of another process's work that
    starts mid-measurement slows later samples of every shape, and each shape's fastest sample
    is still its own cost. Timed one shape after another (the negative control), the burst
    covers every sample of the shapes measured during it."""
    now = [0.0]
    burst_starts = 6.5  # fake seconds; from then on every run costs 10x

    def run_costing(seconds: float) -> Callable[[], None]:
        def run() -> None:
            now[0] += seconds * (10.0 if now[0] >= burst_starts else 1.0)

        return run

    true_costs = [1.0, 1.2, 1.5]
    got = fastest_interleaved([run_costing(c) for c in true_costs], repeats=5, clock=lambda: now[0])
    assert got == pytest.approx(true_costs)

    now[0] = 0.0
    one_after_another = []
    for cost in true_costs:
        run = run_costing(cost)
        run()
        samples = []
        for _ in range(5):
            start = now[0]
            run()
            samples.append(now[0] - start)
        one_after_another.append(min(samples))
    assert one_after_another[1] / one_after_another[0] > 5  # the skew the rounds avoid


def test_leaving_k_zero_must_pay_for_the_queued_step() -> None:
    # K = 1 here is 2% faster than K = 0: within the margin, a batch that has already queued
    # its next K = 0 step keeps it; one that has not (or a clear gain) drafts.
    costs = CostTable(verify={4: [1.0, 1.2]}, draft={4: [0.0, 0.0]}, ewma_weight=0.0)
    rate = 1.02 * 1.2 - 1.0  # tokens(1) / seconds(1) = 1.02 x tokens(0) / seconds(0)
    assert choose_k([[rate]] * 4, costs, 1) == 1  # negative control: no margin asked
    assert choose_k([[rate]] * 4, costs, 1, leave_zero_margin=LEAVE_ZERO_MARGIN) == 0
    assert choose_k([[0.5]] * 4, costs, 1, leave_zero_margin=LEAVE_ZERO_MARGIN) == 1  # 1.25x

    def estimate(level: float) -> AcceptanceEstimate:
        e = AcceptanceEstimate(1)
        for i in range(200):  # a long, steady history at ``level``
            e.observe(1, 1 if (i * level) % 1 + level >= 1 else 0)
        return e

    near = [estimate(rate)] * 4
    assert abs(near[0].rates()[0] - rate) < 0.03
    margin_rate = (1 + LEAVE_ZERO_MARGIN) * 1.2 - 1.0
    assert near[0].rates()[0] < margin_rate
    assert BatchKPolicy(max_k=1, start_k=1).next_k(near, costs, 1, 4) == 1
    assert BatchKPolicy(max_k=1, start_k=1).next_k(near, costs, 1, 4, zero_queued=True) == 0


@pytest.mark.parametrize("plain_ratio", [1.0, 2.0])
def test_drafting_overheads_do_not_hide_plain_decode(plain_ratio: float) -> None:
    """Live K = 2 cycles at B = 8 take 1.6x the table (overheads the load-time timings do not
    see); plain steps take ``plain_ratio`` x the table.  The table alone favours K = 2, so the
    batch starts drafting; it must try K = 0 and keep it when that is really faster (1.0), and
    go back to drafting when plain steps are as dear as the drafts (2.0: the control)."""
    costs = CostTable(verify={8: [1.0, 1.3, 1.6]}, draft={8: [0.0, 0.1, 0.2]}, ewma_weight=EWMA_UP)
    truth = {0: plain_ratio, 1: 1.6, 2: 1.6}
    rates = [[0.8, 0.8]] * 8
    assert choose_k(rates, costs, 2) == 2  # the table alone: drafting pays
    chosen = []
    for _ in range(40):
        k = choose_k(rates, costs, 2)
        chosen.append(k)
        costs.observe(8, k, truth[k] * costs.modelled_s(8, k))
    true_speed = {
        k: sum(expected_tokens(r, k) for r in rates) / (truth[k] * costs.modelled_s(8, k))
        for k in truth
    }
    best = max(true_speed, key=true_speed.__getitem__)
    assert best == (0 if plain_ratio == 1.0 else 2)
    assert chosen[-20:] == [best] * 20


def test_an_untried_k_is_priced_like_the_nearest_tried_drafting_k() -> None:
    # K = 0 cycles run at 0.6x the table (a plain-decode stretch), K = 1 cycles at 1.0x. The
    # overall ratio is mostly K = 0's: pricing an untried K = 2 by it put K = 2 below K = 1.
    costs = CostTable(verify={1: [1.0, 1.3, 1.6]}, draft={1: [0.0, 0.1, 0.2]})
    for _ in range(20):
        costs.observe(1, 0, 0.6 * costs.modelled_s(1, 0))
    costs.observe(1, 1, costs.modelled_s(1, 1))
    assert costs.cycle_s(1, 1) == pytest.approx(costs.modelled_s(1, 1))
    assert costs.cycle_s(1, 2) == pytest.approx(costs.modelled_s(1, 2))
    assert costs.cycle_s(1, 2) > costs.cycle_s(1, 1)
    fresh = CostTable(verify={1: [1.0, 1.3, 1.6]}, draft={1: [0.0, 0.1, 0.2]})
    for _ in range(20):  # control: with no drafting cycle yet, the overall ratio prices K
        fresh.observe(1, 0, 0.6 * fresh.modelled_s(1, 0))
    assert fresh.cycle_s(1, 2) == pytest.approx(0.6 * fresh.modelled_s(1, 2), rel=0.01)


def test_plain_decode_is_priced_by_its_stretches_not_its_first_cycles() -> None:
    """A pipelined K = 0 stretch: the first cycle holds its own step and most of the next
    (2 units), the middle ones one, the last (nothing queued after it) almost none. Each
    stretch costs a unit a step; taken cycle by cycle its first one alone, after each drafting
    cycle, prices plain decode at twice that."""
    costs = CostTable(verify={1: [1.0, 1.3]}, draft={1: [0.0, 0.1]})
    timer = CycleTimer(costs)
    for _ in range(10):
        timer.cycle(1, 1, costs.modelled_s(1, 1))
        for seconds in [2.0, 1.0, 1.0, 0.0]:
            timer.cycle(1, 0, seconds)
    timer.cycle(1, 1, costs.modelled_s(1, 1))
    assert costs.cycle_s(1, 0) == pytest.approx(1.0)
    assert costs.cycle_s(1, 1) == pytest.approx(costs.modelled_s(1, 1))
    # A lone K = 0 cycle between drafting ones holds the queued step the next drafting cycle
    # threw away: not a price.
    timer.cycle(1, 0, 5.0)
    timer.cycle(1, 1, costs.modelled_s(1, 1))
    assert costs.cycle_s(1, 0) == pytest.approx(1.0)
    # A stretch ends when the batch changes size or empties; each size keeps its own price.
    for seconds in [3.0, 3.0]:
        timer.cycle(2, 0, seconds)
    timer.cycle(1, 0, 1.0)
    timer.cycle(1, 0, 1.0)
    timer.end_stretch()
    assert costs.cycle_s(2, 0) == pytest.approx(3.0)
    assert costs.cycle_s(1, 0) == pytest.approx(1.0)


def _steady_request(prior: AcceptancePrior, key: str, level: float, cycles: int, seed: int):
    est = AcceptanceEstimate(max_k=3, prior=prior.for_class(key))
    rng = random.Random(seed)
    for _ in range(cycles):
        est.observe(1, 1 if rng.random() < level else 0)
    prior.learn(key, est)
    return est


def _mean(dist) -> float:
    return sum(p * a for p, a in zip(dist, LEVELS, strict=True))


def test_a_newcomer_starts_from_what_the_instance_s_requests_accepted() -> None:
    prior = AcceptancePrior()
    assert prior.for_class("greedy") == FLAT  # nothing served yet: the flat prior
    for seed in range(6):
        _steady_request(prior, "greedy", 0.25, 40, seed)
    newcomer = AcceptanceEstimate(max_k=3, prior=prior.for_class("greedy"))
    fresh = AcceptanceEstimate(max_k=3)  # control
    assert fresh.rates()[0] == pytest.approx(PRIOR_ACCEPTANCE)
    assert 0.2 < newcomer.rates()[0] < 0.42  # from 0.5 most of the way (the flat share stays)
    # Only depth 1 is pooled; deeper depths start untried, accepting like depth 1.
    assert newcomer.tries == [0.0, 0.0, 0.0]
    assert newcomer.rates()[1] == newcomer.rates()[0]
    # The prior stays wide: a newcomer whose text is easy leaves it within a few hits.
    for _ in range(6):
        newcomer.observe(1, 1)
    assert newcomer.rates()[0] > 0.6
    # The steady estimate drifts back toward the pool, not toward 0.5: its mean over a long
    # steady 0.25 request is nearer 0.25 than a fresh estimate's.
    pooled, flat = [], []
    for seed in range(20):
        a = AcceptanceEstimate(max_k=1, prior=prior.for_class("greedy"))
        b = AcceptanceEstimate(max_k=1)
        rng = random.Random(100 + seed)
        for _ in range(60):
            hit = 1 if rng.random() < 0.25 else 0
            a.observe(1, hit)
            b.observe(1, hit)
            pooled.append(a.rates()[0])
            flat.append(b.rates()[0])
    assert abs(statistics.mean(pooled) - 0.25) < abs(statistics.mean(flat) - 0.25)


def test_sampling_classes_are_pooled_apart() -> None:
    prior = AcceptancePrior()
    for seed in range(6):
        _steady_request(prior, AcceptancePrior.sampling_class(1.0), 0.2, 40, seed)
        _steady_request(prior, AcceptancePrior.sampling_class(0.0), 0.9, 40, seed)
    assert AcceptancePrior.sampling_class(0.0) == "greedy"
    assert AcceptancePrior.sampling_class(0.97) == AcceptancePrior.sampling_class(1.0)
    assert _mean(prior.for_class("greedy")) > 0.6  # the flat share keeps it wide
    assert _mean(prior.for_class(AcceptancePrior.sampling_class(1.0))) < 0.35
    # A request that drafted too little to say anything leaves the pool as it was.
    before = prior.for_class("greedy")
    _steady_request(prior, "greedy", 0.0, POOL_MIN_TRIES - 1, 0)
    assert prior.for_class("greedy") == before
