"""Coordinator failover, the pure part: who takes over, and where the lost layers go.

When the coordinator of a multi-node instance dies, the instance survives it. Every stage
holder learned the instance's record when its shard was loaded (``LoadShardRequest.instance``),
so each one can decide, from its own membership, who takes over: **the live stage holder with
the lowest node id**. All nodes see the same membership, so they all pick the same node and
no election round is needed; a node that sees it differently for a moment only waits (the
others never act for it).

The successor keeps the instance id and every surviving stage where it is (the weights stay
loaded: its LoadShard for the same range adopts the shard), and places only the layer ranges
that died with the coordinator, each on a live node that holds no stage of the instance yet.
The planner checks that placement (``layer_counts``, one stage per node) against the launch's
``min_nodes`` and context length; when it cannot be honoured the successor says why (status
and logs) and falls back to placing the whole instance again, or leaves it failed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from node.cluster.instances import StageRef
from node.placement import (
    ModelCard,
    NodeCapacity,
    Placement,
    PlacementError,
    PlanOptions,
    plan,
)

# A surviving stage is loaded already: it needs no memory it does not have. The planner is
# told so by giving its node this much room (or its total memory, when known).
_ALREADY_LOADED_BYTES = 1 << 62


def lost_nodes(stages: Sequence[StageRef], coordinator: str, live: Collection[str]) -> set[str]:
    """Nodes whose stages are gone: the dead coordinator's, and any stage node not live."""
    return {coordinator} | {s.node_id for s in stages if s.node_id not in live}


def successor(stages: Sequence[StageRef], lost: Collection[str]) -> str | None:
    """The node that takes over: the surviving stage holder with the lowest node id."""
    holders = sorted({s.node_id for s in stages if s.node_id not in lost})
    return holders[0] if holders else None


def replace_missing(
    card: ModelCard,
    stages: Sequence[StageRef],
    lost: Collection[str],
    nodes: Sequence[NodeCapacity],
    *,
    min_nodes: int = 1,
    context_length: int | None = None,
    sequences: int = 1,
    mtp_across_pipeline: bool = False,
    prompt_cache_bytes: int = 0,
) -> Placement:
    """The instance's placement after the ``lost`` nodes went: surviving stages where they
    are, each lost range on a live node without a stage of it (the roomiest first).

    ``nodes`` are the live nodes; ``mtp_across_pipeline`` (a pipeline_mtp instance) budgets
    the MTP head on the last stage, as its launch did. Raises ``PlacementError`` naming why it cannot: too few
    spare nodes, the launch's min_nodes, or memory at the launch's context length."""
    survivors = {s.node_id for s in stages if s.node_id not in lost}
    missing = [s for s in stages if s.node_id in lost]
    spares = sorted(
        (n for n in nodes if n.id not in survivors and n.id not in lost),
        key=lambda n: (-n.available_memory_bytes, n.id),
    )
    if len(spares) < len(missing):
        ranges = ", ".join(f"[{s.start_layer}, {s.end_layer})" for s in missing)
        raise PlacementError(
            f"layers {ranges} were lost with node(s) {', '.join(sorted(lost))} and "
            f"{len(spares)} live node(s) hold no stage of the instance to take "
            f"{len(missing)} range(s)"
        )
    takers = iter(spares)
    order = [next(takers).id if s.node_id in lost else s.node_id for s in stages]
    capacities = []
    for node in nodes:
        if node.id in survivors:
            room = node.total_memory_bytes or _ALREADY_LOADED_BYTES
            node = node.model_copy(update={"available_memory_bytes": room})
        capacities.append(node)
    options = PlanOptions(
        min_nodes=max(1, min_nodes),
        context_length=context_length,
        layer_counts={
            node: s.end_layer - s.start_layer for node, s in zip(order, stages, strict=True)
        },
        max_concurrent_sequences=max(1, sequences),
        mtp_across_pipeline=mtp_across_pipeline,
        prompt_cache_bytes=prompt_cache_bytes,
    )
    return plan(card, capacities, options)
