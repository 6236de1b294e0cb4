"""`macmesh demo`."""

from __future__ import annotations

from node.commands._unavailable import not_yet


def demo() -> None:
    """Not available yet in this build."""
    not_yet("demo", "its issue")
