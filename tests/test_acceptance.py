"""The speculative acceptance rule emits tokens distributed exactly as the target p.

(a) analytic: for a small vocabulary, enumerate every draft path under q, use the module's own
    acceptance inputs and correction/bonus distributions, and sum the exact output distribution;
    it must equal the target's joint to 1e-6.
(b) statistical: sample the full rule (uniform draws, comparisons, residual sampling) many times,
    chained over K = 1..3 and over two emitted tokens, and G-test the result against p; negative
    controls show the same test rejects wrong rules and a 2% shift.

Also holds the small statistics helpers (chi-square tail, G-test, two-sample test) that the other
distribution tests import.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import mlx.core as mx
import numpy as np
import pytest

from node.inference.acceptance import (
    coupled_accept_batch,
    draft_token_logprobs,
    greedy_accept_batch,
    next_token_logits,
    rule_for,
    sampled_accept_batch,
    speculative_accept,
)
from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    position_noise,
    processed_logits,
    processed_logprobs,
    sample_tokens,
)

NEG_INF = -np.inf

# --------------------------------------------------------------------------- statistics helpers


def chi2_sf(stat: float, df: int) -> float:
    """P(X > stat) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, stat/2)
    (series below a+1, Lentz continued fraction above; Numerical Recipes 6.2)."""
    if stat <= 0.0:
        return 1.0
    a, x = df / 2.0, stat / 2.0
    log_prefactor = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        n = 0
        while abs(term) > abs(total) * 1e-16:
            n += 1
            term *= x / (a + n)
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return math.exp(log_prefactor) * h


def chi2_isf(alpha: float, df: int) -> float:
    """The critical value c with P(X > c) = alpha (bisection on chi2_sf)."""
    low, high = 0.0, 10.0 * df + 200.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if chi2_sf(mid, df) > alpha:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def _pool_small(expected: np.ndarray, *observed: np.ndarray, min_expected: float = 5.0):
    """Merge cells whose expected count is below min_expected into one cell (validity of the
    chi-square approximation); cells with zero expectation are dropped."""
    small = expected < min_expected
    keep = ~small
    pooled_expected = np.append(expected[keep], expected[small].sum())
    pooled_observed = [np.append(o[keep], o[small].sum()) for o in observed]
    if pooled_expected[-1] < min_expected:  # fold a still-small pool into the smallest kept cell
        if keep.sum() == 0:
            return pooled_expected, pooled_observed
        smallest = int(np.argmin(pooled_expected[:-1]))
        pooled_expected[smallest] += pooled_expected[-1]
        pooled_expected = pooled_expected[:-1]
        for i, o in enumerate(pooled_observed):
            o[smallest] += o[-1]
            pooled_observed[i] = o[:-1]
    nonzero = pooled_expected > 0
    return pooled_expected[nonzero], [o[nonzero] for o in pooled_observed]


def g_test(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Goodness of fit of counts to probs → (G, p-value). Any count where probs is 0 → p = 0."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if counts[probs <= 0].sum() > 0:
        return math.inf, 0.0
    probs = probs / probs.sum()
    expected, (observed,) = _pool_small(probs * counts.sum(), counts)
    ratio = np.where(observed > 0, observed / expected, 1.0)
    stat = 2.0 * float(np.sum(observed * np.log(ratio)))
    return stat, chi2_sf(stat, len(expected) - 1)


def two_sample_chi2(counts_a: np.ndarray, counts_b: np.ndarray) -> tuple[float, float]:
    """Do two samples of a categorical variable share one distribution? 2×C contingency
    chi-square → (statistic, p-value); sparse cells are pooled."""
    a = np.asarray(counts_a, dtype=np.float64).ravel()
    b = np.asarray(counts_b, dtype=np.float64).ravel()
    n_a, n_b = a.sum(), b.sum()
    total = a + b
    expected_min = total * min(n_a, n_b) / (n_a + n_b)
    order = np.argsort(-expected_min)  # stable cell order for pooling
    _, (a_p, b_p) = _pool_small(expected_min[order], a[order], b[order])
    tot = a_p + b_p
    e_a, e_b = tot * n_a / (n_a + n_b), tot * n_b / (n_a + n_b)
    stat = float(np.sum((a_p - e_a) ** 2 / e_a + (b_p - e_b) ** 2 / e_b))
    return stat, chi2_sf(stat, len(tot) - 1)


def test_chi2_sf_matches_tables() -> None:
    for stat, df, alpha in [
        (3.841459, 1, 0.05),
        (20.515006, 5, 1e-3),
        (66.619, 35, 1e-3),
        (11.0705, 5, 0.05),
    ]:
        assert chi2_sf(stat, df) == pytest.approx(alpha, rel=2e-3)
    assert chi2_isf(1e-3, 5) == pytest.approx(20.515, abs=1e-2)


def test_g_test_accepts_truth_and_rejects_a_shift() -> None:
    rng = np.random.default_rng(0)
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    counts = rng.multinomial(40_000, probs)
    assert g_test(counts, probs)[1] > 1e-3
    shifted = probs + np.array([-0.02, 0.02, 0, 0, 0, 0])
    assert g_test(rng.multinomial(40_000, shifted), probs)[1] < 1e-3
    assert g_test(counts + np.array([0, 0, 0, 0, 0, 1]), probs)[1] == 0.0
    other = rng.multinomial(40_000, probs)
    assert two_sample_chi2(counts, other)[1] > 1e-3
    assert two_sample_chi2(counts, rng.multinomial(40_000, shifted))[1] < 1e-3


# --------------------------------------------------------------------------- greedy


def _rows_with_argmax(argmaxes: list[int], vocab: int = 8) -> mx.array:
    rows = np.full((len(argmaxes), vocab), -3.0, dtype=np.float32)
    for i, best in enumerate(argmaxes):
        rows[i, best] = 0.0
        rows[i, (best + 1) % vocab] = -0.5  # a close runner-up
    return mx.array(rows)


@pytest.mark.parametrize(
    ("drafts", "expected"),
    [
        ([3, 5, 1], (3, 7)),  # all accepted, bonus from row K
        ([3, 5, 2], (2, 1)),  # last rejected, correction = argmax of row 2
        ([3, 4, 1], (1, 5)),  # a later match after a mismatch does not count
        ([6, 5, 1], (0, 3)),
        ([], (0, 3)),
    ],
)
def test_greedy_accept(drafts: list[int], expected: tuple[int, int]) -> None:
    target = _rows_with_argmax([3, 5, 1, 7][: len(drafts) + 1])
    assert speculative_accept(target, None, drafts, SamplingParams(), None) == expected
    assert (
        speculative_accept(target, None, mx.array(drafts, dtype=mx.uint32), SamplingParams(), None)
        == expected
    )


def test_greedy_batch() -> None:
    target = mx.stack([_rows_with_argmax([3, 5, 1]), _rows_with_argmax([2, 2, 2])])
    accepted, next_token = greedy_accept_batch(target, mx.array([[3, 5], [2, 4]]))
    assert accepted.tolist() == [2, 1] and next_token.tolist() == [1, 2]


def test_greedy_rejects_a_draft_its_own_penalty_makes_unlikely() -> None:
    """Row 1 is processed with drafts[0] in the history: the repetition penalty there turns the
    raw argmax (a repeat of the draft) into a rejection, as target-only decoding would."""
    params = SamplingParams(repetition_penalty=4.0, repetition_context_size=1)
    logits = mx.array([[0.0, 5.0, 1.0, 0.0], [0.0, 5.0, 3.0, 0.0]])
    target = processed_logprobs(logits, params, history=[0], drafts=[1])
    assert speculative_accept(target, None, [1], params, None) == (1, 2)
    logits_only = processed_logits(logits, params, history=[0], drafts=[1])
    assert speculative_accept(logits_only, None, [1], params, None) == (1, 2)
    unpenalized = processed_logprobs(logits, SamplingParams(), history=[0], drafts=[1])
    assert speculative_accept(unpenalized, None, [1], SamplingParams(), None) == (1, 1)


# --------------------------------------------------------------------------- (a) analytic exactness


def _normalize(logits: np.ndarray) -> np.ndarray:
    finite = logits[np.isfinite(logits)]
    return (logits - (finite.max() + np.log(np.exp(finite - finite.max()).sum()))).astype(
        np.float32
    )


def _scenario(kind: str, vocab: int, seed: int) -> tuple[Callable, Callable]:
    """p(.|prefix) and q(.|prefix) as processed log-prob rows for one flavour of disagreement."""
    rng = np.random.default_rng(seed)
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def rows(prefix: tuple) -> tuple[np.ndarray, np.ndarray]:
        if prefix not in cache:
            p = rng.normal(0.0, 1.5, vocab)
            q = p + rng.normal(0.0, 1.0, vocab)
            if kind == "filtered":  # p filtered two tokens; q piles 90%+ on one of them
                dead = rng.choice(vocab, 2, replace=False)
                p[dead] = NEG_INF
                q[dead[0]] = q[np.isfinite(q)].max() + 4.0
            elif kind == "q_sparse":  # q is zero where p is not
                q[rng.choice(vocab, 2, replace=False)] = NEG_INF
            elif kind == "identical":  # p == q: the residual is empty, rejections impossible
                q = p.copy()
            elif kind == "peaked":  # near-greedy target, confident but different draft
                p = p * 8.0
                q = rng.normal(0.0, 1.0, vocab) * 8.0
            cache[prefix] = (_normalize(p), _normalize(q))
        return cache[prefix]

    return (lambda prefix: rows(prefix)[0]), (lambda prefix: rows(prefix)[1])


def _true_joint(p_fn: Callable, length: int, vocab: int, prefix: tuple = ()) -> np.ndarray:
    """P(x_0..x_{length-1} | prefix) under p, shape [vocab] * length."""
    if length == 0:
        return np.array(1.0)
    first = np.exp(p_fn(prefix).astype(np.float64))
    return np.stack(
        [first[x] * _true_joint(p_fn, length - 1, vocab, (*prefix, x)) for x in range(vocab)]
    )


def _rule_output_distribution(
    p_fn: Callable, q_fn: Callable, num_drafts: int, vocab: int
) -> np.ndarray:
    """Exact distribution of the first K+1 emitted tokens when one verify step draws K drafts
    from q and later steps (after an early stop) emit exactly p — by induction on steps."""
    paths = list(itertools.product(range(vocab), repeat=num_drafts))
    target = mx.array(np.stack([[p_fn(d[:i]) for i in range(num_drafts + 1)] for d in paths]))
    draft = mx.array(np.stack([[q_fn(d[:i]) for i in range(num_drafts)] for d in paths]))
    log_p, log_q = draft_token_logprobs(target, draft, mx.array(paths, dtype=mx.int32))
    log_p, log_q = np.array(log_p, dtype=np.float64), np.array(log_q, dtype=np.float64)
    # P(log u + log q < log p) for u ~ U[0, 1): min(1, p/q); q = 0 accepts iff p > 0.
    with np.errstate(invalid="ignore", over="ignore"):
        accept = np.where(
            np.isneginf(log_q), np.isfinite(log_p), np.minimum(1.0, np.exp(log_p - log_q))
        )
    # the module's own correction / bonus distribution after n accepted drafts, for every n
    counts = mx.array(np.tile(np.arange(num_drafts + 1), len(paths)), dtype=mx.int32)
    repeat = mx.array(np.repeat(np.arange(len(paths)), num_drafts + 1))
    nxt = next_token_logits(target[repeat], draft[repeat], counts)
    nxt = np.array(mx.softmax(nxt, axis=-1), dtype=np.float64).reshape(
        len(paths), num_drafts + 1, vocab
    )

    out = np.zeros([vocab] * (num_drafts + 1))
    for b, path in enumerate(paths):
        q_path = math.prod(math.exp(q_fn(path[:i])[path[i]]) for i in range(num_drafts))
        reach = q_path
        for n in range(num_drafts + 1):
            stop = 1.0 - accept[b, n] if n < num_drafts else 1.0
            weight = reach * stop
            if weight > 0:
                for x in range(vocab):
                    prefix = (*path[:n], x)
                    tail = _true_joint(p_fn, num_drafts - n, vocab, prefix)
                    out[prefix] += weight * nxt[b, n, x] * tail
            if n < num_drafts:
                reach *= accept[b, n]
    return out


@pytest.mark.parametrize("kind", ["random", "filtered", "q_sparse", "identical", "peaked"])
@pytest.mark.parametrize(("num_drafts", "vocab"), [(1, 5), (2, 5), (3, 4)])
def test_rule_is_exact_analytically(kind: str, num_drafts: int, vocab: int) -> None:
    p_fn, q_fn = _scenario(kind, vocab, seed=num_drafts * 10 + vocab)
    emitted = _rule_output_distribution(p_fn, q_fn, num_drafts, vocab)
    np.testing.assert_allclose(emitted, _true_joint(p_fn, num_drafts + 1, vocab), atol=1e-6)
    assert emitted.sum() == pytest.approx(1.0, abs=1e-6)


def test_empty_residual_falls_back_to_p() -> None:
    p = mx.array(_normalize(np.array([0.0, 1.0, NEG_INF, 2.0])))[None, None]
    target = mx.concatenate([p, p], axis=1)
    out = next_token_logits(target, p, mx.array([0]))
    np.testing.assert_allclose(np.array(out[0]), np.array(p[0, 0]))


# --------------------------------------------------------------------------- (b) statistical exactness

VOCAB = 6
EMITTED = 2  # tokens per run that are compared with p's joint
MAX_DRAFTS = 3
RUNS = 40_000
ALPHA = 1e-3
SHIFT = 0.02

Accept = Callable[[mx.array, mx.array, mx.array, mx.array], tuple[mx.array, mx.array]]


def _tables(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Target and draft log-prob tables [position, previous token (VOCAB = none), VOCAB] with
    filtered target tokens, draft mass on them, and per-draft acceptance around 0.5-0.7."""
    rng = np.random.default_rng(seed)
    shape = (EMITTED + MAX_DRAFTS, VOCAB + 1, VOCAB)
    p = rng.normal(0.0, 1.2, shape)
    q = p + rng.normal(0.0, 1.2, shape)
    dead = rng.random(shape) < 0.15
    p[dead] = NEG_INF
    q[dead & (rng.random(shape) < 0.5)] += 2.0  # the drafter likes some tokens p filtered
    p[..., 0] = np.where(np.isinf(p).all(-1), 0.0, p[..., 0])  # keep every row non-empty
    p_lp = np.apply_along_axis(_normalize, -1, p)
    q_lp = np.apply_along_axis(_normalize, -1, q)
    return p_lp, q_lp


def _simulate(
    accept: Accept, p_table: np.ndarray, q_table: np.ndarray, num_drafts: int, seed: int
) -> tuple[np.ndarray, float]:
    """RUNS chains: draft K tokens from q, verify with `accept`, repeat until each run emitted
    EMITTED tokens → (first EMITTED tokens [RUNS, EMITTED], fraction of steps that rejected)."""
    keys = KeyStream(seed)
    out = np.full((RUNS, EMITTED + num_drafts + 1), -1, dtype=np.int64)
    length = np.zeros(RUNS, dtype=np.int64)
    steps = rejections = 0
    while (active := np.flatnonzero(length < EMITTED)).size:
        start = length[active]
        prev = np.where(start > 0, out[active, np.maximum(start - 1, 0)], VOCAB)
        drafts = np.zeros((active.size, num_drafts), dtype=np.int64)
        target_rows, draft_rows = [], []
        for j in range(num_drafts + 1):
            target_rows.append(p_table[start + j, prev])
            if j == num_drafts:
                break
            q_rows = q_table[start + j, prev]
            draft_rows.append(q_rows)
            drafts[:, j] = np.array(sample_tokens(mx.array(q_rows), keys.next()))
            prev = drafts[:, j]
        accepted, next_token = accept(
            mx.array(np.stack(target_rows, axis=1)),
            mx.array(np.stack(draft_rows, axis=1)),
            mx.array(drafts),
            keys.next(),
        )
        accepted, next_token = np.array(accepted), np.array(next_token)
        emitted = np.concatenate([drafts, np.zeros((active.size, 1), dtype=np.int64)], axis=1)
        emitted[np.arange(active.size), accepted] = next_token
        for j in range(num_drafts + 1):
            write = j <= accepted
            out[active[write], start[write] + j] = emitted[write, j]
        length[active] += accepted + 1
        steps += active.size
        rejections += int((accepted < num_drafts).sum())
    return out[:, :EMITTED], rejections / steps


def _expected(p_table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    first = np.exp(p_table[0, VOCAB].astype(np.float64))
    pair = first[:, None] * np.exp(p_table[1, :VOCAB].astype(np.float64))
    return first, pair


def _inverted_ratio(target, draft, drafts, key):
    """Wrong: accepts with min(1, q/p)."""
    accept_key, token_key = mx.random.split(key)
    log_p, log_q = draft_token_logprobs(target, draft, drafts)
    log_u = mx.log(mx.random.uniform(shape=log_p.shape, key=accept_key))
    accepted = mx.cumprod((log_u + log_p < log_q).astype(mx.int32), axis=-1).sum(axis=-1)
    return accepted, mx.random.categorical(
        next_token_logits(target, draft, accepted), key=token_key
    )


def _resample_from_p(target, draft, drafts, key):
    """Wrong: right acceptance, but a rejected draft is replaced by a fresh draw from p."""
    accepted, _ = sampled_accept_batch(target, draft, drafts, key)
    p_row = mx.take_along_axis(target, accepted[:, None, None], axis=1)[:, 0]
    return accepted, mx.random.categorical(p_row, key=mx.random.split(key)[1])


@pytest.mark.parametrize("num_drafts", [1, 2, 3])
def test_rule_is_exact_statistically(num_drafts: int) -> None:
    """40k chained runs per K, G-test at α = 1e-3 on the first token (6 cells) and the first two
    tokens (36 cells, sparse ones pooled).

    Power for a 2% shift: moving δ = 0.02 of probability from cell a to cell b gives the G
    statistic the noncentrality λ = N·δ²·(1/p_a + 1/p_b) ≥ 4·N·δ² = 64 at N = 40 000 (the sum is
    smallest at p_a = p_b = 1/2). With df ≤ 5 the critical value at α = 1e-3 is 20.5, and
    P(χ²'(5, 64) > 20.5) > 0.999 (computed in test_power_for_a_two_percent_shift). The pair
    table has more, smaller cells, so the same shift has larger λ there.
    """
    p_table, q_table = _tables(seed=num_drafts)
    tokens, rejection_rate = _simulate(
        sampled_accept_batch, p_table, q_table, num_drafts, seed=100 + num_drafts
    )
    assert 0.2 < rejection_rate < 0.95  # both branches are exercised
    first, pair = _expected(p_table)
    assert g_test(np.bincount(tokens[:, 0], minlength=VOCAB), first)[1] > ALPHA
    pair_counts = np.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB)
    assert g_test(pair_counts, pair)[1] > ALPHA


@pytest.mark.parametrize("wrong_rule", [_inverted_ratio, _resample_from_p])
def test_statistical_test_rejects_wrong_rules(wrong_rule: Accept) -> None:
    p_table, q_table = _tables(seed=2)
    tokens, _ = _simulate(wrong_rule, p_table, q_table, 2, seed=102)
    first, pair = _expected(p_table)
    pair_counts = np.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB)
    assert (
        min(
            g_test(np.bincount(tokens[:, 0], minlength=VOCAB), first)[1],
            g_test(pair_counts, pair)[1],
        )
        < ALPHA
    )


def test_statistical_test_detects_a_two_percent_shift() -> None:
    """The exact rule's output with 2% of probability moved from the likeliest first token to
    another one must fail the same first-token G-test."""
    p_table, q_table = _tables(seed=2)
    tokens, _ = _simulate(sampled_accept_batch, p_table, q_table, 2, seed=102)
    first, _ = _expected(p_table)
    source, target = np.argsort(-first)[:2]
    rng = np.random.default_rng(5)
    move = (tokens[:, 0] == source) & (rng.random(RUNS) < SHIFT / first[source])
    shifted = np.where(move, target, tokens[:, 0])
    assert g_test(np.bincount(tokens[:, 0], minlength=VOCAB), first)[1] > ALPHA
    assert g_test(np.bincount(shifted, minlength=VOCAB), first)[1] < ALPHA


def test_power_for_a_two_percent_shift() -> None:
    critical = chi2_isf(ALPHA, VOCAB - 1)
    noncentrality = 4.0 * RUNS * SHIFT**2
    draws = np.random.default_rng(0).noncentral_chisquare(VOCAB - 1, noncentrality, 200_000)
    assert (draws > critical).mean() > 0.999


# --------------------------------------------------------------------------- wrapper and errors


def test_single_sequence_wrapper_uses_the_batch_rule() -> None:
    p_fn, q_fn = _scenario("random", 7, seed=3)
    params = SamplingParams(temperature=1.0)
    drafts = [2, 4]
    target = mx.array(np.stack([p_fn(()), p_fn((2,)), p_fn((2, 4))]))
    draft = mx.array(np.stack([q_fn(()), q_fn((2,))]))
    results = set()
    for seed in range(30):
        key = mx.random.key(seed)
        got = speculative_accept(target, draft, drafts, params, key)
        accepted, token = sampled_accept_batch(target[None], draft[None], mx.array([drafts]), key)
        assert got == (accepted.item(), token.item())
        assert got == speculative_accept(target, draft, mx.array(drafts), params, key)
        results.add(got)
    assert len(results) > 3


def test_zero_drafts_samples_from_p() -> None:
    target = mx.array(_normalize(np.array([NEG_INF, 0.0, NEG_INF, 1.0])))[None]
    params = SamplingParams(temperature=1.0)
    tokens = {
        speculative_accept(target, mx.zeros((0, 4)), [], params, mx.random.key(s))
        for s in range(40)
    }
    assert tokens == {(0, 1), (0, 3)}
    assert speculative_accept(target, None, [], params, mx.random.key(0)) in tokens
    accepted, token = sampled_accept_batch(target[None], None, mx.zeros((1, 0)), mx.random.key(1))
    assert accepted.tolist() == [0] and token.item() in (1, 3)


def test_errors() -> None:
    target = mx.zeros((3, 5))
    params = SamplingParams(temperature=1.0)
    with pytest.raises(ValueError, match="K=1"):
        speculative_accept(target, None, [1], SamplingParams(), None)
    with pytest.raises(ValueError, match="key"):
        speculative_accept(target, mx.zeros((2, 5)), [1, 2], params, None)
    with pytest.raises(ValueError, match="draft logprobs"):
        speculative_accept(target, None, [1, 2], params, mx.random.key(0))
    with pytest.raises(ValueError, match=r"\[2, 5\]"):
        speculative_accept(target, mx.zeros((2, 4)), [1, 2], params, mx.random.key(0))


# ---- the coupled rule (seeded sampling) ----


def _coupled_window(seed: int, batch: int, num_drafts: int, vocab: int, same_q: bool):
    """Random target/draft distributions for a [batch, K+1] window, one key per position, and
    drafts drawn from q with each position's own noise, as the MTP engine draws them."""
    rng = np.random.default_rng(seed)
    target = mx.array(np.log(rng.dirichlet(np.ones(vocab) * 0.3, size=(batch, num_drafts + 1))))
    draft = (
        target[:, :num_drafts]
        if same_q
        else mx.array(np.log(rng.dirichlet(np.ones(vocab) * 0.3, size=(batch, num_drafts))))
    )
    keys = [
        [mx.random.key(seed * 1000 + b * 10 + j) for j in range(num_drafts + 1)]
        for b in range(batch)
    ]
    noise = mx.stack([mx.concatenate([position_noise(k, (1, vocab)) for k in row]) for row in keys])
    drafts = mx.array(
        [
            [sample_tokens(draft[b, j : j + 1], keys[b][j]).item() for j in range(num_drafts)]
            for b in range(batch)
        ],
        dtype=mx.uint32,
    ).reshape(batch, num_drafts)
    return target, drafts, noise, keys


@pytest.mark.parametrize("num_drafts", [0, 1, 3])
def test_coupled_rule_emits_the_targets_own_draw_at_every_position(num_drafts: int) -> None:
    """Every emitted token — accepted drafts and the next token — is what `sample_tokens`
    draws from the target row of that position with that position's key: the same token the
    local engine draws with the same seed, whatever K is."""
    target, drafts, noise, keys = _coupled_window(1, 64, num_drafts, 12, same_q=False)
    accepted, next_token = coupled_accept_batch(target, drafts, noise)
    for b in range(64):
        own = [
            sample_tokens(target[b, j : j + 1], keys[b][j]).item() for j in range(num_drafts + 1)
        ]
        n = accepted[b].item()
        assert drafts[b, :n].tolist() == own[:n]
        assert next_token[b].item() == own[n]
        if n < num_drafts:
            assert drafts[b, n].item() != own[n]  # it stopped at the first mismatch


def test_coupled_rule_accepts_every_draft_from_the_targets_own_distribution() -> None:
    """Shared noise makes q = p drafts always pass; independent draws from the same p would
    not (the control), so the drafts really are coupled to the target's draws."""
    target, drafts, noise, _ = _coupled_window(2, 64, 3, 12, same_q=True)
    accepted, _ = coupled_accept_batch(target, drafts, noise)
    assert accepted.tolist() == [3] * 64
    independent = mx.stack(
        [sample_tokens(target[:, j], mx.random.key(99 + j)) for j in range(3)], axis=1
    )
    control, _ = coupled_accept_batch(target, independent, noise)
    assert sum(control.tolist()) < 0.8 * 3 * 64


def test_a_seed_takes_the_coupled_rule() -> None:
    assert rule_for(SamplingParams(temperature=0.0, seed=1)) == "greedy"
    assert rule_for(SamplingParams(temperature=0.8, seed=1)) == "coupled"
    assert rule_for(SamplingParams(temperature=0.8)) == "ratio"
    with pytest.raises(ValueError, match="noise must match"):
        coupled_accept_batch(mx.zeros((1, 2, 4)), mx.zeros((1, 1), mx.uint32), mx.zeros((1, 1, 4)))


def test_a_positions_key_is_the_same_in_order_and_by_position() -> None:
    in_order, by_position = KeyStream(5), KeyStream(5)
    drawn = [in_order.next() for _ in range(6)]
    assert all(mx.array_equal(by_position.at(i), drawn[i]).item() for i in (3, 0, 5, 1))
    by_position.forget_before(4)
    assert mx.array_equal(by_position.at(4), drawn[4]).item()
    with pytest.raises(ValueError, match="forgotten"):
        by_position.at(3)
