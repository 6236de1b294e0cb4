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
   (K+1 positions per frame), as many traversals as cycles.

K per cycle: the request's ``mtp_k`` pins it; otherwise a ``KPolicy`` chooses K (0..max_k)
from the request's running acceptance and a cost table of this instance: verify and draft
seconds as the coordinator measures whole cycles, per K — each cycle's seconds include every
stage's forward *and every hop*, so the hop cost is in the table. The table starts from a
model (every K costs the same: a traversal is mostly hops and per-frame overhead) and the
measured cycles correct it (``CostTable.observe``). The K a frame asks for is the K of the
*next* frame's drafts (the last stage drafts them before it answers), so a choice takes
effect one cycle later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from node.inference.mtp.kpolicy import CostTable, KPolicy
from node.inference.pipeline import PipelineEngine, _Active
from node.inference.requests import GenerateRequest, check_against_model, prompt_token_ids
from node.inference.stats import acceptance_rate
from node.proto.macmesh.v1 import stage_pb2 as pb

# The card's native-MTP table when the checkpoint has no card (node.inference.loading's).
FALLBACK_K_LIMITS = (2, 3)


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

    def stats(self) -> dict[str, Any]:
        cycles = sum(self.k_counts)
        mean_k = sum(k * c for k, c in enumerate(self.k_counts)) / cycles if cycles else 0.0
        return {
            "engine": "pipeline_mtp",
            "drafter_kind": "native_mtp",
            "num_draft_tokens": mean_k,
            "draft_k_histogram": self.k_counts,
            "proposed_draft_tokens": self.proposed,
            "accepted_draft_tokens": self.accepted,
            "acceptance_rate": acceptance_rate(self.accepted, self.proposed),
        }


def flat_cost_table(max_k: int, seconds: float = 1.0) -> CostTable:
    """The starting cost model: a traversal costs the same at every K (hops dominate); the
    live cycles (``observe``) then correct each K by what it really costs here."""
    return CostTable(verify={1: [seconds] * (max_k + 1)}, draft={1: [0.0] * (max_k + 1)})


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
        self.costs = flat_cost_table(self.max_k)  # shared by the instance's requests
        self.current_k: int | None = None

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
        return frames

    def _choose_k(self, active: _MtpActive, committed: int) -> int:
        """K of the drafts the next verdict brings, never past what the request may emit
        (``committed`` tokens are emitted once the frame in flight is verified)."""
        assert active.policy is not None
        k = active.policy.next_k(active.costs)
        self.current_k = k
        room = active.max_new - active.generated - committed
        active.asked_k = max(0, min(k, room - 1))
        return active.asked_k

    # ---- receiving ----

    def _on_verdict(self, request: _Active, verdict: pb.Verdict) -> None:
        if not isinstance(request, _MtpActive) or request.policy is None:
            super()._on_verdict(request, verdict)
            return
        now = time.perf_counter()
        k, n = request.in_flight_k, verdict.accepted
        if request.generated > 0:  # a verify cycle (the first verdict is the first token)
            request.k_counts[k] += 1
            request.proposed += k
            request.accepted += n
            request.policy.observe(k, n)
            if request.costs is not None:
                request.costs.observe(1, k, now - request.sent_at)
        emitted: list[int] = []
        stop = False
        for token in verdict.token_ids:
            request.generated += 1
            emitted.append(token)
            if token in request.stop_ids or request.generated >= request.max_new:
                stop = True
                break
        drafts = list(verdict.drafts)
        if stop:
            self._release(request)
        else:
            next_k = self._choose_k(request, 1 + len(drafts))
            frame = pb.Activation(
                start_position=verdict.position,
                token_ids=[verdict.token_ids[-1], *drafts],
                sample=True,
                verify=pb.Verify(keep_previous=n + 1, draft_k=next_k),
            )
            request.sent_at, request.in_flight_k = time.perf_counter(), len(drafts)
            self._send([pb.ForwardRequest(request_id=request.request_id, activation=frame)])
        request.events.put(("tokens", emitted))
