"""processed_logprobs must be exactly the distribution mlx-lm's generate_step samples from.

Two independent references: (1) mlx-lm's own processors and filter functions composed the way
generate_step + make_sampler compose them (analytic), (2) mlx-lm's make_sampler itself, sampled
many times (empirical, G-test), which also pins the filter order and where temperature goes.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from helpers.mlx_lm_reference import mlx_lm_processors
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_sampler,
)
from test_acceptance import g_test

from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    draft_token,
    greedy_tokens,
    processed_logits,
    processed_logprobs,
    sample_tokens,
)

VOCAB = 48


def mlx_lm_logprobs(logits_row: mx.array, params: SamplingParams, tokens: list[int]) -> mx.array:
    """What mlx-lm samples from for one row: generate_step's processors + logsumexp, then
    make_sampler's chain (top_p, min_p, top_k on untempered logprobs; categorical(x / temp))."""
    processors = mlx_lm_processors(params)
    logits = logits_row + 0  # the repetition processor writes into its argument
    token_array = mx.array(tokens, dtype=mx.uint32)
    for processor in processors:
        logits = processor(token_array, logits)
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    if params.temperature == 0:
        return logprobs
    if 0 < params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p != 0.0:
        logprobs = apply_min_p(logprobs, params.min_p, 1)
    if params.top_k > 0:
        logprobs = apply_top_k(logprobs, params.top_k)
    scaled = logprobs * (1.0 / params.temperature)
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def assert_same_distribution(ours: mx.array, reference: mx.array) -> None:
    ours_np, ref_np = np.array(ours), np.array(reference)
    np.testing.assert_array_equal(np.isneginf(ours_np), np.isneginf(ref_np))
    finite = np.isfinite(ref_np)
    np.testing.assert_allclose(ours_np[finite], ref_np[finite], atol=2e-5, rtol=1e-5)


def random_logits(seed: int, rows: int = 1, vocab: int = VOCAB, scale: float = 2.5) -> mx.array:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, size=(rows, vocab)).astype(np.float32)
    logits[:, : vocab // 8] *= -1.0  # plenty of negative logits for the sign-aware penalty
    return mx.array(logits)


PARAM_CASES = [
    SamplingParams(),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0.5, top_p=0.5),
    SamplingParams(temperature=2.0, top_p=0.3),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=1.0, min_p=1.0),
    SamplingParams(temperature=1.3, top_k=20, min_p=0.05),
    SamplingParams(temperature=0.6, top_p=0.8, min_p=0.1, top_k=7),
    SamplingParams(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5),
    SamplingParams(temperature=1.0, repetition_penalty=0.7, repetition_context_size=3),
    SamplingParams(temperature=1.0, frequency_penalty=0.4, penalty_context_size=6),
    SamplingParams(temperature=1.0, presence_penalty=-0.3, frequency_penalty=0.2),
    SamplingParams(temperature=0.9, top_p=0.95, logit_bias={0: 5.0, 7: -3.0, 40: 2.5}),
    SamplingParams(repetition_penalty=1.5, logit_bias={3: 4.0}),  # greedy with processors
    SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=12,
        min_p=0.02,
        repetition_penalty=1.2,
        repetition_context_size=4,
        presence_penalty=0.3,
        frequency_penalty=0.25,
        penalty_context_size=5,
        logit_bias={1: 1.0, 2: -1.0},
    ),
]
# Repeats inside and outside the short windows, so window edges matter.
HISTORY = [3, 1, 0, 7, 3, 3, 40, 12, 1, 5, 5, 9, 0, 3]


@pytest.mark.parametrize("params", PARAM_CASES, ids=lambda p: p.__repr_str__(","))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_row_matches_mlx_lm(params: SamplingParams, seed: int) -> None:
    logits = random_logits(seed)
    ours = processed_logprobs(logits, params, mx.array(HISTORY))
    assert ours.shape == (1, VOCAB) and ours.dtype == mx.float32
    assert_same_distribution(ours, mlx_lm_logprobs(logits, params, HISTORY))
    total = float(mx.exp(ours).sum())
    assert math.isclose(total, 1.0, abs_tol=1e-5)


def test_filters_see_untempered_logprobs() -> None:
    """top_p on the tempered distribution would keep a different set; mlx-lm does it before."""
    logits = mx.array([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    hot = processed_logprobs(logits, SamplingParams(temperature=3.0, top_p=0.9), [0])
    kept = np.isfinite(np.array(hot[0]))
    # untempered probs ≈ .64,.23,.09,.03,...: the 0.9 nucleus is the top 3 tokens
    assert kept.tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize(
    ("probs", "params", "kept"),
    [
        # mass exactly at top_p: mlx-lm drops a token once the mass above it is >= top_p
        ([0.5, 0.25, 0.25], SamplingParams(temperature=1.0, top_p=0.5), [1, 0, 0]),
        ([0.125, 0.5, 0.125, 0.25], SamplingParams(temperature=0.5, top_p=0.75), [0, 1, 0, 1]),
        # ...but keeps every token tied with the threshold token
        ([0.5, 0.25, 0.125, 0.125], SamplingParams(temperature=1.0, top_p=0.875), [1, 1, 1, 1]),
        ([0.25, 0.5, 0.25], SamplingParams(temperature=1.0, min_p=0.5), [1, 1, 1]),
        ([0.4, 0.4, 0.2], SamplingParams(temperature=1.0, min_p=1.0), [1, 1, 0]),
        ([0.4, 0.2, 0.2, 0.2], SamplingParams(temperature=1.0, top_k=2), None),  # tie at k
    ],
)
def test_filter_edges_match_mlx_lm(probs: list[float], params: SamplingParams, kept) -> None:
    logits = mx.array([[math.log(p) for p in probs]])
    ours = processed_logprobs(logits, params, [0])
    assert_same_distribution(ours, mlx_lm_logprobs(logits, params, [0]))
    ours_kept = np.isfinite(np.array(ours[0])).astype(int).tolist()
    if kept is not None:
        assert ours_kept == kept
    else:
        assert sum(ours_kept) == params.top_k


@pytest.mark.parametrize("history_len", [0, 2, 14])
def test_rows_are_conditioned_on_drafts(history_len: int) -> None:
    params = SamplingParams(
        temperature=0.8,
        top_p=0.95,
        repetition_penalty=1.4,
        repetition_context_size=3,
        presence_penalty=0.6,
        frequency_penalty=0.3,
        penalty_context_size=5,
    )
    history = HISTORY[:history_len]
    drafts = [3, 3, 5, 40]  # repeats history and itself
    logits = random_logits(7, rows=len(drafts) + 1)
    batched = processed_logprobs(logits, params, mx.array(history), mx.array(drafts))
    for i in range(len(drafts) + 1):
        tokens = history + drafts[:i]
        single = processed_logprobs(logits[i : i + 1], params, tokens)
        np.testing.assert_allclose(np.array(batched[i]), np.array(single[0]), atol=1e-6)
        assert_same_distribution(
            batched[i : i + 1], mlx_lm_logprobs(logits[i : i + 1], params, tokens)
        )
    # the conditioning is real: row 2 saw drafts 3, 3, unlike row 0
    assert not np.allclose(
        np.array(batched[2]), np.array(processed_logprobs(logits[2:3], params, history)[0])
    )


def test_long_history_only_window_matters() -> None:
    params = SamplingParams(
        repetition_penalty=2.0,
        repetition_context_size=2,
        frequency_penalty=1.0,
        penalty_context_size=3,
    )
    logits = random_logits(3)
    long_history = list(range(30)) * 50 + [4, 5, 6]
    ours = processed_logprobs(logits, params, long_history)
    assert_same_distribution(ours, processed_logprobs(logits, params, [4, 5, 6]))
    assert_same_distribution(ours, mlx_lm_logprobs(logits, params, long_history))


EMPIRICAL_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5, top_p=0.8),
    SamplingParams(temperature=1.5, top_k=6, min_p=0.05),
    SamplingParams(
        temperature=0.8, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2
    ),
]


@pytest.mark.parametrize("params", EMPIRICAL_CASES, ids=lambda p: p.__repr_str__(","))
def test_mlx_lm_sampler_draws_from_processed_distribution(params: SamplingParams) -> None:
    """20k draws of mlx-lm's own make_sampler (+ processors) vs our probabilities: the G-test
    at α=1e-3 (see test_acceptance for its power) and no draw outside our kept set."""
    vocab, draws = 16, 20_000
    logits = random_logits(11, vocab=vocab, scale=1.5)
    ours = np.exp(np.array(processed_logprobs(logits, params, HISTORY[:6])[0]).astype(np.float64))

    processed = logits + 0
    for processor in mlx_lm_processors(params):
        processed = processor(mx.array(HISTORY[:6]), processed)
    logprobs = processed - mx.logsumexp(processed, keepdims=True)
    sampler = make_sampler(
        params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k
    )
    mx.random.seed(1234)
    samples = np.array(sampler(mx.broadcast_to(logprobs, (draws, vocab))))
    counts = np.bincount(samples, minlength=vocab)

    assert counts[ours == 0].sum() == 0
    _, pvalue = g_test(counts, ours)
    assert pvalue > 1e-3


def test_greedy_is_penalized_argmax_like_mlx_lm() -> None:
    logits = mx.array([[1.0, 4.0, 3.5, 0.0, -2.0, 3.2]])
    penalized = SamplingParams(repetition_penalty=3.0, top_k=1)  # filters don't apply to greedy
    assert greedy_tokens(processed_logprobs(logits, penalized, [1])).tolist() == [2]  # 4/3 < 3.5
    biased = SamplingParams(repetition_penalty=3.0, logit_bias={5: 0.5})  # 3.2 + 0.5 > 3.5
    ours = processed_logprobs(logits, biased, [1])
    assert greedy_tokens(ours).tolist() == [5]
    assert_same_distribution(ours, mlx_lm_logprobs(logits, biased, [1]))


def test_processed_logits_are_mlx_lm_processor_output() -> None:
    params = PARAM_CASES[-1]
    logits = random_logits(8, rows=3)
    ours = processed_logits(logits, params, HISTORY, [3, 40])
    for i in range(3):
        expected = logits[i : i + 1] + 0
        tokens = mx.array(HISTORY + [3, 40][:i])
        for processor in mlx_lm_processors(params):
            expected = processor(tokens, expected)
        np.testing.assert_allclose(np.array(ours[i]), np.array(expected[0]), atol=1e-6)


def test_sample_tokens_is_reproducible_per_key() -> None:
    logprobs = processed_logprobs(
        random_logits(5, rows=4), SamplingParams(temperature=1.0), [1], [2, 3, 4]
    )
    a = sample_tokens(logprobs, mx.random.key(9)).tolist()
    b = sample_tokens(logprobs, mx.random.key(9)).tolist()
    assert a == b and len(a) == 4
    draws = {tuple(sample_tokens(logprobs, mx.random.key(s)).tolist()) for s in range(20)}
    assert len(draws) > 1


def test_key_stream_is_reproducible_for_a_seed() -> None:
    first, second, other = KeyStream(42), KeyStream(42), KeyStream(43)
    seq_a = [first.next().tolist() for _ in range(3)]
    seq_b = [second.next().tolist() for _ in range(3)]
    assert seq_a == seq_b
    assert len({tuple(k) for k in seq_a}) == 3
    assert other.next().tolist() != seq_a[0]
    assert KeyStream(None).next().tolist() != KeyStream(None).next().tolist()


def test_draft_token_greedy_and_sampled() -> None:
    logits = random_logits(4)
    greedy = SamplingParams(repetition_penalty=1.5)
    token, row = draft_token(logits, greedy, [1, 2], None)
    assert token.ndim == 0 and row.shape == (VOCAB,)
    assert token.item() == int(np.argmax(np.array(mlx_lm_logprobs(logits, greedy, [1, 2])[0])))

    sampled = SamplingParams(temperature=0.9, top_k=3)
    token, row = draft_token(logits, sampled, [1, 2], mx.random.key(0))
    assert_same_distribution(row[None], processed_logprobs(logits, sampled, [1, 2]))
    assert math.isfinite(row[token.item()].item())
    with pytest.raises(ValueError, match="key"):
        draft_token(logits, sampled, [1, 2], None)
    for shape in [(VOCAB,), (1, 1, VOCAB)]:
        same, _ = draft_token(logits.reshape(shape), sampled, [1, 2], mx.random.key(0))
        assert same.item() == token.item()
    with pytest.raises(ValueError, match="one row"):
        draft_token(random_logits(0, rows=2), sampled, [1, 2], mx.random.key(0))


def test_low_precision_logits_are_processed_in_float32() -> None:
    logits = random_logits(2).astype(mx.bfloat16)
    out = processed_logprobs(logits, SamplingParams(temperature=1.0, top_p=0.9), [1])
    assert out.dtype == mx.float32
    assert_same_distribution(
        out,
        mlx_lm_logprobs(logits.astype(mx.float32), SamplingParams(temperature=1.0, top_p=0.9), [1]),
    )


def test_greedy_normalizes_in_the_logits_dtype_like_mlx_lm() -> None:
    """bf16 greedy takes the argmax of the same bf16 log-softmax as stock mlx-lm: there the
    logits 2.359 (id 5) and 2.375 (id 9) both round to -4.875 and the lower id wins, where a
    float32 log-softmax would pick id 9."""
    logits = mx.ones((1, 512)).astype(mx.bfloat16)
    logits[0, 5] = 2.359375
    logits[0, 9] = 2.375
    ours = processed_logprobs(logits, SamplingParams(), [1])
    assert ours.dtype == mx.bfloat16
    assert mx.array_equal(ours, mlx_lm_logprobs(logits, SamplingParams(), [1])).item()
    assert greedy_tokens(ours).item() == 5
    upcast = processed_logprobs(logits.astype(mx.float32), SamplingParams(), [1])
    assert greedy_tokens(upcast).item() == 9
    # mlx-lm's processors run in bf16 too; float32 processors would round differently (measured:
    # 41 of 50 random rows not bit-equal with these penalties).
    params = SamplingParams(
        repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, logit_bias={7: 1.5}
    )
    for seed in range(10):
        row = random_logits(seed).astype(mx.bfloat16)
        history = [int(t) for t in mx.random.randint(0, 48, (30,), key=mx.random.key(seed))]
        ours = processed_logprobs(row, params, history)
        assert mx.array_equal(ours, mlx_lm_logprobs(row, params, history)).item()


BAD_VALUES = [
    ("temperature", -0.5),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("top_k", -1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.2),
    ("repetition_context_size", 0),
    ("penalty_context_size", 0),
    ("presence_penalty", float("nan")),
    ("frequency_penalty", float("-inf")),
    ("seed", -1),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_values_name_field_and_value(field: str, value: float) -> None:
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**{field: value})
    message = str(excinfo.value)
    assert field in message and str(value) in message


def test_bad_logit_bias_names_the_token() -> None:
    with pytest.raises(ValueError, match=r"logit_bias(.|\n)*-3"):
        SamplingParams(logit_bias={-3: 1.0})
    with pytest.raises(ValueError, match=r"logit_bias(.|\n)*nan"):
        SamplingParams(logit_bias={4: float("nan")})
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams(temprature=1.0)  # type: ignore[call-arg]


def test_check_vocab() -> None:
    SamplingParams(top_k=9, logit_bias={9: 1.0}).check_vocab(10)
    with pytest.raises(ValueError, match=r"logit_bias token id 10 .*\[0, 10\)"):
        SamplingParams(logit_bias={10: 1.0}).check_vocab(10)
    with pytest.raises(ValueError, match="top_k=10"):
        SamplingParams(temperature=1.0, top_k=10).check_vocab(10)
    with pytest.raises(ValueError, match="logit_bias token id 48"):
        processed_logprobs(random_logits(0), SamplingParams(logit_bias={48: 1.0}), [1])


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="drafts"):
        processed_logprobs(random_logits(0, rows=3), SamplingParams(), [1], [2])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        processed_logprobs(random_logits(0)[0], SamplingParams(), [1])


def test_params_are_frozen_and_greedy_flag() -> None:
    params = SamplingParams(temperature=0.0, top_p=0.5)
    assert params.is_greedy and not SamplingParams(temperature=0.1).is_greedy
    with pytest.raises(ValueError):
        params.temperature = 1.0  # type: ignore[misc]
    assert SamplingParams.model_validate({"logit_bias": {"12": 2}}).logit_bias == {12: 2.0}
