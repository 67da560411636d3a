"""Measurement primitives: time, peak memory, the device's matmul peak, and the device slug.

Time
    CUDA: ``triton.testing.do_bench`` (median and 20/80 quantiles, L2 flushed between calls).
    CPU: wall clock of ``repeats`` calls after one warm-up (median and 20/80 quantiles).

Peak memory ("peak extra": what one forward+backward allocates beyond its inputs, gradients included)
    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
    ``memory_allocated()`` taken with the inputs alive and nothing else.
    CPU: the process' resident-set high-water mark. Before each case the kernel's counter is reset by writing
    ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) and ``VmHWM`` is read from ``/proc/self/status`` after
    one call; the baseline is ``VmRSS`` with the inputs alive. So that freed memory really leaves the process
    (and a later case cannot reuse it unseen), glibc's mmap threshold is pinned at 64 KiB (``mallopt``;
    blocks above it are mmap'd and unmapped on free) and ``malloc_trim(0)`` runs before each baseline.
    This is real RSS (pages touched), not an allocator's bookkeeping.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

_M_MMAP_THRESHOLD = -3
_libc = None


def _glibc():
    """glibc handle with the mmap threshold pinned (once), or None off glibc."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            lib.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
            _libc = lib
        except OSError:
            _libc = False
    return _libc or None


def device_slug(device: torch.device) -> str:
    """``cpu-x86_64``, or the GPU name lower-cased with each run of characters outside ``[a-z0-9_]`` made one
    dash (``nvidia-h100-80gb-hbm3``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__})"
    return (f"CPU {platform.machine()} ({platform.processor() or 'unknown'}), {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    n: int  # timed calls (0: do_bench, which picks its own count)


def time_fn(fn: Callable[[], object], device: torch.device, *, repeats: int = 5, warmup: int = 1,
            cuda_rep_ms: int = 100, budget_s: float | None = None) -> Timing:
    """Median and 20/80 quantiles of ``fn()`` in milliseconds (``do_bench`` on CUDA, wall clock on CPU).

    CPU: ``repeats`` timed calls after ``warmup`` untimed ones, stopping early (after at least one) once
    ``budget_s`` seconds of timed calls have passed; ``Timing.n`` says how many were timed."""
    if device.type == "cuda":
        import triton.testing

        med, q20, q80 = triton.testing.do_bench(fn, warmup=25, rep=cuda_rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(q20), float(q80), 0)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < max(1, repeats) and (budget_s is None or not times or sum(times) < budget_s * 1e3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], 1)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[1], q[7], len(times))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_memory_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one ``fn()`` call beyond what is alive before it (see module doc)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if not cpu_memory_supported():
        return None
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - base) * 1024


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput on this device (bf16 8192^3 on CUDA, 1024^3 in ``dtype`` on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b), device, repeats=5, cuda_rep_ms=200)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        lib = _glibc()
        if lib is not None:
            lib.malloc_trim(0)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def env_threads() -> str:
    return os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
