"""What an engine streams back: token deltas, then one final event with the stats."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from node.inference.stats import GenerationStats

FinishReason = Literal["stop", "length"]  # what an engine ends with; FinalStats adds "cancelled"


class TokenDelta(BaseModel):
    """New text and the token ids it came from; the client's ``Delta`` is this type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["delta"] = "delta"
    text: str = Field(description="newly decodable text (may be empty mid-character)")
    token_ids: list[int]


class GenerationDone(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["done"] = "done"
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: GenerationStats


GenerationEvent = Annotated[TokenDelta | GenerationDone, Field(discriminator="kind")]
