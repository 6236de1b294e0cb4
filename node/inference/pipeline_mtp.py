"""Native MTP across a pipeline (engine ``pipeline_mtp``): the coordinator's side.

``PipelineMtpEngine`` is a ``PipelineEngine`` (same stages, streams, ring return, release and
failure handling) whose last stage also holds the checkpoint's MTP head. A request runs:

1. open with ``OpenRequest.mtp``; the prompt goes through in the plain prefill pieces (the
   last stage fills the head's cache from them), and its last token travels as the first
   *verify frame* (one position, no verdict to carry);
2. the last stage samples (or verifies) and answers with a ``Verdict``: the emitted tokens
   (accepted drafts + correction), the accepted count ``n`` and the next K drafts, drafted
   by the head right after the verdict (node.inference.stage_mtp);
3. the coordinator streams the emitted tokens and, unless the request is done, sends the
   next verify frame ``[correction, d1..dK]`` at once, with ``keep_previous = n + 1``: the
   verdict of the previous frame rides with it, so every stage commits the accepted prefix
   just before it runs the new frame. No extra round trip: one pipeline traversal per cycle
   (K+1 positions per frame), as many traversals as cycles. The verdicts of one batched
   forward come home as one ``TokenBatch``, and the next verify rows go back as one
   ``ActivationBatch`` per K (``PipelineEngine._send_rows``), so requests in flight together
   keep verifying together.

K per cycle: the request's ``mtp_k`` pins it; otherwise a ``KPolicy`` chooses K (0..max_k)
from the request's running acceptance and this instance's cost table, which counts the hops.
At load (``measure_costs``) the coordinator times its own stage 0 over B = 1, 2, 4, 8
requests x T = 1..max_k+1 positions (verify mode) and one hop (a probe round trip to stage 1,
halved); a cycle of B requests is then modelled as N stages' [B, T] verify plus N hops (the
ring), and drafting k tokens as B x k times one layer plus the LM head (about two of stage
0's layers; the last stage drafts request after request). K is chosen at the number of
requests on the stages, which verify together. Every cycle the coordinator then times
whole — frame out to verdict in, every stage and every hop — corrects the table
(``CostTable.observe``), so a slow link or a busy stage shows up within a few cycles. The K a
frame asks for is the K of the *next* frame's drafts (the last stage drafts them before it
answers), so a choice takes effect one cycle later. Without a stage here to time, K stays
at the card's ``default_k`` unless the request pins it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from node.inference.batching.mtp_step import batch_sizes_to_measure
from node.inference.mtp.costs import CONTEXT_TOKENS, fastest_interleaved, no_dearer_than_longer
from node.inference.mtp.gdn import commit_verified, verify_forward
from node.inference.mtp.kpolicy import CostTable, KPolicy
from node.inference.pipeline import PipelineEngine, _Active
from node.inference.requests import GenerateRequest, check_against_model, prompt_token_ids
from node.inference.stats import acceptance_rate, mean_k
from node.logging import get_logger
from node.proto.macmesh.v1 import stage_pb2 as pb

log = get_logger(__name__)

# The card's native-MTP table when the checkpoint has no card (node.inference.loading's).
FALLBACK_K_LIMITS = (2, 3)
REPEATS = 3
MEASURED_BATCH = 8  # the largest batch timed at load; the table extends it beyond


@dataclass
class _MtpActive(_Active):
    """A pipeline_mtp request in flight: the K policy and the draft counters."""

    policy: KPolicy | None = None
    costs: CostTable | None = None
    k_counts: list[int] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    asked_k: int = 0  # drafts the frame in flight will come back with
    sent_at: float = 0.0
    in_flight_k: int = 0  # drafts the frame in flight verifies
    batch: int = 1  # requests on the stages when K was last chosen
    sent_batch: int = 1  # ... when the frame in flight was sent

    def stats(self) -> dict[str, Any]:
        return {
            "engine": "pipeline_mtp",
            "drafter_kind": "native_mtp",
            "num_draft_tokens": mean_k(self.k_counts),
            "draft_k_histogram": self.k_counts,
            "proposed_draft_tokens": self.proposed,
            "accepted_draft_tokens": self.accepted,
            "acceptance_rate": acceptance_rate(self.accepted, self.proposed),
        }


def pipeline_cost_table(
    stage_verify_s: list[float] | dict[int, list[float]],
    num_stages: int,
    hop_s: float,
    layer_s: float,
) -> CostTable:
    """The cycle model of an N-stage ring for B requests verifying together (one list: B = 1):
    verify(B, T) = N x one stage's [B, T] verify + N hops; draft(B, k) = B x k x (one decoder
    layer + the LM head, ~2 layers): the last stage drafts each request's tokens with its own
    head cache, one request after another. Pure."""
    by_batch = stage_verify_s if isinstance(stage_verify_s, dict) else {1: stage_verify_s}
    verify = {
        b: [num_stages * (t + hop_s) for t in no_dearer_than_longer(costs)]
        for b, costs in by_batch.items()
    }
    draft = {b: [b * k * 2 * layer_s for k in range(len(costs))] for b, costs in by_batch.items()}
    return CostTable(verify=verify, draft=draft)


class PipelineMtpEngine(PipelineEngine):
    """Pipelined generation that drafts on the last stage and verifies K+1 tokens per traversal."""

    kind = "pipeline_mtp"

    def __init__(
        self,
        *args: Any,
        mtp_k_limits: tuple[int, int] | None = None,
        fixed_k: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if len(self.stages) < 2:
            raise ValueError("pipeline_mtp needs at least two stages (one node runs native_mtp)")
        self.mtp_head_on_last = True
        self.default_k, self.max_k = mtp_k_limits or FALLBACK_K_LIMITS
        self.fixed_k = fixed_k  # every request at this K (benchmarks)
        self.costs: CostTable | None = None  # shared by the instance's requests; see load()
        self.current_k: int | None = None

    def load(self) -> list[Any]:
        shards = super().load()
        try:
            self.costs = self.measure_costs()
        except Exception as exc:  # K then stays at the card's default_k
            log.warning("pipeline_mtp cost table not measured", error=str(exc))
        return shards

    def measure_costs(self, repeats: int = REPEATS) -> CostTable | None:
        """Time stage 0 (when it runs here) over B requests x T = 1..max_k+1 positions (B up
        to ``max_batch``, at most ``MEASURED_BATCH``) and one hop to stage 1; model the ring
        from them (``pipeline_cost_table``). A request's K then follows how many requests are
        on the stages (``_choose_k``): drafting that pays alone may not pay in a large batch."""
        from node.inference.probe import probe_round_trips

        if self._local is None:
            return None
        shard = self._local.shard
        ids = [(7 * i + 3) % self.vocab_size for i in range(CONTEXT_TOKENS + self.max_k + 1)]

        def verify(t: int, batch: int, cache: list[Any]) -> Callable[[], None]:
            inputs = mx.array([ids[CONTEXT_TOKENS : CONTEXT_TOKENS + t]] * batch)

            def run() -> None:
                if t == 1:
                    h = shard.forward(inputs, cache)
                else:
                    h, pending = verify_forward(shard.text_model, inputs, cache)
                    commit_verified(cache, pending, 1, t)
                mx.eval(h, [c.state for c in cache])
                for c in cache:  # keep the context length fixed
                    if c.is_trimmable():
                        c.trim(1)

            return run

        stage_s: dict[int, list[float]] = {}
        for batch in batch_sizes_to_measure(min(self.max_batch, MEASURED_BATCH)):
            cache = shard.make_cache()  # every row the same tokens: the cost is the shape's
            context = mx.array([ids[:CONTEXT_TOKENS]] * batch)
            mx.eval(shard.forward(context, cache), [c.state for c in cache])
            n = repeats if batch == 1 else max(2, repeats // 2)
            # Interleaved rounds, as on a single node: a burst of load slows one sample of
            # every T instead of all of one T's (the policy compares T with T).
            runs = [verify(t, batch, cache) for t in range(1, self.max_k + 2)]
            stage_s[batch] = fastest_interleaved(runs, n, time.perf_counter)
        address = self.addresses[self.stages[1].node_id]
        probe = mx.zeros((1, 1, shard.hidden_size), dtype=shard.activation_dtype)
        hop_s = min(probe_round_trips(address, self.instance_id, probe, 2 * repeats)) / 2
        layers = shard.end_layer - shard.start_layer
        table = pipeline_cost_table(stage_s, len(self.stages), hop_s, stage_s[1][0] / layers)
        log.info(
            "pipeline_mtp costs",
            stage_verify_ms={b: [round(1000 * x, 2) for x in v] for b, v in stage_s.items()},
            hop_ms=round(1000 * hop_s, 3),
        )
        return table

    # ---- the request API ----

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        ids = prompt_token_ids(request, self.tokenizer)
        max_k = self.max_k if request.engine != "pipeline" else None
        check_against_model(
            request,
            ids,
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            max_k=max_k,
        )
        return ids

    def _new_active(
        self, request: GenerateRequest, request_id: str, stop_ids: set[int], max_new: int
    ) -> _Active:
        if request.engine == "pipeline":  # plain pipelined decode on this instance
            return super()._new_active(request, request_id, stop_ids, max_new)
        pin = self.fixed_k if self.fixed_k is not None else request.mtp_k
        return _MtpActive(
            request_id=request_id,
            stop_ids=stop_ids,
            max_new=max_new,
            policy=KPolicy(max_k=self.max_k, start_k=self.default_k, pin=pin),
            costs=None if pin is not None else self.costs,
            k_counts=[0] * (self.max_k + 1),
        )

    def _first_frames(
        self, active: _Active, request: GenerateRequest, ids: list[int]
    ) -> list[pb.ForwardRequest]:
        frames = super()._first_frames(active, request, ids)
        if not isinstance(active, _MtpActive):
            return frames
        frames[0].open.mtp = True
        # The prompt's last token is the first verify frame: one position, no verdict yet.
        last = frames[-1].activation
        last.verify.CopyFrom(pb.Verify(keep_previous=0, draft_k=self._choose_k(active, 1)))
        active.sent_at, active.in_flight_k = time.perf_counter(), 0
        active.sent_batch = active.batch
        return frames

    def _choose_k(self, active: _MtpActive, committed: int) -> int:
        """K of the drafts the next verdict brings, never past what the request may emit
        (``committed`` tokens are emitted once the frame in flight is verified)."""
        assert active.policy is not None
        # The requests on the stages verify together (rows of the same K): the cycle that K
        # pays for is the batch's, and the table prices it at this batch size.
        active.batch = max(1, self.batch_size)
        k = active.policy.next_k(active.costs, batch=active.batch)
        self.current_k = k
        room = active.max_new - active.generated - committed
        active.asked_k = max(0, min(k, room - 1))
        return active.asked_k

    # ---- receiving ----

    def _on_verdict(
        self, request: _Active, verdict: pb.Verdict
    ) -> tuple[pb.BatchRow | None, list[int]]:
        if not isinstance(request, _MtpActive) or request.policy is None:
            return super()._on_verdict(request, verdict)
        now = time.perf_counter()
        k, n = request.in_flight_k, verdict.accepted
        if request.generated > 0:  # a verify cycle (the first verdict is the first token)
            request.k_counts[k] += 1
            request.proposed += k
            request.accepted += n
            request.policy.observe(k, n)
            if request.costs is not None:
                request.costs.observe(request.sent_batch, k, now - request.sent_at)
        emitted: list[int] = []
        stop = False
        for token in verdict.token_ids:
            request.generated += 1
            emitted.append(token)
            if token in request.stop_ids or request.generated >= request.max_new:
                stop = True
                break
        drafts = list(verdict.drafts)
        row = None
        if stop:
            self._release(request)
        else:
            next_k = self._choose_k(request, 1 + len(drafts))
            row = pb.BatchRow(
                request_id=request.request_id,
                start_position=verdict.position,
                token_ids=[verdict.token_ids[-1], *drafts],
                sample=True,
                verify=pb.Verify(keep_previous=n + 1, draft_k=next_k),
            )
            request.sent_at, request.in_flight_k = time.perf_counter(), len(drafts)
            request.sent_batch = request.batch
        return row, emitted
