"""CPU benchmarks of the coordinator and the wire; every result carries the machine it was measured on."""

from __future__ import annotations

import gc
import json
import os
import platform
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _proc_field(path: str, field: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info() -> dict:
    """CPU model, cores, RAM and library versions of this machine."""
    import numpy

    info = {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_total_gib": round(int(_proc_field("/proc/meminfo", "MemTotal").split()[0] or 0) / 2**20, 1)
        if _proc_field("/proc/meminfo", "MemTotal") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    for module in ("torch", "flwr"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    return info


def write_result(path: str, summary: dict) -> None:
    """Write a benchmark's JSON summary to `path` (parents created) and say so; nothing when path is empty."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=1))
    print(f"wrote {path}")


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where unknown)."""
    field = _proc_field("/proc/meminfo", "MemAvailable")
    return int(field.split()[0]) * 1024 if field else 0


def _rss_kib(field: str) -> int:
    value = _proc_field("/proc/self/status", field)
    return int(value.split()[0]) if value else 0


def _reset_rss_high_water_mark() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _return_free_heap_to_os() -> None:
    try:  # glibc keeps freed small blocks in the heap; without this an earlier case's heap hides the next one's
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def measure(trace_python_allocations: bool = True) -> Iterator[dict]:
    """Fill a dict with seconds, `traced_peak_bytes` (tracemalloc: numpy buffers + bytes objects allocated
    inside the block, peak minus level at entry) and `rss_peak_bytes` (Linux VmHWM minus RSS at entry)."""
    gc.collect()
    _return_free_heap_to_os()
    result: dict = {}
    rss_ok = _reset_rss_high_water_mark()
    rss_start = _rss_kib("VmRSS")
    if trace_python_allocations:
        tracemalloc.start()
        start_traced = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start
        if trace_python_allocations:
            result["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1] - start_traced
            tracemalloc.stop()
        result["rss_peak_bytes"] = (_rss_kib("VmHWM") - rss_start) * 1024 if rss_ok else None
