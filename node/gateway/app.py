"""The aiohttp application: the gateway's router. OpenAI (chat, completions, responses),
Anthropic (messages) and Ollama (``/api/*``) HTTP APIs, Prometheus ``/metrics`` and the dashboard
(``/``), all in front of one node's InferenceService through the typed client; each API lives in
its own module, and errors take the shape of the API the path belongs to.

A streaming generation sends its HTTP headers only once the node has accepted the request (the
node sends gRPC headers after validating and admitting it, or with the first token at the
latest), so the node's refusals (unknown model, bad values, no capacity, node down) become real
HTTP statuses even for ``stream=true``. After the SSE stream has started, a failure is sent as
an OpenAI-style ``data: {"error": ...}`` event. When the HTTP client goes away the handler is
cancelled (or its next write fails) and the gRPC call is cancelled with it, which frees the
request on every stage.
"""

from __future__ import annotations

import base64
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from node.client import (
    AsyncMacmeshClient,
    GenerateOptions,
    MacmeshError,
    Unauthenticated,
)
from node.gateway import anthropic, dashboard, ollama, responses
from node.gateway.errors import (
    HttpError,
    bad_request,
    from_client_error,
    from_validation_error,
)
from node.gateway.generation import (
    CLIENT,
    METRICS,
    REQUEST_ID_HEADER,
    Generation,
    parse,
    request_id,
)
from node.gateway.generation import stream as send_stream
from node.gateway.metrics import gateway_metrics, metrics_endpoint
from node.gateway.openapi import openapi_document
from node.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Health,
    ModelCard,
    ModelList,
    NativeMtpOut,
)
from node.gateway.translate import (
    Reply,
    RequestError,
    chat_options,
    completion_options,
    include_usage,
)
from node.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    node_address: str
    request_timeout: float | None  # each gRPC call's deadline, seconds
    api_key: str | None = None  # callers must send it (Bearer, x-api-key or Basic password)


# Paths that answer without the API key: a liveness probe must not need a secret.
OPEN_PATHS = frozenset({"/health"})
API_KEY_ENV = "MACMESH_API_KEY"


CONFIG = web.AppKey("config", GatewayConfig)
MAX_BODY_BYTES = 32 * 1024 * 1024


def create_app(
    node_address: str, *, request_timeout: float | None = 600.0, api_key: str | None = None
) -> web.Application:
    """The gateway app for the node at ``node_address``; ``request_timeout`` is each gRPC
    call's deadline in seconds (None = none). With ``api_key`` every path but ``/health``
    needs the key (see ``_key_matches``; 401 in the path's API shape without it).
    Run it with ``handler_cancellation=True``."""
    app = web.Application(
        middlewares=[_errors_as_json, _require_api_key], client_max_size=MAX_BODY_BYTES
    )
    app[CONFIG] = GatewayConfig(node_address, request_timeout, api_key or None)
    app[METRICS] = gateway_metrics()
    app.on_startup.append(_open_client)
    app.on_cleanup.append(_close_client)
    add = app.router
    add.add_get("/health", health)
    add.add_get("/v1/models", list_models)
    add.add_get("/v1/models/{model:.+}", get_model)
    add.add_post("/v1/chat/completions", chat_completions)
    add.add_post("/v1/completions", completions)
    add.add_post("/v1/responses", responses.create)
    add.add_post("/v1/messages", anthropic.messages)
    add.add_get("/api/version", ollama.version)
    add.add_get("/api/tags", ollama.tags)
    add.add_get("/api/ps", ollama.ps)
    add.add_post("/api/show", ollama.show)
    add.add_post("/api/chat", ollama.chat)
    add.add_post("/api/generate", ollama.generate)
    add.add_get("/metrics", metrics_endpoint)
    add.add_get("/openapi.json", openapi)
    dashboard.add_routes(app)
    return app


async def _open_client(app: web.Application) -> None:
    # grpc.aio channels belong to the loop they are created in: create it on startup.
    config = app[CONFIG]
    app[CLIENT] = AsyncMacmeshClient(config.node_address, timeout=config.request_timeout)


async def _close_client(app: web.Application) -> None:
    await app[CLIENT].close()


@web.middleware
async def _require_api_key(request: web.Request, handler: Any) -> web.StreamResponse:
    key = request.app[CONFIG].api_key
    if key is None or request.path in OPEN_PATHS or _key_matches(request, key):
        return await handler(request)
    given = request.headers.get("Authorization") or request.headers.get("x-api-key")
    message = (
        "Incorrect API key provided."
        if given
        else "Missing API key: send 'Authorization: Bearer "
        "<key>' (the gateway runs with --api-key / MACMESH_API_KEY)."
    )
    raise HttpError(401, message, "invalid_request_error", None, "invalid_api_key")


def _key_matches(request: web.Request, key: str) -> bool:
    """Bearer (OpenAI, Ollama clients), x-api-key (Anthropic clients), or HTTP Basic with the
    key as the password (a browser on the dashboard)."""
    wanted = key.encode()
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    candidates = [request.headers.get("x-api-key", "")]
    if scheme.lower() == "bearer":
        candidates.append(token.strip())
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            decoded = ""
        candidates.append(decoded.partition(":")[2])
    return any(hmac.compare_digest(c.encode(), wanted) for c in candidates if c)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except HttpError as exc:
        return _error_response(request, exc)
    except Unauthenticated as exc:  # the node wants a cluster secret this gateway lacks
        error = HttpError(
            502,
            f"the gateway cannot authenticate to its node ({exc.message}); start it with the "
            "cluster's secret (MACMESH_CLUSTER_SECRET or MACMESH_CLUSTER_SECRET_FILE)",
            "server_error",
        )
        return _error_response(request, error)
    except MacmeshError as exc:
        return _error_response(request, from_client_error(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        type_ = "invalid_request_error" if exc.status < 500 else "server_error"
        return _error_response(request, HttpError(exc.status, exc.reason, type_))
    except Exception:
        log.exception("gateway.unhandled", path=request.path)
        error = HttpError(500, "internal gateway error (see the gateway log)", "server_error")
        return _error_response(request, error)


def _error_response(request: web.Request, error: HttpError) -> web.Response:
    log.info(
        "gateway.error",
        path=request.path,
        status=error.status,
        param=error.detail.param,
        message=error.detail.message,
    )
    headers = {}
    if error.status == 401:  # a browser then asks for the key (any user name, the key)
        headers["WWW-Authenticate"] = 'Basic realm="macmesh", charset="UTF-8"'
    return web.json_response(error_body(request.path, error), status=error.status, headers=headers)


def error_body(path: str, error: HttpError) -> dict[str, Any]:
    """The error in the shape of the API ``path`` belongs to."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return anthropic.error_body(error)
    if path.startswith("/api/"):
        return ollama.error_body(error)
    return error.body()


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status)


# ----------------------------------------------------------------------------- endpoints


async def health(request: web.Request) -> web.Response:
    address = request.app[CONFIG].node_address
    try:
        await request.app[CLIENT].check_health()
    except MacmeshError as exc:
        return _json(Health(status="unavailable", node=address, detail=exc.message), 503)
    return _json(Health(status="ok", node=address))


async def list_models(request: web.Request) -> web.Response:
    models = await request.app[CLIENT].list_models()
    return _json(ModelList(data=[_card(m) for m in models]))


async def get_model(request: web.Request) -> web.Response:
    wanted = request.match_info["model"]
    for model in await request.app[CLIENT].list_models():
        if model.id == wanted:
            return _json(_card(model))
    raise HttpError(
        404, f"model {wanted!r} not found", "not_found_error", "model", "model_not_found"
    )


def _card(model: Any) -> ModelCard:
    mtp = model.native_mtp
    return ModelCard(
        id=model.id,
        native_mtp=NativeMtpOut(default_k=mtp.default_k, max_k=mtp.max_k) if mtp else None,
        model_type=model.model_type,
        num_layers=model.num_layers,
        context_length=model.context_length,
        bytes=model.bytes,
        launched=model.launched,
        has_weights=model.has_weights,
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
    reply = _reply("chatcmpl", body.model, chat=True, usage=include_usage(body))
    options = _options(chat_options, body, request_id(request, reply.id))
    return await _generate(request, options, reply, stream=bool(body.stream))


async def completions(request: web.Request) -> web.StreamResponse:
    body: CompletionRequest = await parse(request, CompletionRequest)
    reply = _reply("cmpl", body.model, chat=False, usage=include_usage(body))
    options = _options(completion_options, body, request_id(request, reply.id))
    return await _generate(request, options, reply, stream=bool(body.stream))


def _reply(prefix: str, model: str, *, chat: bool, usage: bool) -> Reply:
    return Reply(
        id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        chat=chat,
        include_usage=usage,
    )


def _options(build: Any, body: Any, request_id: str) -> GenerateOptions:
    try:
        return build(body, request_id)
    except RequestError as exc:
        raise bad_request(exc.message, exc.param) from None
    except ValidationError as exc:
        raise from_validation_error(exc) from None


# ----------------------------------------------------------------------------- generation


async def _generate(
    request: web.Request, options: GenerateOptions, reply: Reply, *, stream: bool
) -> web.StreamResponse:
    api = "openai_chat" if reply.chat else "openai_completions"
    headers = {REQUEST_ID_HEADER: options.request_id}
    async with Generation(request.app, options, api=api) as gen:
        if not stream:
            text, stats = await gen.collect()
            return web.json_response(reply.response(text, stats), headers=headers)
        return await send_stream(
            request,
            gen,
            content_type="text/event-stream",
            headers={"X-Accel-Buffering": "no", **headers},
            opening=[_sse(c) for c in reply.opening_chunks()],
            piece=lambda text: _sse(reply.text_chunk(text)),
            closing=lambda stats: [*(_sse(c) for c in reply.closing_chunks(stats)), DONE],
            # Headers are gone; tell the client in-band, the way OpenAI-compatible servers do.
            error=lambda error: _sse(error.body()) + DONE,
        )


DONE = b"data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
