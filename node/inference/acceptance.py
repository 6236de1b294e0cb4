"""The speculative-decoding acceptance rule, exact for greedy and for sampling.

Sampling (Leviathan et al. 2023, Chen et al. 2023): draft d_i was drawn from q_i; accept it with
probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw the correction from
normalize(max(p_i - q_i, 0)); when all K drafts pass draw a bonus token from p_K. Every emitted
token is then distributed exactly as p, where p and q are the *processed* distributions
(`sampling.processed_logprobs`) — so temperature, top_p/top_k/min_p and penalties carry over.

Seeded sampling (`coupled_accept_batch`): every position j has its own key (the request's key
stream), the target's token at j is the Gumbel-max draw argmax(log p_j + g_j) with that key's
noise, and the draft for j is drawn with the *same* noise from q_j. A draft passes iff it equals
the target's draw; at the first mismatch the target's draw is emitted. Every emitted token is
then the target's own draw for its position — exactly distributed as p, and the same token the
local engine draws with that seed, whatever K was, so a seed reproduces the text at every K,
batch and engine. The price: fewer drafts pass than under the ratio rule (a coupling through
shared noise agrees less often than the optimal one), so unseeded requests keep the ratio rule.

The batch functions are lazy MLX maths over [B, ...]; `speculative_accept` wraps them for one
sequence and performs the only host sync (one `.tolist()`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import mlx.core as mx

from node.inference.sampling import SamplingParams

Rule = Literal["greedy", "coupled", "ratio"]


def rule_for(params: SamplingParams) -> Rule:
    """The acceptance rule of a request: greedy at temperature 0; with a seed, the coupled rule
    (the seed reproduces the text at every K); otherwise the ratio rule (more drafts pass)."""
    if params.is_greedy:
        return "greedy"
    return "coupled" if params.seed is not None else "ratio"


def speculative_accept(
    target_logprobs: mx.array,
    draft_logprobs: mx.array | None,
    drafts: mx.array | Sequence[int],
    params: SamplingParams,
    key: mx.array | None,
) -> tuple[int, int]:
    """Verify K drafts of one sequence → (num_accepted, next_token). One device→host sync.

    target_logprobs [K+1, V]: processed target distributions, row i conditioned on
    history ++ drafts[:i]. draft_logprobs [K, V]: the processed distributions the drafts were
    sampled from (ignored, may be None, for greedy params). drafts [K]. `next_token` is the
    correction at the first rejected position, or the bonus token from row K when all pass.
    Greedy only takes row-wise argmaxes, so `sampling.processed_logits` rows (unnormalized, one
    log-softmax pass cheaper) work as well as processed log-probs.
    """
    drafts = _as_drafts(drafts)
    num_drafts = drafts.size
    if target_logprobs.ndim != 2 or target_logprobs.shape[0] != num_drafts + 1:
        raise ValueError(
            f"target_logprobs must be [K+1, V] for K={num_drafts} drafts, "
            f"got shape {tuple(target_logprobs.shape)}"
        )
    if params.is_greedy:
        accepted, next_token = greedy_accept_batch(target_logprobs[None], drafts[None])
    else:
        if key is None or (draft_logprobs is None and num_drafts > 0):
            raise ValueError("sampling acceptance needs the draft logprobs and a PRNG key")
        expected = (num_drafts, target_logprobs.shape[1])
        if draft_logprobs is not None and tuple(draft_logprobs.shape) != expected:
            raise ValueError(
                f"draft_logprobs must be [K, V] = {list(expected)}, "
                f"got shape {tuple(draft_logprobs.shape)}"
            )
        accepted, next_token = sampled_accept_batch(
            target_logprobs[None],
            None if draft_logprobs is None else draft_logprobs[None],
            drafts[None],
            key,
        )
    result = mx.concatenate([accepted.astype(mx.int64), next_token.astype(mx.int64)])
    num_accepted, token = result.tolist()
    return num_accepted, token


def greedy_accept_batch(target_logprobs: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    """[B, K+1, V], [B, K] → (num_accepted [B], next_token [B]): a draft passes only if it is the
    target's argmax; the next token is the argmax of the first failing row (row K if none)."""
    best = mx.argmax(target_logprobs, axis=-1)  # [B, K+1]
    num_drafts = drafts.shape[-1]
    matches = (best[:, :num_drafts] == drafts.astype(best.dtype)).astype(mx.int32)
    accepted = mx.cumprod(matches, axis=-1).sum(axis=-1)
    next_token = mx.take_along_axis(best, accepted[:, None], axis=-1)[:, 0]
    return accepted, next_token


def coupled_accept_batch(
    target_logprobs: mx.array, drafts: mx.array, noise: mx.array
) -> tuple[mx.array, mx.array]:
    """Seeded sampling: [B, K+1, V] target logprobs, [B, K] drafts, [B, K+1, V] the Gumbel noise
    of each row's position (`sampling.position_noise` of that position's key) → (num_accepted
    [B], next_token [B]), lazy. The drafts must have been drawn with the same noise rows
    (`sampling.sample_tokens` with those keys); then this is the greedy rule on the perturbed
    logprobs, and every emitted token is the target's own draw for its position."""
    if noise.shape != target_logprobs.shape:
        raise ValueError(
            f"noise must match the target logprobs {tuple(target_logprobs.shape)}, "
            f"got {tuple(noise.shape)}"
        )
    return greedy_accept_batch(target_logprobs + noise, drafts)


def sampled_accept_batch(
    target_logprobs: mx.array, draft_logprobs: mx.array | None, drafts: mx.array, key: mx.array
) -> tuple[mx.array, mx.array]:
    """[B, K+1, V], [B, K, V], [B, K], key → (num_accepted [B], next_token [B]), lazy.
    With K = 0 it just samples row 0, and `draft_logprobs` may be None."""
    batch, num_rows, _ = target_logprobs.shape
    num_drafts = num_rows - 1
    accept_key, token_key = mx.random.split(key)
    if num_drafts == 0:
        accepted = mx.zeros((batch,), dtype=mx.int32)
        return accepted, mx.random.categorical(target_logprobs[:, 0], key=token_key)

    if draft_logprobs is None:
        raise ValueError(f"{num_drafts} drafts need their draft logprobs")
    log_p, log_q = draft_token_logprobs(target_logprobs, draft_logprobs, drafts)
    # u < p/q  ⇔  log u + log q < log p. With q(d) = 0 (impossible for a sampled draft) this
    # accepts iff p(d) > 0; a token p filtered out (log p = -inf) is never accepted.
    log_u = mx.log(mx.random.uniform(shape=(batch, num_drafts), key=accept_key))
    passes = (log_u + log_q < log_p).astype(mx.int32)
    accepted = mx.cumprod(passes, axis=-1).sum(axis=-1)  # [B], in [0, K]
    next_logits = next_token_logits(target_logprobs, draft_logprobs, accepted)
    next_token = mx.random.categorical(next_logits, axis=-1, key=token_key)
    return accepted, next_token


def draft_token_logprobs(
    target_logprobs: mx.array, draft_logprobs: mx.array, drafts: mx.array
) -> tuple[mx.array, mx.array]:
    """(log p_i(d_i), log q_i(d_i)), each [B, K]: the two sides of the acceptance test."""
    num_drafts = drafts.shape[-1]
    index = drafts.astype(mx.int32)[..., None]
    log_p = mx.take_along_axis(target_logprobs[:, :num_drafts], index, axis=-1)[..., 0]
    log_q = mx.take_along_axis(draft_logprobs, index, axis=-1)[..., 0]
    return log_p, log_q


def next_token_logits(
    target_logprobs: mx.array, draft_logprobs: mx.array, accepted: mx.array
) -> mx.array:
    """Unnormalized log-weights [B, V] of the token emitted after `accepted` [B] drafts passed:
    log max(p_n - q_n, 0) after a rejection at row n, p_K after full acceptance."""
    num_drafts = draft_logprobs.shape[1]
    rows = accepted.astype(mx.int32)[:, None, None]
    p_row = mx.take_along_axis(target_logprobs, rows, axis=1)[:, 0]  # [B, V]
    # Clamp keeps the gather in range when all K passed; that row's residual is not used.
    q_row = mx.take_along_axis(draft_logprobs, mx.minimum(rows, num_drafts - 1), axis=1)[:, 0]
    residual = mx.maximum(mx.exp(p_row) - mx.exp(q_row), 0.0)
    # The residual can only be empty when p <= q everywhere, i.e. p == q up to rounding; then a
    # rejection has probability ~0 and p itself is the right distribution to fall back on.
    use_p = (accepted == num_drafts)[:, None] | (residual.sum(axis=-1, keepdims=True) <= 0.0)
    return mx.where(use_p, p_row, mx.log(residual))


def _as_drafts(drafts: mx.array | Sequence[int]) -> mx.array:
    if isinstance(drafts, mx.array):
        return drafts.reshape(-1).astype(mx.int32)
    return mx.array(list(drafts), dtype=mx.int32)
