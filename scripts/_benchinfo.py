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


OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def reexec_with_openblas(disabled: bool = False) -> None:
    """Re-execute this script with OpenBLAS preloaded and one BLAS thread, unless ``disabled``,
    the library is missing or both are set already. The shell may preload OpenBLAS already
    (scripts/_bootstrap.sh) without limiting its threads.

    One BLAS thread: with two, a multi-row matmul waits on whichever thread another process
    preempts (4-row matmuls 2.1x a 1-row one with 2 threads on a busy machine, 1.03x with 1);
    single-row matmuls cost the same either way."""
    import subprocess
    import sys

    if disabled or not Path(OPENBLAS).exists():
        return
    if OPENBLAS in os.environ.get("LD_PRELOAD", "") and "OPENBLAS_NUM_THREADS" in os.environ:
        return
    env = {**os.environ, "LD_PRELOAD": OPENBLAS}
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
