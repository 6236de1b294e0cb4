"""The plain local engine, request validation, and the engine selector."""

from __future__ import annotations

import itertools
import random
from functools import cache

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from pydantic import ValidationError

from node.checkpoints import PRESETS, ensure_checkpoint
from node.inference.engine import LocalEngine
from node.inference.errors import EngineUnavailable
from node.inference.events import GenerationDone, TokenDelta
from node.inference.loading import LoadedModel, LoadProgress, load_checkpoint
from node.inference.mtp.recovery import MtpUnavailable
from node.inference.requests import GenerateRequest, RequestError
from node.inference.runner import LocalRunner
from node.inference.sampling import SamplingParams
from node.inference.selector import select_engine


@cache
def loaded(name: str) -> LoadedModel:
    return load_checkpoint(ensure_checkpoint(PRESETS[name]))


def ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 500) for _ in range(n)]


def generate(engine, **kwargs) -> tuple[list, GenerationDone]:
    events = list(engine.generate(GenerateRequest(**kwargs)))
    assert isinstance(events[-1], GenerationDone)
    return events, events[-1]


def test_load_reports_progress_to_the_total() -> None:
    seen: list[LoadProgress] = []
    lm = load_checkpoint(ensure_checkpoint(PRESETS["dense-hf"]), progress=seen.append)
    assert [p.what for p in seen][:2] == ["embedding", "layer 0"]
    assert seen[-1].done_bytes == seen[-1].total_bytes > 0
    assert all(a.done_bytes < b.done_bytes for a, b in itertools.pairwise(seen))
    assert lm.mtp_k_limits == (2, 4)  # from the card derived from the checkpoint


@pytest.mark.parametrize("name", ["dense-hf", "moe-mlx-q4"])
def test_local_greedy_matches_mlx_lm(name: str) -> None:
    lm = loaded(name)
    for seed, length in ((0, 30), (1, 310)):
        prompt = ids(length, seed)
        expected = [
            int(t)
            for t, _ in generate_step(
                mx.array(prompt), lm.model, max_tokens=40, sampler=lambda x: mx.argmax(x, -1)
            )
        ]
        _, done = generate(LocalEngine(lm), prompt_ids=prompt, max_tokens=40, ignore_eos=True)
        assert done.token_ids == expected
        assert done.stats.engine == "local"
        assert done.stats.drafter_kind is None
        assert done.stats.generation_tokens == 40


def test_streamed_text_adds_up_and_eos_stops() -> None:
    lm = loaded("dense-hf")
    events, done = generate(LocalEngine(lm), prompt="Hello, world!", max_tokens=24)
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert "".join(d.text for d in deltas) == done.text
    assert [t for d in deltas for t in d.token_ids] == done.token_ids
    assert done.text == lm.tokenizer.decode(done.token_ids)

    eos = sorted(lm.eos_token_ids)[0]
    force_eos = SamplingParams(logit_bias={eos: 100.0})
    _, stopped = generate(LocalEngine(lm), prompt="Hi", max_tokens=24, sampling=force_eos)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == [] and stopped.text == ""
    _, ignored = generate(
        LocalEngine(lm), prompt="Hi", max_tokens=5, sampling=force_eos, ignore_eos=True
    )
    assert ignored.finish_reason == "length"
    assert ignored.token_ids == [eos] * 5


def test_chat_template_unless_raw() -> None:
    lm = loaded("dense-hf")
    _, templated = generate(LocalEngine(lm), prompt="Hi", max_tokens=1)
    _, raw = generate(LocalEngine(lm), prompt="Hi", max_tokens=1, raw=True)
    assert raw.stats.prompt_tokens == len(lm.tokenizer.encode("Hi", add_special_tokens=False))
    assert templated.stats.prompt_tokens > raw.stats.prompt_tokens + 4


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"mtp_k": 0}, "mtp_k"),
        ({"sampling": {"temperature": -0.5}}, "temperature"),
        ({"sampling": {"top_p": 0.0}}, "top_p"),
        ({"sampling": {"top_p": 1.5}}, "top_p"),
        ({"sampling": {"min_p": 1.5}}, "min_p"),
        ({"sampling": {"min_p": -0.1}}, "min_p"),
        ({"prompt_ids": []}, "prompt_ids is empty"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt_ids": [1, -3]}, r"prompt_ids\[1\]=-3"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"engine": "turbo"}, "engine"),
        ({"prompt": "a", "prompt_ids": [1]}, "exactly one"),
    ],
)
def test_request_validation_names_the_value(fields: dict, match: str) -> None:
    base = {"prompt_ids": [1, 2, 3]}
    if "prompt" in fields:
        base = {}
    with pytest.raises(ValidationError, match=match):
        GenerateRequest(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"prompt_ids": [1, 512]}, r"prompt_ids\[1\]=512 is outside the vocabulary \[0, 512\)"),
        ({"prompt_ids": [1] * 4096}, "4096 tokens, beyond the model's context of 4096"),
        ({"prompt_ids": [1, 2], "mtp_k": 5}, "mtp_k=5 is above this model's max_k=4"),
        ({"prompt_ids": [1], "sampling": {"logit_bias": {999: 1.0}}}, "999"),
    ],
)
def test_model_dependent_errors(fields: dict, match: str) -> None:
    runner = LocalRunner(loaded("dense-hf"))
    with pytest.raises(RequestError, match=match):
        list(runner.generate(GenerateRequest(**fields)))


def test_selector_branches() -> None:
    hf = ensure_checkpoint(PRESETS["dense-hf"])
    sidecar = ensure_checkpoint(PRESETS["dense-sidecar"])
    stripped = ensure_checkpoint(PRESETS["dense-stripped"])

    kind, reason = select_engine(sidecar)
    assert kind == "native_mtp"
    assert reason == "native_mtp: single node, head recovered from sidecar mtp.safetensors"
    assert select_engine(hf)[1].startswith("native_mtp: single node, head recovered from embedded")

    kind, reason = select_engine(stripped)
    assert kind == "local" and reason.startswith("local: checkpoint is stripped")
    with pytest.raises(MtpUnavailable, match="stripped"):
        select_engine(stripped, "native_mtp")

    assert select_engine(hf, "local") == ("local", "local: requested (engine=local)")
    kind, reason = select_engine(hf, native_mtp_enabled=False, disabled_by="MACMESH_NATIVE_MTP=0")
    assert (kind, reason) == ("local", "local: native MTP disabled by MACMESH_NATIVE_MTP=0")
    with pytest.raises(EngineUnavailable, match="disabled"):
        select_engine(hf, "native_mtp", native_mtp_enabled=False)

    assert select_engine(hf, single_node=False)[0] == "pipeline"
    with pytest.raises(EngineUnavailable, match="single node"):
        select_engine(hf, "native_mtp", single_node=False)


def test_runner_falls_back_with_the_reason_in_stats() -> None:
    _, done = generate(
        LocalRunner(loaded("dense-stripped")), prompt_ids=ids(10), max_tokens=6, mtp_k=2
    )
    assert done.stats.engine == "local"
    assert "stripped" in done.stats.engine_reason
    assert done.stats.proposed_draft_tokens == 0 and done.stats.acceptance_rate is None

    _, done = generate(LocalRunner(loaded("dense-high")), prompt_ids=ids(10), max_tokens=6)
    assert done.stats.engine == "native_mtp"
    # The K policy starts at the card's default_k (2), then chooses per cycle.
    assert done.stats.draft_k_histogram[2] >= 1

    off = LocalRunner(loaded("dense-high"), native_mtp_enabled=False, disabled_by="X=0")
    _, done = generate(off, prompt_ids=ids(10), max_tokens=6)
    assert (done.stats.engine, done.stats.engine_reason) == (
        "local",
        "local: native MTP disabled by X=0",
    )
