"""Triton kernels for per-token log-probabilities straight from hidden states and the LM head.

The logits are the model's final logits at temperature ``T``: from the raw head output ``r = h W^T + b``,
``z = r * logit_scale``, then (Gemma's final-logit softcapping) ``z = softcap * tanh(z / softcap)``, then
``z = z / T`` -- folded into two runtime scalars, ``z = z_mul * r`` without softcap and
``z = cap_mul * tanh(z_mul * r)`` with it (``z_mul = logit_scale / T`` without; ``z_mul = logit_scale / softcap``
and ``cap_mul = softcap / T`` with it; the constexpr flag ``SOFTCAP`` picks the form, the values are runtime
arguments, so a new scale or cap never recompiles). The kernels apply it inside
the tile and chain-rule through it: ``dz/dr = z_mul`` or ``z_mul * cap_mul * (1 - tanh^2)``.

For logits ``z`` and target ``y``, every kernel here works with the per-row statistics
``lse = logsumexp(z)``, ``logp = z[y] - lse`` and ``entropy = lse - sum_j softmax(z)_j z_j``, and with the
gradient of a loss that depends on ``logp`` (and ``entropy``) through the per-token upstream gradients
``g = dL/dlogp`` and ``ge = dL/dentropy``::

    dL/dz_j = g (onehot(y)_j - p_j) - ge p_j (log p_j + entropy)          p = softmax(z)

Three kernels, no autograd, no policy (that lives in ``fastpref.ops``):

* ``_fused_fwd_kernel``  -- matmul + online logsumexp over vocab tiles (Cut Cross-Entropy style): the
  logits are never written, not even per chunk. The vocabulary may be split over several programs
  (``num_splits``) when there are too few row blocks to fill the GPU; the partial statistics of the
  splits are merged by ``merge_splits`` on ``[num_splits, N]``-sized tensors.
* ``_rows_stats_kernel`` -- the same statistics from an already materialised ``[rows, V]`` logits chunk
  (the "eager" fused-loss engine forms the chunk with cuBLAS and needs its gradient right away).
* ``_rows_grad_kernel``  -- overwrites a materialised logits chunk with ``dL/d(raw logits)`` in place.

All accumulate in fp32 whatever the input dtype (bf16, fp16, fp32). Only block sizes and true feature
flags are ``tl.constexpr``; sizes (N, V, H) are runtime arguments, so a new batch shape never recompiles.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from one exp: absolute error ~1e-7, saturates without overflow (the interpreter has no libdevice)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _final_logits(r, z_mul, cap_mul, SOFTCAP: tl.constexpr):
    """The final logits of a raw fp32 tile ``r`` (see the module docstring)."""
    z = r * z_mul
    if SOFTCAP:
        z = cap_mul * _tanh(z)
    return z


@triton.jit
def _online_update(z, col_ok, cols, tgt, m, s, t, zt):
    """Fold one ``[BLOCK_ROWS, BLOCK_V]`` tile of final logits into the running row statistics.

    m: running max; s: sum exp(z - m); t: sum exp(z - m) * z (for the entropy); zt: the target's logit.
    Columns outside the vocabulary (``col_ok`` false) contribute nothing.
    """
    z = tl.where(col_ok[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, 1))
    alpha = tl.exp(m - m_new)
    e = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)
    s = s * alpha + tl.sum(e, 1)
    t = t * alpha + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), 1)
    zt = zt + tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    return m_new, s, t, zt


@triton.jit
def _fused_fwd_kernel(
    H,  # hidden states [N, D], row stride stride_h, unit column stride
    W,  # LM head weight [V, D], row stride stride_w, unit column stride
    B,  # bias [V] (read only when HAS_BIAS)
    TGT,  # targets [N] int64; a value outside [0, V) (e.g. ignore_index) matches no column
    OUT_M,  # [num_splits, N] fp32: running max of each split
    OUT_S,  # [num_splits, N] fp32: sum exp(z - m) of each split
    OUT_T,  # [num_splits, N] fp32: sum exp(z - m) * z of each split
    OUT_ZT,  # [num_splits, N] fp32: target logit if the target lies in the split, else 0
    N, V, D,  # rows, vocabulary size, hidden size (runtime: no recompile per shape)
    stride_h, stride_w,
    z_mul, cap_mul,  # the logit transform (module docstring); cap_mul read only when SOFTCAP
    v_per_split,  # vocabulary columns per split, a multiple of BLOCK_V
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,  # exact fp32 dot (fp32 inputs: no tf32; also under the CPU interpreter, whose bf16 dot is wrong)
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # pointer offsets in int64: V * H can exceed 2^31
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    # Every split starts inside the vocabulary (the launcher guarantees it), so the first tile has a
    # valid column and the running max is finite from then on; tiles past V are fully masked.
    v_start = pid_s * v_per_split
    for v0 in range(0, v_per_split, BLOCK_V):
        cols = v_start + v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            h = tl.load(H + rows64[:, None] * stride_h + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(W + cols.to(tl.int64)[:, None] * stride_w + dd[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        m, s, t, zt = _online_update(_final_logits(acc, z_mul, cap_mul, SOFTCAP), col_ok, cols, tgt, m, s, t, zt)
    out = pid_s * N + rows
    tl.store(OUT_M + out, m, mask=row_ok)
    tl.store(OUT_S + out, s, mask=row_ok)
    tl.store(OUT_T + out, t, mask=row_ok)
    tl.store(OUT_ZT + out, zt, mask=row_ok)


@triton.jit
def _rows_stats_kernel(
    Z,  # materialised raw logits [R, V] (h W^T + b, any float dtype), row stride stride_z
    TGT,  # targets [R] int64 (outside [0, V) = ignored, matches no column)
    OUT_M, OUT_S, OUT_T, OUT_ZT,  # [R] fp32 statistics as in _fused_fwd_kernel (one split)
    R, V, stride_z,
    z_mul, cap_mul,
    SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    zt = tl.zeros([BLOCK_R], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = tl.load(Z + rows.to(tl.int64)[:, None] * stride_z + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        m, s, t, zt = _online_update(_final_logits(z.to(tl.float32), z_mul, cap_mul, SOFTCAP), col_ok, cols, tgt,
                                     m, s, t, zt)
    tl.store(OUT_M + rows, m, mask=row_ok)
    tl.store(OUT_S + rows, s, mask=row_ok)
    tl.store(OUT_T + rows, t, mask=row_ok)
    tl.store(OUT_ZT + rows, zt, mask=row_ok)


@triton.jit
def _rows_grad_kernel(
    Z,  # [R, V] raw logits, overwritten in place with dL/d(raw logits) in the same dtype
    TGT,  # [R] int64 targets
    LSE,  # [R] fp32 logsumexp of the final logits
    G,  # [R] fp32 dL/dlogp (already 0 on ignored rows)
    GE,  # [R] fp32 dL/dentropy (read only when HAS_ENT_GRAD)
    ENT,  # [R] fp32 entropy (read only when HAS_ENT_GRAD)
    V, stride_z,
    z_mul, cap_mul,
    SOFTCAP: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(TGT + row)
    lse = tl.load(LSE + row)
    g = tl.load(G + row)
    if HAS_ENT_GRAD:
        ge = tl.load(GE + row)
        ent = tl.load(ENT + row)
    base = Z + row * stride_z
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        # the transform is recomputed from the raw tile (the chain rule needs tanh again)
        u = tl.load(base + cols, mask=col_ok, other=0.0).to(tl.float32) * z_mul
        if SOFTCAP:
            th = _tanh(u)
            z = cap_mul * th
            slope = (z_mul * cap_mul) * (1.0 - th * th)  # dz/dr
        else:
            z = u
            slope = z_mul
        logp = z - lse
        p = tl.exp(logp)
        dz = tl.where(cols == tgt, g, 0.0) - g * p
        if HAS_ENT_GRAD:
            dz -= ge * p * (logp + ent)
        tl.store(base + cols, (dz * slope).to(Z.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------------
# Launchers: check what the kernels assume, pick the grid. Inputs are validated by fastpref.ops.


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def _check_rows(z: torch.Tensor, *vecs: torch.Tensor) -> None:
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"logits chunk must be 2-D with unit column stride, got shape {tuple(z.shape)}")
    for v in vecs:
        if v is not None and (v.shape[0] != z.shape[0] or not v.is_contiguous()):
            raise ValueError("per-row vectors must be contiguous with one entry per logits row")


def _cap(cap_mul: float | None) -> float:
    return 1.0 if cap_mul is None else float(cap_mul)


def merge_splits(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, zt: torch.Tensor):
    """Merge ``[splits, N]`` partial statistics into ``(target_logit, lse, entropy)``, each ``[N]`` fp32."""
    mx = m.max(0).values
    w = torch.exp(m - mx)
    s_all = (s * w).sum(0)
    lse = mx + torch.log(s_all)
    ent = lse - (t * w).sum(0) / s_all
    return zt.sum(0), lse, ent


def fused_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                  z_mul: float, cap_mul: float | None = None, num_splits: int | None = None):
    """``(target_logit, lse, entropy)`` of the final logits of ``hidden @ weight.T + bias``, never forming them.

    hidden [N, D], weight [V, D] (unit column stride, hidden's dtype), targets [N] int64. ``z_mul`` and
    ``cap_mul`` (None: no softcap) as in the module docstring. ``num_splits`` splits the vocabulary across
    programs (default: enough programs to fill the GPU's SMs twice).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("hidden and weight need a unit column stride")
    BLOCK_N = _pow2(N, 16, 64)
    BLOCK_V = 128 if V >= 128 else _pow2(V, 16, 128)
    dot_fp32 = hidden.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"
    BLOCK_D = _pow2(D, 16, 32 if hidden.dtype == torch.float32 else 64)  # fp32 tiles: no spills at 32
    n_blocks = triton.cdiv(N, BLOCK_N)
    v_tiles = triton.cdiv(V, BLOCK_V)
    if num_splits is None:
        target = 2 * _num_sms(hidden.device.index or 0) if hidden.is_cuda else 1
        num_splits = max(1, min(v_tiles, triton.cdiv(target, n_blocks)))
    num_splits = max(1, min(int(num_splits), v_tiles))
    v_per_split = triton.cdiv(v_tiles, num_splits) * BLOCK_V
    num_splits = triton.cdiv(V, v_per_split)
    stats = torch.empty((4, num_splits, N), device=hidden.device, dtype=torch.float32)
    grid = (n_blocks, num_splits)
    _fused_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        stats[0], stats[1], stats[2], stats[3],
        N, V, D, hidden.stride(0), weight.stride(0), float(z_mul), _cap(cap_mul), v_per_split,
        HAS_BIAS=bias is not None,
        SOFTCAP=cap_mul is not None,
        DOT_FP32=dot_fp32,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
        num_warps=4 if BLOCK_N <= 32 else 8, num_stages=2 if hidden.dtype == torch.float32 else 3,
    )
    return merge_splits(stats[0], stats[1], stats[2], stats[3])


def rows_stats(z: torch.Tensor, targets: torch.Tensor, z_mul: float, cap_mul: float | None = None):
    """``(target_logit, lse, entropy)`` [R] fp32 of the final logits of a raw-logits chunk ``z`` [R, V]."""
    _check_rows(z, targets)
    R, V = z.shape
    BLOCK_R = 4
    BLOCK_V = _pow2(V, 16, 1024)
    stats = torch.empty((4, 1, R), device=z.device, dtype=torch.float32)
    _rows_stats_kernel[(triton.cdiv(R, BLOCK_R),)](
        z, targets, stats[0], stats[1], stats[2], stats[3], R, V, z.stride(0), float(z_mul), _cap(cap_mul),
        SOFTCAP=cap_mul is not None, BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V, num_warps=4,
    )
    return merge_splits(stats[0], stats[1], stats[2], stats[3])


def rows_grad_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
               ge: torch.Tensor | None, ent: torch.Tensor | None, z_mul: float,
               cap_mul: float | None = None) -> torch.Tensor:
    """Overwrite raw logits ``z`` [R, V] with ``dL/dz`` (through the transform, see module docstring), return it."""
    _check_rows(z, targets, lse, g, ge, ent)
    R, V = z.shape
    has_ent = ge is not None
    _rows_grad_kernel[(R,)](
        z, targets, lse, g, ge if has_ent else g, ent if has_ent else g, V, z.stride(0), float(z_mul),
        _cap(cap_mul), SOFTCAP=cap_mul is not None, HAS_ENT_GRAD=has_ent, BLOCK_V=_pow2(V, 16, 2048), num_warps=8,
    )
    return z
