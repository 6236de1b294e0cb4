"""`macmesh gateway`."""

from __future__ import annotations

from node.commands._unavailable import not_yet


def gateway() -> None:
    """Not available yet in this build."""
    not_yet("gateway", "its issue")
