"""Native MTP's prompt cache, inside the batched step: what a seeded row continues from.

The daemon tests (``test_prompt_cache_daemon.py``) show the tokens are right turn after
turn; here the step is driven directly (join, then steps until done) so its state can be
read: a row seeded from a snapshot must reach the state a row prefilled from scratch reaches
— the model's caches, the head's cache (whose content only changes drafts, so the tokens
alone would not show a wrong one) and the pending hidden state — up to the noise floor of
different chunk shapes (docs/exactness.md). The negative controls break one piece of the
snapshot and show the comparison catches it.
"""

from __future__ import annotations

import dataclasses
import random

import mlx.core as mx
import numpy as np
import pytest
from helpers.mlx_lm_reference import mlx_lm_greedy
from test_batching import loaded

from node.inference.batching.mtp_step import MtpBatchStep
from node.inference.batching.scheduler import Sequence
from node.inference.events import GenerationDone
from node.inference.loading import LoadedModel
from node.inference.prompt_cache import PromptCache
from node.inference.requests import GenerateRequest

PRESET = "dense-partial"
# Different chunk shapes round differently (~1e-5 measured on states of magnitude ~3); a
# wrong state is off by O(1).
NOISE = 1e-3


class _Never:
    def is_set(self) -> bool:
        return False


class Capturing(MtpBatchStep):
    """The real step, keeping (model caches, head cache, pending hidden) of each row as it
    joins the batch, as numpy arrays."""

    sabotage: str | None = None  # a negative control: which piece of a seeded row to break

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.joined: list[tuple[list[np.ndarray], np.ndarray, np.ndarray]] = []

    def _seed(self, row) -> None:
        super()._seed(row)
        if row.carry is not None and self.sabotage == "hidden":
            row.carry = mx.zeros_like(row.carry)

    def _merge(self, rows, caches, mtp) -> None:
        for i, row in enumerate(rows):
            model = [
                np.array(c.keys if hasattr(c, "keys") else c.cache[1])
                for c in (c.extract(i) for c in caches)
            ]
            head = mtp.extract(i)
            self.joined.append((model, np.array(head.keys), np.array(row.pending_hidden)))
        super()._merge(rows, caches, mtp)


def drive(step: MtpBatchStep, prompt: list[int], max_tokens: int = 12) -> GenerationDone:
    """One request through ``step`` alone: join, then steps until its final event."""
    request = GenerateRequest(prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True)
    step.join(Sequence(uid=0, request=request, kind="native_mtp", reason="test", cancel=_Never()))
    while True:
        for _, event in step.step():
            assert not isinstance(event, Exception), event
            if isinstance(event, GenerationDone):
                return event


def far(a: tuple, b: tuple) -> float:
    """The largest difference between two captured states (shapes must match)."""
    (ma, ha, pa), (mb, hb, pb) = a, b
    assert [m.shape for m in ma] == [m.shape for m in mb]
    assert ha.shape == hb.shape and pa.shape == pb.shape
    return max(
        max(float(np.abs(x - y).max()) for x, y in zip(ma, mb, strict=True)),
        float(np.abs(ha - hb).max()),
        float(np.abs(pa - pb).max()),
    )


@pytest.mark.parametrize("sabotage", [None, "hidden"])
def test_a_seeded_row_reaches_the_state_of_a_row_prefilled_from_scratch(sabotage) -> None:
    lm = loaded(PRESET)
    rng = random.Random(3)
    first = [rng.randrange(500) for _ in range(150)]
    step = Capturing(
        lm, lm.mtp_head(), 2, prefill_chunk=64, fixed_k=2, prompt_cache=PromptCache(2**30)
    )
    step.sabotage = sabotage
    answer = drive(step, first).token_ids
    follow_up = first + answer + [rng.randrange(500) for _ in range(2)]
    seeded = drive(step, follow_up)
    # From the generation-end snapshot (history but the newest token), then from the prompt
    # end snapshot of the follow-up (all but its last token).
    again = drive(step, follow_up)
    assert seeded.stats.cached_prompt_tokens == len(first) + len(answer) - 1
    assert again.stats.cached_prompt_tokens == len(follow_up) - 1
    expected = mlx_lm_greedy(lm.model, follow_up, 12)
    assert seeded.token_ids == again.token_ids == expected  # the head never changes tokens

    scratch = Capturing(lm, lm.mtp_head(), 2, prefill_chunk=64, fixed_k=2)
    assert drive(scratch, follow_up).token_ids == expected
    (reference,) = scratch.joined
    distances = [far(step.joined[i], reference) for i in (1, 2)]
    if sabotage is None:
        assert max(distances) < NOISE, distances
    else:
        assert min(distances) > NOISE, distances


class _EosAt(LoadedModel):
    """The same checkpoint with one chosen token as its end of sequence."""

    eos: int = 0

    @property
    def eos_token_ids(self) -> set[int]:
        return {self.eos}


@pytest.mark.parametrize("sabotage", [None, "saved_states"])
def test_a_row_ending_while_a_decode_step_is_queued_is_stored_without_it(sabotage) -> None:
    """At K = 0 the next decode step is queued before the tokens are read; a row that ends
    on EOS then has one more token in its caches than it keeps. The snapshot leaves it out
    (attention entries trimmed, GatedDeltaNet states from before the queued step): the next
    turn starts from it and still equals mlx-lm."""
    base = loaded(PRESET)
    rng = random.Random(4)
    prompt = [rng.randrange(500) for _ in range(100)]
    greedy = mlx_lm_greedy(base.model, prompt, 20)
    stop = next(i for i in range(6, 20) if greedy[i] not in greedy[:i])
    lm = _EosAt(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    lm.eos = greedy[stop]

    queued: list[bool] = []

    class Recording(MtpBatchStep):
        def _store_finished(self, i: int) -> None:
            queued.append(self._queued is not None)
            if sabotage == "saved_states":
                self._saved = None  # the linear layers' states after the queued step
            super()._store_finished(i)

    step = Recording(
        lm, lm.mtp_head(), 2, prefill_chunk=64, fixed_k=0, prompt_cache=PromptCache(2**30)
    )
    request = GenerateRequest(prompt_ids=prompt, max_tokens=20)
    step.join(Sequence(uid=0, request=request, kind="native_mtp", reason="test", cancel=_Never()))
    done = None
    while done is None:
        done = next((e for _, e in step.step() if isinstance(e, GenerationDone)), None)
    assert done.finish_reason == "stop" and done.token_ids == greedy[:stop]
    assert queued == [True]  # the case under test did happen

    follow_up = prompt + done.token_ids + [3, 4]
    got = drive(step, follow_up, 8)
    assert got.stats.cached_prompt_tokens == len(prompt) + stop
    if sabotage is None:
        assert got.token_ids == mlx_lm_greedy(base.model, follow_up, 8)
    else:
        assert got.token_ids != mlx_lm_greedy(base.model, follow_up, 8)
