"""Native-MTP speculative decoding with the checkpoint's own MTP head (single node).

Cache bookkeeping.  With ``x`` the token sequence and ``h_j`` the target's post-final-norm
hidden at position j, the MTP head's KV cache holds one entry per pair ``(h_j, x_{j+1})``.
A cycle starts with ``L`` tokens in the target caches, ``last = x_L`` emitted but not yet
fed, and ``pending`` = the pairs not yet in the MTP cache (it always ends with
``(h_{L-1}, last)``):

1. draft: the head runs over ``pending`` (refilling its cache with true target hiddens),
   its last output gives d1; K-1 chained steps feed the head its own output and the previous
   draft;
2. verify: one target forward over ``[last, d1..dK]`` keeping each position's GatedDeltaNet
   state (``gdn.verify_forward``);
3. accept: the sampling module's rule gives ``n`` accepted drafts and one correction/bonus
   token ``c`` — one host sync per cycle reads ``n``, ``c`` and the drafts;
4. roll back: attention caches trim the K-n rejected positions, linear layers commit the
   state after ``n+1`` tokens, the MTP cache drops its K-1 chained entries, and
   ``pending`` becomes ``(h_L..h_{L+n}, d1..dn, c)``.

A K = 0 cycle is a plain decode step: the head does not run, and the new pair is appended to
``pending`` (fed to the head by the next drafting cycle in one forward, or flushed once
``PENDING_LIMIT`` pairs wait), so stretches the policy does not draft cost what target-only
decode costs.  K may change from one cycle to the next: every cycle starts from the same
invariant whatever K the previous one used.

K per cycle (``node.inference.mtp.kpolicy``): unless the request pins ``mtp_k``, a
``KPolicy`` chooses each cycle's K from the request's running per-depth acceptance and the
engine's cost table (measured on first use, ``node.inference.mtp.costs``, and refreshed with
every cycle's measured seconds), starting at the card's ``default_k``.

Prefill runs the prompt through the target once (chunked); each chunk's hidden states feed
the head's cache in the same pass, pairing ``h_i`` with prompt token ``i+1``.

Rollback method, chosen by measurement (scripts/bench_mtp.py; BENCHMARKS.md "Native MTP"):
keep every position's recurrent state during verification and commit the accepted one
("capture"), rather than snapshot the linear caches and replay the accepted prefix through
the target ("replay").  Capture costs nothing extra — the per-step states are intermediate
values of the recurrence anyway, and the conv state after n tokens is a slice of the conv
input — while replay pays one more target forward of n+1 tokens on every cycle with a
rejection.  Measured on a 286M fp32 qwen3_5 (2 CPU cores, OpenBLAS, ~87% per-draft
acceptance): K=2 1.97x (capture) vs 1.81x (replay) over target-only decode, K=4 2.70x vs
2.24x; cost-model efficiency 0.94-1.02 vs 0.78-0.94.  Both are exact;
``rollback="replay"`` stays available for comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import mlx.core as mx

from node.inference import acceptance, forward
from node.inference.acceptance import (
    coupled_accept_batch,
    greedy_accept_batch,
    sampled_accept_batch,
)
from node.inference.engine import (
    Clock,
    generation_done,
    history_tail,
    next_token,
    prefill,
    prepare_request,
)
from node.inference.events import GenerationEvent
from node.inference.loading import LoadedModel
from node.inference.mtp.costs import measure_costs
from node.inference.mtp.gdn import commit_verified, verify_forward
from node.inference.mtp.head import MtpHead
from node.inference.mtp.kpolicy import CostTable, KPolicy
from node.inference.requests import GenerateRequest
from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    draft_token,
    position_noise,
    processed_logprobs,
)

Rollback = Literal["capture", "replay"]

# Pairs a run of K = 0 cycles may leave for the head before they are fed to it: bounds the
# memory they hold and the size of the head forward that catches up.
PENDING_LIMIT = 64


class MtpEngine:
    """Speculative decoding drafted by the checkpoint's MTP head."""

    kind = "native_mtp"

    def __init__(
        self,
        loaded: LoadedModel,
        head: MtpHead | None = None,
        reason: str = "native_mtp",
        rollback: Rollback = "capture",
        costs: CostTable | None = None,
        fixed_k: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.loaded = loaded
        self.head = head if head is not None else loaded.mtp_head()
        self.reason = reason
        self.rollback = rollback
        self._costs = costs
        # Every request at this K, 0 included (benchmarks compare the policy with fixed K;
        # requests can pin K >= 1 with mtp_k).
        self.fixed_k = fixed_k
        # What cycles and the cost table are timed with (see costs.measure_costs).
        self.clock = clock
        # The K the policy chose for the latest cycle of any request (status shows it).
        self.current_k: int | None = None

    def cost_table(self) -> CostTable:
        """The instance's cost table, measured on first use (a few timed forwards)."""
        if self._costs is None:
            self._costs = measure_costs(
                self.loaded, self.head, self.loaded.mtp_k_limits[1], clock=self.clock
            )
        return self._costs

    def generate(
        self, request: GenerateRequest, reason: str | None = None
    ) -> Iterator[GenerationEvent]:
        loaded = self.loaded
        default_k, max_k = loaded.mtp_k_limits
        prepared = prepare_request(loaded, request, max_k=max_k)
        pin = self.fixed_k if self.fixed_k is not None else request.mtp_k
        policy = KPolicy(max_k=max_k, start_k=default_k, pin=pin)
        costs = self.cost_table() if pin is None else None
        run = _MtpRun(self, prepared.params, list(prepared.prompt_ids), self.rollback)
        output = prepared.output
        clock = Clock()
        # Cycles per K chosen (by the policy or the pin); the last cycles of a request may
        # draft fewer, and proposed_draft_tokens counts what was drafted.
        k_counts = [0] * (max_k + 1)

        first = run.start()
        clock.mark_first_token()
        delta = output.add([first])
        if delta is not None:
            yield delta
        while not output.done:
            chosen = policy.next_k(costs)
            k_counts[chosen] += 1
            self.current_k = chosen
            # Never draft past the last token the request may still emit.
            k = min(chosen, output.remaining - 1)
            start = self.clock()
            emitted = run.cycle(k)
            if costs is not None:
                costs.observe(1, k, self.clock() - start)
            policy.observe(k, len(emitted) - 1)
            delta = output.add(emitted)
            if delta is not None:
                yield delta
        clock.mark_end()
        yield generation_done(
            "native_mtp",
            reason or self.reason,
            loaded,
            prepared,
            clock,
            k_counts=k_counts,
            proposed=run.proposed,
            accepted=run.accepted,
        )


class _MtpRun:
    """The caches and counters of one request."""

    def __init__(
        self, engine: MtpEngine, params: SamplingParams, history: list[int], rollback: Rollback
    ) -> None:
        self.model = engine.loaded.model
        self.head = engine.head
        self.params = params
        self.history = history  # every token so far: prompt + emitted
        self.rollback = rollback
        self.keys = KeyStream(params.seed)
        # A seed makes every position's token the target's own draw with that position's key
        # (acceptance.coupled_accept_batch): the same text as the local engine, at every K.
        self.seeded = acceptance.rule_for(params) == "coupled"
        self.prompt_len = len(history)
        self.cache = self.model.make_cache()
        self.mtp_cache = self.head.make_cache()
        self.proposed = 0
        self.accepted = 0
        # Pairs (h_j, x_{j+1}) not yet in the MTP cache: hidden [1, m, D], tokens [1, m].
        self.pending_hidden: mx.array | None = None
        self.pending_tokens: mx.array | None = None

    def _tail(self, extra: list[mx.array] | None = None) -> Any:
        tail = history_tail(self.history, self.params)
        if not extra or not self.params.has_penalties:
            return tail
        return mx.concatenate([mx.array(tail, dtype=mx.int32), *[e.reshape(1) for e in extra]])

    def _head(self, tokens: mx.array, hidden: mx.array) -> mx.array:
        return self.head(forward.embed(self.model, tokens), hidden, self.mtp_cache)

    def start(self) -> int:
        """Prefill target and MTP caches in one pass; return the first generated token."""
        ids = self.history
        n = len(ids)
        prompt = mx.array(ids)[None]

        def feed_head(hidden: mx.array, start: int, end: int) -> None:
            # Pairs (h_i, x_{i+1}) for the positions whose next token is in the prompt.
            stop = min(end, n - 1)
            if stop > start:
                self._head(prompt[:, start + 1 : stop + 1], hidden[:, : stop - start])
                if end < n:  # evaluate per chunk so a long prompt's hiddens are not all kept
                    mx.eval(self.mtp_cache.state)

        last_hidden = prefill(self.model, ids, self.cache, on_chunk=feed_head)
        logits = forward.logits(self.model, last_hidden[:, -1, :])
        token = next_token(logits, self.params, self._tail(), self.keys)
        mx.eval(token, self.mtp_cache.state)
        first = int(token.item())
        self.history.append(first)
        self.pending_hidden = last_hidden
        self.pending_tokens = mx.array([[first]])
        return first

    def cycle(self, k: int) -> list[int]:
        """Draft k tokens, verify, roll back; return the emitted tokens (1..k+1)."""
        assert self.pending_hidden is not None and self.pending_tokens is not None
        params = self.params
        last = self.pending_tokens[:, -1:]  # [1, 1]
        drafts: list[mx.array] = []
        draft_lps: list[mx.array] = []
        position = len(self.history) - self.prompt_len  # of the token after `last`
        if k == 0 and self.pending_tokens.shape[1] > PENDING_LIMIT:
            # Feed all but the newest pair (the invariant keeps one pending), now.
            self._head(self.pending_tokens[:, :-1], self.pending_hidden[:, :-1])
            mx.eval(self.mtp_cache.state)
            self.pending_tokens = self.pending_tokens[:, -1:]
            self.pending_hidden = self.pending_hidden[:, -1:]
        if k > 0:
            # The pending pairs go into the MTP cache; the last output drafts d1.
            x = self._head(self.pending_tokens, self.pending_hidden)[:, -1:, :]
            for s in range(k):
                if s > 0:
                    x = self._head(drafts[-1].reshape(1, 1), x)
                mtp_logits = forward.logits(self.model, x[:, -1, :])
                token, lp = draft_token(
                    mtp_logits, params, self._tail(drafts), self._draft_key(position + s)
                )
                drafts.append(token)
                draft_lps.append(lp)

        draft_ids = mx.stack(drafts).astype(mx.uint32) if drafts else mx.zeros((0,), mx.uint32)
        verify_ids = mx.concatenate([last.reshape(-1).astype(mx.uint32), draft_ids])[None]
        if k == 0:  # a plain decode step: nothing to roll back
            hidden = forward.hidden_states(self.model, verify_ids, self.cache)
        elif self.rollback == "capture":
            hidden, pending_gdn = verify_forward(
                forward.text_model(self.model), verify_ids, self.cache
            )
        else:
            snapshot = _snapshot_linear(self.cache)
            hidden = forward.hidden_states(self.model, verify_ids, self.cache)
        target_logits = forward.logits(self.model, hidden[0])  # [k+1, V]
        target_lp = processed_logprobs(target_logits, params, self._tail(), draft_ids)
        if params.is_greedy:
            n_acc, nxt = greedy_accept_batch(target_lp[None], draft_ids[None])
        elif self.seeded:
            vocab = target_lp.shape[-1]
            noise = mx.concatenate(
                [position_noise(self.keys.at(position + r), (1, vocab)) for r in range(k + 1)]
            )
            n_acc, nxt = coupled_accept_batch(target_lp[None], draft_ids[None], noise[None])
        else:
            draft_lp = mx.stack(draft_lps) if draft_lps else mx.zeros((0, target_lp.shape[-1]))
            n_acc, nxt = sampled_accept_batch(
                target_lp[None], draft_lp[None], draft_ids[None], self.keys.next()
            )
        result = mx.concatenate(
            [n_acc.astype(mx.int32), nxt.astype(mx.int32), draft_ids.astype(mx.int32)]
        )
        values = result.tolist()  # the one host sync of the cycle
        n, correction, proposed = values[0], values[1], values[2:]

        if k == 0:
            pass
        elif self.rollback == "capture":
            commit_verified(self.cache, pending_gdn, n + 1, k + 1)
        elif n < k:
            _restore_linear(self.cache, snapshot)
            for c in self.cache:
                if c.is_trimmable():
                    c.trim(k + 1)
            forward.hidden_states(self.model, verify_ids[:, : n + 1], self.cache)
        if k > 1:
            self.mtp_cache.trim(k - 1)

        emitted = [*proposed[:n], correction]
        if self.seeded:
            self.keys.forget_before(position + len(emitted))
        self.proposed += k
        self.accepted += n
        self.history.extend(emitted)
        if k == 0:  # the head did not run: the new pair waits behind the old ones
            self.pending_hidden = mx.concatenate([self.pending_hidden, hidden], axis=1)
            self.pending_tokens = mx.concatenate(
                [self.pending_tokens, mx.array([emitted], dtype=self.pending_tokens.dtype)],
                axis=1,
            )
        else:
            self.pending_hidden = hidden[:, : n + 1, :]
            self.pending_tokens = mx.array([emitted])
        return emitted

    def _draft_key(self, position: int) -> mx.array | None:
        if self.params.is_greedy:
            return None
        return self.keys.at(position) if self.seeded else self.keys.next()


def _snapshot_linear(cache: list[Any]) -> list[list[Any] | None]:
    # ArraysCache.cache is the live list the next forward rebinds: copy it.
    return [list(c.cache) if not c.is_trimmable() else None for c in cache]


def _restore_linear(cache: list[Any], snapshot: list[list[Any] | None]) -> None:
    for c, saved in zip(cache, snapshot, strict=True):
        if saved is not None:
            c.cache = list(saved)
