"""One way to turn a pydantic ``ValidationError`` into a message a user can act on.

It names the field, the first bad value and, inside a list or map, its index or key (pydantic's
location), and never echoes the whole bad input: a 100k-id prompt with one bad id, or 500 NaN
logit_bias entries, give a line, not 300 KB (which also outgrew gRPC's 16 KiB limit on status
details and came back as a transport error instead of INVALID_ARGUMENT).
"""

from __future__ import annotations

from pydantic import ValidationError

MAX_VALUE_CHARS = 60
MAX_PROBLEMS = 3


def short_repr(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _location(loc: tuple) -> str:
    """pydantic's location as people write it: ``messages[0].role``, ``logit_bias[7]``."""
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    return where


def describe(exc: ValidationError, *, whole: str = "request", prefix: str = "") -> str:
    """``field=value: problem`` for the first few problems, then how many more there are.

    ``whole`` names a problem of the object as a whole (its input is the whole object, so it is
    not echoed); ``prefix`` is put before each field name (e.g. ``sampling.``)."""
    errors = exc.errors()
    parts = []
    for err in errors[:MAX_PROBLEMS]:
        message = err["msg"].removeprefix("Value error, ")
        if err["loc"]:
            where = prefix + _location(err["loc"])
            parts.append(f"{where}={short_repr(err.get('input'))}: {message}")
        else:
            parts.append(f"{prefix.rstrip('.') or whole}: {message}")
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    return "; ".join(parts)
