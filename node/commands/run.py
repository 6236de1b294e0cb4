"""`macmesh run`."""

from __future__ import annotations

from node.commands._unavailable import not_yet


def run() -> None:
    """Not available yet in this build."""
    not_yet("run", "its issue")
