"""Measuring a single-node instance's native-MTP cost table on first use (the K policy's input).

A few timed forwards on the loaded model, with the shapes a cycle uses: the target over
T = 1..max_k+1 positions (T = 1 is the K = 0 cycle: a plain decode step; T > 1 the verify
pass that keeps each position's GatedDeltaNet state), and the head drafting k = 1..max_k
tokens from two pending pairs (the usual n + 1 = 2 after a cycle that accepted one draft).
K = 0 drafts nothing and defers the head's pairs to the next drafting cycle, so its draft
cost is 0.  Each shape runs once to warm up, then ``repeats`` rounds run every shape once each
(interleaved, so a burst of load hits all shapes alike); each shape's fastest sample counts
(other processes only ever add time).  ``clock`` is ``time.perf_counter``; a benchmark on a shared
machine may pass ``time.process_time`` (the work this process did, on MLX's CPU backend).

``batch_sizes`` says which batch sizes to measure (the single-sequence engine: 1; the batched
one: 1, 2, 4, ... up to its ``max_batch``; the ``CostTable`` interpolates between them). A
[B, T] shape runs B identical rows: a forward's cost does not depend on the token values.  The engine refreshes the table from the cycles it
times (``CostTable.observe``), so this only has to be right to within the load of the moment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import mlx.core as mx

from node.inference import forward
from node.inference.loading import LoadedModel
from node.inference.mtp.gdn import commit_verified, verify_forward
from node.inference.mtp.head import MtpHead
from node.inference.mtp.kpolicy import CostTable

CONTEXT_TOKENS = 32  # cache length the timings run at: short, so loading stays quick
REPEATS = 5


def fastest_interleaved(
    runs: Sequence[Callable[[], None]], repeats: int, clock: Callable[[], float]
) -> list[float]:
    """The fastest of ``repeats`` samples of each run, taken in rounds that run every shape once.

    Interleaved, a burst of another process's work slows one sample of every shape instead of
    all the samples of whichever shape was being measured: the K policy compares the shapes
    with each other, so their ratios are what must survive a loaded machine."""
    for run in runs:
        run()  # warm-up: kernels, allocator
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = clock()
            run()
            best[i] = min(best[i], clock() - start)
    return best


def measure_costs(
    loaded: LoadedModel,
    head: MtpHead,
    max_k: int,
    repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter,
    batch_sizes: Sequence[int] = (1,),
) -> CostTable:
    """Seconds of verify(B, T) and draft(B, k) for each batch size B on this machine, now."""
    verify: dict[int, list[float]] = {}
    draft: dict[int, list[float]] = {}
    for batch in batch_sizes:
        # Larger batches take longer per sample; fewer samples keep loading quick.
        n = repeats if batch == 1 else max(2, repeats // 2)
        verify[batch], draft[batch] = _measure_batch(loaded, head, max_k, batch, n, clock)
    return CostTable(verify=verify, draft=draft)


def _measure_batch(
    loaded: LoadedModel,
    head: MtpHead,
    max_k: int,
    batch: int,
    repeats: int,
    clock: Callable[[], float],
) -> tuple[list[float], list[float]]:
    model = loaded.model
    tm = forward.text_model(model)
    vocab = loaded.vocab_size
    # Every row the same tokens: the cost of a [B, T] forward does not depend on the values.
    ids = [(7 * i + 3) % vocab for i in range(CONTEXT_TOKENS + max_k + 2)]
    cache = model.make_cache()
    hidden = tm(mx.array([ids[:CONTEXT_TOKENS]] * batch), cache)
    mtp_cache = head.make_cache()
    tokens = mx.array([ids[1:CONTEXT_TOKENS]] * batch)
    head(forward.embed(model, tokens), hidden[:, :-1], mtp_cache)
    mx.eval(hidden, [c.state for c in cache], mtp_cache.state)
    pending_hidden = mx.concatenate([hidden[:, -1:], hidden[:, -1:]], axis=1)
    pending_tokens = mx.array([ids[CONTEXT_TOKENS : CONTEXT_TOKENS + 2]] * batch)

    def verify(t: int) -> Callable[[], None]:
        inputs = mx.array([ids[CONTEXT_TOKENS : CONTEXT_TOKENS + t]] * batch)

        def run() -> None:
            if t == 1:
                h = forward.hidden_states(model, inputs, cache)
            else:
                h, pending = verify_forward(tm, inputs, cache)
                commit_verified(cache, pending, 1, t)
            out = mx.argmax(forward.logits(model, h), axis=-1)
            mx.eval(out, [c.state for c in cache])
            # Keep the cache length fixed; the recurrent state drifts by one token per call,
            # which does not change the cost.
            for c in cache:
                if c.is_trimmable():
                    c.trim(1)

        return run

    def draft(k: int) -> Callable[[], None]:
        def run() -> None:
            x = head(forward.embed(model, pending_tokens), pending_hidden, mtp_cache)[:, -1:]
            token = mx.argmax(forward.logits(model, x[:, -1]), axis=-1)
            for _ in range(k - 1):
                x = head(forward.embed(model, token[:, None]), x, mtp_cache)
                token = mx.argmax(forward.logits(model, x[:, -1]), axis=-1)
            mx.eval(token)
            mtp_cache.trim(k + 1)

        return run

    runs = [verify(t) for t in range(1, max_k + 2)] + [draft(k) for k in range(1, max_k + 1)]
    seconds = fastest_interleaved(runs, repeats, clock)
    verify_s, draft_s = seconds[: max_k + 1], [0.0, *seconds[max_k + 1 :]]
    return no_dearer_than_longer(verify_s), no_dearer_than_longer(draft_s)


def no_dearer_than_longer(seconds: list[float]) -> list[float]:
    """Each entry capped by every later one: verifying (drafting) more never costs less, so a
    measurement above a longer one's is another process's time, not this shape's."""
    out = list(seconds)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out
