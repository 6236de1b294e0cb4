"""A generation request, its validation, and how it becomes prompt token ids.

Checks that need only the request run when it is built (pydantic ``ValidationError``, a
``ValueError`` naming the field and value); checks that need the model — vocabulary,
context length, the card's max K — run in ``check_against_model`` and raise ``RequestError``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from node.inference.sampling import SamplingParams

# "pipeline": plain pipelined decode on a pipeline_mtp instance (no drafts).
RequestedEngine = Literal["auto", "native_mtp", "local", "pipeline"]


class RequestError(ValueError):
    """A request that cannot run on this model; the message names the bad value."""


class GenerateRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str | None = Field(None, description="text; the chat template applies unless raw")
    prompt_ids: list[int] | None = Field(None, description="token ids, used as given")
    max_tokens: int = Field(256, ge=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    engine: RequestedEngine = "auto"
    mtp_k: int | None = Field(None, ge=1, description="drafts per step; None → the card's default")
    ignore_eos: bool = False
    raw: bool = Field(False, description="skip the chat template")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt and prompt_ids")
        if self.prompt is not None and self.prompt == "":
            raise ValueError("prompt is empty")
        if self.prompt_ids is not None:
            if not self.prompt_ids:
                raise ValueError("prompt_ids is empty")
            for i, token in enumerate(self.prompt_ids):
                if token < 0:
                    raise ValueError(f"prompt_ids[{i}]={token} is negative")
        return self


def prompt_token_ids(request: GenerateRequest, tokenizer: Any) -> list[int]:
    """The prompt as token ids: given ids, raw text, or text through the chat template."""
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    assert request.prompt is not None
    if request.raw or not getattr(tokenizer, "has_chat_template", False):
        return list(tokenizer.encode(request.prompt, add_special_tokens=False))
    messages = [{"role": "user", "content": request.prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def check_against_model(
    request: GenerateRequest,
    prompt_ids: list[int],
    *,
    vocab_size: int,
    context_length: int,
    max_k: int | None,
) -> None:
    """Raise ``RequestError`` naming the value when the request does not fit this model."""
    if not prompt_ids:
        raise RequestError("prompt is empty after tokenization")
    for i, token in enumerate(prompt_ids):
        if not 0 <= token < vocab_size:
            raise RequestError(
                f"prompt_ids[{i}]={token} is outside the vocabulary [0, {vocab_size})"
            )
    if len(prompt_ids) >= context_length:
        raise RequestError(
            f"prompt has {len(prompt_ids)} tokens, beyond the model's context of "
            f"{context_length} tokens (at least one must remain for generation)"
        )
    if request.mtp_k is not None and max_k is not None and request.mtp_k > max_k:
        raise RequestError(f"mtp_k={request.mtp_k} is above this model's max_k={max_k}")
    try:
        request.sampling.check_vocab(vocab_size)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
