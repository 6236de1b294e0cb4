"""`macmesh place`."""

from __future__ import annotations

from node.commands._unavailable import not_yet


def place() -> None:
    """Not available yet in this build."""
    not_yet("place", "its issue")
