"""A pipeline stage's side of native MTP across the pipeline (engine ``pipeline_mtp``).

The coordinator opens a request with ``OpenRequest.mtp``. Its frames are rows of the stage's
batched forwards like any other (``StageRuntime._forward`` calls the hooks below): its
prompt pieces batch with other prompts (the last stage then fills each request's head cache
from its own rows, ``prefill_rows``), and the verify frames of requests in flight together
go through each stage as one [B, K+1] forward (rows of the same K), each row with its own
verdict.

Every stage: a frame that carries ``Verify`` holds ``[c, d1..dK]`` — the last emitted token
and K drafts — and runs with mlx-lm's forward in verify mode (``mtp.gdn.verify_forward``):
attention caches grow by K+1, GatedDeltaNet caches stay as they were and each position's
state is kept aside. The frame stays *pending* until the next frame of the same request
arrives: its ``keep_previous`` is the verdict (accepted drafts + 1), and the stage commits
that prefix (trim attention, take the state after that many tokens) before it runs the new
frame. So the verdict never costs a round trip of its own: it rides with the next frame,
which has to come through the pipeline anyway. In a batch each row keeps its candidates
(``RowPending``: the forward's per-position states and its row in them) and commits its own
prefix in whatever batch cache its request sits in when its verdict comes
(``commit_verdicts``: attention rows drop their own rejected tail, as the local batched
engine does; GatedDeltaNet rows take their own state).

The last stage decides the verdict at once: it holds the MTP head (and the embedding it
embeds drafts with), runs the acceptance rule of ``node.inference.acceptance`` on the K+1
target rows, commits its own caches, feeds the verified pairs to the head and drafts the
next frame's tokens, then answers with one ``Verdict`` (the emitted tokens, the accepted
count, the next drafts). The MTP-head bookkeeping is the single-node engine's
(``node.inference.mtp.engine``: pending pairs ``(h_j, x_{j+1})``, chained drafts trimmed
after the verdict), so the drafts, the PRNG subkeys and the emitted tokens follow the same
rules on one node and across several.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from node.inference.acceptance import (
    coupled_accept_batch,
    greedy_accept_batch,
    rule_for,
    sampled_accept_batch,
)
from node.inference.batching.mtp_step import _drop_tail, commit_rows
from node.inference.codec import FrameError
from node.inference.engine import history_tail, next_token
from node.inference.mtp.engine import PENDING_LIMIT
from node.inference.mtp.gdn import PendingGdnState
from node.inference.mtp.head import MtpHead
from node.inference.sampling import (
    KeyStream,
    SamplingParams,
    draft_token,
    position_noise,
    processed_logprobs,
)
from node.inference.shard import ShardError
from node.inference.stage_wire import INVALID_ARGUMENT, error_response
from node.proto.macmesh.v1 import stage_pb2 as pb

if TYPE_CHECKING:
    from node.inference.stage_runtime import StageRuntime


def load_head(runtime: StageRuntime, path: Path) -> None:
    """Recover the checkpoint's MTP head onto a last stage (raises ``MtpUnavailable``)."""
    from mlx.utils import tree_flatten

    from node.inference import forward
    from node.inference.mtp.recovery import load_mtp_head

    shard = runtime.shard
    if not shard.has_head:
        raise ShardError(
            f"the MTP head goes on the last stage; layers [{shard.start_layer}, "
            f"{shard.end_layer}) of {shard.num_layers} are not"
        )
    if _embedding(runtime) is None:
        raise ShardError("the last stage was loaded without the embedding the MTP head needs")
    head = load_mtp_head(path, forward.language_model(shard.model).args)
    runtime.mtp_head = head
    runtime.mtp_head_bytes = sum(v.nbytes for _, v in tree_flatten(head.parameters()))
    if shard.embedding is not None:
        runtime.mtp_head_bytes += sum(
            v.nbytes for _, v in tree_flatten(shard.embedding.parameters())
        )


def _embedding(runtime: StageRuntime) -> Any:
    shard = runtime.shard
    return shard.embedding if shard.embedding is not None else shard.head_embedding


# ---- per-request state ----


@dataclass
class RowPending:
    """A verify row's GatedDeltaNet candidates: the pending states of the forward it ran in
    (one per linear layer, over that forward's B rows) and its row there."""

    layers: list[PendingGdnState | None]
    row: int
    positions: int  # the row's positions (T of that forward)
    size: int  # the rows of that forward


@dataclass
class StageVerify:
    """Any stage: the verify frame waiting for its verdict."""

    pending: RowPending | None = None  # None: nothing to roll back
    positions: int = 0  # positions of the pending frame (0: no frame pending)


@dataclass
class LastStageMtp(StageVerify):
    """The last stage: the sampler's history and keys, the MTP head's cache and pairs."""

    params: SamplingParams = field(default_factory=SamplingParams)
    keys: KeyStream = field(default_factory=lambda: KeyStream(None))
    mtp_cache: Any = None
    history: list[int] = field(default_factory=list)  # prompt + emitted
    carry: mx.array | None = None  # prefill: the hidden whose next token is still to come
    # Pairs (h_j, x_{j+1}) not yet in the head's cache, as in the single-node engine.
    pending_hidden: mx.array | None = None
    pending_tokens: mx.array | None = None
    drafts: list[int] = field(default_factory=list)  # what the last verdict proposed
    draft_lps: list[mx.array] = field(default_factory=list)
    # Seeded sampling: the coupled rule (acceptance.coupled_accept_batch), one key per
    # generated position, as the single-node engine; `position` is that of drafts[0].
    seeded: bool = False
    prompt_len: int = 0
    position: int = 0


def open_state(runtime: StageRuntime, sampling: SamplingParams) -> StageVerify:
    if not runtime.shard.has_head:
        return StageVerify()
    head = runtime.mtp_head
    if head is None:
        raise FrameError(
            f"instance {runtime.instance_id!r} was loaded without the MTP head on its last "
            "stage; launch it with --mtp-across-pipeline"
        )
    return LastStageMtp(
        params=sampling,
        keys=KeyStream(sampling.seed),
        mtp_cache=head.make_cache(),
        seeded=rule_for(sampling) == "coupled",
    )


# ---- session hook: positions after a verdict ----


def rewind(rid: str, inbound: Any, act: pb.Activation | pb.BatchRow) -> None:
    """Before a frame's position check: the verdict it carries drops the rejected positions of
    the request's previous verify frame (``inbound.verify_positions``)."""
    if act.HasField("verify") and not inbound.mtp:
        raise FrameError(
            f"request {rid!r} was not opened for pipeline MTP (OpenRequest.mtp), but its frame "
            "carries a verify"
        )
    if act.HasField("verify") and not act.sample:
        raise FrameError(f"a verify frame of request {rid!r} must sample (sample=true)")
    if not act.HasField("verify"):
        if inbound.verify_positions:
            raise FrameError(
                f"a verify frame of {inbound.verify_positions} positions waits for its verdict; "
                "the next frame must carry one (verify.keep_previous)"
            )
        return
    keep, pending = act.verify.keep_previous, inbound.verify_positions
    if pending == 0 and keep != 0:
        raise FrameError(f"verify.keep_previous={keep} but no verify frame is pending")
    if pending and not 1 <= keep <= pending:
        raise FrameError(
            f"verify.keep_previous={keep} is outside 1..{pending}, the positions of the "
            "pending verify frame"
        )
    inbound.position -= pending - keep
    inbound.verify_positions = len(act.token_ids)


# ---- the head's bookkeeping ----

Live = list[tuple[Any, Any]]  # (stage_batch.BatchEntry, RequestState), in the cache's row order


def _head(runtime: StageRuntime, mtp: LastStageMtp, tokens: mx.array, hidden: mx.array) -> mx.array:
    head: MtpHead = runtime.mtp_head
    return head(_embedding(runtime)(tokens), hidden, mtp.mtp_cache)


def _tail(mtp: LastStageMtp, extra: list[mx.array] | None = None) -> Any:
    tail = history_tail(mtp.history, mtp.params)
    if not extra or not mtp.params.has_penalties:
        return tail
    return mx.concatenate([mx.array(tail, dtype=mx.int32), *[e.reshape(1) for e in extra]])


def prefill_rows(runtime: StageRuntime, live: Live, hidden: mx.array) -> None:
    """The last stage, after a forward of prompt pieces (``hidden`` [B, T, D], rows right-
    padded): each MTP request's head gets the pairs (h_i, x_{i+1}) whose next token is known
    (a piece's last hidden waits for the next piece's first token)."""
    for j, (entry, state) in enumerate(live):
        mtp = state.mtp
        if not isinstance(mtp, LastStageMtp):
            continue
        tokens = entry.row.token_ids
        h = hidden[j : j + 1, : len(tokens)]
        ids = mx.array([tokens], dtype=mx.uint32)
        pairs = h[:, :-1] if mtp.carry is None else mx.concatenate([mtp.carry, h[:, :-1]], axis=1)
        pair_tokens = ids[:, 1:] if mtp.carry is None else ids
        if pair_tokens.shape[1] > 0:
            _head(runtime, mtp, pair_tokens, pairs)
        mtp.carry = h[:, -1:]
        mtp.history.extend(tokens)
        mx.eval(mtp.carry, mtp.mtp_cache.state)


# ---- verify rows: one [B, K+1] forward for the verify frames of several requests ----
#
# StageRuntime._forward runs the rows that wait together (node.inference.stage_batch) on the
# batch caches of their requests: first ``commit_before`` (earlier stages: each row's verdict
# commits its request's pending frame, in whatever batch cache the request is now), then one
# forward (``gdn.verify_forward`` when the rows carry drafts), then ``keep_pending`` (earlier
# stages: each row's candidates wait for its verdict) or ``verify_rows`` (the last stage:
# each row's own acceptance rule, all rows committed at once, each request's head drafts).


def commit_verdicts(cache: list[Any], rows: list[tuple[RowPending, int] | None]) -> None:
    """Row j of ``cache`` keeps the first ``rows[j][1]`` positions of its verify frame
    (``rows[j][0]``); rows that are None stay as they are. Attention caches drop each row's
    rejected tail (``_drop_tail``: what remains is an ordinary left-padded cache), each
    GatedDeltaNet row takes its candidate state after that many positions."""
    todo = [(j, r) for j, r in enumerate(rows) if r is not None]
    if not todo:
        return
    first = todo[0][1][0]
    same = len(todo) == len(rows) == first.size and all(
        r[0].layers is first.layers and r[0].row == j for j, r in todo
    )
    for layer, c in enumerate(cache):
        if first.layers[layer] is None:  # attention: a trimmable cache
            drop = [0 if r is None else r[0].positions - r[1] for r in rows]
            if isinstance(c, BatchKVCache):
                _drop_tail(c, drop)
            elif drop[0]:
                c.trim(drop[0])
            continue
        if same:  # one verify forward over exactly these rows (the common case): slices
            pending = first.layers[layer]
            commit_rows(c, pending, [keep - 1 for _, (_, keep) in todo])
            continue
        conv, state = [], []
        for j, r in enumerate(rows):
            if r is None:
                conv.append(c[0][j : j + 1])
                state.append(c[1][j : j + 1])
                continue
            at, keep = r[0].row, r[1]
            p = r[0].layers[layer]
            assert p is not None
            conv.append(p.conv_input[at : at + 1, keep : keep + p.keep, :])
            state.append(p.states[keep - 1][at : at + 1])
        c[0] = mx.concatenate(conv) if len(conv) > 1 else conv[0]
        c[1] = mx.concatenate(state) if len(state) > 1 else state[0]


def commit_before(cache: list[Any], live: Live) -> None:
    """Earlier stages, before a forward: the verdicts the rows carry commit their requests'
    pending verify frames."""
    rows: list[tuple[RowPending, int] | None] = []
    for entry, state in live:
        mtp = state.mtp
        if entry.row.verify is None or mtp is None or not mtp.positions:
            rows.append(None)
            continue
        rows.append(None if mtp.pending is None else (mtp.pending, entry.row.verify[0]))
        mtp.pending, mtp.positions = None, 0
    commit_verdicts(cache, rows)


def keep_pending(
    cache: list[Any], live: Live, pending: list[PendingGdnState | None] | None, width: int
) -> None:
    """Earlier stages, after a forward: each verify row's candidates wait for its verdict (a
    plain row in a verify forward keeps all its positions at once)."""
    plain: list[tuple[RowPending, int] | None] = []
    for j, (entry, state) in enumerate(live):
        here = None if pending is None else RowPending(pending, j, width, len(live))
        if entry.row.verify is not None and state.mtp is not None:
            state.mtp.pending, state.mtp.positions = here, width
            plain.append(None)
        else:
            plain.append(None if here is None else (here, width))
    commit_verdicts(cache, plain)


def check_rows(runtime: StageRuntime, live: Live) -> Live:
    """The last stage, before a forward: a verify row must carry the drafts this stage
    proposed (the first one: the prompt's last token, no drafts, no verdict). A row that
    does not fails its request alone (INVALID_ARGUMENT); the others go on."""
    kept = []
    for entry, state in live:
        row, mtp = entry.row, state.mtp
        problem = ""
        if isinstance(mtp, LastStageMtp) and row.sample and row.verify is None:
            problem = (
                f"a sampled frame of MTP request {row.rid!r} carries no verify (Verify); the "
                "prompt's last token is the first verify frame"
            )
        elif isinstance(mtp, LastStageMtp) and row.verify is not None:
            if mtp.pending_tokens is None:
                if len(row.token_ids) != 1 or row.verify[0] != 0:
                    problem = (
                        "the first sampled frame of an MTP request carries one token, no verdict"
                    )
            elif row.token_ids[1:] != mtp.drafts:
                problem = (
                    f"verify frame carries drafts {row.token_ids[1:]} but this stage proposed "
                    f"{mtp.drafts}"
                )
        if problem:
            state.failed = True
            state.reply(error_response(row.rid, INVALID_ARGUMENT, problem, runtime.position))
        else:
            kept.append((entry, state))
    return kept


def verify_rows(
    runtime: StageRuntime,
    live: Live,
    rows: list[int],
    hidden: mx.array,
    cache: list[Any],
    pending: list[PendingGdnState | None] | None,
) -> list[tuple[Any, pb.BatchToken]]:
    """The last stage: the verdict of each verify row ``rows`` of the forward (``hidden``
    [B, T, D]); every row of it committed at once; each request's head drafts its next K.
    Returns (request state, its BatchToken with the Verdict) per row."""
    shard = runtime.shard
    width = hidden.shape[1]
    decided = {}
    for j in rows:
        entry, state = live[j]
        decided[j] = _accept(shard, state.mtp, entry.row.token_ids, hidden[j : j + 1])
    if pending is not None:  # verify rows keep their accepted prefix, plain rows everything
        commit_verdicts(
            cache,
            [
                (
                    RowPending(pending, j, width, len(live)),
                    decided[j][0] + 1 if j in decided else width,
                )
                for j in range(len(live))
            ],
        )
    out = []
    for j in rows:
        entry, state = live[j]
        row, mtp = entry.row, state.mtp
        n, emitted, first = decided[j]
        _advance(runtime, mtp, row.token_ids, hidden[j : j + 1], n, emitted, first, row.verify[1])
        if state.direct:
            runtime.tokens_returned += 1
        verdict = pb.Verdict(
            token_ids=emitted, accepted=n, drafts=mtp.drafts, position=row.start_position + n + 1
        )
        out.append((state, pb.BatchToken(request_id=row.rid, verdict=verdict)))
    return out


def _accept(shard: Any, mtp: LastStageMtp, tokens: list[int], hidden: mx.array):
    """One verify row's verdict from its target hidden states [1, K+1, D]: (accepted drafts,
    emitted tokens, whether it was the request's first sampled frame)."""
    params = mtp.params
    k = len(tokens) - 1
    if mtp.pending_tokens is None:  # the prompt's last token: sample the first token
        mtp.history.extend(tokens)
        mtp.prompt_len = len(mtp.history)
        token = next_token(shard.logits(hidden[:, -1, :]), params, _tail(mtp), mtp.keys)
        return 0, [int(token.item())], True
    draft_ids = mx.array(mtp.drafts, dtype=mx.uint32) if k else mx.zeros((0,), mx.uint32)
    target_lp = processed_logprobs(shard.logits(hidden[0]), params, _tail(mtp), draft_ids)
    if params.is_greedy:
        n_acc, nxt = greedy_accept_batch(target_lp[None], draft_ids[None])
    elif mtp.seeded:
        shape = (1, target_lp.shape[-1])
        noise = mx.concatenate(
            [position_noise(mtp.keys.at(mtp.position + r), shape) for r in range(k + 1)]
        )
        n_acc, nxt = coupled_accept_batch(target_lp[None], draft_ids[None], noise[None])
    else:
        draft_lp = mx.stack(mtp.draft_lps) if k else mx.zeros((0, target_lp.shape[-1]))
        n_acc, nxt = sampled_accept_batch(
            target_lp[None], draft_lp[None], draft_ids[None], mtp.keys.next()
        )
    n, correction = mx.concatenate([n_acc.astype(mx.int32), nxt.astype(mx.int32)]).tolist()
    emitted = [*mtp.drafts[:n], correction]
    if mtp.seeded:
        mtp.keys.forget_before(mtp.position + len(emitted))
    return n, emitted, False


def _advance(
    runtime: StageRuntime,
    mtp: LastStageMtp,
    tokens: list[int],
    hidden: mx.array,
    n: int,
    emitted: list[int],
    first: bool,
    next_k: int,
) -> None:
    """After a row's verdict: the head's pending pairs and cache, then its next drafts."""
    k = len(tokens) - 1
    if not first and k > 1:
        mtp.mtp_cache.trim(k - 1)  # the chained drafts' entries
    mtp.history.extend(emitted)
    new_tokens = mx.array([emitted], dtype=mx.uint32)
    if first:
        # Pairs (h_{L-2}, x_{L-1}) (from the last prompt piece) and (h_{L-1}, first).
        mtp.pending_hidden = (
            hidden if mtp.carry is None else mx.concatenate([mtp.carry, hidden], axis=1)
        )
        pair_tokens = [*tokens, *emitted] if mtp.carry is not None else emitted
        mtp.pending_tokens = mx.array([pair_tokens], dtype=mx.uint32)
        mtp.carry = None
    elif k == 0:  # the head did not run last time: the new pair waits behind the old ones
        mtp.pending_hidden = mx.concatenate([mtp.pending_hidden, hidden], axis=1)
        mtp.pending_tokens = mx.concatenate([mtp.pending_tokens, new_tokens], axis=1)
    else:
        mtp.pending_hidden = hidden[:, : n + 1, :]
        mtp.pending_tokens = new_tokens
    _draft(runtime, mtp, next_k)
    mx.eval(mtp.mtp_cache.state, mtp.pending_hidden)


def _draft(runtime: StageRuntime, mtp: LastStageMtp, k: int) -> None:
    """Draft ``k`` tokens from the pending pairs (the single-node engine's cycle, first half)."""
    assert mtp.pending_tokens is not None and mtp.pending_hidden is not None
    drafts: list[mx.array] = []
    lps: list[mx.array] = []
    mtp.position = len(mtp.history) - mtp.prompt_len  # of the first draft
    if k == 0 and mtp.pending_tokens.shape[1] > PENDING_LIMIT:
        # Feed all but the newest pair now (the invariant keeps one pending).
        _head(runtime, mtp, mtp.pending_tokens[:, :-1], mtp.pending_hidden[:, :-1])
        mtp.pending_tokens = mtp.pending_tokens[:, -1:]
        mtp.pending_hidden = mtp.pending_hidden[:, -1:]
    if k > 0:
        x = _head(runtime, mtp, mtp.pending_tokens, mtp.pending_hidden)[:, -1:, :]
        for s in range(k):
            if s > 0:
                x = _head(runtime, mtp, drafts[-1].reshape(1, 1), x)
            if mtp.params.is_greedy:
                key = None
            else:
                key = mtp.keys.at(mtp.position + s) if mtp.seeded else mtp.keys.next()
            token, lp = draft_token(
                runtime.shard.logits(x[:, -1, :]), mtp.params, _tail(mtp, drafts), key
            )
            drafts.append(token)
            lps.append(lp)
    if drafts:
        stacked = mx.stack(drafts)
        mx.eval(stacked, lps)
        mtp.drafts = [int(t) for t in stacked.tolist()]
    else:
        mtp.drafts = []
    mtp.draft_lps = lps
