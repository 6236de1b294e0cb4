"""The aiohttp application: OpenAI-compatible HTTP in front of one node's InferenceService.

A streaming generation sends its HTTP headers only once the node has accepted the request (the
node sends gRPC headers after validating and admitting it, or with the first token at the
latest), so the node's refusals (unknown model, bad values, no capacity, node down) become real
HTTP statuses even for ``stream=true``. After the SSE stream has started, a failure is sent as
an OpenAI-style ``data: {"error": ...}`` event. When the HTTP client goes away the handler is
cancelled (or its next write fails) and the gRPC call is cancelled with it, which frees the
request on every stage.
"""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from node.client import (
    AsyncMacmeshClient,
    FinalStats,
    GenerateOptions,
    MacmeshError,
    Unauthenticated,
)
from node.gateway.errors import (
    HttpError,
    bad_request,
    from_client_error,
    from_validation_error,
)
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
    api_key: str | None = None  # callers must send "Authorization: Bearer <api_key>"


# Paths that answer without the API key: a liveness probe must not need a secret.
OPEN_PATHS = frozenset({"/health"})
API_KEY_ENV = "MACMESH_API_KEY"


CONFIG = web.AppKey("config", GatewayConfig)
CLIENT = web.AppKey("client", AsyncMacmeshClient)
MAX_BODY_BYTES = 32 * 1024 * 1024
# A caller's X-Request-Id travels to the node as the request id (for its logs) when it is sane.
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def create_app(
    node_address: str, *, request_timeout: float | None = 600.0, api_key: str | None = None
) -> web.Application:
    """The gateway app for the node at ``node_address``; ``request_timeout`` is each gRPC
    call's deadline in seconds (None = none). With ``api_key`` every path but ``/health``
    needs ``Authorization: Bearer <api_key>`` (401, OpenAI-style, without it).
    Run it with ``handler_cancellation=True``."""
    app = web.Application(
        middlewares=[_errors_as_json, _require_api_key], client_max_size=MAX_BODY_BYTES
    )
    app[CONFIG] = GatewayConfig(node_address, request_timeout, api_key or None)
    app.on_startup.append(_open_client)
    app.on_cleanup.append(_close_client)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/openapi.json", openapi)
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
    if key is None or request.path in OPEN_PATHS:
        return await handler(request)
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return await handler(request)
    message = (
        "Incorrect API key provided."
        if given
        else "Missing API key: send 'Authorization: Bearer "
        "<key>' (the gateway runs with --api-key / MACMESH_API_KEY)."
    )
    raise HttpError(401, message, "invalid_request_error", None, "invalid_api_key")


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
    return web.json_response(error.body(), status=error.status)


async def _parse(request: web.Request, model: type[BaseModel]) -> Any:
    body = await request.read()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


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
    body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
    reply = _reply("chatcmpl", body.model, chat=True, usage=include_usage(body))
    options = _options(chat_options, body, _request_id(request, reply))
    return await _generate(request, options, reply, stream=bool(body.stream))


async def completions(request: web.Request) -> web.StreamResponse:
    body: CompletionRequest = await _parse(request, CompletionRequest)
    reply = _reply("cmpl", body.model, chat=False, usage=include_usage(body))
    options = _options(completion_options, body, _request_id(request, reply))
    return await _generate(request, options, reply, stream=bool(body.stream))


def _reply(prefix: str, model: str, *, chat: bool, usage: bool) -> Reply:
    return Reply(
        id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        chat=chat,
        include_usage=usage,
    )


def _request_id(request: web.Request, reply: Reply) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.match(given) else reply.id


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
    started = time.monotonic()
    events = request.app[CLIENT].generate_with(options)
    outcome = "cancelled"
    try:
        if stream:
            # The node answers its headers once it has validated and admitted the request, so
            # its refusals (unknown model, bad values, no capacity) still become HTTP statuses.
            await events.wait_started()
            response = await _stream(request, events, reply, options.request_id)
        else:
            response = await _collect(events, reply, options.request_id)
        outcome = "done"
        return response
    except MacmeshError:
        outcome = "error"
        raise
    finally:
        events.cancel()  # a no-op when the call finished; frees the request when it did not
        log.info(
            "gateway.generate",
            id=reply.id,
            request_id=options.request_id,
            model=options.model,
            stream=stream,
            outcome=outcome,
            seconds=round(time.monotonic() - started, 3),
        )


async def _collect(events: Any, reply: Reply, request_id: str) -> web.Response:
    parts: list[str] = []
    event = await anext(events, None)
    while event is not None:
        if isinstance(event, FinalStats):
            body = reply.response("".join(parts), event)
            return web.json_response(body, headers={REQUEST_ID_HEADER: request_id})
        parts.append(event.text)
        event = await anext(events, None)
    raise _no_final_stats()


async def _stream(
    request: web.Request, events: Any, reply: Reply, request_id: str
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200, headers={**SSE_HEADERS, REQUEST_ID_HEADER: request_id}
    )
    await response.prepare(request)
    try:
        await _send_events(response, events, reply)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        # The client went away; the caller's finally cancels the gRPC call.
        log.info("gateway.client_disconnected", id=reply.id)
    return response


async def _send_events(response: web.StreamResponse, events: Any, reply: Reply) -> None:
    for chunk in reply.opening_chunks():
        await _send(response, chunk)
    try:
        event = await anext(events, None)
        while event is not None:
            if isinstance(event, FinalStats):
                for chunk in reply.closing_chunks(event):
                    await _send(response, chunk)
                break
            if event.text:
                await _send(response, reply.text_chunk(event.text))
            event = await anext(events, None)
        else:
            await _send(response, _no_final_stats().body())
    except MacmeshError as exc:
        # Headers are gone; tell the client in-band, the way OpenAI-compatible servers do.
        await _send(response, from_client_error(exc).body())


def _no_final_stats() -> HttpError:
    return HttpError(502, "the node ended the generation without final stats", "server_error")


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    # A closed connection raises ConnectionResetError here.
    await response.write(f"data: {data}\n\n".encode())
