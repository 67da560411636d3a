"""Causal attention over packed (variable-length) sequences: ``varlen_attention`` and its PyTorch twin.

``q [total, Hq, D]``, ``k``/``v`` ``[total, Hkv, D]`` (flash-attn's varlen layout: the tokens of all sequences
concatenated, no padding), ``cu_seqlens`` int32 ``[S + 1]`` token boundaries (``cu_seqlens[0] = 0``), and
``max_seqlen`` the longest sequence (a Python int, used only to size the kernel grid; an upper bound is fine).
Each sequence attends to itself only::

    out[t] = sum_{u in seq(t), u <= t} softmax_u(scale * q[t] . k[u]) v[u]        (causal)

Grouped-query attention: q head ``h`` reads kv head ``h // (Hq // Hkv)``. ``impl="triton"`` runs the
FlashAttention-2 kernels of ``fastpref.kernels.varlen_attention`` (O(total) memory, logsumexp saved for the
backward, deterministic GQA gradients); ``impl="torch"`` runs one ``scaled_dot_product_attention`` per
sequence (it reads the boundaries on the host: ``cu_seqlens_host`` when given, else ``cu_seqlens.tolist()``, a
device sync).
Shared-prefix attention (a segment additionally attending to its parent prompt) goes through the same
function with a ``fastpref.attention.prefix.PrefixLayout``; see that module.

Mixed dtypes (``fastpref._amp``): inside ``torch.autocast`` q, k, v are cast to autocast's dtype, as
``scaled_dot_product_attention`` does there; outside autocast to their promoted dtype. The output is in that
compute dtype, and the gradients come back in the dtypes of q, k and v.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastpref import _amp
from fastpref._impl import resolve_impl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, ranges):
        from fastpref.kernels.varlen_attention import varlen_attn_fwd

        out, lse = varlen_attn_fwd(q, k, v, cu_seqlens, max_seqlen, scale, causal, ranges)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, *(ranges or ()))
        ctx.meta = (max_seqlen, causal, scale, ranges is not None)
        return out

    @staticmethod
    def backward(ctx, dout):
        from fastpref.kernels.varlen_attention import varlen_attn_bwd

        q, k, v, out, lse, cu_seqlens, *ranges = ctx.saved_tensors
        max_seqlen, causal, scale, has_ranges = ctx.meta
        dq, dk, dv = varlen_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal,
                                     tuple(ranges) if has_ranges else None)
        return dq, dk, dv, None, None, None, None, None


def _torch_attention(q, k, v, cu_seqlens, causal, scale, parent_ranges, cu_host=None):
    """Per-sequence SDPA (the twin). ``parent_ranges``: host list of (start, end) key ranges, or None;
    ``cu_host``: the boundaries as host ints (else read from ``cu_seqlens``: a host sync)."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1) if group > 1 else k
    vv = v.repeat_interleave(group, dim=1) if group > 1 else v
    cu = list(cu_host) if cu_host is not None else cu_seqlens.tolist()  # tolist: a host sync
    out = torch.zeros_like(q)
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        if b <= a:
            continue
        pa, pb = parent_ranges[s] if parent_ranges is not None else (0, 0)
        qs = q[a:b].transpose(0, 1)
        if pb > pa:  # prefix keys first (fully visible), then the own segment
            ks = torch.cat([kk[pa:pb], kk[a:b]]).transpose(0, 1)
            vs = torch.cat([vv[pa:pb], vv[a:b]]).transpose(0, 1)
            own = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device)
            if causal:
                own = own.tril()
            mask = torch.cat([torch.ones(b - a, pb - pa, dtype=torch.bool, device=q.device), own], dim=1)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, kk[a:b].transpose(0, 1), vv[a:b].transpose(0, 1),
                                               is_causal=causal, scale=scale)
        out[a:b] = o.transpose(0, 1)
    return out


def _validate(q, k, v, cu_seqlens, max_seqlen, softmax_scale, op):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{op}: {name} must be a 3-D tensor [total_tokens, heads, head_dim], got "
                             f"{getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"{op}: k must be [total={q.shape[0]}, kv_heads, head_dim={q.shape[2]}] like q, "
                         f"got {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{op}: q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be an int32 tensor [num_seqs + 1], got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{op}: cu_seqlens must be on {q.device} like q, got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{op}: max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"{op}: softmax_scale must be a positive float or None, got {softmax_scale!r}")


def _attention(q, k, v, cu_seqlens, max_seqlen, *, causal, softmax_scale, impl, op, ranges=None,
               parent_ranges=None, cu_host=None):
    """Shared body of ``varlen_attention`` and ``prefix_attention`` (ranges: the kernel's int32 prefix
    tensors; parent_ranges: the same on the host for the twin, computed lazily; cu_host: the boundaries on the
    host, for the twin)."""
    _validate(q, k, v, cu_seqlens, max_seqlen, softmax_scale, op)
    if cu_host is not None and len(cu_host) != cu_seqlens.numel():
        raise ValueError(f"{op}: cu_seqlens_host has {len(cu_host)} entries, cu_seqlens {cu_seqlens.numel()}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    which = resolve_impl(impl, q.device, op=op)
    dtype = _amp.compute_dtype(q, k, v)
    if which == "triton" and dtype == torch.float64:
        raise ValueError(f"{op}: impl='triton' supports float16/bfloat16/float32, got float64 (use impl='torch')")
    q, k, v = _amp.cast(dtype, q, k, v)  # differentiable: gradients return in each input's dtype
    with _amp.no_autocast(q.device):
        if which == "torch":
            pr = parent_ranges() if callable(parent_ranges) else parent_ranges
            return _torch_attention(q, k, v, cu_seqlens, causal, scale, pr, cu_host)
        return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, causal, scale, ranges)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     *, causal: bool = True, softmax_scale: float | None = None, impl: str = "auto",
                     cu_seqlens_host=None) -> torch.Tensor:
    """Attention of each packed sequence to itself: ``q [total, Hq, D]``, ``k``/``v`` ``[total, Hkv, D]``,
    ``cu_seqlens`` int32 ``[S + 1]`` on q's device, ``max_seqlen`` a Python int >= the longest sequence.

    Returns ``[total, Hq, D]`` in the compute dtype (q's dtype when q, k, v share it; autocast's dtype inside
    ``torch.autocast``; else the promoted dtype -- module docstring); differentiable w.r.t. q, k, v, gradients in
    their own dtypes. ``softmax_scale`` defaults to ``1/sqrt(D)``. Same contract as flash-attn's
    ``flash_attn_varlen_func`` with equal q/k boundaries. Tokens past ``cu_seqlens[-1]`` get a zero output.
    ``cu_seqlens_host``: optionally the same boundaries as host ints (a tuple or list), which the PyTorch twin
    reads instead of copying ``cu_seqlens`` to the host (a device sync); the Triton kernels never need it.
    """
    return _attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale, impl=impl,
                      op="varlen_attention", cu_host=cu_seqlens_host)
