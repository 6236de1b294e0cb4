"""The machine block every benchmark's JSON report starts with (shared by scripts/bench_*.py)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Platform, CPU, MLX and BLAS settings: what a figure needs to be compared. (MLX is
    imported here: the scripts re-exec themselves with the BLAS preload before loading it.)"""
    import mlx.core as mx

    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas_preload": os.environ.get("LD_PRELOAD", ""),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
    }
