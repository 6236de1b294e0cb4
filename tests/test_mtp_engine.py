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

import itertools
import random
from functools import cache

import mlx.core as mx
import pytest
from helpers.mlx_lm_reference import WINDOWED_PENALTIES, mlx_lm_greedy
from mlx_lm.generate import generate_step

from node.checkpoints import PRESETS, CheckpointSpec, ensure_checkpoint
from node.inference import engine as engine_module
from node.inference.events import GenerationDone, TokenDelta
from node.inference.loading import LoadedModel, load_checkpoint
from node.inference.mtp import engine as engine_mtp
from node.inference.mtp.engine import MtpEngine
from node.inference.mtp.kpolicy import CostTable, KPolicy
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


def run(name: str, ids: list[int], n: int, k: int | None, **kwargs) -> GenerationDone:
    engine = MtpEngine(loaded(name), rollback=kwargs.pop("rollback", "capture"))
    request = GenerateRequest(prompt_ids=ids, max_tokens=n, mtp_k=k, ignore_eos=True, **kwargs)
    events = list(engine.generate(request))
    done = events[-1]
    assert isinstance(done, GenerationDone)
    streamed = [t for e in events[:-1] if isinstance(e, TokenDelta) for t in e.token_ids]
    assert streamed == done.token_ids
    return done


def check_greedy(name: str, ids: list[int], n: int, k: int | None, **kwargs) -> GenerationDone:
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
    hist = done.stats.draft_k_histogram
    assert len(hist) == 5 and hist[k] == sum(hist) > 0  # the pinned K on every cycle
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
    params = WINDOWED_PENALTIES
    ids = prompt(5, 24)
    expected = mlx_lm_greedy(loaded("dense-partial").model, ids, 48, params)
    for k in (1, 3):
        done = run("dense-partial", ids, 48, k, sampling=params)
        assert done.token_ids == expected, f"K={k}"
        assert done.stats.accepted_draft_tokens > 0


def local_sampled(name: str, ids: list[int], n: int, params: SamplingParams) -> list[int]:
    """What the local engine (target only, one token per step) draws with ``params``' seed."""
    request = GenerateRequest(prompt_ids=ids, max_tokens=n, ignore_eos=True, sampling=params)
    done = list(engine_module.LocalEngine(loaded(name)).generate(request))[-1]
    assert isinstance(done, GenerationDone)
    return done.token_ids


SEEDED = [
    SamplingParams(temperature=0.9, top_p=0.95, seed=123),
    SamplingParams(temperature=0.7, top_k=40, min_p=0.02, seed=7, repetition_penalty=1.2),
    SamplingParams(temperature=1.0, seed=2026, presence_penalty=0.4, frequency_penalty=0.2),
]


@pytest.mark.parametrize("name", ["dense-partial", "moe-partial", "dense-high"])
def test_a_seed_gives_the_local_engines_text_at_every_k(monkeypatch, name: str) -> None:
    """Seeded sampling is the target's own draw per position (coupled acceptance): native MTP
    at any K — pinned, or changing at random every cycle — emits the tokens the local engine
    draws with that seed, so a seed reproduces the text whatever K the policy picks."""
    for index, params in enumerate(SEEDED):
        ids = prompt(index + 2)
        expected = local_sampled(name, ids, 32, params)
        for k in (1, 2, 4):
            done = run(name, ids, 32, k, sampling=params)
            assert done.token_ids == expected, f"{name} seed={params.seed} K={k}"
        random_k_schedule(monkeypatch, seed=index)
        done = run(name, ids, 32, None, sampling=params)
        monkeypatch.undo()
        assert done.token_ids == expected, f"{name} seed={params.seed} random K"
        if name == "dense-high":  # coupled drafts still pass where the head agrees
            assert done.stats.accepted_draft_tokens > 0
    other = params.model_copy(update={"seed": params.seed + 1})
    assert run(name, ids, 32, 2, sampling=other).token_ids != expected


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


# ---- K chosen per cycle (the policy on: mtp_k unset) --------------------------------------------

# Verify positions nearly free, drafts cheap: the policy drafts deep when drafts match and
# stops when they do not.  Frozen (ewma_weight=0) so the choice does not depend on timing.
CHEAP_VERIFY = CostTable(
    verify={1: [1.0 + 0.1 * t for t in range(5)]},
    draft={1: [0.05 * k for k in range(5)]},
    ewma_weight=0.0,
)


def run_adaptive(name: str, ids: list[int], n: int, costs: CostTable | None = None, **kwargs):
    engine = MtpEngine(loaded(name), costs=costs)
    request = GenerateRequest(prompt_ids=ids, max_tokens=n, ignore_eos=True, **kwargs)
    done = list(engine.generate(request))[-1]
    assert isinstance(done, GenerationDone)
    return done, engine


def random_k_schedule(monkeypatch, seed: int) -> list[int]:
    """Replace the policy's choice by a random K in 0..limit every cycle: the hardest test of
    cache bookkeeping across K changes (0 -> 4 -> 1 -> 0 -> 0 -> 3 ...)."""
    rng = random.Random(seed)
    chosen: list[int] = []

    def next_k(self, costs, limit=None, batch=1):
        bound = self.max_k if limit is None else max(0, min(self.max_k, limit))
        k = rng.randint(0, bound)
        chosen.append(k)
        return k

    monkeypatch.setattr(KPolicy, "next_k", next_k)
    return chosen


@pytest.mark.parametrize("name", ["dense-partial", "moe-partial", "dense-high"])
@pytest.mark.parametrize("index", [0, 6, 10])
def test_greedy_identical_when_k_changes_every_cycle(monkeypatch, name: str, index: int) -> None:
    chosen = random_k_schedule(monkeypatch, seed=index)
    done = check_greedy(name, prompt(index), 64, None)
    assert len(set(chosen)) >= 4  # K=0 and several depths, in random order
    hist = done.stats.draft_k_histogram
    assert [hist[k] for k in range(5)] == [chosen.count(k) for k in range(5)]


def test_long_k_zero_runs_feed_the_head_later(monkeypatch) -> None:
    """Long stretches of K=0 leave the head's pairs pending (flushed past PENDING_LIMIT);
    drafting afterwards must see a head cache as complete as if it had never paused."""
    schedule = iter([0] * 150 + [2] * 200)
    monkeypatch.setattr(KPolicy, "next_k", lambda self, costs, limit=None, batch=1: next(schedule))
    paused = check_greedy("dense-high", prompt(3), 200, None)
    assert paused.stats.draft_k_histogram[0] >= 150
    # The drafts after the pause are accepted like a run that drafted all along.
    assert paused.stats.acceptance_rate > 0.9


@pytest.mark.parametrize("name", ["dense-partial", "moe-partial"])
def test_greedy_identical_with_the_policy_on(name: str) -> None:
    """The real policy and a measured cost table, several prompts: exact whatever it picks."""
    engine = MtpEngine(loaded(name))
    for index in (1, 5, 9, 13):
        ids = prompt(index)
        request = GenerateRequest(prompt_ids=ids, max_tokens=64, ignore_eos=True)
        done = list(engine.generate(request))[-1]
        assert done.token_ids == reference(name, tuple(ids), 64), f"prompt {index}"
        hist = done.stats.draft_k_histogram
        assert sum(hist) >= 64 // 5 and len(hist) == 5
    assert engine.current_k is not None


def test_policy_drafts_deep_when_drafts_match_and_stops_when_they_do_not() -> None:
    high, _ = run_adaptive("dense-high", prompt(3), 96, CHEAP_VERIFY)
    hist = high.stats.draft_k_histogram
    assert hist[4] > 0.7 * sum(hist)  # max_k on most cycles
    assert high.stats.num_draft_tokens > 3
    none, engine = run_adaptive("dense-none", prompt(2), 96, CHEAP_VERIFY)
    hist = none.stats.draft_k_histogram
    assert hist[0] > 0.7 * sum(hist)  # K=0 on most cycles: plain decode
    assert 0 < hist[1] < 0.2 * sum(hist)  # and rare K=1 probes
    assert engine.current_k in (0, 1)
    check_greedy("dense-none", prompt(2), 96, None)  # reference cached: exact too


def test_explicit_mtp_k_pins_k_with_the_policy_available() -> None:
    done, _ = run_adaptive("dense-none", prompt(2), 32, CHEAP_VERIFY, mtp_k=3)
    hist = done.stats.draft_k_histogram
    assert hist[3] == sum(hist) > 0  # drafts never match, yet K stays at the pin


def test_the_first_cycle_uses_the_cards_default_k(monkeypatch) -> None:
    seen: list[int] = []
    original = engine_mtp._MtpRun.cycle

    def recording(self, k):
        seen.append(k)
        return original(self, k)

    monkeypatch.setattr(engine_mtp._MtpRun, "cycle", recording)
    run_adaptive("dense-none", prompt(2), 16, CHEAP_VERIFY)
    assert seen[0] == loaded("dense-none").mtp_k_limits[0]


# The "alternating" head: drafts accepted on alternate blocks of sigma's cycle, rejected on the
# others (the smallest width that holds one independent embedding per ordinary token).
ALTERNATING = CheckpointSpec(
    agreement="alternating",
    agreement_block=16,
    hidden_size=512,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    full_attention_interval=2,
    mixer_scale=1.0,
    seed=7,
)


def test_alternating_head_moves_between_easy_and_hard_text() -> None:
    from node.checkpoints.weights import agreeing_tokens

    engine = MtpEngine(load_checkpoint(ensure_checkpoint(ALTERNATING)), costs=CHEAP_VERIFY)
    agree = set(agreeing_tokens(ALTERNATING).tolist())
    ids = prompt(0, 24)
    request = GenerateRequest(prompt_ids=ids, max_tokens=96, ignore_eos=True)
    done = list(engine.generate(request))[-1]
    inside = [t in agree for t in done.token_ids]
    switches = sum(a != b for a, b in itertools.pairwise(inside))
    assert 4 <= switches <= 8  # runs of ~16 tokens, in and out of the agreeing blocks
    # The policy follows the text: deep K on the easy blocks, K=0 on the hard ones.
    hist = done.stats.draft_k_histogram
    assert hist[0] > 0 and hist[3] + hist[4] > 0
    fixed = MtpEngine(engine.loaded, fixed_k=1)
    pinned = list(fixed.generate(request))[-1]
    assert pinned.token_ids == done.token_ids
    assert 0.2 < pinned.stats.acceptance_rate < 0.6  # half the text accepts, half does not


def test_alternating_head_needs_a_wide_model() -> None:
    from node.checkpoints.weights import build_model, build_mtp

    narrow = CheckpointSpec(agreement="alternating", agreement_block=16, mixer_scale=1.0)
    with pytest.raises(ValueError, match="hidden_size >= "):
        build_mtp(narrow, build_model(narrow))
    with pytest.raises(ValueError, match="agreement_block"):
        CheckpointSpec(agreement="high", agreement_block=16)
