"""OpenAI's Responses API (``POST /v1/responses``), text in and text out, over the
InferenceService.

``input`` is a string or a list of messages (``role`` user / assistant / system / developer,
``content`` a string or ``input_text`` / ``output_text`` parts); ``instructions`` is the system
prompt. ``max_output_tokens``, ``temperature``, ``top_p`` and macmesh's extensions (top_k,
min_p, repetition_penalty, seed, mtp_k, engine, ignore_eos) are honoured. Streaming sends the
Responses event sequence (response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta ..., response.output_text.done,
response.content_part.done, response.output_item.done, response.completed — also at the token
limit, with ``status: "incomplete"`` inside, because the openai client's stream helper waits
for that event only), each with a ``sequence_number``; a failure after the stream started is an ``error`` event. macmesh stores
nothing, so ``previous_response_id`` is refused, as are tools and non-text formats. Errors
have OpenAI's shape. A response that hit the token limit is ``status: "incomplete"`` with
``incomplete_details.reason: "max_output_tokens"``, as OpenAI reports it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from node.client import ChatMessage, FinalStats, GenerateOptions
from node.gateway.errors import HttpError
from node.gateway.generation import Generation, parse, request_id, stream
from node.gateway.schemas import UINT32_MAX, MacmeshExtensions
from node.gateway.translate import OPENAI_DEFAULT_TEMPERATURE, extension_options, macmesh_stats


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TextPart(_Request):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Request):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]


class TextFormat(_Request):
    type: Literal["text"]


class TextConfig(_Request):
    format: TextFormat | None = None


class ResponsesRequest(MacmeshExtensions):
    model: str = Field(min_length=1)
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    store: bool | None = None  # nothing is stored either way
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: TextConfig | None = None
    previous_response_id: None = Field(None, description="macmesh stores no responses")
    tools: Annotated[list[dict], Field(max_length=0)] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description="macmesh: 0 or -1 = off")


def _content(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def options(req: ResponsesRequest, request_id: str) -> GenerateOptions:
    if isinstance(req.input, str):
        messages = [ChatMessage(role="user", content=req.input)]
    else:
        messages = [
            ChatMessage(
                role="system" if m.role == "developer" else m.role, content=_content(m.content)
            )
            for m in req.input
        ]
    if req.instructions:
        messages.insert(0, ChatMessage(role="system", content=req.instructions))
    return GenerateOptions(
        model=req.model,
        messages=messages,
        max_tokens=req.max_output_tokens or 0,
        **extension_options(
            req,
            temperature=OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
        ),
        request_id=request_id,
    )


class Reply:
    """One response's ids and the bodies and events built from them."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.req = req
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0

    def item(self, text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": []}
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": [part] if status == "completed" or text else [],
        }

    def body(self, text: str | None, stats: FinalStats | None) -> dict[str, Any]:
        r = self.req
        done = stats is not None
        incomplete = done and stats.finish_reason == "length"
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "model": r.model,
            "output": [self.item(text or "", "completed")] if done else [],
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "store": False,
            "temperature": OPENAI_DEFAULT_TEMPERATURE if r.temperature is None else r.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": r.top_p or 1.0,
            "truncation": "disabled",
            "usage": None,
            "metadata": r.metadata or {},
        }
        if stats is not None:
            body["usage"] = {
                "input_tokens": stats.prompt_tokens,
                "input_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
                "output_tokens": stats.generation_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": stats.prompt_tokens + stats.generation_tokens,
            }
            body["macmesh"] = macmesh_stats(stats).model_dump(mode="json")
        return body

    def event(self, type_: str, **fields: Any) -> bytes:
        data = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return f"event: {type_}\ndata: {payload}\n\n".encode()

    def opening(self) -> list[bytes]:
        where = {"output_index": 0, "item_id": self.item_id, "content_index": 0}
        return [
            self.event("response.created", response=self.body(None, None)),
            self.event("response.in_progress", response=self.body(None, None)),
            self.event(
                "response.output_item.added", output_index=0, item=self.item("", "in_progress")
            ),
            self.event(
                "response.content_part.added",
                **where,
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]

    def delta(self, text: str, parts: list[str]) -> bytes:
        parts.append(text)
        return self.event(
            "response.output_text.delta",
            output_index=0,
            item_id=self.item_id,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def closing(self, text: str, stats: FinalStats) -> list[bytes]:
        where = {"output_index": 0, "item_id": self.item_id, "content_index": 0}
        part = {"type": "output_text", "text": text, "annotations": []}
        final = self.body(text, stats)
        # Always response.completed, the status inside saying "incomplete" at the token limit:
        # the openai client's stream helper (responses.stream) waits for that event only.
        return [
            self.event("response.output_text.done", **where, text=text, logprobs=[]),
            self.event("response.content_part.done", **where, part=part),
            self.event(
                "response.output_item.done", output_index=0, item=self.item(text, "completed")
            ),
            self.event("response.completed", response=final),
        ]

    def error(self, error: HttpError) -> bytes:
        return self.event(
            "error", code=error.detail.code, message=error.detail.message, param=error.detail.param
        )


async def create(request: web.Request) -> web.StreamResponse:
    body: ResponsesRequest = await parse(request, ResponsesRequest)
    reply = Reply(body)
    opts = options(body, request_id(request, reply.id))
    async with Generation(request.app, opts, api="responses") as gen:
        if not body.stream:
            text, stats = await gen.collect()
            return web.json_response(reply.body(text, stats))
        parts: list[str] = []
        return await stream(
            request,
            gen,
            content_type="text/event-stream",
            opening=reply.opening(),
            piece=lambda text: reply.delta(text, parts),
            closing=lambda stats: reply.closing("".join(parts), stats),
            error=reply.error,
        )
