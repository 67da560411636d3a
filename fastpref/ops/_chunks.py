"""The chunk machinery shared by ``linear_logprobs`` and the fused-loss engine.

Both engines walk the tokens in chunks of rows and, for each chunk, form the raw logits
``z = h_c W^T + b`` with one matmul (cuBLAS on GPU), then apply two row-wise primitives:

* ``stats(z, targets)``              -> target logit, logsumexp and entropy of ``z / T`` (fp32, ``[rows]``)
* ``grad_(z, targets, lse, g, ...)`` -> ``z`` overwritten with ``dL/dz`` for per-token upstream gradients

Each primitive has a Triton kernel (``fastpref.kernels.logprobs``) and a PyTorch twin here with the same
signature; ``impl`` picks one. Only one ``[chunk, V]`` tile is alive at a time, so the extra memory is
``O(N + chunk * V)`` whatever ``N * V`` is.
"""

from __future__ import annotations

import torch

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


def _torch_stats(z: torch.Tensor, targets: torch.Tensor, inv_temp: float, need_entropy: bool):
    zs = z.float()
    if inv_temp != 1.0:
        zs = zs * inv_temp
    lse = torch.logsumexp(zs, dim=-1)
    valid = (targets >= 0) & (targets < z.shape[1])
    zt = zs.gather(1, targets.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    zt = torch.where(valid, zt, 0.0)
    # The entropy costs three more passes over the tile: only when someone reads it.
    ent = lse - (torch.softmax(zs, dim=-1) * zs).sum(-1) if need_entropy else torch.zeros_like(lse)
    return zt, lse, ent


def _torch_grad_(z, targets, lse, g, ge, ent, inv_temp):
    valid = (targets >= 0) & (targets < z.shape[1])
    rows = torch.arange(z.shape[0], device=z.device)
    cols = targets.clamp(0, z.shape[1] - 1)
    if ge is None:
        # In place on the tile (no [chunk, V] temporaries: on CPU each one costs page faults as well as a pass):
        # dz = (g onehot - g p) / T with p = exp(z / T - lse).
        dz = z if z.dtype == torch.float32 else z.float()
        if inv_temp != 1.0:
            dz.mul_(inv_temp)
        dz.sub_(lse.unsqueeze(1)).exp_().mul_((g * -inv_temp).unsqueeze(1))
        dz[rows, cols] += torch.where(valid, g * inv_temp, 0.0)
        return dz if dz is z else z.copy_(dz)
    logp = z.float() * inv_temp - lse.unsqueeze(1)
    p = logp.exp()
    dz = p * -g.unsqueeze(1)
    dz -= ge.unsqueeze(1) * p * (logp + ent.unsqueeze(1))
    dz[rows, cols] += torch.where(valid, g, 0.0)
    z.copy_(dz.mul_(inv_temp))
    return z


def stats(z: torch.Tensor, targets: torch.Tensor, inv_temp: float, impl: str, need_entropy: bool = True):
    """``(target_logit, lse, entropy)`` of ``z * inv_temp``, each ``[rows]`` fp32 (see module docstring).

    With ``need_entropy=False`` the twin skips the entropy (zeros); the Triton kernel computes it in the same
    single pass anyway.
    """
    if impl == "triton":
        from fastpref.kernels.logprobs import rows_stats

        return rows_stats(z, targets, inv_temp)
    return _torch_stats(z, targets, inv_temp, need_entropy)


def grad_(z, targets, lse, g, ge, ent, inv_temp: float, impl: str) -> torch.Tensor:
    """Overwrite raw logits ``z`` with ``dL/dz = (g (onehot - p) - ge p (log p + H)) / T`` and return it."""
    if impl == "triton":
        from fastpref.kernels.logprobs import rows_grad_

        return rows_grad_(z, targets, lse, g, ge, ent, inv_temp)
    return _torch_grad_(z, targets, lse, g, ge, ent, inv_temp)


class GradAccumulator:
    """Accumulates ``dh``, ``dW``, ``db`` from per-chunk ``dz`` tiles: ``dh_c = dz W``, ``dW += dz^T h_c``.

    ``dW`` and ``db`` accumulate in the weight's dtype with ``addmm_`` (as Liger does): an fp32 accumulator
    would cost another weight-sized buffer; the test-suite bounds the resulting error per dtype.
    """

    def __init__(self, hidden, weight, bias, need_dh: bool, need_dw: bool, need_db: bool):
        self.hidden, self.weight = hidden, weight
        self.dh = torch.empty_like(hidden) if need_dh else None
        self.dw = torch.zeros_like(weight) if need_dw else None
        self.db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_db else None

    def add(self, start: int, end: int, dz: torch.Tensor) -> None:
        if self.dh is not None:
            torch.mm(dz, self.weight, out=self.dh[start:end])
        if self.dw is not None:
            self.dw.addmm_(dz.t(), self.hidden[start:end])
        if self.db is not None:
            self.db += dz.sum(0, dtype=torch.float32)

    def grads(self, bias):
        db = self.db.to(bias.dtype) if (self.db is not None and bias is not None) else None
        return self.dh, self.dw, db
