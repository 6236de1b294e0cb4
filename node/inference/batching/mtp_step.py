"""Batched native MTP: the sequences of a batch draft together and verify together.

One ``step()`` is one cycle of every sequence in the batch (``node.inference.mtp.engine``
describes a cycle and its cache bookkeeping for one sequence; this is the same cycle over B
rows):

1. draft: the MTP head runs once over every row's pending pairs (rows have 1..K+1 of them,
   right-padded to the longest), then K-1 chained [B, 1] steps;
2. verify: ONE target forward over ``[B, K+1]`` = each row's last token and its K drafts,
   keeping every position's GatedDeltaNet state (``gdn.verify_forward``);
3. accept: each row applies the acceptance rule (``node.inference.acceptance``) with its own
   sampling parameters, penalties, logit bias and key stream, to at most its own K drafts;
   one host sync per cycle reads every row's accepted count, correction and drafts;
4. roll back, per row: GatedDeltaNet conv and recurrent states commit the state after that
   row's ``n + 1`` tokens (a gather over rows), attention KV drops each row's rejected tail
   (below), the head's cache drops the K-1 chained entries, and the row's pending pairs
   become ``(h_L..h_{L+n}, d1..dn, c)``.

A K = 0 cycle is a plain batched decode step (``[B, 1]``, the head does not run; each row's
new pair waits in its pending list, as in the single-sequence engine). Its next step is
queued with ``mx.async_eval`` before this one's tokens are read back, as the local engine
does, so K = 0 stretches cost what plain batched decode costs.

KV rollback with left-padded batch caches (mlx-lm's ``BatchKVCache``: per-row left padding,
one shared write index). After verifying K+1 positions row r keeps ``n_r + 1`` of them. The
cache is trimmed uniformly to the longest kept prefix, then each row that kept less is rolled
right by the difference, which turns its rejected entries into more left padding
(``BatchKVCache.prepare(right_padding=...)`` + ``finalize()``, mlx-lm's own seam for
right-padded prompts: one gather per attention layer, and none at all in the common cycle
where every row accepted the same count). Why this and not per-row masks of "holes": the
result is again an ordinary left-padded cache, so mlx-lm's attention, masks and RoPE offsets
(per-row ``offset``) apply unchanged and exactly — each row's valid entries, positions and
order are what a single-sequence cache would hold; a hole mask would need our own attention
mask and a compaction pass anyway. Padding every row shares is dropped from the front
(``_drop_common_padding``), so the cache stays as long as its longest row. The head's
cache uses the same roll for the rows whose pending pairs were fewer than the longest.

Newcomers join between cycles. Newcomers whose whole prompt fits one chunk prefill together
in one right-padded forward (``_prefill_together``); a longer prompt runs alone through fresh
single-sequence caches (target and head, in the same pass), one chunk of ``prefill_chunk``
tokens per step, so the running rows wait at most one chunk. The prefilled caches are then
merged into the batch (``BatchKVCache.merge`` / ``extend``, ``ArraysCache.extend``). Leavers
free their rows (``filter``).

K per cycle: one K serves the whole batch (it shares the verify forward). Unpinned rows let
``kpolicy.BatchKPolicy`` choose it from every row's acceptance estimate and the cost table's
[B, K+1] costs (measured on the first unpinned request for batch sizes up to ``max_batch``,
refreshed from every cycle's seconds); K falls to 0 where drafting stops paying. A request's
explicit ``mtp_k`` pins its own K: the batch runs at the largest K any row wants (pinned rows' pins and the
policy's K for the rest) and each pinned row accepts at most its own K (its extra drafts cost
it nothing it would not pay anyway, they are simply not looked at). Every row also drafts at
most ``remaining - 1`` tokens. Per-request stats are as in the single engine: proposed and
accepted drafts, ``num_draft_tokens`` = the mean K of the row's cycles, and its K histogram.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache

from node.inference import acceptance, forward
from node.inference.acceptance import (
    coupled_accept_batch,
    greedy_accept_batch,
    sampled_accept_batch,
)
from node.inference.batching.scheduler import Sequence, StepOutput
from node.inference.batching.steps import BATCH_PREFILL_CHUNK
from node.inference.engine import (
    Clock,
    PreparedRequest,
    generation_done,
    history_tail,
    next_token,
    prepare_request,
)
from node.inference.loading import LoadedModel
from node.inference.mtp.costs import measure_costs
from node.inference.mtp.engine import PENDING_LIMIT
from node.inference.mtp.gdn import verify_forward
from node.inference.mtp.head import MtpHead
from node.inference.mtp.kpolicy import (
    AcceptanceEstimate,
    AcceptancePrior,
    BatchKPolicy,
    CostTable,
    CycleTimer,
)
from node.inference.prompt_cache import (
    PromptCache,
    Snapshot,
    store_snapshot,
    thaw,
    thaw_extras,
)
from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    draft_token,
    position_noise,
    processed_logprobs,
    sample_tokens,
)
from node.logging import get_logger

log = get_logger(__name__)


@dataclass(eq=False)
class _Row:
    """One sequence of the batch: its request, caches while it prefills, and counters."""

    seq: Sequence
    prepared: PreparedRequest
    pin: int | None
    keys: KeyStream
    history: list[int]
    clock: Clock = field(default_factory=Clock)
    estimate: AcceptanceEstimate | None = None
    # Prefill (before the row joins the batch caches): single-sequence caches and progress.
    cache: list[Any] | None = None
    mtp_cache: KVCache | None = None
    prefilled: int = 0
    # Hidden states of prompt positions whose pair waits for the next token (the last
    # chunk's last position, or a prompt-cache snapshot's pending ones): [m, D].
    carry: mx.array | None = None
    cached: int = 0  # prompt tokens seeded from the prompt cache
    # Pairs (h_j, x_{j+1}) not yet in the head's cache: hidden [m, D], tokens (m ints).
    pending_hidden: mx.array | None = None
    pending_tokens: list[int] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    k_counts: list[int] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.prepared.params

    @property
    def coupled(self) -> bool:
        """Seeded sampling: each position's token is the target's own draw with that
        position's key (acceptance.coupled_accept_batch), whatever K or the batch does."""
        return acceptance.rule_for(self.params) == "coupled"

    @property
    def position(self) -> int:
        """Index of the next token this row generates (its key in the key stream)."""
        return len(self.history) - len(self.prepared.prompt_ids)

    def key(self, position: int) -> mx.array:
        """The key of the draw at ``position`` (sampled rows only): by position for a seeded
        row, so a step undone or redone draws the same; in order otherwise."""
        return self.keys.at(position) if self.coupled else self.keys.next()

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that depends on the row: argmax batched over such rows."""
        p = self.params
        return p.is_greedy and not p.logit_bias and not p.has_penalties

    def tail(self, extra: list[mx.array] | None = None) -> Any:
        tail = history_tail(self.history, self.params)
        if not extra or not self.params.has_penalties:
            return tail
        return mx.concatenate([mx.array(tail, dtype=mx.int32), *[e.reshape(1) for e in extra]])


def _to_batch(cache: Any) -> Any:
    """A single-sequence cache as a batch-of-one cache that ``extend`` can join."""
    if isinstance(cache, KVCache):
        return BatchKVCache.merge([cache])
    return cache  # ArraysCache: the batch dimension is already there


def _extend(batch: list[Any] | None, new: list[Any]) -> list[Any]:
    if batch is None:
        return new
    for b, n in zip(batch, new, strict=True):
        b.extend(n)
    return batch


def _drop_tail(cache: BatchKVCache, drop: list[int]) -> None:
    """Drop the last ``drop[r]`` entries of each row r (exact: see the module docstring)."""
    least = min(drop)
    if least:
        cache.trim(least)
    rest = [d - least for d in drop]
    if any(rest):
        cache.prepare(right_padding=rest)
        cache.finalize()


# Leading cache columns that are padding in every row are dropped once there are this many
# (the copy of the cache it costs is then paid once per this many wasted columns).
COMPACT_PADDING = 32


def _drop_common_padding(caches: list[BatchKVCache]) -> None:
    """Drop the leading columns every row of these caches pads (they share one padding
    history: the batch's attention layers, or the head's cache alone).

    Each cycle the cache grows by the longest kept prefix and the other rows' shortfall
    becomes left padding; when different rows keep the longest in different cycles, every row
    pads the front, so the cache would outgrow its longest row without bound (by ~20% of the
    tokens at B = 4, K = 2 and 80% acceptance; 2x at B = 8, K = 4 and 50%) — memory the
    instance's per-sequence budget does not count, and attention over nothing. mlx-lm's
    ``filter`` (every row kept) drops exactly those columns."""
    if min(caches[0].left_padding.tolist()) >= COMPACT_PADDING:
        every = mx.arange(caches[0].left_padding.shape[0])
        for c in caches:
            c.filter(every)


def _plain_logprobs(logits: mx.array) -> mx.array:
    """The log-softmax rows mlx-lm's greedy sampler takes the argmax of (what
    ``processed_logprobs`` gives greedy params without bias or penalties, for any rows)."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class MtpBatchStep:
    """Batched native-MTP decoding (the ``native_mtp`` engine) for every sequence it holds."""

    def __init__(
        self,
        loaded: LoadedModel,
        head: MtpHead | None,
        max_batch: int,
        prefill_chunk: int = BATCH_PREFILL_CHUNK,
        context_tokens: int | None = None,
        costs: CostTable | None = None,
        fixed_k: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.loaded = loaded
        self.prompt_cache = prompt_cache
        self.model = loaded.model
        self._head = head  # None: the checkpoint's, loaded when the first request joins
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.context_tokens = context_tokens  # per-sequence memory budget: generation stops there
        self.fixed_k = fixed_k  # every request at this K (benchmarks), 0 included
        self.clock = clock
        self.default_k, self.max_k = loaded.mtp_k_limits
        self._costs = costs
        self.policy = BatchKPolicy(max_k=self.max_k, start_k=self.default_k)
        # Depth 1's prior for a newcomer, from the requests this instance has served
        # (kpolicy.AcceptancePrior: per sampling class, only depth 1).
        self.acceptance_prior = AcceptancePrior()
        self.current_k: int | None = None  # the latest cycle's K (status shows it)
        self._prefilling: list[_Row] = []
        self._rows: list[_Row] = []  # batch order = row order of the caches
        self._cache: list[Any] | None = None
        self._mtp_cache: BatchKVCache | None = None
        # A K = 0 step queued before the previous one's tokens were read (see _decode): its
        # (hidden, tokens), and the linear layers' states from before it.
        self._queued: tuple[mx.array, mx.array] | None = None
        self._saved: list[list[Any] | None] | None = None
        # Feeds the cost table every cycle's seconds, once there is a table.
        self._timer: CycleTimer | None = CycleTimer(costs) if costs is not None else None

    def __len__(self) -> int:
        return len(self._prefilling) + len(self._rows)

    @property
    def head(self) -> MtpHead:
        if self._head is None:
            self._head = self.loaded.mtp_head()
        return self._head

    def cost_table(self) -> CostTable:
        """[B, K+1] costs for B up to ``max_batch``, measured on first use."""
        if self._costs is None:
            costs = measure_costs(
                self.loaded,
                self.head,
                self.max_k,
                batch_sizes=batch_sizes_to_measure(self.max_batch),
                clock=self.clock,
            )
            # Live timings correct the table as fast when cycles run slower than modelled as
            # when they run faster: a batched cycle's overhead over the isolated forwards
            # (the host sync, per-row rollback and sampling) is systematic and grows with B,
            # so it must reach the policy within a few cycles, while other processes' load
            # slows K = 0 and K > 0 cycles alike.
            costs.ewma_weight = costs.ewma_down
            self._costs = costs
            self._timer = CycleTimer(costs)
        return self._costs

    # -- joining and leaving ---------------------------------------------------------------

    def join(self, seq: Sequence) -> None:
        request = seq.request
        prepared = prepare_request(self.loaded, request, self.max_k, self.context_tokens)
        pin = self.fixed_k if self.fixed_k is not None else request.mtp_k
        sampling = AcceptancePrior.sampling_class(prepared.params.temperature)
        row = _Row(
            seq=seq,
            prepared=prepared,
            pin=pin,
            keys=KeyStream(prepared.params.seed),
            history=list(prepared.prompt_ids),
            estimate=(
                AcceptanceEstimate(self.max_k, prior=self.acceptance_prior.for_class(sampling))
                if pin is None
                else None
            ),
            cache=self.model.make_cache(),
            mtp_cache=self.head.make_cache(),
            k_counts=[0] * (self.max_k + 1),
        )
        if pin is None:
            self.cost_table()  # measured before the first unpinned request runs
        if self.prompt_cache is not None:
            self._seed(row)
        self._prefilling.append(row)

    def _seed(self, row: _Row) -> None:
        """Start ``row`` from the longest cached prefix of its prompt that holds the head's
        state too: the model's caches, the head's cache and the hidden states whose pairs the
        head has not seen (``_store_finished``); its prefill computes only the rest."""
        assert self.prompt_cache is not None
        ids = row.prepared.prompt_ids
        try:
            hit = self.prompt_cache.lookup(ids, usable=_has_head)
            if hit is None:
                return
            extras = thaw_extras(hit.snapshot)
            row.cache, row.mtp_cache, row.carry = thaw(hit), extras["mtp_cache"], extras["hidden"]
            row.prefilled = row.cached = hit.length
        except Exception:  # the request runs without the cache rather than not at all
            log.exception("seeding from the prompt cache failed", tokens=len(ids))

    def leave(self, seq: Sequence) -> None:
        for i, row in enumerate(self._prefilling):
            if row.seq is seq:
                del self._prefilling[i]
                return
        for i, row in enumerate(self._rows):
            if row.seq is seq:
                self._remove([i])
                return

    def _remove(self, indices: list[int]) -> None:
        drop = set(indices)
        for i in drop:  # what each leaving row's drafts showed, for the next requests
            row = self._rows[i]
            if row.estimate is not None:
                self.acceptance_prior.learn(
                    AcceptancePrior.sampling_class(row.params.temperature), row.estimate
                )
        keep = [i for i in range(len(self._rows)) if i not in drop]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            if self._timer is not None:
                self._timer.end_stretch()
            self._cache, self._mtp_cache = None, None
            self._queued, self._saved = None, None
            return
        where = mx.array(keep)
        assert self._cache is not None and self._mtp_cache is not None
        for c in [*self._cache, self._mtp_cache]:
            c.filter(where)
        if self._queued is not None and self._saved is not None:
            # The queued step goes on for the rows that stay.
            hidden, tokens = self._queued
            self._queued = (hidden[where], tokens[where])
            self._saved = [None if s is None else [a[where] for a in s] for s in self._saved]

    def reset(self) -> None:
        self._prefilling.clear()
        self._rows.clear()
        self._cache, self._mtp_cache = None, None
        self._queued, self._saved = None, None

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> StepOutput:
        out: StepOutput = []
        # Newcomers whose whole prompt fits one chunk prefill together in one forward; longer
        # prompts go one chunk per step each.
        short = [
            r
            for r in self._prefilling
            if r.prefilled == 0 and len(r.prepared.prompt_ids) <= self.prefill_chunk
        ]
        if len(short) > 1:
            self._prefill_together(short, out)
        for row in list(self._prefilling):
            self._prefill_chunk(row, out)
        if self._rows:
            self._cycle(out)
        return out

    def _emit(self, row: _Row, tokens: list[int], out: StepOutput) -> bool:
        """Stream ``tokens``; True (and the final event) when the row is done."""
        output = row.prepared.output
        row.history.extend(tokens)
        delta = output.add(tokens)
        if delta is not None:
            out.append((row.seq, delta))
        if not output.done:
            return False
        row.clock.mark_end()
        done = generation_done(
            "native_mtp",
            row.seq.reason,
            self.loaded,
            row.prepared,
            row.clock,
            k_counts=row.k_counts,
            proposed=row.proposed,
            accepted=row.accepted,
            cached_prompt_tokens=row.cached,
        )
        out.append((row.seq, done))
        return True

    def _prefill_chunk(self, row: _Row, out: StepOutput) -> None:
        """One chunk of ``row``'s prompt through the target and the head; after the last one,
        the first token, and the row's caches join the batch."""
        assert row.cache is not None and row.mtp_cache is not None
        ids = row.prepared.prompt_ids
        n = len(ids)
        start = row.prefilled
        end = min(start + self.prefill_chunk, n)
        if self.prompt_cache is not None and start < n - 1:
            end = min(end, n - 1)  # a chunk ends there: the prompt-end snapshot
        hidden = forward.hidden_states(self.model, mx.array(ids[start:end])[None], row.cache)
        # Pairs (h_j, x_{j+1}) whose next token is in this chunk: the carried positions' and
        # this chunk's but its last, which waits for the next token (next chunk or generated).
        carried = 0 if row.carry is None else row.carry.shape[0]
        pairs = [row.carry[None]] if row.carry is not None else []
        if end - start > 1:
            pairs.append(hidden[:, :-1])
        if pairs:
            self.head(
                forward.embed(self.model, mx.array(ids[start - carried + 1 : end])[None]),
                mx.concatenate(pairs, axis=1),
                row.mtp_cache,
            )
        row.carry = hidden[0, -1:]
        row.prefilled = end
        if end < n:
            mx.eval([c.state for c in row.cache], row.mtp_cache.state, row.carry)
            if self.prompt_cache is not None and end == n - 1:
                store_snapshot(
                    self.prompt_cache,
                    ids[:end],
                    row.cache,
                    {"mtp_cache": row.mtp_cache, "hidden": row.carry},
                )
            return
        self._prefilling.remove(row)
        row.carry = None
        last = hidden[:, -1:, :]
        logits = forward.logits(self.model, last[:, -1, :])
        token = next_token(logits, row.params, row.tail(), row.keys)
        mx.eval(token, last, [c.state for c in row.cache], row.mtp_cache.state)
        first = int(token.item())
        row.clock.mark_first_token()
        caches, mtp = [_to_batch(c) for c in row.cache], BatchKVCache.merge([row.mtp_cache])
        row.cache, row.mtp_cache = None, None
        if self._emit(row, [first], out):
            return
        row.pending_hidden = last[0]
        row.pending_tokens = [first]
        self._merge([row], caches, mtp)

    def _prefill_together(self, rows: list[_Row], out: StepOutput) -> None:
        """Whole short prompts of several newcomers in one right-padded forward (mlx-lm's
        ``BatchGenerator`` prompt protocol: ``prepare(lengths, right_padding)`` keeps each
        GatedDeltaNet row's state at its own length, ``finalize`` rolls each attention row's
        padding into left padding), the head fed in the same pass the same way."""
        lengths = [len(r.prepared.prompt_ids) for r in rows]
        width = max(lengths)
        padding = [width - n for n in lengths]
        tokens = mx.array(
            [r.prepared.prompt_ids + [0] * p for r, p in zip(rows, padding, strict=True)]
        )
        caches = [
            BatchKVCache([0] * len(rows)) if isinstance(c, KVCache) else ArraysCache(len(c.cache))
            for c in self.model.make_cache()
        ]
        for c in caches:
            c.prepare(lengths=lengths, right_padding=padding)
        hidden = forward.hidden_states(self.model, tokens, caches)
        for c in caches:
            c.finalize()
        mtp = BatchKVCache([0] * len(rows))
        if width > 1:  # pairs (h_i, x_{i+1}): n - 1 per row, padded like the prompt
            self.head(forward.embed(self.model, tokens[:, 1:]), hidden[:, :-1], mtp)
            _drop_tail(mtp, padding)
        last = mx.take_along_axis(hidden, mx.array(lengths)[:, None, None] - 1, axis=1)
        logits = forward.logits(self.model, last[:, 0, :])  # [N, V]
        firsts = mx.concatenate(
            [
                next_token(logits[i : i + 1], r.params, r.tail(), r.keys).astype(mx.uint32)
                for i, r in enumerate(rows)
            ]
        )
        mx.eval(firsts, last, [c.state for c in caches], mtp.state)
        keep = []
        for i, (row, first) in enumerate(zip(rows, firsts.tolist(), strict=True)):
            self._prefilling.remove(row)
            row.cache, row.mtp_cache = None, None
            row.clock.mark_first_token()
            if self._emit(row, [first], out):
                continue
            row.pending_hidden = last[i]
            row.pending_tokens = [first]
            keep.append(i)
        if not keep:
            return
        if len(keep) < len(rows):
            where = mx.array(keep)
            for c in [*caches, mtp]:
                c.filter(where)
        self._merge([rows[i] for i in keep], caches, mtp)

    def _merge(self, rows: list[_Row], caches: list[Any], mtp: BatchKVCache) -> None:
        """Prefilled rows join the batch: their caches extend the batch's."""
        self._flush_queued()
        self._cache = _extend(self._cache, caches)
        mtp.is_head = True  # type: ignore[attr-defined]  # tells the tests' controls apart
        if self._mtp_cache is None:
            self._mtp_cache = mtp
        else:
            self._mtp_cache.extend(mtp)
        self._rows.extend(rows)

    def _choose_k(self) -> tuple[int, list[int]]:
        """(the batch's K, each row's own cap: the drafts it may accept)."""
        rows = self._rows
        unpinned = [r for r in rows if r.pin is None]
        want = max((r.pin for r in rows if r.pin is not None), default=0)
        if unpinned:
            bound = max(r.prepared.output.remaining - 1 for r in unpinned)
            estimates = [r.estimate for r in unpinned if r.estimate is not None]
            k = self.policy.next_k(
                estimates, self.cost_table(), bound, len(rows), zero_queued=self._queued is not None
            )
            want = max(want, k)
        caps = []
        for r in rows:
            # An unpinned row takes whatever the batch drafts: accepting more costs it nothing.
            own = want if r.pin is None else r.pin
            r.k_counts[min(own, self.max_k)] += 1
            caps.append(max(0, min(own, r.prepared.output.remaining - 1)))
        return max(caps), caps

    def _cycle(self, out: StepOutput) -> None:
        start = self.clock()
        k, caps = self._choose_k()
        self.current_k = k
        batch = len(self._rows)
        if k == 0:
            if any(len(r.pending_tokens) > PENDING_LIMIT for r in self._rows):
                # Feed all but each row's newest pair (the invariant keeps one pending), now.
                self._feed_head(self._rows, keep_last=True)
                for r in self._rows:
                    assert r.pending_hidden is not None
                    r.pending_hidden = r.pending_hidden[-1:]
                    r.pending_tokens = r.pending_tokens[-1:]
            finished = self._decode(out)
        else:
            finished = self._speculate(k, caps, out)
        if self._timer is not None:
            self._timer.cycle(batch, k, self.clock() - start)
        if finished:
            if self.prompt_cache is not None:
                for i in finished:
                    self._store_finished(i)
            self._remove(finished)

    def _store_finished(self, i: int) -> None:
        """Snapshot row ``i`` as it finishes, under its history but the newest token (what
        its caches hold): the model's caches, the head's, and the hidden states of the
        pending pairs (the head has seen the pairs before them). A queued K = 0 step has
        advanced the model's caches by one more token: its entry is left out, and the linear
        layers' states are the ones saved before it."""
        assert self.prompt_cache is not None
        assert self._cache is not None and self._mtp_cache is not None
        row = self._rows[i]
        assert row.pending_hidden is not None
        tokens = row.history[:-1]
        caches: list[Any] = []
        for c, saved in zip(self._cache, self._saved or [None] * len(self._cache), strict=True):
            if saved is not None:
                one = ArraysCache(len(saved))
                one.cache = [a[i : i + 1] for a in saved]
            else:
                one = c.extract(i)
                if self._queued is not None and isinstance(one, KVCache):
                    one.trim(1)
            caches.append(one)
        head = self._mtp_cache.extract(i)
        offsets = {c.offset for c in caches if isinstance(c, KVCache)}
        if offsets - {len(tokens)} or head.offset + row.pending_hidden.shape[0] != len(tokens):
            log.error("a finished row's caches do not match its tokens; not stored")
            return
        store_snapshot(
            self.prompt_cache,
            tokens,
            caches,
            {"mtp_cache": head, "hidden": row.pending_hidden},
        )

    # -- K = 0: plain batched decode, pipelined -------------------------------------------

    def _decode_graph(self, last: mx.array, unread: bool) -> tuple[mx.array, mx.array]:
        """One [B, 1] decode step from ``last`` [B]: (hidden [B, 1, D], tokens [B]), lazy.

        ``unread``: ``last`` is not in the rows' histories yet (a queued step)."""
        assert self._cache is not None
        rows = self._rows
        hidden = forward.hidden_states(self.model, last.reshape(-1, 1), self._cache)
        logits = forward.logits(self.model, hidden[:, 0, :])  # [B, V]
        plain = [i for i, r in enumerate(rows) if r.plain_greedy]
        greedy = mx.argmax(_plain_logprobs(logits), axis=-1) if plain else None
        if len(plain) == len(rows):
            assert greedy is not None
            return hidden, greedy
        tokens = []
        for i, r in enumerate(rows):
            if r.plain_greedy:
                assert greedy is not None
                tokens.append(greedy[i])
                continue
            lp = processed_logprobs(
                logits[i : i + 1], r.params, r.tail([last[i]] if unread else None)
            )
            if r.params.is_greedy:
                t = mx.argmax(lp, axis=-1)
            else:
                t = sample_tokens(lp, r.key(r.position + (1 if unread else 0)))
            tokens.append(t[0].astype(mx.uint32))
        return hidden, mx.stack(tokens)

    def _decode(self, out: StepOutput) -> list[int]:
        rows = self._rows
        if self._queued is not None:
            hidden, tokens = self._queued
            self._queued, self._saved = None, None
        else:
            last = mx.array([r.pending_tokens[-1] for r in rows], dtype=mx.uint32)
            hidden, tokens = self._decode_graph(last, unread=False)
            mx.async_eval(tokens)
        # Queue the next K = 0 step before reading these tokens back (as mlx-lm's
        # generate_step does): the device computes it while the host streams this one. If the
        # next cycle drafts or a row joins, _flush_queued undoes it exactly.
        if self.policy.stays_at_zero() and all(
            r.pin in (None, 0) and r.prepared.output.remaining > 1 for r in rows
        ):
            assert self._cache is not None
            self._saved = [None if c.is_trimmable() else list(c.cache) for c in self._cache]
            self._queued = self._decode_graph(tokens, unread=True)
            mx.async_eval(self._queued[1])
        values = tokens.tolist()
        finished = []
        for i, (row, token) in enumerate(zip(rows, values, strict=True)):
            assert row.pending_hidden is not None
            row.pending_hidden = mx.concatenate([row.pending_hidden, hidden[i]], axis=0)
            row.pending_tokens.append(token)
            if self._emit(row, [token], out):
                finished.append(i)
                continue
            if row.coupled:
                row.keys.forget_before(row.position)
        return finished

    def _flush_queued(self) -> None:
        """Undo a queued K = 0 step: attention caches trim its one entry, the linear layers
        take back the states saved before it (exact: nothing else changed)."""
        queued, saved = self._queued, self._saved
        self._queued, self._saved = None, None
        if queued is None or saved is None or self._cache is None:
            return
        for c, states in zip(self._cache, saved, strict=True):
            if states is None:
                c.trim(1)
            else:
                c.cache = states

    # -- K > 0: draft together, verify together -------------------------------------------

    def _feed_head(self, rows: list[_Row], keep_last: bool) -> mx.array:
        """Run the head over every row's pending pairs (all but the newest when
        ``keep_last``); return each row's last output [B, 1, D]."""
        assert self._mtp_cache is not None
        counts = [len(r.pending_tokens) - (1 if keep_last else 0) for r in rows]
        width = max(counts)
        dim = rows[0].pending_hidden.shape[-1]  # type: ignore[union-attr]
        hiddens, tokens = [], []
        for r, m in zip(rows, counts, strict=True):
            assert r.pending_hidden is not None
            h = r.pending_hidden[:m]
            if m < width:
                h = mx.concatenate([h, mx.zeros((width - m, dim), h.dtype)], axis=0)
            hiddens.append(h)
            tokens.append(r.pending_tokens[:m] + [0] * (width - m))
        x = self.head(
            forward.embed(self.model, mx.array(tokens)), mx.stack(hiddens), self._mtp_cache
        )
        # Rows with fewer pairs got padding after their own: drop it from the head's cache.
        _drop_tail(self._mtp_cache, [width - m for m in counts])
        last = mx.array([max(m - 1, 0) for m in counts])
        return mx.take_along_axis(x, last[:, None, None], axis=1)

    def _speculate(self, k: int, caps: list[int], out: StepOutput) -> list[int]:
        self._flush_queued()
        rows = self._rows
        assert self._cache is not None and self._mtp_cache is not None
        x = self._feed_head(rows, keep_last=False)
        drafts: list[mx.array] = []  # per depth: [B]
        draft_lps: list[list[mx.array | None]] = []  # per depth, per row (sampled rows only)
        for s in range(k):
            if s > 0:
                x = self.head(forward.embed(self.model, drafts[-1][:, None]), x, self._mtp_cache)
            logits = forward.logits(self.model, x[:, -1, :])  # [B, V]
            tokens, lps = self._draft_rows(rows, logits, drafts, s, caps)
            drafts.append(tokens)
            draft_lps.append(lps)
        draft_ids = mx.stack(drafts, axis=1).astype(mx.uint32)  # [B, k]
        last = mx.array([[r.pending_tokens[-1]] for r in rows], dtype=mx.uint32)
        hidden, pending_gdn = verify_forward(
            forward.text_model(self.model), mx.concatenate([last, draft_ids], axis=1), self._cache
        )
        target = forward.logits(self.model, hidden)  # [B, k+1, V]
        n_acc, nxt = self._accept_rows(rows, target, draft_ids, draft_lps, caps)
        result = mx.concatenate(
            [
                n_acc[:, None].astype(mx.int32),
                nxt[:, None].astype(mx.int32),
                draft_ids.astype(mx.int32),
            ],
            axis=1,
        )
        values = result.tolist()  # the one host sync of the cycle

        # Roll back every cache to each row's accepted prefix.
        accepted = [v[0] for v in values]
        for c, p in zip(self._cache, pending_gdn, strict=True):
            if p is None:
                _drop_tail(c, [k - n for n in accepted])
            else:
                commit_rows(c, p, accepted)
        if k > 1:
            self._mtp_cache.trim(k - 1)
        _drop_common_padding([c for c in self._cache if isinstance(c, BatchKVCache)])
        _drop_common_padding([self._mtp_cache])

        finished = []
        observed = []
        for i, (row, v) in enumerate(zip(rows, values, strict=True)):
            n, correction, proposed = v[0], v[1], v[2 : 2 + caps[i]]
            row.proposed += caps[i]
            row.accepted += n
            if row.estimate is not None:
                row.estimate.observe(caps[i], n)
                observed.append((caps[i], n))
            emitted = [*proposed[:n], correction]
            if row.coupled:
                row.keys.forget_before(row.position + len(emitted))
            row.pending_hidden = hidden[i, : n + 1, :]
            row.pending_tokens = emitted
            if self._emit(row, emitted, out):
                finished.append(i)
        self.policy.observe(k, observed)
        return finished

    def _draft_rows(
        self,
        rows: list[_Row],
        logits: mx.array,
        drafts: list[mx.array],
        depth: int,
        caps: list[int],
    ) -> tuple[mx.array, list[mx.array | None]]:
        """Each row's draft at ``depth`` from head logits [B, V] (lazy). A row past its own
        cap takes the plain argmax: its draft is never looked at, and it draws no key, so a
        row's key stream does not depend on the other rows' K."""
        plain = mx.argmax(logits, axis=-1)
        if all(r.plain_greedy or depth >= c for r, c in zip(rows, caps, strict=True)):
            return plain, [None] * len(rows)
        tokens, lps = [], []
        for i, (r, cap) in enumerate(zip(rows, caps, strict=True)):
            if r.plain_greedy or depth >= cap:
                tokens.append(plain[i])
                lps.append(None)
                continue
            key = None if r.params.is_greedy else r.key(r.position + depth)
            earlier = [d[i] for d in drafts]
            token, lp = draft_token(logits[i], r.params, r.tail(earlier), key)
            tokens.append(token.astype(plain.dtype))
            lps.append(None if r.params.is_greedy else lp)
        return mx.stack(tokens), lps

    def _accept_rows(
        self,
        rows: list[_Row],
        target: mx.array,
        draft_ids: mx.array,
        draft_lps: list[list[mx.array | None]],
        caps: list[int],
    ) -> tuple[mx.array, mx.array]:
        """(accepted [B], next token [B]): each row's rule on its first ``cap`` drafts."""
        batch, width, vocab = target.shape
        k = width - 1
        n_all = nxt_all = None
        if any(r.plain_greedy for r in rows):
            lp = _plain_logprobs(target.reshape(batch * width, vocab)).reshape(batch, width, vocab)
            best = mx.argmax(lp, axis=-1)  # [B, k+1]
            allowed = mx.arange(k)[None, :] < mx.array(caps)[:, None]
            matches = (best[:, :k] == draft_ids.astype(best.dtype)) & allowed
            n_all = mx.cumprod(matches.astype(mx.int32), axis=-1).sum(axis=-1)
            nxt_all = mx.take_along_axis(best, n_all[:, None], axis=-1)[:, 0]
        if all(r.plain_greedy for r in rows):
            assert n_all is not None and nxt_all is not None
            return n_all, nxt_all
        ns, nxts = [], []
        for i, (r, cap) in enumerate(zip(rows, caps, strict=True)):
            if r.plain_greedy:
                assert n_all is not None and nxt_all is not None
                ns.append(n_all[i])
                nxts.append(nxt_all[i])
                continue
            d = draft_ids[i, :cap]
            lp = processed_logprobs(target[i, : cap + 1], r.params, r.tail(), d)
            if r.params.is_greedy:
                n, t = greedy_accept_batch(lp[None], d[None])
            elif r.coupled:
                noise = mx.concatenate(
                    [position_noise(r.key(r.position + j), (1, vocab)) for j in range(cap + 1)]
                )
                n, t = coupled_accept_batch(lp[None], d[None], noise[None])
            else:
                q = mx.stack([draft_lps[s][i] for s in range(cap)]) if cap else None
                n, t = sampled_accept_batch(
                    lp[None], None if q is None else q[None], d[None], r.keys.next()
                )
            ns.append(n[0].astype(mx.int32))
            nxts.append(t[0].astype(mx.int32))
        return mx.stack(ns), mx.stack(nxts)


def _has_head(snapshot: Snapshot) -> bool:
    """A snapshot native MTP can continue from (the local engine's have no head state)."""
    return "mtp_cache" in snapshot.extras


def commit_rows(cache: ArraysCache, pending: Any, n_accepted: list[int]) -> None:
    """Set each row r of a GatedDeltaNet cache to its state after ``n_accepted[r] + 1``
    verified tokens: the conv state is a slice of the conv input, the recurrent state the
    one the verify pass kept at that position. The counts are on the host already (the
    cycle's one sync), so each row takes its own state without gathering every position's:
    when all rows accepted the same count (the common case) it is one slice, no copy."""
    keep = pending.keep
    if len(set(n_accepted)) == 1:
        n = n_accepted[0]
        cache[0] = pending.conv_input[:, n + 1 : n + 1 + keep, :]
        cache[1] = pending.states[n]
        return
    cache[0] = mx.concatenate(
        [pending.conv_input[r : r + 1, n + 1 : n + 1 + keep, :] for r, n in enumerate(n_accepted)]
    )
    cache[1] = mx.concatenate([pending.states[n][r : r + 1] for r, n in enumerate(n_accepted)])


def batch_sizes_to_measure(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch`` (and it): the cost table interpolates between."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


__all__ = ["PENDING_LIMIT", "MtpBatchStep", "batch_sizes_to_measure", "commit_rows"]
