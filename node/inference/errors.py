"""Errors the inference engines raise; each message says what is wrong and with which value."""

from __future__ import annotations


class EngineUnavailable(RuntimeError):
    """The engine a request asked for cannot run here; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
