"""Per-request limits a node enforces before any work: prompt size and max_tokens.

Pure checks over the request message; each failure is a ``LimitExceeded`` (a ``ValueError``, so
it goes out as INVALID_ARGUMENT) whose message names the limit, the value and the setting that
raises it. Message size is gRPC's own limit (``max_message_bytes``): beyond it gRPC answers
RESOURCE_EXHAUSTED naming both sizes before the request reaches a handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_PROMPT_CHARS = 1_000_000
DEFAULT_MAX_PROMPT_TOKENS = 131_072
DEFAULT_MAX_TOKENS_LIMIT = 32_768
DEFAULT_MAX_STOPS = 16
DEFAULT_MAX_MESSAGES = 4_096


class LimitExceeded(ValueError):
    """A request is beyond a node's limit; the message names limit, value and setting."""


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    max_tokens: int = DEFAULT_MAX_TOKENS_LIMIT
    max_stops: int = DEFAULT_MAX_STOPS
    max_messages: int = DEFAULT_MAX_MESSAGES

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(
            max_prompt_chars=getattr(settings, "max_prompt_chars", DEFAULT_MAX_PROMPT_CHARS),
            max_prompt_tokens=getattr(settings, "max_prompt_tokens", DEFAULT_MAX_PROMPT_TOKENS),
            max_tokens=getattr(settings, "max_tokens_limit", DEFAULT_MAX_TOKENS_LIMIT),
            max_stops=getattr(settings, "max_stops", DEFAULT_MAX_STOPS),
            max_messages=getattr(settings, "max_messages", DEFAULT_MAX_MESSAGES),
        )


def _over(what: str, value: int, limit: int, setting: str) -> LimitExceeded:
    return LimitExceeded(
        f"{what} is {value}, above this node's limit of {limit} (setting {setting})"
    )


def check_request(request: Any, limits: Limits) -> None:
    """Check a ``GenerateRequest`` against ``limits`` before it is tokenized."""
    if request.max_tokens > limits.max_tokens:
        raise _over("max_tokens", request.max_tokens, limits.max_tokens, "MACMESH_MAX_TOKENS_LIMIT")
    messages = request.messages.messages
    chars = len(request.text) + sum(len(m.content) + len(m.role) for m in messages)
    if chars > limits.max_prompt_chars:
        raise _over(
            "the prompt length (characters)",
            chars,
            limits.max_prompt_chars,
            "MACMESH_MAX_PROMPT_CHARS",
        )
    if len(request.prompt_ids.ids) > limits.max_prompt_tokens:
        raise _over(
            "the prompt length (prompt_ids)",
            len(request.prompt_ids.ids),
            limits.max_prompt_tokens,
            "MACMESH_MAX_PROMPT_TOKENS",
        )
    if len(messages) > limits.max_messages:
        raise _over(
            "the number of messages", len(messages), limits.max_messages, "MACMESH_MAX_MESSAGES"
        )
    if len(request.stop) > limits.max_stops:
        raise _over(
            "the number of stop strings", len(request.stop), limits.max_stops, "MACMESH_MAX_STOPS"
        )


def check_prompt_tokens(count: int, limits: Limits) -> None:
    """Check the tokenized prompt's length."""
    if count > limits.max_prompt_tokens:
        raise _over(
            "the prompt length (tokens)",
            count,
            limits.max_prompt_tokens,
            "MACMESH_MAX_PROMPT_TOKENS",
        )
