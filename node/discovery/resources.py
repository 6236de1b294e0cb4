"""What this machine offers the cluster: memory, chip, memory bandwidth, OS and MLX device.

macOS: ``sysctl`` for total memory, chip and CPU count (once), ``psutil`` for available memory
(it asks the kernel directly; ``vm_stat`` is the fallback, parsed the same way). Linux:
``/proc/meminfo`` and ``/proc/cpuinfo``, clamped to the cgroup memory limit when one is set.

Memory bandwidth on Apple silicon comes from Apple's published figures per chip; elsewhere it is
measured once with a short memory copy. MLX is never imported here: the daemon must start fast and
the device follows from the platform (Metal on Apple silicon, CPU otherwise).

The ``parse_*`` functions are pure so they are tested on captured outputs from both systems.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node.discovery.models import Resources
from node.logging import get_logger

log = get_logger(__name__)

# Unified-memory bandwidth in GB/s from Apple's specifications. Keys are matched against
# ``machdep.cpu.brand_string`` longest first ("Apple M2 Max" before "Apple M2"). Where a chip
# ships in two memory configurations the value depends on the CPU count (binned parts have
# fewer cores and a narrower memory bus).
_APPLE_BANDWIDTH_GBPS: dict[str, float | dict[int, float]] = {
    "Apple M1": 68.25,
    "Apple M1 Pro": 200.0,
    "Apple M1 Max": 400.0,
    "Apple M1 Ultra": 800.0,
    "Apple M2": 100.0,
    "Apple M2 Pro": 200.0,
    "Apple M2 Max": 400.0,
    "Apple M2 Ultra": 800.0,
    "Apple M3": 100.0,
    "Apple M3 Pro": 150.0,
    "Apple M3 Max": {14: 300.0, 16: 400.0},
    "Apple M3 Ultra": 819.0,
    "Apple M4": 120.0,
    "Apple M4 Pro": 273.0,
    "Apple M4 Max": {14: 410.0, 16: 546.0},
    "Apple M5": 153.0,
}


def apple_bandwidth_gbps(chip: str, cpu_count: int) -> float:
    """Published bandwidth for an Apple chip name, 0.0 when the chip is unknown."""
    for name in sorted(_APPLE_BANDWIDTH_GBPS, key=len, reverse=True):
        if chip == name or chip.startswith(name + " ") or chip.startswith(name + "("):
            value = _APPLE_BANDWIDTH_GBPS[name]
            if isinstance(value, dict):
                # Binned parts have the smaller core count; an unknown count gets the smaller bus.
                fitting = [bw for cores, bw in sorted(value.items()) if cpu_count >= cores]
                return fitting[-1] if fitting else min(value.values())
            return value
    return 0.0


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl a b c`` output (``name: value`` lines) as a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


_VM_PAGE_SIZE_RE = re.compile(r"page size of (\d+) bytes")
_VM_LINE_RE = re.compile(r'^\s*"?([^":]+?)"?\s*:\s*(\d+)\.?\s*$')


def parse_vm_stat(text: str) -> int:
    """Available bytes from ``vm_stat`` output: free + speculative + inactive pages.

    Inactive pages are reclaimable without swapping (the figure psutil and Activity Monitor use);
    speculative pages are listed apart from free ones by vm_stat but are just as free.
    """
    match = _VM_PAGE_SIZE_RE.search(text)
    if not match:
        raise ValueError("vm_stat output has no 'page size of N bytes' header")
    page_size = int(match.group(1))
    pages: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        m = _VM_LINE_RE.match(line)
        if m:
            pages[m.group(1).strip().lower()] = int(m.group(2))
    missing = [k for k in ("pages free", "pages inactive") if k not in pages]
    if missing:
        raise ValueError(f"vm_stat output lacks {', '.join(missing)}")
    available = pages["pages free"] + pages["pages inactive"] + pages.get("pages speculative", 0)
    return available * page_size


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, available) bytes from ``/proc/meminfo``."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and fields and fields[0].isdigit():
            scale = 1024 if fields[-1].lower() == "kb" else 1
            kib[key.strip()] = int(fields[0]) * scale
    if "MemTotal" not in kib:
        raise ValueError("/proc/meminfo lacks MemTotal")
    if "MemAvailable" in kib:
        available = kib["MemAvailable"]
    else:  # kernels before 3.14
        available = kib.get("MemFree", 0) + kib.get("Buffers", 0) + kib.get("Cached", 0)
    return kib["MemTotal"], min(available, kib["MemTotal"])


def parse_cpuinfo(text: str) -> str:
    """The CPU model from ``/proc/cpuinfo`` (x86 ``model name``; ARM ``Hardware``/``Model``)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if sep and value and key not in found:
            found[key] = value
    for key in ("model name", "model", "hardware", "cpu model", "processor"):
        value = found.get(key, "")
        # On ARM "processor" is just an index; only accept a name.
        if value and not value.isdigit():
            return value
    return ""


def parse_cgroup_memory(limit_text: str, usage_text: str | None) -> tuple[int, int] | None:
    """(limit, limit - usage) from cgroup v2 ``memory.max`` / ``memory.current``; None if unlimited."""
    limit_text = limit_text.strip()
    if not limit_text.isdigit():  # "max" = no limit
        return None
    limit = int(limit_text)
    usage = int(usage_text.strip()) if usage_text and usage_text.strip().isdigit() else 0
    return limit, max(0, limit - usage)


def mlx_device_for(system: str, machine: str) -> str:
    """MLX runs on Metal ("gpu") on Apple silicon and on its CPU backend everywhere else."""
    return "gpu" if system == "Darwin" and machine == "arm64" else "cpu"


def measure_copy_bandwidth_gbps(nbytes: int = 64 * 1024 * 1024, repeats: int = 3) -> float:
    """A rough memory bandwidth: best of a few large memcpy's (read + write bytes per second).

    Plain bytearrays, not numpy: the daemon's startup path stays light.
    """
    src = b"\x5a" * nbytes  # filled, so reads do not come from the shared zero page
    dst = bytearray(nbytes)
    dst[:] = src  # fault the destination pages in before timing
    view = memoryview(dst)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        view[:] = src
        best = min(best, time.perf_counter() - start)
    return round(2 * nbytes / best / 1e9, 1)


@dataclass(frozen=True)
class StaticResources:
    """The parts that do not change while the process runs."""

    memory_total_bytes: int
    chip: str
    memory_bandwidth_gbps: float
    os: str
    mlx_device: str
    cpu_count: int


def _run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=5, check=True).stdout


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _macos_static() -> StaticResources:
    values = parse_sysctl(_run("sysctl", "hw.memsize", "machdep.cpu.brand_string", "hw.ncpu"))
    chip = values.get("machdep.cpu.brand_string", "") or platform.processor()
    cpu_count = int(values.get("hw.ncpu", "0") or 0) or (os.cpu_count() or 0)
    bandwidth = apple_bandwidth_gbps(chip, cpu_count)  # 0 = unknown chip: measured later
    return StaticResources(
        memory_total_bytes=int(values["hw.memsize"]),
        chip=chip,
        memory_bandwidth_gbps=bandwidth,
        os=f"macOS {platform.mac_ver()[0]}".strip(),
        mlx_device=mlx_device_for(platform.system(), platform.machine()),
        cpu_count=cpu_count,
    )


def _macos_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or broken: vm_stat says the same, at the cost of a fork
        return parse_vm_stat(_run("vm_stat"))


def _linux_memory() -> tuple[int, int]:
    text = _read("/proc/meminfo")
    if text is None:
        import psutil

        mem = psutil.virtual_memory()
        return int(mem.total), int(mem.available)
    total, available = parse_meminfo(text)
    limit_text = _read("/sys/fs/cgroup/memory.max")
    if limit_text is not None:
        cgroup = parse_cgroup_memory(limit_text, _read("/sys/fs/cgroup/memory.current"))
        if cgroup is not None and cgroup[0] < total:
            total, available = cgroup[0], min(available, cgroup[1])
    return total, available


def _linux_static() -> StaticResources:
    total, _ = _linux_memory()
    chip = parse_cpuinfo(_read("/proc/cpuinfo") or "") or platform.processor() or platform.machine()
    return StaticResources(
        memory_total_bytes=total,
        chip=chip,
        memory_bandwidth_gbps=0.0,  # measured in the background by ResourceMonitor
        os=f"Linux {platform.release()}",
        mlx_device=mlx_device_for(platform.system(), platform.machine()),
        cpu_count=os.cpu_count() or 0,
    )


def _generic_static() -> StaticResources:
    import psutil

    return StaticResources(
        memory_total_bytes=int(psutil.virtual_memory().total),
        chip=platform.processor() or platform.machine(),
        memory_bandwidth_gbps=0.0,  # measured in the background by ResourceMonitor
        os=f"{platform.system()} {platform.release()}",
        mlx_device=mlx_device_for(platform.system(), platform.machine()),
        cpu_count=os.cpu_count() or 0,
    )


def _generic_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _probes_for(system: str) -> tuple[Callable[[], StaticResources], Callable[[], int]]:
    if system == "darwin":
        return _macos_static, _macos_available
    if system.startswith("linux"):
        return _linux_static, lambda: _linux_memory()[1]
    return _generic_static, _generic_available


MEASURE_DELAY_S = 1.0


class ResourceMonitor:
    """Resources of this machine; static parts read once, available memory at most once per
    ``refresh_s`` (heartbeats ask every second, reading is cheap but not free).

    Where no published bandwidth figure exists it is measured on a background thread, so the
    daemon starts at once; until then heartbeats report 0 (unknown).
    """

    def __init__(
        self,
        refresh_s: float = 1.0,
        platform_name: str = sys.platform,
        measure_bandwidth: bool = True,
    ) -> None:
        self._static_probe, self._available_probe = _probes_for(platform_name)
        self._static = self._static_probe()
        self._bandwidth_gbps = self._static.memory_bandwidth_gbps
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._cached: Resources | None = None
        self._cached_at = 0.0
        if not self._bandwidth_gbps and measure_bandwidth:
            # Delayed: the copy holds the GIL for a moment, and startup should not wait on it.
            timer = threading.Timer(MEASURE_DELAY_S, self._measure)
            timer.daemon = True
            timer.start()

    def _measure(self) -> None:
        try:
            value = measure_copy_bandwidth_gbps()
        except MemoryError:
            return
        with self._lock:
            self._bandwidth_gbps = value
            self._cached = None

    def snapshot(self) -> Resources:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached_at >= self._refresh_s:
                self._cached = self._build(self._available())
                self._cached_at = now
            return self._cached

    def _available(self) -> int:
        try:
            return min(self._available_probe(), self._static.memory_total_bytes)
        except Exception as exc:  # never let a flaky probe stop heartbeats
            log.warning("cannot read available memory; reporting the last value", error=str(exc))
            return self._cached.memory_available_bytes if self._cached else 0

    def _build(self, available: int) -> Resources:
        s = self._static
        return Resources(
            memory_total_bytes=s.memory_total_bytes,
            memory_available_bytes=available,
            chip=s.chip,
            memory_bandwidth_gbps=self._bandwidth_gbps,
            os=s.os,
            mlx_device=s.mlx_device,
            cpu_count=s.cpu_count,
        )


def gather_resources() -> Resources:
    """One-off reading of this machine's resources (bandwidth measured now if need be)."""
    monitor = ResourceMonitor(measure_bandwidth=False)
    resources = monitor.snapshot()
    if not resources.memory_bandwidth_gbps:
        resources = resources.model_copy(
            update={"memory_bandwidth_gbps": measure_copy_bandwidth_gbps()}
        )
    return resources
