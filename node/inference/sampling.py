"""Request sampling parameters and the exact distribution mlx-lm would sample from.

mlx-lm's `generate_step` turns a row of logits into a token in three stages, and this module
reproduces each one with the same MLX ops in the same order, vectorized over N positions:

1. logits processors (`make_logits_processors`), each given `tokens` = prompt + generated tokens:
   logit bias (additive), repetition penalty (sign-aware multiplicative, once per distinct token in
   the last `repetition_context_size` tokens), presence penalty (subtracted once per distinct token)
   and frequency penalty (subtracted once per occurrence), both over the last
   `penalty_context_size` tokens;
2. `logprobs = logits - logsumexp(logits)` (greedy: stages 1-2 in the logits' dtype, as mlx-lm);
3. the sampler (`make_sampler`): temperature 0 is argmax of the logprobs and ignores every filter;
   otherwise top_p, then min_p, then top_k mask the *untempered* logprobs to -inf (no
   renormalization in between), and `categorical(masked * (1 / temp))` draws the token.

`processed_logprobs` returns log-softmax of what stage 3 samples from, which is what speculative
decoding needs as p (target) and q (draft). Everything here is lazy MLX maths: no host syncs.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import mlx.core as mx
from pydantic import BaseModel, ConfigDict, Field, field_validator

_NEG_INF = -float("inf")


class SamplingParams(BaseModel):
    """A request's sampling options; invalid values raise pydantic's ValidationError (a ValueError)
    naming the field and the value."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.0, ge=0.0)  # 0 → greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1 → off
    top_k: int = Field(0, ge=0)  # 0 → off
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # 0 → off
    repetition_penalty: float = Field(1.0, gt=0.0)  # 1 → off
    repetition_context_size: int = Field(20, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # mlx-lm has presence_context_size and frequency_context_size; both are this one value here.
    penalty_context_size: int = Field(20, ge=1)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    seed: int | None = Field(None, ge=0, lt=2**64)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_not_negative(cls, bias: dict[int, float]) -> dict[int, float]:
        negative = [token for token in bias if token < 0]
        if negative:
            raise ValueError(f"logit_bias token id {negative[0]} is negative")
        return bias

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def max_context_size(self) -> int:
        """How many trailing history tokens the penalties can look at."""
        return max(self.repetition_context_size, self.penalty_context_size)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError when a value only makes sense for a larger vocabulary."""
        for token in self.logit_bias:
            if token >= vocab_size:
                raise ValueError(
                    f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})"
                )
        if self.top_k >= vocab_size:
            raise ValueError(
                f"top_k={self.top_k} must be smaller than the vocabulary size {vocab_size}"
            )


def request_key(seed: int | None) -> mx.array:
    """The root PRNG key of a request: reproducible for a seed, fresh entropy otherwise."""
    return mx.random.key(secrets.randbits(63) if seed is None else seed)


class KeyStream:
    """Independent subkeys of one root key, in a reproducible order (lazy, no syncs).

    Subkey i is the key of the request's i-th sampled token: ``next()`` hands them out in
    order (the local engine and a pipeline's last stage draw one per token), ``at(i)`` by
    position (seeded native MTP samples a whole verify window at once and re-draws a rejected
    position with its own key next cycle). Both walk the same chain, so a position's key never
    depends on which engine asked for it."""

    def __init__(self, seed: int | None) -> None:
        self._key = request_key(seed)
        self._keys: list[mx.array] = []  # subkeys of positions _first, _first + 1, ...
        self._first = 0
        self._drawn = 0  # next() hands out position _drawn

    def at(self, position: int) -> mx.array:
        if position < self._first:
            raise ValueError(f"key of position {position} was already forgotten")
        while self._first + len(self._keys) <= position:
            keys = mx.random.split(self._key)
            self._key = keys[0]
            self._keys.append(keys[1])
        return self._keys[position - self._first]

    def next(self) -> mx.array:
        key = self.at(self._drawn)
        self._drawn += 1
        self.forget_before(self._drawn)
        return key

    def forget_before(self, position: int) -> None:
        """Positions below ``position`` will not be asked for again (their tokens are out)."""
        drop = min(max(position - self._first, 0), len(self._keys))
        del self._keys[:drop]
        self._first += drop


def processed_logits(
    logits: mx.array,
    params: SamplingParams,
    history: mx.array | Sequence[int],
    drafts: mx.array | Sequence[int] | None = None,
) -> mx.array:
    """Logits [N, V] after mlx-lm's logits processors (logit bias, repetition, presence and
    frequency penalties), row i conditioned on `history ++ drafts[:i]`; in the logits' own dtype
    for greedy params, float32 when sampling.

    Greedy drafts only need this: in float32 normalizing does not move the argmax, so these rows
    can go straight to `greedy_tokens` and skip a log-softmax pass. (In bf16 it can, by rounding
    a near-tie into a tie: target tokens come from `processed_logprobs`, as in mlx-lm.)
    Arguments as for `processed_logprobs`.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    num_rows, vocab_size = logits.shape
    params.check_vocab(vocab_size)
    history = _as_tokens(history)
    drafts = _as_tokens(drafts if drafts is not None else [])
    if drafts.size != num_rows - 1:
        raise ValueError(f"{num_rows} logits rows need {num_rows - 1} drafts, got {drafts.size}")

    if not params.is_greedy:
        # Sampling needs an accurate distribution (and the p/q ratios of speculative acceptance).
        # Greedy instead runs mlx-lm's ops in the model's dtype, as generate_step does: in bf16 a
        # near-tie can round to an exact tie that argmax breaks by the lower token id, and only
        # the same roundings give stock mlx-lm's tokens (bf16 matrix: docs/exactness.md).
        logits = logits.astype(mx.float32)
    if params.logit_bias:
        indices = mx.array(list(params.logit_bias.keys()), dtype=mx.int32)
        values = mx.array(list(params.logit_bias.values()), dtype=mx.float32)
        logits = logits.at[:, indices].add(values)
    if params.has_penalties:
        logits = _apply_penalties(logits, params, history, drafts)
    return logits


def processed_logprobs(
    logits: mx.array,
    params: SamplingParams,
    history: mx.array | Sequence[int],
    drafts: mx.array | Sequence[int] | None = None,
) -> mx.array:
    """Log-probabilities [N, V] of the distribution mlx-lm would sample from at N positions.

    Row i is processed as if the tokens so far were `history ++ drafts[:i]`; `history` is exactly
    the `tokens` mlx-lm hands its logits processors (prompt + generated tokens) and `drafts` has
    N - 1 entries (None or empty when N == 1). Filtered tokens get -inf. For greedy params the
    result is the penalized, biased log-softmax (temperature and filters do not apply to argmax).
    Token ids in `history`/`drafts` must be inside the vocabulary (not checked: it would sync).
    """
    logits = processed_logits(logits, params, history, drafts)
    if params.is_greedy:
        return _log_softmax(logits)
    if params.top_p == 1.0 and params.min_p == 0.0 and params.top_k == 0:
        # Temperature only: log_softmax((l - lse(l)) / T) == log_softmax(l / T), and no filter
        # threshold depends on the rounding of the first normalization, so skip that pass.
        return _log_softmax(logits * (1.0 / params.temperature))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if params.top_p < 1.0:
        logprobs = _apply_top_p(logprobs, params.top_p)
    if params.min_p != 0.0:
        logprobs = _apply_min_p(logprobs, params.min_p)
    if params.top_k > 0:
        logprobs = _apply_top_k(logprobs, params.top_k)
    return _log_softmax(logprobs * (1.0 / params.temperature))


def greedy_tokens(logprobs: mx.array) -> mx.array:
    """Argmax per row: [N, V] → [N]."""
    return mx.argmax(logprobs, axis=-1)


def sample_tokens(logprobs: mx.array, key: mx.array) -> mx.array:
    """One categorical draw per row: [N, V] → [N] (-inf entries are never drawn).

    Gumbel-max with the noise written out (``position_noise``), not ``mx.random.categorical``:
    the same key must give the same noise whether a token is drawn alone ([1, V], the local
    engine) or as one row of a verify window (seeded native MTP, ``acceptance.coupled_accept``),
    and categorical's noise depends on the input's shape. Same distribution either way."""
    return mx.argmax(logprobs + position_noise(key, logprobs.shape), axis=-1)


def position_noise(key: mx.array, shape: tuple[int, ...] | Sequence[int]) -> mx.array:
    """Standard Gumbel noise of ``shape`` [N, V] drawn from ``key`` (float32)."""
    return mx.random.gumbel(shape=tuple(shape), key=key)


def draft_token(
    mtp_logits: mx.array,
    params: SamplingParams,
    history: mx.array | Sequence[int],
    key: mx.array | None,
) -> tuple[mx.array, mx.array]:
    """Draw one draft from MTP logits [1, V] → (token [] uint32, processed logprobs [V]).

    `history` must end with every token before the drafted position (earlier drafts included), so
    the draft's penalties match the target row that will verify it. The returned logprobs row is
    the q that `speculative_accept` needs. Greedy: argmax, `key` may be None. Lazy, no syncs.
    `mtp_logits` may be any shape holding one row ([V], [1, V], [1, 1, V]).
    """
    vocab_size = mtp_logits.shape[-1]
    if mtp_logits.size != vocab_size:
        raise ValueError(
            f"draft_token takes one row of logits, got shape {tuple(mtp_logits.shape)}"
        )
    mtp_logits = mtp_logits.reshape(1, vocab_size)
    if params.is_greedy:
        # argmax of the unnormalized logits: the log-softmax row stays lazy and costs nothing
        # unless the caller evaluates it.
        logits = processed_logits(mtp_logits, params, history)
        return greedy_tokens(logits)[0], _log_softmax(logits)[0]
    if key is None:
        raise ValueError("sampling a draft with temperature > 0 needs a PRNG key")
    logprobs = processed_logprobs(mtp_logits, params, history)
    return sample_tokens(logprobs, key)[0], logprobs[0]


def _log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _as_tokens(tokens: mx.array | Sequence[int]) -> mx.array:
    if isinstance(tokens, mx.array):
        return tokens.reshape(-1).astype(mx.int32)
    return mx.array(list(tokens), dtype=mx.int32)


def _apply_penalties(
    logits: mx.array, params: SamplingParams, history: mx.array, drafts: mx.array
) -> mx.array:
    num_rows = logits.shape[0]
    if history.size == 0:
        # mlx-lm skips processors while `tokens` is empty; only the first row can see no tokens.
        if num_rows == 1:
            return logits
        rest = _apply_penalties(logits[1:], params, drafts[:1], drafts[1:])
        return mx.concatenate([logits[:1], rest], axis=0)
    # Only the trailing window can matter; slicing keeps the concat cheap for long prompts.
    tail = history[-params.max_context_size :]
    tokens = mx.concatenate([tail, drafts]) if drafts.size else tail

    if params.repetition_penalty != 1.0:
        window, _ = _row_windows(tokens, tail.size, num_rows, params.repetition_context_size)
        selected = mx.take_along_axis(logits, window, axis=-1)
        penalty = params.repetition_penalty
        selected = mx.where(selected < 0, selected * penalty, selected / penalty)
        # Duplicate ids write identical values, as in mlx-lm's `logits[:, tokens] = ...`.
        logits = mx.put_along_axis(logits, window, selected, axis=-1)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        window, valid = _row_windows(tokens, tail.size, num_rows, params.penalty_context_size)
        if params.presence_penalty != 0.0:
            selected = mx.take_along_axis(logits, window, axis=-1) - params.presence_penalty
            logits = mx.put_along_axis(logits, window, selected, axis=-1)
        if params.frequency_penalty != 0.0:
            # Scatter-subtract accumulates over duplicates like mlx-lm's `.at[...].subtract`;
            # padding slots subtract 0.
            rows = mx.broadcast_to(mx.arange(num_rows)[:, None], window.shape)
            amounts = valid.astype(mx.float32) * params.frequency_penalty
            logits = logits.at[rows, window].subtract(amounts)
    return logits


def _row_windows(
    tokens: mx.array, history_len: int, num_rows: int, context_size: int
) -> tuple[mx.array, mx.array]:
    """Token ids [N, W] of each row's last `context_size` tokens, plus which slots are real.

    Row i sees tokens[:history_len + i]. A row with fewer than W tokens pads with position 0,
    which is then inside its window (history_len >= 1), so set-like penalties see a duplicate
    and count-like ones mask it out with `valid`.
    """
    width = min(context_size, history_len + num_rows - 1)
    ends = history_len + mx.arange(num_rows)[:, None]
    positions = ends - width + mx.arange(width)[None, :]
    valid = positions >= 0
    return mx.take(tokens, mx.maximum(positions, 0)), valid


# The filters below are mlx-lm's (sample_utils.apply_top_p / apply_min_p / apply_top_k), the same
# ops in the same order so thresholds and ties resolve identically; they work on [N, V].


def _apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    sorted_logprobs = mx.sort(logprobs, axis=-1)
    sorted_probs = mx.exp(sorted_logprobs)
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    total_mass = mass_above[..., :1] + sorted_probs[..., :1]
    num_dropped = (mass_above >= top_p * total_mass).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logprobs, num_dropped, axis=-1)
    return mx.where(logprobs < threshold, _NEG_INF, logprobs)


def _apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    top_logprobs = mx.max(logprobs, axis=-1, keepdims=True)
    threshold = top_logprobs + math.log(min_p)
    return mx.where(logprobs < threshold, _NEG_INF, logprobs)


def _apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    mask_idx = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logprobs, mask_idx, mx.array(_NEG_INF, logprobs.dtype), axis=-1)
