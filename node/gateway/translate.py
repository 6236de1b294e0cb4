"""OpenAI requests to macmesh Generate options, and macmesh events back to OpenAI shapes (pure).

Defaults follow OpenAI, not macmesh: temperature 1.0 unless the request says otherwise, and
16 new tokens for text completions. A chat without max_tokens leaves the limit to the node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from node.client import ChatMessage, FinalStats, GenerateOptions, Sampling
from node.gateway.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageIn,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    FinishReason,
    GenerationFields,
    MacmeshExtensions,
    MacmeshStats,
    PromptTokensDetails,
    Usage,
)

OPENAI_DEFAULT_TEMPERATURE = 1.0


class RequestError(ValueError):
    """A request that is well-formed JSON but asks for something contradictory or unsupported."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def sampling(req: GenerationFields) -> Sampling:
    temperature = OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    return Sampling(
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),  # -1 is vLLM's "off"
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias={int(token): bias for token, bias in (req.logit_bias or {}).items()},
        seed=req.seed,
    )


def extension_options(
    req: MacmeshExtensions,
    *,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
) -> dict[str, Any]:
    """GenerateOptions fields from macmesh's extensions plus an API's own sampling values."""
    return {
        "sampling": Sampling(
            temperature=temperature,
            top_p=top_p or 1.0,
            top_k=max(top_k or 0, 0),
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            seed=req.seed,
        ),
        "engine": req.engine or "auto",
        "mtp_k": req.mtp_k or 0,
        "ignore_eos": bool(req.ignore_eos),
    }


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _common(req: GenerationFields, request_id: str) -> dict[str, Any]:
    return {
        "model": req.model,
        "sampling": sampling(req),
        "engine": req.engine or "auto",
        "mtp_k": req.mtp_k or 0,
        "ignore_eos": bool(req.ignore_eos),
        "stop": stop_strings(req.stop),
        "request_id": request_id,
    }


def chat_message(message: ChatMessageIn) -> ChatMessage:
    if isinstance(message.content, str):
        content = message.content
    else:
        content = "\n".join(part.text for part in message.content)
    role = "system" if message.role == "developer" else message.role
    return ChatMessage(role=role, content=content)


def chat_options(req: ChatCompletionRequest, request_id: str) -> GenerateOptions:
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise RequestError(
            "max_completion_tokens",
            f"max_completion_tokens={req.max_completion_tokens} contradicts "
            f"max_tokens={req.max_tokens}; send one of them",
        )
    limit = req.max_completion_tokens or req.max_tokens or 0
    return GenerateOptions(
        messages=[chat_message(m) for m in req.messages],
        max_tokens=limit,
        **_common(req, request_id),
    )


def completion_options(req: CompletionRequest, request_id: str) -> GenerateOptions:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]  # one batch of token ids
    limit = 16 if req.max_tokens is None else req.max_tokens
    common = _common(req, request_id)
    if isinstance(prompt, str):
        return GenerateOptions(prompt=prompt, raw=True, max_tokens=limit, **common)
    if prompt and isinstance(prompt[0], str):
        return GenerateOptions(prompt=prompt[0], raw=True, max_tokens=limit, **common)
    return GenerateOptions(prompt_ids=list(prompt), max_tokens=limit, **common)


def include_usage(req: GenerationFields) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# ----------------------------------------------------------------------------- responses


def finish_reason(stats: FinalStats) -> FinishReason:
    return "length" if stats.finish_reason == "length" else "stop"


def usage(stats: FinalStats) -> Usage:
    return Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.generation_tokens,
        total_tokens=stats.prompt_tokens + stats.generation_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.cached_prompt_tokens),
    )


def macmesh_stats(stats: FinalStats) -> MacmeshStats:
    """The request's FinalStats in the HTTP API's shape (``tps`` is generation_tps; the stop
    sequence is not part of it)."""
    fields = stats.model_dump(exclude={"kind", "generation_tps", "stop_sequence"})
    return MacmeshStats.model_validate({**fields, "tps": stats.generation_tps})


@dataclass(frozen=True)
class Reply:
    """Builds one request's response body or SSE chunks; ``chat`` picks the endpoint's shape."""

    id: str
    created: int
    model: str
    chat: bool
    include_usage: bool = False

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chunks sent before any text: the assistant role for chat, nothing for completions."""
        if not self.chat:
            return []
        choice = ChatChunkChoice(index=0, delta=ChunkDelta(role="assistant", content=""))
        return [self._chat_chunk([choice])]

    def text_chunk(self, text: str) -> dict[str, Any]:
        if self.chat:
            return self._chat_chunk([ChatChunkChoice(index=0, delta=ChunkDelta(content=text))])
        return self._completion_chunk([CompletionChoice(index=0, text=text)])

    def closing_chunks(self, stats: FinalStats) -> list[dict[str, Any]]:
        """The finish_reason chunk, then the usage chunk if asked for; the last carries macmesh."""
        reason = finish_reason(stats)
        extra = macmesh_stats(stats)
        if self.chat:
            choices: Sequence[Any] = [
                ChatChunkChoice(index=0, delta=ChunkDelta(), finish_reason=reason)
            ]
            make = self._chat_chunk
        else:
            choices = [CompletionChoice(index=0, text="", finish_reason=reason)]
            make = self._completion_chunk
        if not self.include_usage:
            return [make(choices, macmesh=extra)]
        return [make(choices), make([], usage=usage(stats), macmesh=extra)]

    def response(self, text: str, stats: FinalStats) -> dict[str, Any]:
        reason = finish_reason(stats)
        if self.chat:
            body: ChatCompletion | Completion = ChatCompletion(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[
                    ChatChoice(
                        index=0, message=AssistantMessage(content=text), finish_reason=reason
                    )
                ],
                usage=usage(stats),
                macmesh=macmesh_stats(stats),
            )
        else:
            body = Completion(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[CompletionChoice(index=0, text=text, finish_reason=reason)],
                usage=usage(stats),
                macmesh=macmesh_stats(stats),
            )
        return body.model_dump(mode="json")

    def _chat_chunk(
        self,
        choices: Sequence[Any],
        usage: Usage | None = None,
        macmesh: MacmeshStats | None = None,
    ) -> dict[str, Any]:
        return self._chunk(ChatCompletionChunk, choices, usage, macmesh)

    def _completion_chunk(
        self,
        choices: Sequence[Any],
        usage: Usage | None = None,
        macmesh: MacmeshStats | None = None,
    ) -> dict[str, Any]:
        return self._chunk(CompletionChunk, choices, usage, macmesh)

    def _chunk(
        self,
        kind: type[ChatCompletionChunk] | type[CompletionChunk],
        choices: Sequence[Any],
        usage: Usage | None,
        macmesh: MacmeshStats | None,
    ) -> dict[str, Any]:
        chunk = kind(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=list(choices),
            usage=usage,
            macmesh=macmesh,
        )
        return self._chunk_json(chunk, usage, macmesh)

    def _chunk_json(
        self,
        chunk: ChatCompletionChunk | CompletionChunk,
        usage: Usage | None,
        macmesh: MacmeshStats | None,
    ) -> dict[str, Any]:
        # OpenAI sends "usage": null on every chunk when usage was asked for, else omits it.
        exclude = set()
        if usage is None and not self.include_usage:
            exclude.add("usage")
        if macmesh is None:
            exclude.add("macmesh")
        return chunk.model_dump(mode="json", exclude=exclude)
