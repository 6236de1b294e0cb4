"""Per-request generation statistics, the final message of every request (DESIGN.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EngineKind = Literal["native_mtp", "local", "pipeline"]


class StageStats(BaseModel):
    """One pipeline stage a request went through (a single one for local engines)."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    start_layer: int = Field(ge=0)
    end_layer: int = Field(ge=0, description="exclusive")
    address: str = Field("", description="host:port of the node's gRPC server, when known")


class GenerationStats(BaseModel):
    model_config = ConfigDict(frozen=True)

    engine: EngineKind
    engine_reason: str = ""
    drafter_kind: Literal["native_mtp"] | None = None
    num_draft_tokens: int = Field(0, ge=0, description="K, drafts per verify step")
    proposed_draft_tokens: int = Field(0, ge=0)
    accepted_draft_tokens: int = Field(0, ge=0)
    acceptance_rate: float | None = Field(
        None, description="accepted / proposed; None when nothing was drafted"
    )
    prompt_tokens: int = Field(0, ge=0)
    generation_tokens: int = Field(0, ge=0)
    prompt_tps: float = Field(0.0, ge=0.0)
    generation_tps: float = Field(0.0, ge=0.0)
    stages: list[StageStats] = Field(default_factory=list)
    queue_seconds: float = Field(0.0, ge=0.0, description="waiting for a place in the batch")
    time_to_first_token_seconds: float = Field(
        0.0, ge=0.0, description="from arrival at the instance to the first token"
    )


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def acceptance_rate(accepted: int, proposed: int) -> float | None:
    return accepted / proposed if proposed else None
