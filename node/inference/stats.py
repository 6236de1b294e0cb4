"""Per-request generation statistics: what engines measure and what every request ends with.

``GenerationStats`` is what an engine reports; ``FinalStats`` is the same record as the last
event of a request carries it (the wire's ``GenerationStats`` message): with why it finished.
One record from the engine to the caller: ``macmesh generate --local`` and ``--node``, the
gRPC client and the HTTP gateway all read these fields (node.messages converts them to and
from protobuf, once at each edge).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EngineKind = Literal["native_mtp", "local", "pipeline", "pipeline_mtp"]
ENGINE_KINDS: tuple[str, ...] = ("native_mtp", "local", "pipeline", "pipeline_mtp")
DrafterKind = Literal["native_mtp"]
FinishReason = Literal["stop", "length", "cancelled"]


class StageStats(BaseModel):
    """One pipeline stage a request went through (a single one for local engines)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node_id: str
    start_layer: int = Field(ge=0)
    end_layer: int = Field(ge=0, description="exclusive")
    address: str = Field("", description="host:port of the node's gRPC server, when known")


class GenerationStats(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineKind
    engine_reason: str = ""
    drafter_kind: DrafterKind | None = None
    num_draft_tokens: float = Field(
        0.0,
        ge=0.0,
        description="K, drafts per verify step: the mean of the K chosen per cycle (a request's "
        "last cycles may draft fewer, never past max_tokens)",
    )
    draft_k_histogram: list[int] = Field(
        default_factory=list, description="[K] = cycles that chose K (empty without a drafter)"
    )
    proposed_draft_tokens: int = Field(0, ge=0)
    accepted_draft_tokens: int = Field(0, ge=0)
    acceptance_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="accepted / proposed; None when nothing was drafted"
    )
    prompt_tokens: int = Field(0, ge=0)
    cached_prompt_tokens: int = Field(
        0, ge=0, description="of prompt_tokens, the ones the prompt cache served (not computed)"
    )
    generation_tokens: int = Field(0, ge=0)
    prompt_tps: float = Field(0.0, ge=0.0)
    generation_tps: float = Field(0.0, ge=0.0)
    stages: list[StageStats] = Field(default_factory=list)
    queue_seconds: float = Field(0.0, ge=0.0, description="waiting for a place in the batch")
    time_to_first_token_seconds: float = Field(
        0.0, ge=0.0, description="from arrival at the instance to the first token"
    )


class FinalStats(GenerationStats):
    """The last event of every generation: the engine's stats and why the request finished."""

    kind: Literal["final"] = "final"
    finish_reason: FinishReason
    stop_sequence: str | None = None  # the stop string that ended it (finish_reason "stop")

    @classmethod
    def of(cls, stats: GenerationStats, finish_reason: str, **update: object) -> FinalStats:
        """``stats`` as a final event; ``update`` overrides fields (the coordinator's reason,
        the instance's stages)."""
        return cls.model_validate({**stats.model_dump(), **update, "finish_reason": finish_reason})


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def acceptance_rate(accepted: int, proposed: int) -> float | None:
    return accepted / proposed if proposed else None


def mean_k(counts: list[int]) -> float:
    """The mean K of a K histogram (``counts[k]``: cycles that drafted k)."""
    cycles = sum(counts)
    return sum(k * c for k, c in enumerate(counts)) / cycles if cycles else 0.0
