"""`macmesh generate`."""

from __future__ import annotations

from node.commands._unavailable import not_yet


def generate() -> None:
    """Not available yet in this build."""
    not_yet("generate", "its issue")
