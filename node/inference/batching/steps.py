"""Step functions for ``BatchScheduler``: what one batched step computes.

``LocalBatchStep`` is plain batched decode on mlx-lm's own continuous batcher
(``mlx_lm.generate.BatchGenerator``). It serves as it is: per-sequence samplers and logits
processors, per-sequence ``max_tokens``, ``insert``/``remove`` between steps, batch caches for
qwen3_5 (``BatchKVCache`` with per-sequence offsets and left padding, ``ArraysCache`` with
``lengths``/``filter``/``extend`` for GatedDeltaNet), and prompt processing in chunks of
``prefill_step_size`` interleaved with the decode steps of the running batch (each ``next()``
is one decode step plus at most one chunk per newcomer). What is ours: the sampling (the
request's own ``SamplingParams`` through ``node.inference.sampling``, with its own PRNG key
stream) and the output bookkeeping (EOS, ``max_tokens``, context room, detokenized deltas,
stats) shared with the single-sequence engines.

With a ``PromptCache`` the step seeds a newcomer's row from the longest cached prefix of its
prompt (``BatchGenerator.insert`` takes per-sequence caches and the tokens they hold) and
prefills only the rest; it stores a snapshot of each row at the end of its prompt (all but
the last token, taken between two steps while the row is still in the prompt batch) and at
the end of its generation (prompt + every generated token: the next turn of a chat starts
with them).

Batched native MTP is ``mtp_step.MtpBatchStep``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from node.inference.batching.scheduler import Sequence, StepOutput
from node.inference.engine import (
    PREFILL_CHUNK,
    Clock,
    PreparedRequest,
    generation_done,
    prepare_request,
)
from node.inference.loading import LoadedModel
from node.inference.prompt_cache import PromptCache, store_snapshot, thaw
from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    greedy_tokens,
    processed_logits,
    processed_logprobs,
    sample_tokens,
)
from node.logging import get_logger

log = get_logger(__name__)

# Prompt tokens per prefill chunk while others decode: running streams wait at most one
# chunk's forward for a newcomer.
BATCH_PREFILL_CHUNK = min(256, PREFILL_CHUNK)


def logits_processor(params: SamplingParams) -> Callable[[mx.array, mx.array], mx.array]:
    """mlx-lm logits processor applying the request's logit bias and penalties.

    mlx-lm hands it ``tokens`` = prompt + generated so far, exactly the history
    ``processed_logits`` expects."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return processed_logits(logits, params, tokens)

    return process


def sampler(params: SamplingParams, keys: KeyStream) -> Callable[[mx.array], mx.array]:
    """mlx-lm sampler for one sequence: its filters and temperature, then a draw from its own
    key stream (bias and penalties already ran in the logits processor)."""
    filters_only = params.model_copy(
        update={
            "logit_bias": {},
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        }
    )

    def sample(logprobs: mx.array) -> mx.array:
        return sample_tokens(processed_logprobs(logprobs, filters_only, []), keys.next())

    return sample


@dataclass
class _Slot:
    seq: Sequence
    prepared: PreparedRequest
    clock: Clock
    cached: int = 0  # prompt tokens seeded from the prompt cache


class LocalBatchStep:
    """Batched target-only decode (the ``local`` engine) for every sequence it holds."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int,
        prefill_chunk: int = BATCH_PREFILL_CHUNK,
        context_tokens: int | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.loaded = loaded
        self.context_tokens = context_tokens  # per-sequence budget: generation stops there
        self.prompt_cache = prompt_cache
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._generator: Any = None
        self._slots: dict[int, _Slot] = {}  # BatchGenerator uid -> slot
        self._uids: dict[int, int] = {}  # scheduler uid -> BatchGenerator uid

    def __len__(self) -> int:
        return len(self._slots)

    def _gen(self) -> Any:
        if self._generator is None:
            from mlx_lm.generate import BatchGenerator

            # The scheduler admits at most max_batch sequences; EOS is ours to decide
            # (ignore_eos is per request), so the generator gets no stop tokens.
            self._generator = BatchGenerator(
                self.loaded.model,
                sampler=greedy_tokens,
                completion_batch_size=self.max_batch,
                prefill_batch_size=self.max_batch,
                prefill_step_size=self.prefill_chunk,
            )
        return self._generator

    def join(self, seq: Sequence) -> None:
        prepared = prepare_request(self.loaded, seq.request, None, self.context_tokens)
        params = prepared.params
        needs_processor = bool(params.logit_bias) or params.has_penalties
        # Greedy rows share one sampler object, so mlx-lm samples them in one batched argmax.
        sample = greedy_tokens if params.is_greedy else sampler(params, KeyStream(params.seed))
        ids = prepared.prompt_ids
        seeded, cached = self._seed(ids)
        (uid,) = self._gen().insert(
            [ids[cached:]],
            max_tokens=[prepared.output.remaining],
            caches=[seeded],
            # The tokens the seeded cache holds: penalties see the whole history either way.
            all_tokens=[ids[:cached]],
            samplers=[sample],
            logits_processors=[[logits_processor(params)] if needs_processor else []],
        )
        self._slots[uid] = _Slot(seq, prepared, Clock(), cached)
        self._uids[seq.uid] = uid

    def _seed(self, ids: list[int]) -> tuple[list[Any] | None, int]:
        """Caches holding the longest cached prefix of ``ids`` and its length (None, 0: none)."""
        if self.prompt_cache is None:
            return None, 0
        try:
            hit = self.prompt_cache.lookup(ids)
            return (thaw(hit), hit.length) if hit is not None else (None, 0)
        except Exception:  # the request runs without the cache rather than not at all
            log.exception("seeding from the prompt cache failed", tokens=len(ids))
            return None, 0

    def leave(self, seq: Sequence) -> None:
        uid = self._uids.pop(seq.uid, None)
        if uid is None:
            return
        self._slots.pop(uid, None)
        self._generator.remove([uid])  # a no-op when the generator finished it itself

    def step(self) -> StepOutput:
        prompt_responses, responses = self._gen().next()
        if self.prompt_cache is not None:
            self._store_prompt_ends(prompt_responses)
        out: StepOutput = []
        for response in responses:
            slot = self._slots.get(response.uid)
            if slot is None:
                continue
            output = slot.prepared.output
            if slot.clock.first_token is None:
                slot.clock.mark_first_token()
            delta = output.add([response.token])
            if delta is not None:
                out.append((slot.seq, delta))
            if output.done or response.finish_reason is not None:
                if output.finish_reason is None:
                    output.finish_reason = "length"
                slot.clock.mark_end()
                if self.prompt_cache is not None:
                    self._store_generation_end(slot, response)
                done = generation_done(
                    "local",
                    slot.seq.reason,
                    self.loaded,
                    slot.prepared,
                    slot.clock,
                    cached_prompt_tokens=slot.cached,
                )
                out.append((slot.seq, done))
        return out

    def _store_prompt_ends(self, responses: list[Any]) -> None:
        """Snapshot the rows whose prompt batch now holds all but their last prompt token."""
        ending = [
            r.uid
            for r in responses
            if r.uid in self._slots and r.progress[0] == r.progress[1] - 1 > 0
        ]
        if ending:
            for cache, tokens in self._generator.extract_cache(ending).values():
                self._store(tokens, cache)

    def _store_generation_end(self, slot: _Slot, response: Any) -> None:
        """Snapshot a finished row: its cache holds the prompt and every generated token."""
        if response.prompt_cache is not None:  # the generator finished the row itself
            self._store(response.all_tokens, response.prompt_cache)
            return
        # We finished it (EOS, context room): take the row out now, with its cache.
        self._uids.pop(slot.seq.uid, None)
        self._slots.pop(response.uid, None)
        removed = self._generator.remove([response.uid], return_prompt_caches=True)
        if response.uid in removed:
            cache, tokens = removed[response.uid]
            self._store(tokens, cache)

    def _store(self, tokens: list[int], cache: list[Any]) -> None:
        assert self.prompt_cache is not None
        store_snapshot(self.prompt_cache, tokens, cache)

    def reset(self) -> None:
        generator, self._generator = self._generator, None
        self._slots.clear()
        self._uids.clear()
        if generator is not None:
            generator.close()
