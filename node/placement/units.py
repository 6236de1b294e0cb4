"""Human units for byte counts.

Apple sells memory in binary sizes (a "64 GB" Mac has 64 GiB), so macmesh prints binary units
and says so (GiB, not GB): a number a user compares with "About This Mac" must not be 7% off.
"""

from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10


def format_bytes(n: int | float) -> str:
    """1.5 GiB style: one decimal, the largest binary unit that keeps the number >= 1."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{sign}{n / size:.1f} {unit}"
    return f"{sign}{int(n)} B"
