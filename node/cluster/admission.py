"""Memory admission for launches: refuse with RESOURCE_EXHAUSTED rather than run out of memory.

The planner works from the memory figures peers sent in their last heartbeat (up to a second
old, and blind to a launch that started a moment ago). Right before a node loads weights it
measures its memory again and refuses when the shard plus the kept-free headroom would not fit:
two launches racing for the same memory get one instance and one clear refusal, never an OOM.
"""

from __future__ import annotations

from node.placement import InsufficientMemoryError, format_bytes

DEFAULT_HEADROOM = 0.10
HEADROOM_ENV = "MACMESH_LAUNCH_MEMORY_HEADROOM"


def check_memory(
    need_bytes: int, available_bytes: int, total_bytes: int, headroom: float, where: str
) -> None:
    """Raise ``InsufficientMemoryError`` unless ``need_bytes`` fits in ``available_bytes`` with
    ``headroom`` (a fraction of ``total_bytes``) left free. Pure."""
    keep_free = int(total_bytes * headroom)
    if need_bytes + keep_free > available_bytes:
        raise InsufficientMemoryError(
            f"{where} has {format_bytes(available_bytes)} free right now; loading "
            f"{format_bytes(need_bytes)} would leave less than the {headroom:.0%} of "
            f"{format_bytes(total_bytes)} it keeps free ({HEADROOM_ENV}); unload something "
            "or add a node"
        )


def measure() -> tuple[int, int]:
    """(available, total) bytes of this machine now."""
    import psutil

    mem = psutil.virtual_memory()
    return int(mem.available), int(mem.total)


def admit_load(need_bytes: int, headroom: float, where: str) -> None:
    available, total = measure()
    check_memory(need_bytes, available, total, headroom, where)
