"""Model cards and the placement planner: which nodes hold which layers of a model.

Public API:
    ModelCard, NativeMtpSpec                  cards (node.placement.cards)
    get_card, find_card, known_card_ids, requantize, registry
    card_from_checkpoint                      a card from a local checkpoint's headers
    card_from_config                          a card estimated from config numbers
    resolve_card                              MODEL (card id or checkpoint dir) -> ModelCard
    NodeCapacity, PlanOptions, Stage, Placement, plan
    PlacementError (bad input), InsufficientMemoryError (does not fit), UnknownModelError,
    CheckpointError
    format_bytes                              human units for byte counts (node.placement.units)
"""

from node.placement.cards import (
    ModelCard,
    NativeMtpSpec,
    find_card,
    get_card,
    known_card_ids,
    registry,
    requantize,
)
from node.placement.checkpoint import card_from_checkpoint
from node.placement.errors import (
    CheckpointError,
    InsufficientMemoryError,
    PlacementError,
    UnknownModelError,
)
from node.placement.estimate import card_from_config
from node.placement.planner import NodeCapacity, Placement, PlanOptions, Stage, plan
from node.placement.resolve import resolve_card
from node.placement.units import format_bytes

__all__ = [
    "CheckpointError",
    "InsufficientMemoryError",
    "ModelCard",
    "NativeMtpSpec",
    "NodeCapacity",
    "Placement",
    "PlacementError",
    "PlanOptions",
    "Stage",
    "UnknownModelError",
    "card_from_checkpoint",
    "card_from_config",
    "find_card",
    "format_bytes",
    "get_card",
    "known_card_ids",
    "plan",
    "registry",
    "requantize",
    "resolve_card",
]
