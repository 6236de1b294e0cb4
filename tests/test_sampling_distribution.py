"""End to end: what the batched engines sample is what mlx-lm's sampler samples.

The real instance runner (``LocalRunner.submit``: the batch scheduler, many sequences in one
batch) generates short continuations of one prompt, one fixed seed per run, with the ``local``
engine and with native MTP (adaptive K; K = 1, 2, 3 in the slow variant). Seeded native MTP
takes the coupled acceptance rule (node.inference.acceptance.rule_for); the ratio rule that
unseeded requests take is tested with seeded runs forced onto it (slow), as is its control. The reference is
mlx-lm alone: the plain model over prompt + history, ``make_logits_processors`` (penalties,
logit bias) and the distribution ``make_sampler`` draws from — its own filter functions in its
own order, then softmax(x / temperature) — computed exactly (test_sampling checks that closed
form against ``make_sampler``'s draws), so the engine's sample is the only random side.

The test (``tree_test``). The runs form a prefix tree: the count of next tokens at a node
(prompt + the first d generated tokens) is multinomial with the reference's exact conditional
distribution given the node's count, independently across nodes (chain rule). Per node, a
Pearson chi-square over the tokens with an expected count >= E_MIN (the rest pooled in one
cell); nodes seen >= MIN_NODE times. One statistic per depth (the sum over its nodes, df
summed) and one over all depths: T + 1 p-values, each against ALPHA / (T + 1). A token the
reference cannot emit (filtered out: probability 0) fails at once.

Power (computed by ``test_design_has_the_power_it_claims`` from the exact distributions at the
run counts used; noncentral chi-square, λ = Σ_nodes n_node·Σ_cells (q - p)²/p, one depth's
statistic at α = ALPHA / (T + 1) = 2e-4):
- a 2% shift by temperature (the engine's temperature x1.053: total variation 2.0% at the
  first token and 2.05% at the second): LOCAL_RUNS = 10 000 detect it with power 0.989 from
  the first token alone and 0.959 from the second alone;
- a 2% shift by a biased acceptance rule (accept with min(1, c·p/q), c = 1.029 calibrated to a
  total variation of 2% at the first drafted token): MTP_RUNS = 5 000 detect it with power
  0.997 from that token alone;
- the hardest two-cell move — 2% of probability between the two likeliest first tokens
  (p 0.66 and 0.25) — has power 0.53 at 10 000 runs and 0.93 at 20 000
  (MACMESH_DIST_RUNS=20000 runs every test at that count).
The previous version of this test detected ~14% moved between two cells of ~0.3.

Negative controls (slow) run exactly those shifted engines: the real engine with the shifted
temperature, and native MTP on the ratio rule with the biased rule patched into every module
that imported it (whichever native-MTP path the runner uses). They must fail, the real ones pass.

Determinism: fixed seeds (one per run, disjoint ranges per test) and an exact reference, so the
outcome is fixed up to the rare token that a ~1e-6 logit difference between CPUs or batch
compositions flips. Recorded (2-core x86, OpenBLAS, against 2e-4): local min p 0.12 (its
control 8e-28, depth 1 4e-17); native MTP adaptive, ratio rule, min p 0.19 (its control 3e-11
at the first drafted token); fixed K = 1, 2, 3 min p 0.42, 0.50, 0.008 (K = 3 against 1.7e-4,
five tokens); filters, local, min p 0.41 and 0.23 — far from the threshold on both sides.

Cost (CPU seconds on the shared 2-core box, load ~13, so an idle machine is faster): the local
run ~50 s, the native-MTP run ~65-85 s; the default selection (``-m "not slow"``: the power
check, both real engines) stays near two minutes idle; the negative controls, fixed K = 1..3
and the filter settings (top_p, top_k/min_p, logit bias) are marked slow.

Both sides use the same weights with the LM head scaled up: the constructed checkpoint's
next-token distributions are nearly flat (entropy ~4.8 nats over 512 tokens), which would
spread the runs over hundreds of cells; a sharper head gives peaked but non-trivial
distributions (first token: 0.66 / 0.25 / 0.06 / tail).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable

import mlx.core as mx
import numpy as np
import pytest
from test_acceptance import chi2_isf, chi2_sf
from test_sampling import mlx_lm_logprobs

from node.checkpoints import CheckpointSpec, ensure_checkpoint
from node.checkpoints.reference_mtp import lm_head_logits, load_reference_mtp
from node.inference import acceptance
from node.inference.events import GenerationDone
from node.inference.loading import LoadedModel, load_checkpoint
from node.inference.requests import GenerateRequest
from node.inference.runner import LocalRunner
from node.inference.sampling import SamplingParams

# A "partial"-agreement head on the smallest hybrid stack: one GatedDeltaNet layer and one
# full-attention layer, so both kinds of rollback happen, at the lowest cost per run.
SPEC = CheckpointSpec(
    arch="dense",
    layout="hf",
    agreement="partial",
    num_hidden_layers=2,
    full_attention_interval=2,
    seed=4,
)
PROMPT = [10, 200, 33, 47]
LM_HEAD_SCALE = 2.0
MAX_TOKENS = 4  # token 0 comes from prefill; one K=2 cycle emits 1-3 more
RUNS = int(os.environ.get("MACMESH_DIST_RUNS", "0"))  # 0: the defaults below
LOCAL_RUNS = RUNS or 10_000
MTP_RUNS = RUNS or 5_000
MAX_BATCH = 64
ALPHA = 1e-3  # per engine run, over its T + 1 statistics
E_MIN = 20.0  # expected count below which a token's cell is pooled
MIN_NODE = 100  # runs through a prefix before its next token is tested
SHIFT = 0.02  # the total variation the negative controls are calibrated to

PENALTIES = SamplingParams(
    temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2
)
FILTERS = {
    "top_p 0.9, temperature 0.7, logit bias": SamplingParams(
        temperature=0.7, top_p=0.9, logit_bias={422: 0.5}
    ),
    "top_k 20, min_p 0.05, repetition 1.2": SamplingParams(
        temperature=1.0, top_k=20, min_p=0.05, repetition_penalty=1.2
    ),
}


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    loaded = load_checkpoint(ensure_checkpoint(SPEC))
    lm = loaded.model.language_model
    assert not lm.args.tie_word_embeddings  # the MTP head shares this very lm_head
    lm.lm_head.weight = lm.lm_head.weight * LM_HEAD_SCALE
    mx.eval(lm.lm_head.weight)
    return loaded


@pytest.fixture(scope="module")
def runner(loaded: LoadedModel):
    runner = LocalRunner(loaded, max_batch=MAX_BATCH)
    yield runner
    runner.close()


# --------------------------------------------------------------------------- the reference


def mlx_lm_distributions(
    params: SamplingParams, logits: mx.array, contexts: list[list[int]]
) -> np.ndarray:
    """[H, V] logits → what mlx-lm samples from after each context (prompt + generated):
    generate_step's processors and log-softmax, make_sampler's filters and temperature
    (test_sampling checks that closed form against make_sampler's own draws)."""
    rows = [
        mlx_lm_logprobs(logits[i : i + 1].astype(mx.float32), params, context)
        for i, context in enumerate(contexts)
    ]
    probs = np.exp(np.array(mx.concatenate(rows), dtype=np.float64))
    return probs / probs.sum(axis=-1, keepdims=True)


class Reference:
    """Exact mlx-lm next-token distributions of PROMPT + history, computed once per node."""

    def __init__(self, loaded: LoadedModel, params: SamplingParams) -> None:
        self.model = loaded.model
        self.params = params
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, histories: list[tuple[int, ...]]) -> np.ndarray:
        todo = sorted({h for h in histories if h not in self._cache})
        by_length: dict[int, list[tuple[int, ...]]] = {}
        for history in todo:
            by_length.setdefault(len(history), []).append(history)
        for group in by_length.values():
            contexts = [PROMPT + list(h) for h in group]
            logits = self.model(mx.array(contexts))[:, -1, :]
            probs = mlx_lm_distributions(self.params, logits, contexts)
            self._cache.update(zip(group, probs, strict=True))
        return np.stack([self._cache[h] for h in histories])


# --------------------------------------------------------------------------- the test


def _pooled(expected: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Cells with expected count < E_MIN pooled into one; a pool still below E_MIN folds into
    the smallest kept cell."""
    keep = expected >= E_MIN
    out = [np.append(a[keep], a[~keep].sum()) for a in (expected, *arrays)]
    if out[0][-1] < E_MIN and keep.any():
        smallest = int(np.argmin(out[0][:-1]))
        for a in out:
            a[smallest] += a[-1]
        out = [a[:-1] for a in out]
    return out


def next_token_counts(samples: np.ndarray, depth: int) -> dict[tuple[int, ...], np.ndarray]:
    """Prefix of `depth` generated tokens → counts of the token after it (prefixes seen >=
    MIN_NODE times)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in samples.tolist():
        groups.setdefault(tuple(row[:depth]), []).append(row[depth])
    return {h: np.bincount(t, minlength=512) for h, t in groups.items() if len(t) >= MIN_NODE}


def tree_test(samples: np.ndarray, reference: Reference) -> dict[str, float]:
    """p-value per depth and over all depths (module docstring)."""
    pvalues: dict[str, float] = {}
    total_stat, total_df = 0.0, 0
    for depth in range(samples.shape[1]):
        nodes = next_token_counts(samples, depth)
        if not nodes:
            continue
        probs = reference(list(nodes))
        stat, df = 0.0, 0
        for counts, p in zip(nodes.values(), probs, strict=True):
            if counts[p <= 0].sum() > 0:
                stat = math.inf  # a token mlx-lm's sampler can never emit here
            expected, observed = _pooled(p * counts.sum(), counts.astype(np.float64))
            stat += float(np.sum((observed - expected) ** 2 / expected))
            df += len(expected) - 1
        pvalues[f"depth {depth}"] = chi2_sf(stat, df) if math.isfinite(stat) else 0.0
        total_stat += stat
        total_df += df
    pvalues["all depths"] = chi2_sf(total_stat, total_df) if math.isfinite(total_stat) else 0.0
    return pvalues


def threshold(pvalues: dict[str, float]) -> float:
    return ALPHA / len(pvalues)


def engine_samples(
    runner: LocalRunner,
    params: SamplingParams,
    runs: int,
    *,
    seed_base: int,
    engine: str = "local",
    mtp_k: int | None = None,
    max_tokens: int = MAX_TOKENS,
) -> tuple[np.ndarray, int, int]:
    """→ (tokens [runs, max_tokens], drafts proposed, drafts accepted), all runs submitted at
    once so the scheduler batches them."""
    streams = [
        runner.submit(
            GenerateRequest(
                prompt_ids=PROMPT,
                max_tokens=max_tokens,
                sampling=params.model_copy(update={"seed": seed_base + i}),
                engine=engine,  # type: ignore[arg-type]
                mtp_k=mtp_k,
                ignore_eos=True,
            )
        )
        for i in range(runs)
    ]
    tokens, proposed, accepted = [], 0, 0
    for stream in streams:
        done = next(e for e in stream if isinstance(e, GenerationDone))
        assert done.stats.engine == engine
        tokens.append(done.token_ids)
        proposed += done.stats.proposed_draft_tokens
        accepted += done.stats.accepted_draft_tokens
    return np.array(tokens), proposed, accepted


# --------------------------------------------------------------------------- controls


def total_variation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(a - b).sum(axis=-1)


def bisect(f: Callable[[float], float], target: float, low: float, high: float) -> float:
    """x in [low, high] with f(x) = target, f increasing."""
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if f(mid) < target else (low, mid)
    return (low + high) / 2


def shifted_temperature(loaded: LoadedModel, params: SamplingParams) -> SamplingParams:
    """params with the temperature raised until the first token moves by SHIFT."""
    root = Reference(loaded, params)([()])[0]

    def shift(scale: float) -> float:
        hot = params.model_copy(update={"temperature": params.temperature * scale})
        return float(total_variation(Reference(loaded, hot)([()])[0], root))

    scale = bisect(shift, SHIFT, 1.0, 2.0)
    return params.model_copy(update={"temperature": params.temperature * scale})


def draft_distributions(
    loaded: LoadedModel, params: SamplingParams, histories: list[tuple[int, ...]]
) -> np.ndarray:
    """q of the first draft after each history: the reference MTP head over the target's
    hidden states, then the same processing as p."""
    head = load_reference_mtp(ensure_checkpoint(SPEC), loaded.model)
    text = loaded.model.language_model.model
    rows = []
    for history in histories:
        ids = PROMPT + list(history)
        out = head(text(mx.array([ids[:-1]])), text.embed_tokens(mx.array([ids[1:]])))
        rows.append(lm_head_logits(loaded.model, out[:, -1, :]))
    contexts = [PROMPT + list(h) for h in histories]
    return mlx_lm_distributions(params, mx.concatenate(rows), contexts)


def biased_emission(p: np.ndarray, q: np.ndarray, bias: float) -> np.ndarray:
    """The first drafted position's token distribution under the rule accepting a draft with
    probability min(1, bias·p/q) (the residual unchanged); bias = 1 gives p."""
    accept = q * np.minimum(1.0, bias * p / np.where(q > 0, q, 1.0))
    residual = np.maximum(p - q, 0.0)
    residual = residual / residual.sum() if residual.sum() > 0 else p
    return accept + (1.0 - accept.sum()) * residual


def first_draft_nodes(loaded: LoadedModel, params: SamplingParams, count: int = 40):
    """The `count` likeliest first tokens: (histories, their probabilities, p, q there)."""
    root = Reference(loaded, params)([()])[0]
    first = np.argsort(-root)[:count]
    histories = [(int(t),) for t in first]
    p = Reference(loaded, params)(histories)
    return histories, root[first], p, draft_distributions(loaded, params, histories)


def calibrated_bias(loaded: LoadedModel, params: SamplingParams) -> float:
    """The acceptance bias that moves the first drafted token by SHIFT (total variation
    averaged over the first token)."""
    _, weight, p, q = first_draft_nodes(loaded, params)

    def shift(bias: float) -> float:
        moved = np.stack([biased_emission(p[i], q[i], bias) for i in range(len(p))])
        return float((weight * total_variation(moved, p)).sum())

    return bisect(shift, SHIFT, 1.0, 3.0)


def biased_rule(bias: float):
    """sampled_accept_batch with the test u < bias·p/q: wrong on purpose, by a calibrated
    amount."""
    log_bias = math.log(bias)
    original = acceptance.sampled_accept_batch

    def rule(target, draft, drafts, key):
        if target.shape[1] == 1:
            return original(target, draft, drafts, key)
        accept_key, token_key = mx.random.split(key)
        log_p, log_q = acceptance.draft_token_logprobs(target, draft, drafts)
        log_u = mx.log(mx.random.uniform(shape=log_p.shape, key=accept_key))
        passes = (log_u + log_q < log_p + log_bias).astype(mx.int32)
        accepted = mx.cumprod(passes, axis=-1).sum(axis=-1)
        logits = acceptance.next_token_logits(target, draft, accepted)
        return accepted, mx.random.categorical(logits, axis=-1, key=token_key)

    return rule


def force_ratio_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded runs (deterministic) through the ratio rule that unseeded requests take: a
    seeded request would otherwise take the coupled rule (acceptance.rule_for)."""
    monkeypatch.setattr(acceptance, "rule_for", lambda p: "greedy" if p.is_greedy else "ratio")


def patch_acceptance(monkeypatch: pytest.MonkeyPatch, rule) -> None:
    """Replace the ratio rule in every module that imported it (whichever native-MTP path the
    runner uses), and make seeded runs take it."""
    force_ratio_rule(monkeypatch)
    original = acceptance.sampled_accept_batch
    patched = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("node.") and getattr(module, "sampled_accept_batch", None) is original:
            monkeypatch.setattr(module, "sampled_accept_batch", rule)
            patched += 1
    assert patched >= 2  # the acceptance module and at least one engine


# --------------------------------------------------------------------------- the statistics


def ncx2_sf(x: float, df: int, lam: float) -> float:
    """P(X > x) for the noncentral chi-square: a Poisson(λ/2) mixture of central ones."""
    half = lam / 2.0
    terms = int(half + 12.0 * math.sqrt(half + 1.0) + 20.0)
    return sum(
        math.exp(-half + j * math.log(half) - math.lgamma(j + 1)) * chi2_sf(x, df + 2 * j)
        for j in range(terms)
    )


def power(nodes: list[tuple[float, np.ndarray, np.ndarray]], tests: int) -> float:
    """Power of one depth's statistic against q, for nodes (expected count, p, q)."""
    lam, df = 0.0, 0
    for count, p, q in nodes:
        if count < MIN_NODE:
            continue
        expected, q_pooled = _pooled(p * count, q * count)
        lam += float(np.sum((q_pooled - expected) ** 2 / expected))
        df += len(expected) - 1
    return ncx2_sf(chi2_isf(ALPHA / tests, df), df, lam)


def test_design_has_the_power_it_claims(loaded: LoadedModel) -> None:
    tests = MAX_TOKENS + 1
    reference = Reference(loaded, PENALTIES)
    hot = Reference(loaded, shifted_temperature(loaded, PENALTIES))
    root, hot_root = reference([()])[0], hot([()])[0]
    histories, weight, p, q = first_draft_nodes(loaded, PENALTIES)
    assert power([(LOCAL_RUNS, root, hot_root)], tests) > 0.98
    nodes = [(LOCAL_RUNS * w, p[i], hot(histories)[i]) for i, w in enumerate(weight)]
    assert power(nodes, tests) > 0.9

    bias = calibrated_bias(loaded, PENALTIES)
    nodes = [(MTP_RUNS * w, p[i], biased_emission(p[i], q[i], bias)) for i, w in enumerate(weight)]
    assert power(nodes, tests) > 0.99

    two_cells = root.copy()
    top = np.argsort(-root)[:2]
    two_cells[top] += [-SHIFT, SHIFT]
    assert power([(20_000, root, two_cells)], tests) > 0.9


# --------------------------------------------------------------------------- the tests


def test_local_batched_sampling_matches_mlx_lm(loaded: LoadedModel, runner: LocalRunner) -> None:
    samples, _, _ = engine_samples(runner, PENALTIES, LOCAL_RUNS, seed_base=0)
    pvalues = tree_test(samples, Reference(loaded, PENALTIES))
    assert min(pvalues.values()) > threshold(pvalues), pvalues


@pytest.mark.slow
def test_negative_control_local_temperature_off_by_2_percent(
    loaded: LoadedModel, runner: LocalRunner
) -> None:
    hot = shifted_temperature(loaded, PENALTIES)
    samples, _, _ = engine_samples(runner, hot, LOCAL_RUNS, seed_base=100_000)
    pvalues = tree_test(samples, Reference(loaded, PENALTIES))
    assert min(pvalues.values()) < threshold(pvalues), pvalues


def test_native_mtp_batched_sampling_matches_mlx_lm(
    loaded: LoadedModel, runner: LocalRunner
) -> None:
    """Adaptive K (the policy chooses each cycle's K); seeded, so the coupled rule."""
    samples, proposed, accepted = engine_samples(
        runner, PENALTIES, MTP_RUNS, seed_base=200_000, engine="native_mtp"
    )
    assert 0 < accepted < proposed  # drafts were both accepted and rejected
    pvalues = tree_test(samples, Reference(loaded, PENALTIES))
    assert min(pvalues.values()) > threshold(pvalues), pvalues


@pytest.mark.slow
def test_native_mtp_ratio_rule_matches_mlx_lm(
    loaded: LoadedModel, runner: LocalRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adaptive K through the ratio rule (what unseeded requests take)."""
    force_ratio_rule(monkeypatch)
    samples, proposed, accepted = engine_samples(
        runner, PENALTIES, MTP_RUNS, seed_base=250_000, engine="native_mtp"
    )
    assert 0 < accepted < proposed
    pvalues = tree_test(samples, Reference(loaded, PENALTIES))
    assert min(pvalues.values()) > threshold(pvalues), pvalues


@pytest.mark.slow
def test_negative_control_mtp_acceptance_biased_by_2_percent(
    loaded: LoadedModel, runner: LocalRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    patch_acceptance(monkeypatch, biased_rule(calibrated_bias(loaded, PENALTIES)))
    samples, proposed, accepted = engine_samples(
        runner, PENALTIES, MTP_RUNS, seed_base=300_000, engine="native_mtp"
    )
    assert 0 < accepted < proposed
    pvalues = tree_test(samples, Reference(loaded, PENALTIES))
    assert min(pvalues.values()) < threshold(pvalues), pvalues


@pytest.mark.slow
@pytest.mark.parametrize("mtp_k", [1, 2, 3])
def test_native_mtp_fixed_k_matches_mlx_lm(
    loaded: LoadedModel, runner: LocalRunner, mtp_k: int
) -> None:
    """K pinned; K = 3 needs five tokens to draft all three in the first cycle."""
    samples, proposed, accepted = engine_samples(
        runner,
        PENALTIES,
        MTP_RUNS,
        seed_base=400_000 + 10_000 * mtp_k,
        engine="native_mtp",
        mtp_k=mtp_k,
        max_tokens=max(MAX_TOKENS, mtp_k + 2),
    )
    assert 0 < accepted < proposed
    pvalues = tree_test(samples, Reference(loaded, PENALTIES))
    assert min(pvalues.values()) > threshold(pvalues), pvalues


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["local", "native_mtp"])
@pytest.mark.parametrize("params", list(FILTERS.values()), ids=list(FILTERS))
def test_filters_match_mlx_lm(
    loaded: LoadedModel, runner: LocalRunner, engine: str, params: SamplingParams
) -> None:
    runs = LOCAL_RUNS if engine == "local" else MTP_RUNS
    seed = 500_000 + 100_000 * list(FILTERS.values()).index(params)
    samples, _, _ = engine_samples(runner, params, runs, seed_base=seed, engine=engine)
    pvalues = tree_test(samples, Reference(loaded, params))
    assert min(pvalues.values()) > threshold(pvalues), pvalues
