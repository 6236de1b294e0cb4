"""Every failure the gateway reports, as an HTTP status plus an OpenAI-style error body (pure).

The openai client turns the status into its exception type (400 BadRequestError, 404
NotFoundError, 429 RateLimitError, 503/5xx InternalServerError), and ``error.param`` names the
offending request field when there is one.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from node.client import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    MacmeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from node.gateway.schemas import ErrorBody, ErrorDetail

_MAX_SHOWN_INPUT = 80

# (HTTP status, OpenAI-style error type) for each typed client error.
_HTTP_FOR_ERROR: dict[type[MacmeshError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    FailedPrecondition: (400, "invalid_request_error"),
    NotFound: (404, "not_found_error"),
    ResourceExhausted: (429, "resource_exhausted_error"),
    Unavailable: (503, "service_unavailable_error"),
    Cancelled: (503, "service_unavailable_error"),
    DeadlineExceeded: (504, "timeout_error"),
    Unimplemented: (501, "not_implemented_error"),
}


class HttpError(Exception):
    """An error response: status plus an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type_, param=param, code=code)

    def body(self) -> dict[str, Any]:
        return ErrorBody(error=self.detail).model_dump(mode="json")


def bad_request(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, "invalid_request_error", param=param)


def from_client_error(exc: MacmeshError, *, model_param: bool = True) -> HttpError:
    """Map a node's answer to HTTP; a NOT_FOUND during generation names the model."""
    status, type_ = _HTTP_FOR_ERROR.get(type(exc), (500, "server_error"))
    param = "model" if isinstance(exc, NotFound) and model_param else None
    code = "model_not_found" if param == "model" else exc.code.name.lower()
    return HttpError(status, exc.message, type_, param=param, code=code)


def field_path(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; pydantic's union branch names dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _is_union_branch(part):
            continue
        else:
            path += f".{part}" if path else part
    return path


def _is_union_branch(part: str) -> bool:
    # pydantic inserts the tried type ("str", "list[TextPart]", "function-after[...]") into loc
    return (
        part in {"str", "int", "float", "bool", "none", "list", "dict"}
        or "[" in part
        or part.startswith(("constrained-", "function-", "lax-", "json-"))
        or part[:1].isupper()  # a model's class name
    )


def from_validation_error(exc: ValidationError) -> HttpError:
    """A 400 naming the first bad field and the value it had."""
    errors = exc.errors(include_url=False)
    # In a union every branch reports; a type mismatch is the least useful of those reports.
    first = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("the request body must be a JSON object")
    param = field_path(tuple(first["loc"])) or None
    shown = repr(first.get("input"))
    if len(shown) > _MAX_SHOWN_INPUT:
        shown = shown[: _MAX_SHOWN_INPUT - 3] + "..."
    if first["type"] == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}={shown}: {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param)
