"""Structured logging for every macmesh process.

Readable console lines by default; one JSON object per line with ``--log-format json`` (or
``MACMESH_LOG_FORMAT=json``) for log shippers. Logs go to stderr so that command output on
stdout (``--json`` results, generated text) stays machine-readable.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Literal

import structlog

LogFormat = Literal["console", "json"]


def configure_logging(level: str = "info", fmt: LogFormat = "console") -> None:
    """Configure structlog and the stdlib root logger once per process."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error")
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(name)s: %(message)s")


_WRITE_LOCK = threading.Lock()


class _StderrLogger:
    """Writes to whatever ``sys.stderr`` is *now*: test runners and daemons swap it after setup."""

    def __init__(self, *_args: object) -> None:
        pass

    def msg(self, message: str) -> None:
        # One write of the whole line under one lock: ``print`` writes the text and the newline
        # separately, so two threads' JSON lines could end up on one line.
        with _WRITE_LOCK:
            stream = sys.stderr
            stream.write(message + "\n")
            stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
