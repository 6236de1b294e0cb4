"""Ollama's API (``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``, ``/api/chat``,
``/api/generate``) over the InferenceService, so Ollama clients and tools can use a cluster.

``stream`` defaults to true, as in Ollama: newline-delimited JSON objects, the last one with
``done: true``, ``done_reason`` and the counts and durations (nanoseconds) Ollama reports.
``options`` maps ``num_predict`` (-1 / -2: no limit but the node's), ``temperature``,
``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``repeat_penalty``, ``presence_penalty``
and ``frequency_penalty``; other options (``num_ctx``, ``num_gpu``, ...) are accepted and
ignored, as Ollama ignores those a runner does not use. Unset sampling options take Ollama's
defaults (temperature 0.8, top_k 40, top_p 0.9). ``/api/generate`` with an empty prompt
answers ``done_reason: "load"`` at once (Ollama's "load the model" call; launching stays
``macmesh launch``'s job). Errors are Ollama's ``{"error": "..."}``, in the stream too.
Tools, images, ``format`` (JSON mode), templates and ``context`` are refused with a 400.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from node import __version__
from node.client import ChatMessage, FinalStats, GenerateOptions, ModelInfo, Sampling
from node.gateway.errors import HttpError
from node.gateway.generation import CLIENT, Generation, parse, request_id, stream
from node.gateway.schemas import UINT64_MAX, StopString
from node.gateway.translate import macmesh_stats

NDJSON = "application/x-ndjson"
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9


def error_body(error: HttpError) -> dict[str, Any]:
    return {"error": error.detail.message}


# ----------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class Options(_Request):
    num_predict: int | None = Field(None, ge=-2, le=2**32 - 1)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: Annotated[list[StopString], Field(max_length=16)] | None = None
    repeat_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)


class Message(_Request):
    role: Literal["system", "user", "assistant"]
    content: str
    images: Annotated[list[str], Field(max_length=0)] | None = None
    tool_calls: Annotated[list[dict], Field(max_length=0)] | None = None


class _Generation(_Request):
    model: str = Field(min_length=1)
    stream: bool | None = True
    options: Options | None = None
    format: Literal[""] | None = None
    keep_alive: str | int | float | None = None
    think: Literal[False] | None = None


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    tools: Annotated[list[dict], Field(max_length=0)] | None = None


class GenerateRequest(_Generation):
    prompt: str = ""
    system: str | None = None
    raw: bool | None = False
    suffix: Literal[""] | None = None
    images: Annotated[list[str], Field(max_length=0)] | None = None
    template: Literal[""] | None = None
    context: Annotated[list[int], Field(max_length=0)] | None = None


class ShowRequest(_Request):
    model: str = Field(min_length=1)


def sampling(opts: Options | None) -> Sampling:
    o = opts or Options()
    return Sampling(
        temperature=DEFAULT_TEMPERATURE if o.temperature is None else o.temperature,
        top_p=DEFAULT_TOP_P if o.top_p is None else o.top_p,
        top_k=DEFAULT_TOP_K if o.top_k is None else o.top_k,
        min_p=o.min_p or 0.0,
        repetition_penalty=o.repeat_penalty or 1.0,
        presence_penalty=o.presence_penalty or 0.0,
        frequency_penalty=o.frequency_penalty or 0.0,
        seed=o.seed,
    )


def _common(req: _Generation, request_id: str) -> dict[str, Any]:
    opts = req.options or Options()
    limit = opts.num_predict if opts.num_predict and opts.num_predict > 0 else 0
    return {
        "model": req.model,
        "max_tokens": limit,
        "sampling": sampling(req.options),
        "stop": list(opts.stop or []),
        "request_id": request_id,
    }


def chat_options(req: ChatRequest, request_id: str) -> GenerateOptions:
    messages = [ChatMessage(role=m.role, content=m.content) for m in req.messages]
    return GenerateOptions(messages=messages, **_common(req, request_id))


def generate_options(req: GenerateRequest, request_id: str) -> GenerateOptions:
    if req.raw:
        return GenerateOptions(prompt=req.prompt, raw=True, **_common(req, request_id))
    messages = [ChatMessage(role="user", content=req.prompt)]
    if req.system:
        messages.insert(0, ChatMessage(role="system", content=req.system))
    return GenerateOptions(messages=messages, **_common(req, request_id))


# ----------------------------------------------------------------------------- responses


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(tokens: int, tps: float) -> int:
    return int(tokens / tps * 1e9) if tps > 0 else 0


def done_fields(stats: FinalStats, began: float) -> dict[str, Any]:
    return {
        "done": True,
        "done_reason": "length" if stats.finish_reason == "length" else "stop",
        "total_duration": int((time.monotonic() - began) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": _ns(stats.prompt_tokens, stats.prompt_tps),
        "eval_count": stats.generation_tokens,
        "eval_duration": _ns(max(stats.generation_tokens - 1, 0), stats.generation_tps),
        "macmesh": macmesh_stats(stats).model_dump(mode="json"),
    }


def line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def details(model: ModelInfo) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": model.model_type,
        "families": [model.model_type],
        "parameter_size": "",
        "quantization_level": "",
    }


def model_entry(model: ModelInfo) -> dict[str, Any]:
    return {
        "name": model.id,
        "model": model.id,
        "modified_at": "1970-01-01T00:00:00Z",
        "size": model.bytes,
        "digest": "",
        "details": details(model),
    }


# ----------------------------------------------------------------------------- endpoints


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def tags(request: web.Request) -> web.Response:
    models = await request.app[CLIENT].list_models()
    return web.json_response({"models": [model_entry(m) for m in models]})


async def ps(request: web.Request) -> web.Response:
    models = {m.id: m for m in await request.app[CLIENT].list_models()}
    status = await request.app[CLIENT].cluster_status()
    running = []
    for instance in status.instances:
        known = models.get(instance.model)
        entry = model_entry(known) if known else {"name": instance.model, "model": instance.model}
        running.append({**entry, "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0})
    return web.json_response({"models": running})


async def show(request: web.Request) -> web.Response:
    body: ShowRequest = await parse(request, ShowRequest)
    for model in await request.app[CLIENT].list_models():
        if model.id == body.model:
            info: dict[str, Any] = {
                "general.architecture": model.model_type,
                f"{model.model_type}.block_count": model.num_layers,
                f"{model.model_type}.context_length": model.context_length,
            }
            if model.native_mtp is not None:
                info["macmesh.native_mtp.default_k"] = model.native_mtp.default_k
                info["macmesh.native_mtp.max_k"] = model.native_mtp.max_k
            return web.json_response(
                {
                    "modelfile": "",
                    "parameters": "",
                    "template": "",
                    "details": details(model),
                    "model_info": info,
                    "capabilities": ["completion"],
                    "modified_at": "1970-01-01T00:00:00Z",
                }
            )
    raise HttpError(404, f"model '{body.model}' not found", "not_found_error", "model")


async def chat(request: web.Request) -> web.StreamResponse:
    body: ChatRequest = await parse(request, ChatRequest)
    opts = chat_options(body, request_id(request, f"ollama-{time.time_ns()}"))

    def piece(text: str) -> dict[str, Any]:
        return {
            "model": body.model,
            "created_at": now(),
            "message": {"role": "assistant", "content": text},
            "done": False,
        }

    return await _run(request, opts, body.stream is not False, piece)


async def generate(request: web.Request) -> web.StreamResponse:
    body: GenerateRequest = await parse(request, GenerateRequest)

    def piece(text: str) -> dict[str, Any]:
        return {"model": body.model, "created_at": now(), "response": text, "done": False}

    if not body.prompt and not body.system:  # Ollama's "load the model" call
        loaded = {**piece(""), "done": True, "done_reason": "load"}
        return web.json_response(loaded)
    opts = generate_options(body, request_id(request, f"ollama-{time.time_ns()}"))
    return await _run(request, opts, body.stream is not False, piece)


async def _run(
    request: web.Request, opts: GenerateOptions, streaming: bool, piece: Any
) -> web.StreamResponse:
    began = time.monotonic()
    async with Generation(request.app, opts, api="ollama") as gen:
        if not streaming:
            text, stats = await gen.collect()
            reply = piece(text)
            return web.json_response({**reply, **done_fields(stats, began)})
        return await stream(
            request,
            gen,
            content_type=NDJSON,
            opening=[],
            piece=lambda text: line(piece(text)),
            closing=lambda stats: [line({**piece(""), **done_fields(stats, began)})],
            error=lambda e: line(error_body(e)),
        )
