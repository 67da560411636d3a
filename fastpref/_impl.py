"""Choosing between the Triton kernels and their PyTorch twins (``impl="auto"|"triton"|"torch"``)."""

from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (it does not on macOS/Windows)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platform dependent
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device, *, op: str = "op") -> str:
    """Map ``impl`` to ``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``auto`` picks Triton on CUDA and the PyTorch twin elsewhere. ``triton`` on a CPU tensor needs the
    Triton interpreter (``TRITON_INTERPRET=1``, slow, meant for tests); anything else is an error.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    usable = triton_available() and (device.type == "cuda" or (device.type == "cpu" and triton_interpret()))
    if impl == "auto":
        return "triton" if usable and device.type == "cuda" else "torch"
    if not usable:
        raise ValueError(
            f"{op}: impl='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got a tensor on {device} with triton {'installed' if triton_available() else 'not installed'}"
        )
    return "triton"
