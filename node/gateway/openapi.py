"""The gateway's OpenAPI 3.1 document, derived from the same pydantic models that validate
requests and build responses, so the document cannot drift from the behaviour."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from node import __version__
from node.gateway.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorBody,
    Health,
    ModelCard,
    ModelList,
)

_REF = "#/components/schemas/{model}"
_SSE_DESCRIPTION = (
    "With stream=true: server-sent events, each `data: <chunk JSON>` "
    "(chat.completion.chunk or text_completion), ending with `data: [DONE]`. The last chunk "
    "before [DONE] carries the `macmesh` stats and, with stream_options.include_usage, `usage`."
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "invalid request (error.param names the field)",
        404: "unknown model",
        429: "the cluster is out of memory or capacity",
        502: "the node broke the generation protocol",
        503: "the node or a stage is unavailable",
        504: "the request's deadline passed",
    }
    return {str(s): {"description": reasons[s], "content": _json("ErrorBody")} for s in statuses}


def _generation_path(summary: str, request: str, response: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [
                {
                    "name": "X-Request-Id",
                    "in": "header",
                    "required": False,
                    "description": "passed to the node as the request id (for its logs) when "
                    "it matches ^[A-Za-z0-9._:/-]{1,128}$; echoed in the response",
                    "schema": {"type": "string"},
                }
            ],
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {
                    "description": "the completion (JSON), or a stream of chunks (SSE). "
                    + _SSE_DESCRIPTION,
                    "content": {
                        **_json(response),
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors(400, 404, 429, 502, 503, 504),
            },
        }
    }


@cache
def openapi_document() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], str]] = [
        (ChatCompletionRequest, "validation"),
        (CompletionRequest, "validation"),
        (ChatCompletion, "serialization"),
        (ChatCompletionChunk, "serialization"),
        (Completion, "serialization"),
        (CompletionChunk, "serialization"),
        (ModelList, "serialization"),
        (ModelCard, "serialization"),
        (ErrorBody, "serialization"),
        (Health, "serialization"),
    ]
    _, top = models_json_schema(models, ref_template=_REF)  # type: ignore[arg-type]
    schemas = top.get("$defs", {})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "macmesh OpenAI-compatible gateway",
            "version": __version__,
            "description": "OpenAI-compatible HTTP over a macmesh cluster's gRPC "
            "InferenceService. Extensions: top_k, min_p, repetition_penalty, mtp_k, engine, "
            "ignore_eos (top-level request fields); responses carry a `macmesh` stats object.",
        },
        "paths": {
            "/health": {
                "get": {
                    "summary": "whether the gateway's node serves InferenceService",
                    "responses": {
                        "200": {"description": "serving", "content": _json("Health")},
                        "503": {
                            "description": "the node is unavailable",
                            "content": _json("Health"),
                        },
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "models the cluster knows, with native MTP capability",
                    "responses": {
                        "200": {"description": "the models", "content": _json("ModelList")},
                        **_errors(503, 504),
                    },
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "one model",
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "the model", "content": _json("ModelCard")},
                        **_errors(404, 503, 504),
                    },
                }
            },
            "/v1/chat/completions": _generation_path(
                "chat completion", "ChatCompletionRequest", "ChatCompletion"
            ),
            "/v1/completions": _generation_path(
                "text completion", "CompletionRequest", "Completion"
            ),
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": schemas},
    }
