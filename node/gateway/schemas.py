"""The OpenAI-compatible wire shapes of the gateway, as pydantic models.

Requests are validated strictly (a string is not a number), so what the OpenAPI document derived
from these models says is exactly what the gateway accepts. Unknown fields are ignored, as
OpenAI-compatible servers do, except the ones that would silently change the meaning of a request
(tools, logprobs, n > 1, echo, ...): those are declared here and only accept "off".

macmesh's own sampling options (top_k, min_p, repetition_penalty, mtp_k, engine, ignore_eos) are
top-level fields, which is where the openai client's ``extra_body`` puts them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
MAX_STOP_STRINGS = 4

TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]
StopString = Annotated[str, StringConstraints(min_length=1)]
LogitBias = Annotated[
    dict[
        Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")],
        Annotated[float, Field(ge=-100.0, le=100.0)],
    ],
    WithJsonSchema(
        {
            "type": "object",
            "description": "token id (a decimal string) -> bias added to its logit",
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": {"type": "number", "minimum": -100.0, "maximum": 100.0},
        }
    ),
]
Engine = Literal["auto", "native_mtp", "local", "pipeline", "pipeline_mtp"]


def _off_only(feature: str, off: str) -> WrapValidator:
    """A field that accepts only "off": anything else is refused as an unsupported feature,
    in words (pydantic would say "List should have at most 0 items")."""

    def check(value: object, handler: ValidatorFunctionWrapHandler) -> object:
        try:
            return handler(value)
        except ValidationError as exc:
            if all(
                e["type"].endswith("_type") or e["type"] == "none_required" for e in exc.errors()
            ):
                raise  # the wrong type (n="2"): pydantic's own words say that best
            raise PydanticCustomError(
                "unsupported", f"{feature} {{verb}} not supported by macmesh; {off}", {"verb": "is"}
            ) from None

    return WrapValidator(check)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = None


class GenerationFields(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1, description="a model-card id or a checkpoint directory")
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="default 1.0; 0 is greedy decoding"
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: Annotated[
        int | None,
        Field(ge=1, le=1, description="only 1 is supported"),
        _off_only("n > 1 (several choices per request)", "send n=1 or leave it out"),
    ] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    user: str | None = None
    # macmesh extensions
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description="0 or -1 turn it off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    mtp_k: int | None = Field(
        None, ge=0, le=UINT32_MAX, description="draft tokens per step; 0 = the model's default_k"
    )
    engine: Engine | None = Field(None, description="override the instance's engine choice")
    ignore_eos: bool | None = None


class MacmeshExtensions(_Request):
    """macmesh's own request fields, for the APIs whose requests are not GenerationFields."""

    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    mtp_k: int | None = Field(
        None, ge=0, le=UINT32_MAX, description="draft tokens per step; 0 = the model's default_k"
    )
    engine: Engine | None = Field(None, description="override the instance's engine choice")
    ignore_eos: bool | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ResponseFormat(_Request):
    type: Literal["text"]


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    # accepted only when they ask for nothing macmesh does not do
    logprobs: Annotated[
        Literal[False] | None, _off_only("logprobs", "send false or leave it out")
    ] = None
    top_logprobs: Annotated[
        Literal[0] | None, _off_only("top_logprobs", "send 0 or leave it out")
    ] = None
    response_format: Annotated[
        ResponseFormat | None,
        _off_only("response_format other than text (JSON mode)", 'send {"type": "text"}'),
    ] = None
    tools: Annotated[
        Annotated[list[dict], Field(max_length=0)] | None,
        _off_only("tool calling (tools)", "leave tools out or send []"),
    ] = None
    tool_choice: Annotated[
        Literal["none"] | None,
        _off_only("tool calling (tool_choice)", 'send "none" or leave it out'),
    ] = None


class CompletionRequest(GenerationFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)
        ]
    ) = Field(description="one text prompt, or one list of token ids")
    max_tokens: int | None = Field(16, ge=1, le=UINT32_MAX)
    echo: Annotated[Literal[False] | None, _off_only("echo", "send false or leave it out")] = None
    best_of: Annotated[Literal[1] | None, _off_only("best_of > 1", "send 1 or leave it out")] = None
    logprobs: Annotated[Literal[0] | None, _off_only("logprobs", "send 0 or leave it out")] = None
    suffix: Annotated[
        Literal[""] | None, _off_only("suffix (insertion)", 'send "" or leave it out')
    ] = None


# ----------------------------------------------------------------------------- responses


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Response):
    cached_tokens: int = Field(0, description="prompt tokens the instance's prompt cache served")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class StageOut(_Response):
    node_id: str
    address: str
    start_layer: int
    end_layer: int


class MacmeshStats(_Response):
    """How the request ran: engine, speculative decoding, speed and stages."""

    engine: str
    engine_reason: str
    drafter_kind: str | None
    num_draft_tokens: float  # mean K per cycle
    draft_k_histogram: list[int]  # [K] = cycles that chose K
    proposed_draft_tokens: int
    accepted_draft_tokens: int
    acceptance_rate: float | None = Field(
        description="accepted / proposed; null when nothing was drafted"
    )
    prompt_tokens: int
    cached_prompt_tokens: int = 0
    generation_tokens: int
    prompt_tps: float
    tps: float = Field(description="generation tokens per second")
    queue_seconds: float = Field(description="waiting for a place in the instance's batch")
    time_to_first_token_seconds: float = Field(description="from arrival at the instance")
    finish_reason: str
    stages: list[StageOut]


FinishReason = Literal["stop", "length"]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    macmesh: MacmeshStats


class ChunkDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    macmesh: MacmeshStats | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    macmesh: MacmeshStats


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    macmesh: MacmeshStats | None = None


class NativeMtpOut(_Response):
    default_k: int
    max_k: int


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "macmesh"
    native_mtp: NativeMtpOut | None
    model_type: str
    num_layers: int
    context_length: int
    bytes: int
    launched: bool
    has_weights: bool = False  # the weights are on the cluster node answering (or launched)


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(_Response):
    error: ErrorDetail


class Health(_Response):
    status: Literal["ok", "unavailable"]
    node: str
    detail: str | None = None
