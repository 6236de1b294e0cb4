"""`macmesh status`."""

from __future__ import annotations

from node.commands._unavailable import not_yet


def status() -> None:
    """Not available yet in this build."""
    not_yet("status", "its issue")
