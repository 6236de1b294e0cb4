"""End to end: native-MTP sampling emits the distribution target-only mlx-lm sampling emits.

Native MTP (K = 2) on a "partial"-agreement checkpoint, so drafts are both accepted and
rejected, generates short continuations of one prompt many times, one seed per run. The
reference is target-only sampling with mlx-lm's own make_sampler + make_logits_processors
over the plain model (no MTP, no node.inference.sampling), run as a batch of identical prompts
— the same per-row computation as generate_step's `_step` (checked against generate_step
itself below). A two-sample chi-square compares the tokens at every position and the adjacent
pairs. A negative control swaps the engine's acceptance rule for a wrong one and must fail.

Both sides use the same weights with the LM head scaled up: the constructed checkpoint's
next-token distributions are nearly flat (entropy ~4.8 nats over 512 tokens), which would spread
a few hundred runs over hundreds of cells; a sharper head gives peaked but non-trivial
distributions, where a shift is visible with the run counts this machine affords.

Power (stated; not 2% here): the rule itself is tested to a 2% shift in test_acceptance.py.
Here 300 MTP runs per setting (MTP_RUNS) against 10 000 reference rows (effective sample ~290)
detect moving ~14% of probability between two cells of probability ~0.3 with power ~0.9
(λ = n·δ²·(1/p_a + 1/p_b) ≈ 290·0.0196·6.7 ≈ 38; the critical value at α = 1e-4 with 5 degrees
of freedom is 25.7). That catches wiring errors (a wrong draft distribution, history, penalty
conditioning, rollback, acceptance rule), which move far more; the negative control shows one.
Subtler errors need more runs: MACMESH_MTP_DIST_RUNS=3000 (about ten minutes here) detects ~4.5%
with the same power. For example, resampling from p instead of the residual after a rejection
gives p-values ~0.01 at 300 runs: not flagged by default.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from test_acceptance import two_sample_chi2

from node.checkpoints import CheckpointSpec, ensure_checkpoint
from node.inference import acceptance
from node.inference.acceptance import draft_token_logprobs, next_token_logits
from node.inference.events import GenerationDone
from node.inference.loading import LoadedModel, load_checkpoint
from node.inference.mtp import engine as mtp_engine
from node.inference.mtp.engine import MtpEngine
from node.inference.mtp.kpolicy import KPolicy
from node.inference.requests import GenerateRequest
from node.inference.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def ratio_rule(monkeypatch):
    """Each run is seeded (so the test is deterministic), but this file tests the ratio rule:
    a seeded request would otherwise take the coupled rule, which test_mtp_engine shows emits
    exactly the local engine's draws."""
    monkeypatch.setattr(acceptance, "rule_for", lambda p: "greedy" if p.is_greedy else "ratio")


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
MAX_TOKENS = 4  # token 0 comes from prefill; one K=2 cycle emits 1-3 more
MTP_K = 2
LM_HEAD_SCALE = 2.0
MTP_RUNS = int(os.environ.get("MACMESH_MTP_DIST_RUNS", "300"))
REF_RUNS = 10_000
ALPHA = 1e-4  # per comparison; 6 comparisons x 4 settings stay far below 1% family-wise

SETTINGS = {
    "temperature 1.0": SamplingParams(temperature=1.0),
    "temperature 0.7, top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "top_k 20, min_p 0.05": SamplingParams(temperature=1.0, top_k=20, min_p=0.05),
    "temperature 0.8, repetition 1.3, presence 0.5": SamplingParams(
        temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5
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


def mtp_samples(
    loaded: LoadedModel, params: SamplingParams, runs: int, mtp_k: int | None = MTP_K
) -> tuple[np.ndarray, int, int]:
    """→ (tokens [runs, MAX_TOKENS], drafts proposed, drafts accepted) from the MTP engine."""
    engine = MtpEngine(loaded)
    tokens, proposed, accepted = [], 0, 0
    for seed in range(runs):
        request = GenerateRequest(
            prompt_ids=PROMPT,
            max_tokens=MAX_TOKENS,
            sampling=params.model_copy(update={"seed": seed}),
            engine="native_mtp",
            mtp_k=mtp_k,
            ignore_eos=True,
        )
        done = next(e for e in engine.generate(request) if isinstance(e, GenerationDone))
        assert done.stats.engine == "native_mtp"
        tokens.append(done.token_ids)
        proposed += done.stats.proposed_draft_tokens
        accepted += done.stats.accepted_draft_tokens
    return np.array(tokens), proposed, accepted


def _mlx_lm_processing(params: SamplingParams):
    processors = make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty,
        presence_context_size=params.penalty_context_size,
        frequency_penalty=params.frequency_penalty,
        frequency_context_size=params.penalty_context_size,
    )
    sampler = make_sampler(
        params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k
    )
    return processors, sampler


def reference_samples(model, params: SamplingParams, runs: int, seed: int) -> np.ndarray:
    """Target-only mlx-lm sampling of `runs` continuations of PROMPT → [runs, MAX_TOKENS].

    Per row this is generate_step's `_step`: the processors see prompt + generated tokens,
    logprobs = logits - logsumexp(logits), then the sampler draws. Rows that share a history
    share their logits, so each step runs the model (uncached, over the whole history) and the
    processors once per distinct history, and the sampler over all rows.
    """
    processors, sampler = _mlx_lm_processing(params)
    mx.random.seed(seed)
    history = np.tile(np.array(PROMPT), (runs, 1))
    for _ in range(MAX_TOKENS):
        distinct, inverse = np.unique(history, axis=0, return_inverse=True)
        logits = model(mx.array(distinct))[:, -1, :].astype(mx.float32)
        if processors:
            rows = []
            for i, context in enumerate(distinct):
                row_logits = logits[i : i + 1]
                for processor in processors:
                    row_logits = processor(mx.array(context), row_logits)
                rows.append(row_logits)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = sampler(logprobs[mx.array(inverse.reshape(-1))])
        history = np.concatenate([history, np.array(sampled)[:, None]], axis=1)
    return history[:, len(PROMPT) :]


_REFERENCES: dict[str, np.ndarray] = {}


def _reference(loaded: LoadedModel, params: SamplingParams) -> np.ndarray:
    """The reference sample of a setting, drawn once per module run."""
    key = params.model_dump_json()
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_samples(loaded.model, params, REF_RUNS, seed=17)
    return _REFERENCES[key]


def compare(mtp: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """p-values of the two-sample test per position and per adjacent pair."""
    vocab = int(max(mtp.max(), reference.max())) + 1
    pvalues = {}
    for position in range(MAX_TOKENS):
        a = np.bincount(mtp[:, position], minlength=vocab)
        b = np.bincount(reference[:, position], minlength=vocab)
        pvalues[f"position {position}"] = two_sample_chi2(a, b)[1]
    for first in range(1, MAX_TOKENS - 1):
        codes_a = mtp[:, first] * vocab + mtp[:, first + 1]
        codes_b = reference[:, first] * vocab + reference[:, first + 1]
        a = np.bincount(codes_a, minlength=vocab * vocab)
        b = np.bincount(codes_b, minlength=vocab * vocab)
        pvalues[f"pair {first},{first + 1}"] = two_sample_chi2(a, b)[1]
    return pvalues


def test_batched_reference_is_generate_step(loaded: LoadedModel) -> None:
    """The batched reference reproduces mlx-lm's generate_step (greedy, with penalties, so
    the processors' token history is checked too)."""
    for params in (SamplingParams(), SamplingParams(repetition_penalty=1.3, presence_penalty=0.5)):
        processors, sampler = _mlx_lm_processing(params)
        steps = generate_step(
            mx.array(PROMPT),
            loaded.model,
            max_tokens=MAX_TOKENS,
            sampler=sampler,
            logits_processors=processors,
        )
        expected = [token for token, _ in steps]
        batched = reference_samples(loaded.model, params, runs=3, seed=0)
        assert batched.tolist() == [expected] * 3


@pytest.mark.parametrize("params", list(SETTINGS.values()), ids=list(SETTINGS))
def test_mtp_sampling_matches_target_only(loaded: LoadedModel, params: SamplingParams) -> None:
    mtp, proposed, accepted = mtp_samples(loaded, params, MTP_RUNS)
    assert 0 < accepted < proposed  # drafts were both accepted and rejected
    pvalues = compare(mtp, _reference(loaded, params))
    assert min(pvalues.values()) > ALPHA, pvalues


def test_mtp_sampling_matches_target_only_when_k_changes_every_cycle(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K drawn at random per cycle (0..3, the policy's seam): the distribution must not move,
    whichever K each cycle drafts and whatever the previous one left in the caches."""
    rng = np.random.default_rng(5)
    monkeypatch.setattr(
        KPolicy, "next_k", lambda self, costs, limit=None, batch=1: int(rng.integers(0, 4))
    )
    params = SETTINGS["temperature 0.8, repetition 1.3, presence 0.5"]
    mtp, proposed, accepted = mtp_samples(loaded, params, MTP_RUNS, mtp_k=None)
    assert 0 < accepted < proposed
    pvalues = compare(mtp, _reference(loaded, params))
    assert min(pvalues.values()) > ALPHA, pvalues


def _inverted_ratio_rule(target, draft, drafts, key):
    """Wrong on purpose: accepts a draft with probability min(1, q/p)."""
    accept_key, token_key = mx.random.split(key)
    log_p, log_q = draft_token_logprobs(target, draft, drafts)
    log_u = mx.log(mx.random.uniform(shape=log_p.shape, key=accept_key))
    passes = (log_u + log_p < log_q).astype(mx.int32)
    accepted = mx.cumprod(passes, axis=-1).sum(axis=-1)
    logits = next_token_logits(target, draft, accepted)
    return accepted, mx.random.categorical(logits, key=token_key)


def test_negative_control_wrong_rule_is_detected(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = SETTINGS["temperature 1.0"]
    monkeypatch.setattr(mtp_engine, "sampled_accept_batch", _inverted_ratio_rule)
    mtp, _, _ = mtp_samples(loaded, params, MTP_RUNS)
    pvalues = compare(mtp, _reference(loaded, params))
    assert min(pvalues.values()) < ALPHA, pvalues
