"""`macmesh launch`."""

from __future__ import annotations

from node.commands._unavailable import not_yet


def launch() -> None:
    """Not available yet in this build."""
    not_yet("launch", "its issue")
