"""Continuous batching on one node: the batch scheduler with the real batched local step.

Exactness per sequence: whatever joins or leaves the batch meanwhile, a sequence's greedy
output equals mlx-lm's own ``generate_step`` on its prompt alone (penalties and logit bias
through mlx-lm's ``make_logits_processors``), for dense and MoE checkpoints and prompts of 1
to 310 tokens. Requests are all submitted up front and read afterwards: the worker never
waits for a reader, so sequences join as earlier ones finish, while the others decode.
"""

from __future__ import annotations

import random
from functools import cache

import pytest
from helpers.mlx_lm_reference import PENALTIES, mlx_lm_greedy

from node.checkpoints import PRESETS, ensure_checkpoint
from node.cluster.live import CancelToken
from node.inference.batching.scheduler import BatchScheduler, SchedulerClosed
from node.inference.batching.steps import LocalBatchStep
from node.inference.engine import LocalEngine
from node.inference.events import GenerationDone, TokenDelta
from node.inference.loading import LoadedModel, load_checkpoint
from node.inference.requests import GenerateRequest, RequestError
from node.inference.runner import LocalRunner
from node.inference.sampling import SamplingParams


@cache
def loaded(name: str) -> LoadedModel:
    return load_checkpoint(ensure_checkpoint(PRESETS[name]))


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 500) for _ in range(n)]


@cache
def reference(name: str, prompt: tuple[int, ...], max_tokens: int, penalties: bool) -> list[int]:
    """mlx-lm alone on this prompt: the sequence's expected greedy output."""
    params = SamplingParams(**PENALTIES) if penalties else None
    return mlx_lm_greedy(loaded(name).model, prompt, max_tokens, params)


class RecordingStep(LocalBatchStep):
    """The real batched step, noting how many sequences each step ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def step(self):
        self.sizes.append(len(self))
        return super().step()


def request(prompt: list[int], max_tokens: int, penalties: bool) -> GenerateRequest:
    sampling = SamplingParams(**PENALTIES) if penalties else SamplingParams()
    return GenerateRequest(
        prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True, sampling=sampling
    )


@pytest.mark.parametrize("name", ["dense-hf", "moe-mlx-q4"])
def test_each_sequence_in_a_batch_equals_mlx_lm_alone(name: str) -> None:
    lm = loaded(name)
    lengths = [1, 310, 5, 64, 2, 120, 30, 17]
    budgets = [12, 20, 6, 16, 9, 14, 5, 11]  # they finish at different steps: others join
    cases = [(ids(n, seed), budgets[seed], seed % 2 == 1) for seed, n in enumerate(lengths)]
    step = RecordingStep(lm, max_batch=3, prefill_chunk=64)  # 310 tokens: five chunks
    scheduler = BatchScheduler({"local": step}, max_batch=3)
    try:
        # One more request leaves early: its reader cancels after the first tokens.
        cancel = CancelToken()
        leaving = scheduler.submit(request(ids(40, 99), 200, False), "local", "local", cancel)
        streams = [scheduler.submit(request(*case), "local", "local") for case in cases]
        next(leaving)
        cancel.set()
        assert not any(isinstance(e, GenerationDone) for e in leaving)
        for (prompt, budget, penalties), stream in zip(cases, streams, strict=True):
            events = list(stream)
            done = events[-1]
            assert isinstance(done, GenerationDone)
            assert done.token_ids == reference(name, tuple(prompt), budget, penalties)
            deltas = [t for e in events if isinstance(e, TokenDelta) for t in e.token_ids]
            assert deltas == done.token_ids
            assert done.stats.generation_tokens == budget
            assert done.finish_reason == "length"
            assert done.stats.time_to_first_token_seconds >= done.stats.queue_seconds >= 0
    finally:
        scheduler.close()
    assert max(step.sizes) == 3  # never above max_batch
    assert step.sizes.count(3) > 10  # and really batched
    assert len(step) == 0  # every sequence left, the cancelled one included


def test_seeded_sampling_in_a_batch_equals_the_request_alone() -> None:
    """Each sequence draws from its own key stream: its sampled text does not depend on
    which other requests share the batch."""
    lm = loaded("dense-hf")
    params = [
        SamplingParams(temperature=0.9, seed=5),
        SamplingParams(temperature=0.7, top_p=0.9, seed=6, **PENALTIES),
        SamplingParams(temperature=1.2, top_k=40, min_p=0.05, seed=7),
    ]
    reqs = [
        GenerateRequest(prompt_ids=ids(20 + 9 * i, i), max_tokens=16, ignore_eos=True, sampling=p)
        for i, p in enumerate(params)
    ]
    alone = [list(LocalEngine(lm).generate(r))[-1].token_ids for r in reqs]
    runner = LocalRunner(lm, native_mtp_enabled=False, max_batch=4)
    try:
        streams = [runner.submit(r) for r in reqs]
        together = [list(s)[-1].token_ids for s in streams]
    finally:
        runner.close()
    assert together == alone
    assert len({tuple(t) for t in together}) == 3


def test_eos_and_context_end_a_sequence_and_a_bad_request_fails_alone() -> None:
    lm = loaded("dense-hf")
    runner = LocalRunner(lm, native_mtp_enabled=False, max_batch=4)
    eos = sorted(lm.eos_token_ids)[0]
    try:
        stops = runner.submit(
            GenerateRequest(
                prompt_ids=ids(8, 1), max_tokens=30, sampling=SamplingParams(logit_bias={eos: 50})
            )
        )
        bad = runner.submit(GenerateRequest(prompt_ids=[1, 999999], max_tokens=4))
        near_end = runner.submit(
            GenerateRequest(prompt_ids=ids(lm.context_length - 3, 2), max_tokens=30)
        )
        fine = runner.submit(GenerateRequest(prompt_ids=ids(8, 3), max_tokens=5, ignore_eos=True))
        with pytest.raises(RequestError, match="999999"):
            list(bad)
        done = list(stops)[-1]
        assert (done.finish_reason, done.token_ids) == ("stop", [])
        done = list(near_end)[-1]
        assert done.finish_reason == "length" and done.stats.generation_tokens == 3
        assert list(fine)[-1].stats.generation_tokens == 5
    finally:
        runner.close()


def test_close_ends_running_and_waiting_requests() -> None:
    lm = loaded("dense-hf")
    runner = LocalRunner(lm, native_mtp_enabled=False, max_batch=1)
    long = GenerateRequest(prompt_ids=ids(8, 4), max_tokens=3000, ignore_eos=True)
    running, waiting = runner.submit(long), runner.submit(long)
    assert isinstance(next(running), TokenDelta)
    assert (runner.batch_size, runner.queued) == (1, 1)
    runner.close()
    assert not any(isinstance(e, GenerationDone) for e in running)
    assert list(waiting) == []
    with pytest.raises(SchedulerClosed):
        runner.submit(long)


def test_native_mtp_requests_share_the_device_with_the_batch() -> None:
    lm = loaded("dense-high")
    runner = LocalRunner(lm, max_batch=4)
    prompt = ids(12, 5)
    try:
        mtp = runner.submit(GenerateRequest(prompt_ids=prompt, max_tokens=10, ignore_eos=True))
        plain = runner.submit(
            GenerateRequest(prompt_ids=prompt, max_tokens=10, ignore_eos=True, engine="local")
        )
        mtp_done, plain_done = list(mtp)[-1], list(plain)[-1]
    finally:
        runner.close()
    assert (mtp_done.stats.engine, plain_done.stats.engine) == ("native_mtp", "local")
    assert (
        mtp_done.token_ids
        == plain_done.token_ids
        == reference("dense-high", tuple(prompt), 10, False)
    )
