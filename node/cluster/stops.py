"""Stop strings over streamed text. Pure.

Text is released as soon as it cannot be the beginning of a stop string; the text that might
be is held back until the next delta decides. At the first match the text before it is
released and the rest (the stop string included) is dropped, as OpenAI's API does.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """The part of ``pending + text`` that is safe to send now."""
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            at = min(hits)
            self.matched = next(s for s in self.stops if self.pending.find(s) == at)
            out, self.pending = self.pending[:at], ""
            return out
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """What is still held back once generation ended without a match."""
        out, self.pending = self.pending, ""
        return out
