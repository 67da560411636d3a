"""The chunk machinery shared by ``linear_logprobs`` and the fused-loss engine.

Both engines walk the tokens in chunks of rows and, for each chunk, form the raw logits
``z = h_c W^T + b`` with one matmul (cuBLAS on GPU), then apply two row-wise primitives:

* ``stats(z, targets, m)``              -> target logit, logsumexp and entropy of the final logits ``m(z)``
  (fp32, ``[rows]``)
* ``grad_(z, targets, lse, g, ..., m)`` -> ``z`` overwritten with ``dL/dz`` for per-token upstream gradients

``m`` is the :class:`LogitMap` from raw to final logits, in the order the models apply it:
``(h W^T + b) * logit_scale``, then ``softcap * tanh(. / softcap)`` (Gemma 2/3; Liger's ``softcap`` argument is
the naming precedent), then ``/ temperature`` (TRL and vLLM sample from the model's final logits).

Each primitive has a Triton kernel (``fastpref.kernels.logprobs``) and a PyTorch twin here with the same
signature; ``impl`` picks one. Only one ``[chunk, V]`` tile is alive at a time, so the extra memory is
``O(N + chunk * V)`` whatever ``N * V`` is.

Mixed dtypes (bf16 activations with fp32 master weights): the matmul runs in ``fastpref._amp.compute_dtype`` --
autocast's dtype inside ``torch.autocast`` (as the model's own ``lm_head`` would), the promoted dtype outside --
and the gradients come back in each input's own dtype (:class:`GradAccumulator`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitMap:
    """Raw head output ``r`` -> final logits: ``pre * r``, or ``post * tanh(pre * r)`` with softcapping.

    ``pre = logit_scale / T`` and ``post = None`` without softcap; ``pre = logit_scale / softcap`` and
    ``post = softcap / T`` with it (the kernels' ``z_mul`` / ``cap_mul``).
    """

    pre: float
    post: float | None = None

    @property
    def softcap(self) -> bool:
        return self.post is not None


def _positive(op: str, name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        what = "None or a finite number > 0" if allow_none else "a finite number > 0"
        raise ValueError(f"{op}: {name} must be {what}, got {value!r}")


def logit_map(op: str, temperature: float = 1.0, softcap: float | None = None,
              logit_scale: float = 1.0) -> LogitMap:
    """Validate ``temperature``, ``softcap`` and ``logit_scale`` (one-line ``ValueError`` naming the argument) and
    fold them into a :class:`LogitMap`."""
    _positive(op, "temperature", temperature)
    _positive(op, "softcap", softcap, allow_none=True)
    _positive(op, "logit_scale", logit_scale)
    if softcap is None:
        return LogitMap(float(logit_scale) / float(temperature))
    return LogitMap(float(logit_scale) / float(softcap), float(softcap) / float(temperature))


# Elements of one [chunk, V] logits tile by default. GPU: 64M (128 MiB in bf16), large enough for cuBLAS to
# run near peak, small enough to stay a few percent of the full logits at LLM sizes. CPU: 4M (16 MiB fp32),
# where matmuls saturate much earlier and memory is the scarcer resource.
_TILE_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}


def default_chunk_rows(vocab_size: int, n_rows: int, device: torch.device | str = "cuda") -> int:
    """Rows per chunk so that ``rows * V`` is about one tile budget (a power of two in [16, 8192])."""
    budget = _TILE_ELEMENTS.get(torch.device(device).type, _TILE_ELEMENTS["cuda"])
    rows = max(16, min(8192, 1 << max(0, (budget // max(vocab_size, 1)).bit_length() - 1)))
    return max(1, min(rows, n_rows))


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Raw logits ``h W^T + b`` of one chunk, in the input dtype (cuBLAS accumulates in fp32)."""
    return torch.addmm(bias, h, weight.t()) if bias is not None else torch.mm(h, weight.t())


def final_logits(z: torch.Tensor, m: LogitMap) -> torch.Tensor:
    """fp32 final logits of a raw tile (a new tensor unless ``z`` is fp32 and the map is the identity)."""
    zs = z.float()
    if m.softcap:
        return torch.tanh(zs * m.pre).mul_(m.post)
    return zs * m.pre if m.pre != 1.0 else zs


def _torch_stats(z: torch.Tensor, targets: torch.Tensor, m: LogitMap, need_entropy: bool):
    zs = final_logits(z, m)
    lse = torch.logsumexp(zs, dim=-1)
    valid = (targets >= 0) & (targets < z.shape[1])
    zt = zs.gather(1, targets.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    zt = torch.where(valid, zt, 0.0)
    # The entropy costs three more passes over the tile: only when someone reads it.
    ent = lse - (torch.softmax(zs, dim=-1) * zs).sum(-1) if need_entropy else torch.zeros_like(lse)
    return zt, lse, ent


def _torch_grad_(z, targets, lse, g, ge, ent, m: LogitMap):
    valid = (targets >= 0) & (targets < z.shape[1])
    rows = torch.arange(z.shape[0], device=z.device)
    cols = targets.clamp(0, z.shape[1] - 1)
    inv_temp = m.pre  # without softcap the final logits are r * pre (pre = logit_scale / T)
    if ge is None and not m.softcap:
        # In place on the tile (no [chunk, V] temporaries: on CPU each one costs page faults as well as a pass):
        # dz = (g onehot - g p) * pre with p = exp(z * pre - lse).
        dz = z if z.dtype == torch.float32 else z.float()
        if inv_temp != 1.0:
            dz.mul_(inv_temp)
        dz.sub_(lse.unsqueeze(1)).exp_().mul_((g * -inv_temp).unsqueeze(1))
        dz[rows, cols] += torch.where(valid, g * inv_temp, 0.0)
        return dz if dz is z else z.copy_(dz)
    # General path (entropy gradient and/or softcap): dz/dr = pre [* post * (1 - tanh(pre r)^2)].
    th = torch.tanh(z.float() * m.pre) if m.softcap else None
    logp = (th * m.post if m.softcap else z.float() * m.pre) - lse.unsqueeze(1)
    p = logp.exp()
    dz = p * -g.unsqueeze(1)
    if ge is not None:
        dz -= ge.unsqueeze(1) * p * (logp + ent.unsqueeze(1))
    dz[rows, cols] += torch.where(valid, g, 0.0)
    if m.softcap:
        dz.mul_(th.square_().neg_().add_(1.0)).mul_(m.pre * m.post)
    else:
        dz.mul_(m.pre)
    z.copy_(dz)
    return z


def stats(z: torch.Tensor, targets: torch.Tensor, m: LogitMap, impl: str, need_entropy: bool = True):
    """``(target_logit, lse, entropy)`` of the final logits ``m(z)``, each ``[rows]`` fp32 (see module docstring).

    With ``need_entropy=False`` the twin skips the entropy (zeros); the Triton kernel computes it in the same
    single pass anyway.
    """
    if impl == "triton":
        from fastpref.kernels.logprobs import rows_stats

        return rows_stats(z, targets, m.pre, m.post)
    return _torch_stats(z, targets, m, need_entropy)


def grad_(z, targets, lse, g, ge, ent, m: LogitMap, impl: str) -> torch.Tensor:
    """Overwrite raw logits ``z`` with ``dL/dz = (g (onehot - p) - ge p (log p + H)) * dm/dz`` and return it."""
    if impl == "triton":
        from fastpref.kernels.logprobs import rows_grad_

        return rows_grad_(z, targets, lse, g, ge, ent, m.pre, m.post)
    return _torch_grad_(z, targets, lse, g, ge, ent, m)


class GradAccumulator:
    """Accumulates ``dh``, ``dW``, ``db`` from per-chunk ``dz`` tiles: ``dh_c = dz W``, ``dW += dz^T h_c``.

    ``hidden`` and ``weight`` are the compute-dtype operands; ``dtypes`` the inputs' own ``(hidden, weight,
    bias)`` dtypes, in which :meth:`grads` returns the gradients (default: the compute dtype). ``dW``
    accumulates with ``addmm_`` in the wider of the compute and the weight dtype (as Liger does for one dtype:
    an fp32 accumulator for bf16 weights would cost another weight-sized buffer; the test-suite bounds the
    error per dtype); fp32 master weights under bf16 autocast thus sum the chunks' bf16 products in fp32.
    ``db`` accumulates in fp32.
    """

    def __init__(self, hidden, weight, bias, need_dh: bool, need_dw: bool, need_db: bool, dtypes=None):
        self.hidden, self.weight = hidden, weight
        self.dtypes = dtypes or (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        self.dh = torch.empty_like(hidden) if need_dh else None
        acc = torch.promote_types(weight.dtype, self.dtypes[1])
        self.dw = torch.zeros_like(weight, dtype=acc) if need_dw else None
        self.db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_db else None

    def add(self, start: int, end: int, dz: torch.Tensor) -> None:
        if self.dh is not None:
            torch.mm(dz, self.weight, out=self.dh[start:end])
        if self.dw is not None:
            if self.dw.dtype == dz.dtype:
                self.dw.addmm_(dz.t(), self.hidden[start:end])
            else:  # a weight wider than the compute dtype (fp32 master weights, bf16 compute)
                self.dw += torch.mm(dz.t(), self.hidden[start:end])
        if self.db is not None:
            self.db += dz.sum(0, dtype=torch.float32)

    def grads(self, bias):
        hd, wd, bd = self.dtypes
        db = self.db.to(bd or bias.dtype) if (self.db is not None and bias is not None) else None
        dh = self.dh.to(hd) if self.dh is not None else None
        dw = self.dw.to(wd) if self.dw is not None else None
        return dh, dw, db
