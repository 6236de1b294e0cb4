"""Native MTP end to end: greedy output identical to mlx-lm's own target-only generation, and
acceptance that matches how the checkpoints were constructed.

The reference is ``mlx_lm.generate.generate_step`` with an argmax sampler on the same loaded
model — independent of our prefill, sampling module and caches. ``ignore_eos`` semantics on both
sides (generate_step never stops on EOS; the engine is told to ignore it).

Matrix (default run, about a minute on 2 busy cores):
- every layout × arch (hf / mlx / sidecar × dense / MoE), 4-bit (dense, MoE, sidecar next to
  quantized shards), bf16 (hf, mlx) and tied embeddings: one prompt each, K cycling 1..4
  across them. Their heads are random, so nearly every draft is rejected: the reject path.
- "partial" checkpoints (dense and MoE, ~40-70% acceptance): prompts of 5..310 tokens with
  K = 1..4: accept, partial-accept and reject paths, chunked prefill across chunk borders.
- "high" / "none" checkpoints: acceptance > 90% for K = 1..4, and ~0.
The full matrix — 20 prompts (four of 300+ tokens), 200 generated tokens, K = 1..4 on the
dense partial checkpoint (12 prompts on the MoE one), plus 300+-token prompts on the high one
— is marked slow (about a minute on a quiet machine, five under load).
"""

from __future__ import annotations

import random
from functools import cache

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from node.checkpoints import PRESETS, ensure_checkpoint
from node.inference import engine as engine_module
from node.inference.events import GenerationDone, TokenDelta
from node.inference.loading import LoadedModel, load_checkpoint
from node.inference.mtp.engine import MtpEngine
from node.inference.requests import GenerateRequest
from node.inference.sampling import SamplingParams

PROMPT_LENGTHS = [
    3,
    8,
    17,
    33,
    60,
    90,
    120,
    160,
    210,
    260,
    310,
    330,
    350,
    380,
    45,
    75,
    24,
    140,
    305,
    12,
]


@cache
def loaded(name: str) -> LoadedModel:
    return load_checkpoint(ensure_checkpoint(PRESETS[name]))


def prompt(i: int, length: int | None = None) -> list[int]:
    rng = random.Random(1000 + i)
    return [rng.randrange(0, 500) for _ in range(length or PROMPT_LENGTHS[i])]


def _argmax(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


@cache
def reference(name: str, prompt_key: tuple[int, ...], n: int) -> list[int]:
    """Stock mlx-lm's target-only greedy tokens, what ``mlx_lm.generate`` gives a user.

    No upcast for bf16 models: mlx-lm takes the argmax of a bf16 log-softmax, whose rounding
    turns near-ties into exact ties broken by the lower token id (measured: logits 2.375 vs
    2.359 both become -4.3125), and our greedy sampling normalizes in the logits' dtype too.
    """
    steps = generate_step(
        mx.array(list(prompt_key)), loaded(name).model, max_tokens=n, sampler=_argmax
    )
    return [int(token) for token, _ in steps]


def run(name: str, ids: list[int], n: int, k: int, **kwargs) -> GenerationDone:
    engine = MtpEngine(loaded(name), rollback=kwargs.pop("rollback", "capture"))
    request = GenerateRequest(prompt_ids=ids, max_tokens=n, mtp_k=k, ignore_eos=True, **kwargs)
    events = list(engine.generate(request))
    done = events[-1]
    assert isinstance(done, GenerationDone)
    streamed = [t for e in events[:-1] if isinstance(e, TokenDelta) for t in e.token_ids]
    assert streamed == done.token_ids
    return done


def check_greedy(name: str, ids: list[int], n: int, k: int, **kwargs) -> GenerationDone:
    done = run(name, ids, n, k, **kwargs)
    expected = reference(name, tuple(ids), n)
    if done.token_ids != expected:
        pairs = zip(done.token_ids, expected, strict=False)
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), len(expected))
        pytest.fail(f"{name} K={k}: first difference at generated token {first}")
    return done


LAYOUTS = [
    "dense-hf",
    "dense-mlx",
    "dense-sidecar",
    "moe-hf",
    "moe-mlx",
    "moe-sidecar",
    "dense-mlx-q4",
    "moe-mlx-q4",
    "dense-sidecar-q4",
    "dense-tied",
    "dense-hf-bf16",
    "dense-mlx-bf16",
]


@pytest.mark.parametrize(("index", "name"), list(enumerate(LAYOUTS)), ids=LAYOUTS)
def test_greedy_identical_in_every_layout(index: int, name: str) -> None:
    k = 1 + index % 4
    done = check_greedy(name, prompt(index, 40), 40, k)
    assert done.stats.engine == "native_mtp"
    assert done.stats.num_draft_tokens == k


@pytest.mark.parametrize("name", ["dense-partial", "moe-partial"])
@pytest.mark.parametrize(("k", "index"), [(1, 0), (2, 4), (3, 10), (4, 6)])
def test_greedy_identical_with_partial_agreement(name: str, k: int, index: int) -> None:
    done = check_greedy(name, prompt(index), 64, k)
    rate = done.stats.acceptance_rate
    assert rate is not None and 0.1 < rate < 0.95  # both accepts and rejects happened


def test_chunked_prefill_fills_the_head_cache_across_chunks(monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 64)
    whole = run("dense-partial", prompt(12), 48, 2)
    check_greedy("dense-partial", prompt(12), 48, 2)
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 4096)
    unchunked = run("dense-partial", prompt(12), 48, 2)
    # Chunking must not change what the head sees: the same drafts get accepted.
    assert whole.stats.accepted_draft_tokens == unchunked.stats.accepted_draft_tokens


def test_replay_rollback_is_exact_too() -> None:
    for index, k in ((1, 3), (5, 2)):
        capture = check_greedy("dense-partial", prompt(index), 48, k)
        replay = check_greedy("dense-partial", prompt(index), 48, k, rollback="replay")
        assert capture.stats.accepted_draft_tokens == replay.stats.accepted_draft_tokens


@pytest.mark.parametrize("name", ["dense-high", "moe-high"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_high_agreement_is_accepted(name: str, k: int) -> None:
    done = check_greedy(name, prompt(3), 48, k)
    assert done.stats.acceptance_rate > 0.9
    # All-accepted cycles emit k + 1 tokens: far fewer cycles than tokens.
    assert done.stats.proposed_draft_tokens <= k * (48 // (k + 1) + 4)


@pytest.mark.parametrize("name", ["dense-none", "moe-none"])
def test_no_agreement_is_rejected(name: str) -> None:
    done = check_greedy(name, prompt(2), 32, 2)
    assert done.stats.acceptance_rate < 0.02


def test_penalties_condition_each_verified_position() -> None:
    """Greedy with repetition/presence/frequency penalties and a logit bias equals mlx-lm's
    generate_step with the same logits processors: at every verified position the penalty
    sees exactly the tokens accepted before it."""
    params = SamplingParams(
        repetition_penalty=1.3,
        repetition_context_size=16,
        presence_penalty=0.4,
        frequency_penalty=0.2,
        penalty_context_size=16,
        logit_bias={7: 1.5, 301: -2.0},
    )
    ids = prompt(5, 24)
    processors = make_logits_processors(
        logit_bias=params.logit_bias,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty,
        presence_context_size=params.penalty_context_size,
        frequency_penalty=params.frequency_penalty,
        frequency_context_size=params.penalty_context_size,
    )
    model = loaded("dense-partial").model
    expected = [
        int(t)
        for t, _ in generate_step(
            mx.array(ids), model, max_tokens=48, sampler=_argmax, logits_processors=processors
        )
    ]
    for k in (1, 3):
        done = run("dense-partial", ids, 48, k, sampling=params)
        assert done.token_ids == expected, f"K={k}"
        assert done.stats.accepted_draft_tokens > 0


def test_seeded_sampling_is_reproducible() -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=123)
    a = run("dense-partial", prompt(1), 24, 2, sampling=params)
    b = run("dense-partial", prompt(1), 24, 2, sampling=params)
    c = run("dense-partial", prompt(1), 24, 2, sampling=params.model_copy(update={"seed": 124}))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_max_tokens_is_exact_and_stats_add_up(n: int) -> None:
    done = check_greedy("dense-high", prompt(4, 20), n, 4)
    stats = done.stats
    assert len(done.token_ids) == stats.generation_tokens == n
    assert done.finish_reason == "length"
    assert stats.prompt_tokens == 20
    assert stats.drafter_kind == "native_mtp"
    assert stats.accepted_draft_tokens <= stats.proposed_draft_tokens
    if stats.proposed_draft_tokens:
        assert stats.acceptance_rate == stats.accepted_draft_tokens / stats.proposed_draft_tokens
    else:
        assert n <= 2 and stats.acceptance_rate is None  # n=2: the one cycle drafts nothing
    assert stats.prompt_tps > 0
    assert stats.stages[0].end_layer == loaded("dense-high").num_layers


@pytest.mark.slow
@pytest.mark.parametrize(("name", "prompts"), [("dense-partial", 20), ("moe-partial", 12)])
def test_full_matrix_twenty_prompts_two_hundred_tokens(name: str, prompts: int) -> None:
    """20 prompts (four of 300+ tokens; the MoE model: 12, two of 300+), 200 generated tokens,
    K = 1..4 (each K on 5 prompts, 3 for MoE)."""
    for index in range(prompts):
        check_greedy(name, prompt(index), 200, 1 + index % 4)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_full_matrix_high_agreement_long_prompts(k: int) -> None:
    for index in (10, 11, 12, 13):  # 310..380 prompt tokens
        done = check_greedy("dense-high", prompt(index), 200, k)
        assert done.stats.acceptance_rate > 0.9


def test_prefill_is_one_pass_over_the_prompt(monkeypatch) -> None:
    """The target sees each prompt token once before the first token comes out: the MTP cache
    is filled from that same pass, not from a second prefill."""
    from node.inference import forward

    seen: list[int] = []
    original = forward.hidden_states

    def counting(model, ids, cache):
        seen.append(ids.shape[1])
        return original(model, ids, cache)

    monkeypatch.setattr(forward, "hidden_states", counting)
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 100)
    engine = MtpEngine(loaded("dense-high"))
    events = engine.generate(GenerateRequest(prompt_ids=prompt(11), max_tokens=8, mtp_k=2))
    next(events)  # the first token: prefill done
    assert seen == [100, 100, 100, 30]  # 330 prompt tokens in chunks, nothing twice
    done = list(events)[-1]
    assert isinstance(done, GenerationDone) and done.stats.acceptance_rate > 0.9
