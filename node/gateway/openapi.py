"""The gateway's OpenAPI 3.1 document, derived from the same pydantic models that validate
requests and build responses, so the document cannot drift from the behaviour."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from node import __version__
from node.gateway import anthropic, ollama, responses
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


OPENAI_ERROR: dict[str, Any] = _ref("ErrorBody")
ANTHROPIC_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
OLLAMA_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def _error_responses(error: dict[str, Any], *statuses: int) -> dict[str, Any]:
    return {
        str(s): {
            "description": "an error, in this API's own shape",
            "content": {"application/json": {"schema": error}},
        }
        for s in statuses
    }


def _post(
    summary: str, request: dict[str, Any], response: dict[str, Any], error: dict[str, Any]
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": request},
            "responses": {
                "200": {
                    "description": "the reply (JSON), or a stream",
                    "content": {"application/json": {"schema": response}},
                },
                **_error_responses(error, 400, 401, 404, 429, 502, 503, 504),
            },
        }
    }


def _get(summary: str, error: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {
                    "description": "the answer",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **_error_responses(error, 401, 503, 504),
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
        (anthropic.MessagesRequest, "validation"),
        (anthropic.Message, "serialization"),
        (responses.ResponsesRequest, "validation"),
        (ollama.ChatRequest, "validation"),
        (ollama.GenerateRequest, "validation"),
        (ollama.ShowRequest, "validation"),
    ]
    refs, top = models_json_schema(models, ref_template=_REF)  # type: ignore[arg-type]
    schemas = top.get("$defs", {})

    def ref(model: type[BaseModel], mode: str = "validation") -> dict[str, Any]:
        return {"application/json": {"schema": refs[(model, mode)]}}  # type: ignore[index]

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
            "/v1/responses": _post(
                "OpenAI Responses (text in, text out); stream=true sends Responses events",
                ref(responses.ResponsesRequest),
                {"type": "object"},
                OPENAI_ERROR,
            ),
            "/v1/messages": _post(
                "Anthropic Messages; stream=true sends Anthropic's server-sent events",
                ref(anthropic.MessagesRequest),
                ref(anthropic.Message, "serialization")["application/json"]["schema"],
                ANTHROPIC_ERROR,
            ),
            "/api/chat": _post(
                "Ollama chat; NDJSON unless stream is false",
                ref(ollama.ChatRequest),
                {"type": "object"},
                OLLAMA_ERROR,
            ),
            "/api/generate": _post(
                "Ollama generate; NDJSON unless stream is false",
                ref(ollama.GenerateRequest),
                {"type": "object"},
                OLLAMA_ERROR,
            ),
            "/api/show": _post(
                "Ollama: one model's details",
                ref(ollama.ShowRequest),
                {"type": "object"},
                OLLAMA_ERROR,
            ),
            "/api/tags": _get("Ollama: the models the cluster knows", OLLAMA_ERROR),
            "/api/ps": _get("Ollama: the launched models", OLLAMA_ERROR),
            "/api/version": _get("Ollama: the gateway's version", OLLAMA_ERROR),
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
