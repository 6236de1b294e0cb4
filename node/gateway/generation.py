"""One Generate call as every HTTP API of the gateway runs it (OpenAI, Anthropic, Ollama,
Responses): the typed client's event stream, the final stats, the gateway's metrics and the
request's log line. The APIs differ only in how they shape the text and the stats.

    async with Generation(request.app, options, api="anthropic") as gen:
        await gen.wait_started()       # stream: the node admitted it (its refusals raise here)
        async for text in gen.texts():  # non-empty text pieces; gen.stats is set at the end
            ...
    # or: text, stats = await gen.collect()

Leaving the block cancels the gRPC call if it is still running (the client went away, or an
error), which frees the request on every stage.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from node.client import AsyncMacmeshClient, FinalStats, GenerateOptions, MacmeshError
from node.gateway.errors import HttpError, from_client_error, from_validation_error
from node.logging import get_logger
from node.metrics import GenerationMetrics, RequestTracker

log = get_logger(__name__)

CLIENT = web.AppKey("client", AsyncMacmeshClient)
METRICS = web.AppKey("metrics", GenerationMetrics)
# A caller's X-Request-Id travels to the node as the request id (for its logs) when it is sane.
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


async def parse(request: web.Request, model: type[BaseModel]) -> Any:
    body = await request.read()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def request_id(request: web.Request, default: str) -> str:
    """The caller's X-Request-Id when it is sane, else ``default`` (the response's id)."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.match(given) else default


def no_final_stats() -> HttpError:
    return HttpError(502, "the node ended the generation without final stats", "server_error")


class Generation:
    def __init__(self, app: web.Application, options: GenerateOptions, *, api: str) -> None:
        self.options = options
        self.api = api
        self.events = app[CLIENT].generate_with(options)
        self.tracker: RequestTracker = app[METRICS].track(api=api)
        self.stats: FinalStats | None = None
        self.outcome = "cancelled"
        self._started = time.monotonic()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, MacmeshError):
            self.failed(exc)
        elif isinstance(exc, HttpError):
            self.outcome = "error"
        self.events.cancel()  # a no-op when the call finished
        self.tracker.end(self.outcome)
        log.info(
            "gateway.generate",
            api=self.api,
            request_id=self.options.request_id,
            model=self.options.model,
            outcome=self.outcome,
            seconds=round(time.monotonic() - self._started, 3),
        )

    def failed(self, exc: MacmeshError) -> None:
        self.outcome = exc.code.name.lower()

    async def wait_started(self) -> None:
        """Until the node admitted the request; its refusal raises the typed client error."""
        await self.events.wait_started()

    async def texts(self) -> AsyncIterator[str]:
        """The generated text, piece by piece; ``self.stats`` holds the final stats after."""
        event = await anext(self.events, None)
        while event is not None:
            if isinstance(event, FinalStats):
                self.stats = event
                self.outcome = event.finish_reason or "stop"
                self.tracker.final(
                    event.engine,
                    event.prompt_tokens,
                    event.generation_tokens,
                    event.proposed_draft_tokens,
                    event.accepted_draft_tokens,
                    instance=self.options.model,  # the gateway sees models, not instance ids
                    cached_prompt_tokens=event.cached_prompt_tokens,
                )
                return
            self.tracker.tokens(len(event.token_ids))
            if event.text:
                yield event.text
            event = await anext(self.events, None)
        raise no_final_stats()

    async def collect(self) -> tuple[str, FinalStats]:
        parts = [text async for text in self.texts()]
        assert self.stats is not None  # texts() raises unless it saw them
        return "".join(parts), self.stats


async def stream(
    request: web.Request,
    gen: Generation,
    *,
    content_type: str,
    opening: list[bytes],
    piece: Callable[[str], bytes],
    closing: Callable[[FinalStats], list[bytes]],
    error: Callable[[HttpError], bytes],
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Send one generation as a stream in an API's own framing: the node must have admitted
    the request first (so its refusals are still HTTP statuses), then ``opening``, one
    ``piece(text)`` per text delta, ``closing(stats)``; a failure after the headers went out
    is sent in-band as ``error(http_error)``."""
    await gen.wait_started()
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": content_type, "Cache-Control": "no-cache", **(headers or {})},
    )
    await response.prepare(request)
    try:
        for chunk in opening:
            await response.write(chunk)
        try:
            async for text in gen.texts():
                await response.write(piece(text))
            assert gen.stats is not None
            for chunk in closing(gen.stats):
                await response.write(chunk)
        except MacmeshError as exc:
            gen.failed(exc)
            await response.write(error(from_client_error(exc)))
        except HttpError as exc:
            await response.write(error(exc))
        await response.write_eof()
    except ConnectionResetError:
        log.info("gateway.client_disconnected", request_id=gen.options.request_id)
    return response
