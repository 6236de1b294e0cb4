"""`macmesh models`."""

from __future__ import annotations

from node.commands._unavailable import not_yet


def models() -> None:
    """Not available yet in this build."""
    not_yet("models", "its issue")
