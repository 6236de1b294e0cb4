"""The plain local engine (target-only prefill + decode) and what every engine shares.

An engine turns a ``GenerateRequest`` into a stream of ``TokenDelta`` events followed by one
``GenerationDone`` carrying ``GenerationStats``.  Sampling goes through
``node.inference.sampling`` so the local and MTP engines sample the same distributions.
The decode loop overlaps host and device like mlx-lm's ``generate_step``: step n+1 is
queued with ``mx.async_eval`` before step n's token is read back.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from node.inference import forward
from node.inference.events import FinishReason, GenerationDone, GenerationEvent, TokenDelta
from node.inference.loading import LoadedModel
from node.inference.requests import GenerateRequest, check_against_model, prompt_token_ids
from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    greedy_tokens,
    processed_logprobs,
    sample_tokens,
)
from node.inference.stats import GenerationStats, StageStats, acceptance_rate, mean_k, rate

# Prompt tokens per prefill forward: bounds activation memory and graph size.
PREFILL_CHUNK = 512


def prefill(
    model: Any,
    ids: list[int],
    cache: list[Any],
    chunk: int | None = None,
    on_chunk: Callable[[mx.array, int, int], None] | None = None,
) -> mx.array:
    """Run the prompt through the target once, in chunks; return the last hidden [1, 1, D].

    ``on_chunk(hidden, start, end)`` sees each chunk's post-final-norm hidden states (the MTP
    engine fills its head's cache there, in the same pass).
    """
    chunk = chunk or PREFILL_CHUNK
    hidden = None
    for start in range(0, len(ids), chunk):
        end = min(start + chunk, len(ids))
        hidden = forward.hidden_states(model, mx.array(ids[start:end])[None], cache)
        if on_chunk is not None:
            on_chunk(hidden, start, end)
        if end < len(ids):
            mx.eval([c.state for c in cache], hidden)
    assert hidden is not None
    return hidden[:, -1:, :]


def history_tail(history: list[int], params: SamplingParams) -> list[int]:
    """The trailing tokens the penalties can see; none when the request has no penalties."""
    if not params.has_penalties:
        return []
    return history[-params.max_context_size :]


def next_token(logits: mx.array, params: SamplingParams, history: Any, keys: KeyStream) -> mx.array:
    """One token [1] from logits [1, V] through the request's processing (lazy)."""
    lp = processed_logprobs(logits, params, history)
    return greedy_tokens(lp) if params.is_greedy else sample_tokens(lp, keys.next())


@dataclass
class OutputTracker:
    """Collects emitted tokens, stops at EOS / max_tokens / context, streams text deltas."""

    tokenizer: Any
    eos_ids: set[int]
    max_tokens: int
    room: int  # tokens the context still has for generation
    tokens: list[int] = field(default_factory=list)
    generated: int = 0  # tokens produced, the EOS included
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        # A private detokenizer: the wrapper's one is shared by every request.
        self._detok = copy.copy(self.tokenizer.detokenizer)
        self._detok.reset()
        self._text: list[str] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return min(self.max_tokens - self.generated, self.room - self.generated)

    def add(self, new_tokens: list[int]) -> TokenDelta | None:
        emitted: list[int] = []
        for token in new_tokens:
            if self.done:
                break
            self.generated += 1
            if token in self.eos_ids:
                self.finish_reason = "stop"
                break
            emitted.append(token)
            self._detok.add_token(token)
            if self.generated >= self.max_tokens or self.generated >= self.room:
                self.finish_reason = "length"
        if self.done:
            self._detok.finalize()
        if not emitted and not self.done:
            return None
        self.tokens.extend(emitted)
        text = self._detok.last_segment
        self._text.append(text)
        return TokenDelta(text=text, token_ids=emitted)

    @property
    def text(self) -> str:
        return "".join(self._text)


@dataclass
class PreparedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    output: OutputTracker


def prepare_request(
    loaded: LoadedModel,
    request: GenerateRequest,
    max_k: int | None,
    context_tokens: int | None = None,
) -> PreparedRequest:
    """Tokenize and validate against the model; raises ``RequestError`` naming the value.

    ``context_tokens`` is the instance's memory budget per sequence (the launch's context):
    generation stops there ("length") as it does at the model's own context."""
    ids = prompt_token_ids(request, loaded.tokenizer)
    check_against_model(
        request,
        ids,
        vocab_size=loaded.vocab_size,
        context_length=loaded.context_length,
        max_k=max_k,
    )
    output = OutputTracker(
        tokenizer=loaded.tokenizer,
        eos_ids=set() if request.ignore_eos else loaded.eos_token_ids,
        max_tokens=request.max_tokens,
        room=min(loaded.context_length, context_tokens or loaded.context_length) - len(ids),
    )
    return PreparedRequest(prompt_ids=ids, params=request.sampling, output=output)


@dataclass
class Clock:
    """Wall-clock marks of one request."""

    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    end: float | None = None

    def mark_first_token(self) -> None:
        self.first_token = time.perf_counter()

    def mark_end(self) -> None:
        self.end = time.perf_counter()


def generation_done(
    engine: str,
    reason: str,
    loaded: LoadedModel,
    prepared: PreparedRequest,
    clock: Clock,
    *,
    k_counts: list[int] | None = None,
    proposed: int = 0,
    accepted: int = 0,
    cached_prompt_tokens: int = 0,
) -> GenerationDone:
    """The final event of a finished request: its output and stats. Every local engine,
    batched or not, ends here. ``k_counts``: native MTP's K histogram (its mean is
    ``num_draft_tokens``); ``proposed``/``accepted``: its draft counts."""
    output = prepared.output
    assert output.finish_reason is not None
    first = clock.first_token or clock.start
    end = clock.end or first
    generated = output.generated
    stats = GenerationStats(
        engine=engine,  # type: ignore[arg-type]
        engine_reason=reason,
        drafter_kind="native_mtp" if engine == "native_mtp" else None,
        num_draft_tokens=mean_k(k_counts or []),
        draft_k_histogram=k_counts or [],
        proposed_draft_tokens=proposed,
        accepted_draft_tokens=accepted,
        acceptance_rate=acceptance_rate(accepted, proposed),
        prompt_tokens=len(prepared.prompt_ids),
        cached_prompt_tokens=cached_prompt_tokens,
        generation_tokens=generated,
        prompt_tps=rate(len(prepared.prompt_ids), first - clock.start),
        # The first token comes out of prefill; decode speed counts the ones after it.
        generation_tps=rate(max(generated - 1, 0), end - first),
        stages=[StageStats(node_id="local", start_layer=0, end_layer=loaded.num_layers)],
    )
    return GenerationDone(
        text=output.text, token_ids=output.tokens, finish_reason=output.finish_reason, stats=stats
    )


class LocalEngine:
    """Target-only generation on one node."""

    kind = "local"

    def __init__(self, loaded: LoadedModel, reason: str = "local") -> None:
        self.loaded = loaded
        self.reason = reason

    def generate(
        self, request: GenerateRequest, reason: str | None = None
    ) -> Iterator[GenerationEvent]:
        loaded, model = self.loaded, self.loaded.model
        prepared = prepare_request(loaded, request, max_k=None)
        params, output = prepared.params, prepared.output
        keys = KeyStream(params.seed)
        history = list(prepared.prompt_ids)
        clock = Clock()

        cache = model.make_cache()
        hidden = prefill(model, prepared.prompt_ids, cache)

        def step(token: mx.array) -> mx.array:
            h = forward.hidden_states(model, token.reshape(1, 1), cache)
            hist: Any = []
            if params.has_penalties:
                tail = mx.array(history_tail(history, params), dtype=mx.int32)
                hist = mx.concatenate([tail, token.astype(mx.int32)])
            return next_token(forward.logits(model, h[:, -1, :]), params, hist, keys)

        token = next_token(
            forward.logits(model, hidden[:, -1, :]), params, history_tail(history, params), keys
        )
        mx.async_eval(token)
        first = True
        while True:
            upcoming = step(token) if output.remaining > 1 else None
            if upcoming is not None:
                mx.async_eval(upcoming)
            value = int(token.item())
            if first:
                clock.mark_first_token()
                first = False
            history.append(value)
            delta = output.add([value])
            if delta is not None:
                yield delta
            if output.done or upcoming is None:
                break
            token = upcoming
        if output.finish_reason is None:
            output.finish_reason = "length"
        clock.mark_end()
        yield generation_done("local", reason or self.reason, loaded, prepared, clock)
