"""Anthropic's Messages API (``POST /v1/messages``) over the InferenceService.

Text in, text out: system prompts (a string or text blocks), user / assistant turns (a string
or text blocks), ``stop_sequences`` (``stop_reason: "stop_sequence"`` names the one that
matched), ``max_tokens`` (required, as in Anthropic's API), temperature / top_p / top_k, and
streaming as Anthropic's server-sent events (message_start, content_block_start, ping,
content_block_delta, content_block_stop, message_delta, message_stop). Errors have Anthropic's
shape ``{"type": "error", "error": {"type": ..., "message": ...}}``; an error after the stream
started is an ``event: error``. Tools, images and extended thinking are refused with a 400
naming the field. Defaults follow Anthropic: temperature 1.0.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from node.client import ChatMessage, FinalStats, GenerateOptions
from node.gateway.errors import HttpError
from node.gateway.generation import Generation, parse, request_id, stream
from node.gateway.schemas import UINT32_MAX, MacmeshExtensions, MacmeshStats, StopString
from node.gateway.translate import extension_options, macmesh_stats

DEFAULT_TEMPERATURE = 1.0
MAX_STOP_SEQUENCES = 16  # the node's own limit (MACMESH_MAX_STOPS default)

# Anthropic's error type for each HTTP status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(error: HttpError) -> dict[str, Any]:
    type_ = _TYPES.get(
        error.status, "api_error" if error.status >= 500 else "invalid_request_error"
    )
    return {"type": "error", "error": {"type": type_, "message": error.detail.message}}


# ----------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TextBlock(_Request):
    type: Literal["text"]
    text: str


class MessageIn(_Request):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]


class Disabled(_Request):
    type: Literal["disabled"]


class MessagesRequest(MacmeshExtensions):
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=UINT32_MAX)
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    # accepted only when they ask for nothing macmesh does not do
    tools: Annotated[list[dict], Field(max_length=0)] | None = None
    thinking: Disabled | None = None


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


def options(req: MessagesRequest, request_id: str) -> GenerateOptions:
    messages = [ChatMessage(role=m.role, content=_text(m.content)) for m in req.messages]
    if req.system:
        messages.insert(0, ChatMessage(role="system", content=_text(req.system)))
    return GenerateOptions(
        model=req.model,
        messages=messages,
        max_tokens=req.max_tokens,
        **extension_options(
            req,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
        ),
        stop=list(req.stop_sequences or []),
        request_id=request_id,
    )


# ----------------------------------------------------------------------------- responses


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextOut(_Response):
    type: Literal["text"] = "text"
    text: str


class Usage(_Response):
    """Anthropic's split: ``input_tokens`` are the prompt tokens computed, the ones the prompt
    cache served are ``cache_read_input_tokens`` (macmesh caches on its own: nothing is ever
    written on request, ``cache_creation_input_tokens`` stays 0)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(_Response):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextOut]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence"] | None
    stop_sequence: str | None
    usage: Usage
    macmesh: MacmeshStats | None = None


def stop_reason(stats: FinalStats) -> Literal["end_turn", "max_tokens", "stop_sequence"]:
    if stats.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stats.stop_sequence else "end_turn"


def usage(stats: FinalStats) -> Usage:
    return Usage(
        input_tokens=stats.prompt_tokens - stats.cached_prompt_tokens,
        output_tokens=stats.generation_tokens,
        cache_read_input_tokens=stats.cached_prompt_tokens,
    )


def message(id_: str, model: str, text: str, stats: FinalStats) -> Message:
    return Message(
        id=id_,
        model=model,
        content=[TextOut(text=text)],
        stop_reason=stop_reason(stats),
        stop_sequence=stats.stop_sequence,
        usage=usage(stats),
        macmesh=macmesh_stats(stats),
    )


def sse(event: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


def opening_events(id_: str, model: str) -> list[bytes]:
    start = Message(
        id=id_,
        model=model,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=Usage(input_tokens=0, output_tokens=0),
    ).model_dump(mode="json", exclude={"macmesh"})
    return [
        sse("message_start", {"type": "message_start", "message": start}),
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        sse("ping", {"type": "ping"}),
    ]


def text_event(text: str) -> bytes:
    delta = {"type": "text_delta", "text": text}
    return sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})


def closing_events(stats: FinalStats) -> list[bytes]:
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason(stats), "stop_sequence": stats.stop_sequence},
        "usage": usage(stats).model_dump(),
        "macmesh": macmesh_stats(stats).model_dump(mode="json"),
    }
    return [
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_delta", delta),
        sse("message_stop", {"type": "message_stop"}),
    ]


# ----------------------------------------------------------------------------- endpoint


async def messages(request: web.Request) -> web.StreamResponse:
    body: MessagesRequest = await parse(request, MessagesRequest)
    id_ = f"msg_{uuid.uuid4().hex}"
    opts = options(body, request_id(request, id_))
    async with Generation(request.app, opts, api="anthropic") as gen:
        if not body.stream:
            text, stats = await gen.collect()
            return web.json_response(message(id_, body.model, text, stats).model_dump(mode="json"))
        return await stream(
            request,
            gen,
            content_type="text/event-stream",
            opening=opening_events(id_, body.model),
            piece=text_event,
            closing=closing_events,
            error=lambda e: sse("error", error_body(e)),
        )
