"""Errors the placement package raises; every message names the bad value or the shortfall."""

from __future__ import annotations


class PlacementError(ValueError):
    """A model cannot be placed on the given nodes, or the request itself is invalid."""


class UnknownModelError(PlacementError):
    """MODEL is neither a card id nor a checkpoint directory."""


class CheckpointError(PlacementError):
    """A checkpoint directory is missing files or holds unreadable ones."""


class InsufficientMemoryError(PlacementError):
    """The request is valid but the nodes do not have the memory; says needed vs offered."""
