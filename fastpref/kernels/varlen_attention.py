"""Triton flash attention over packed (variable-length) sequences, forward and backward.

Layout (flash-attn's varlen layout): the tokens of all sequences are concatenated,
``q [total, Hq, D]``, ``k``/``v`` ``[total, Hkv, D]`` with ``Hq`` a multiple of ``Hkv`` (grouped-query
attention: q head ``h`` reads kv head ``h // (Hq // Hkv)``), and ``cu_seqlens`` (int32 ``[S + 1]``) the token
boundaries of the ``S`` sequences. Each sequence attends only to itself (causally when ``CAUSAL``).

Optional shared prefixes (``HAS_PREFIX``): sequence ``s`` additionally attends *fully* (no causal mask) to a
key range ``[pk_start[s], pk_end[s])`` -- the tokens of its parent prefix segment (empty range: none). For the
backward of the keys, ``q_child_end[s]`` says where the query range of the segments that use ``s`` as their
parent ends: those are the segments right after ``s``, i.e. queries ``[cu[s + 1], q_child_end[s])``
(``q_child_end[s] == cu[s + 1]`` when ``s`` is nobody's parent). ``fastpref.attention.prefix`` builds these.

Algorithm (FlashAttention-2, Dao 2023, arXiv:2307.08691): online softmax in base 2 with fp32 accumulation;
the forward saves ``lse`` (natural-log logsumexp of the scaled scores, ``[Hq, total]`` fp32). Backward:

* ``_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` ``[Hq, total]``;
* ``_bwd_dkdv_kernel``: one program per (key block, sequence x kv head) loops over the q heads of the group
  and over the query blocks that can see the block (``dV += P^T dO``, ``dK += dS^T Q``), so GQA gradients are
  summed in registers in a fixed order -- no atomics, bitwise reproducible;
* ``_bwd_dq_kernel``: one program per (query block, sequence x q head) loops over key blocks
  (``dQ += dS K``), where ``dS = P * (dP - delta)``, ``dP = dO V^T``.

Grids are ``(cdiv(max_seqlen, BLOCK), S * heads)``: every program looks its sequence up in ``cu_seqlens`` and
exits at once when its block starts past the sequence end. Key loops run only over blocks inside the
sequence and at or below the diagonal (loop bounds); in the forward and dQ kernels the element mask is applied
only to the tiles that straddle the diagonal or a sequence end (the dK/dV kernel masks every visited tile).
Only block sizes, the padded head dim and feature flags are ``tl.constexpr``; ``max_seqlen`` and all sizes
are runtime values, so new batch shapes never recompile. Head dims that are not a power of two (96, or tiny
test sizes) are padded to ``BLOCK_D`` with masked loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpref._impl import triton_interpret

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, DOT_FP32: tl.constexpr):
    """``a @ b`` with fp32 accumulation; exact fp32 products when ``DOT_FP32`` (fp32 inputs: no tf32; and under
    the CPU interpreter, whose bf16/fp16 dot is wrong -- the operands are already rounded to the input dtype)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_tile(q, m_i, l_i, acc, K, V, k_tok, kvh, stride_kt, stride_kh, stride_vt, stride_vh,
              offs_d, d_ok, mask, n_ok, qk_scale_log2, DOT_FP32: tl.constexpr, MASKED: tl.constexpr):
    """Fold one key block (absolute token indices ``k_tok``) into the running softmax state of a query block.
    ``MASKED`` false: a tile wholly inside the visible range, the element mask is not applied."""
    k = tl.load(K + k_tok[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                mask=n_ok[None, :] & d_ok[:, None], other=0.0)                       # [BLOCK_D, BLOCK_N]
    s = _mm(q, k, DOT_FP32) * qk_scale_log2                                                # base-2 scaled scores
    if MASKED:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                          # rows with no key yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + k_tok[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)                       # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_FP32)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,           # q [total, Hq, D]; k, v [total, Hkv, D]; out like q; lse [Hq, total] fp32
    CU,                        # int32 [S + 1]: token boundaries of the sequences (segments)
    PK_START, PK_END,          # int32 [S]: key range of each segment's parent prefix (HAS_PREFIX only)
    qk_scale_log2,             # softmax_scale * log2(e)
    stride_qt, stride_qh,      # token / head strides of q (head dim stride is 1)
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_lh,                 # head stride of lse (= total)
    n_q_heads,                 # Hq
    group,                     # Hq // Hkv
    head_dim,                  # D (<= BLOCK_D)
    CAUSAL: tl.constexpr,      # mask keys after the query within the own segment
    DOT_FP32: tl.constexpr,    # exact fp32 dots (fp32 inputs, or the CPU interpreter)
    HAS_PREFIX: tl.constexpr,  # also attend fully to [PK_START[s], PK_END[s])
    BLOCK_M: tl.constexpr,     # queries per program
    BLOCK_N: tl.constexpr,     # keys per inner step
    BLOCK_D: tl.constexpr,     # head dim padded to a power of two
):
    pid_m = tl.program_id(0)
    pid_sh = tl.program_id(1)
    seq = pid_sh // n_q_heads
    h = pid_sh % n_q_heads
    kvh = h // group
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 >= L:  # block wholly past this sequence's end: nothing to do
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < head_dim
    q = tl.load(Q + (start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_PREFIX:
        ps = tl.load(PK_START + seq)
        pe = tl.load(PK_END + seq)
        p_full = ps + ((pe - ps) // BLOCK_N) * BLOCK_N
        for n0 in range(ps, p_full, BLOCK_N):
            k_tok = n0 + offs_n
            n_ok = k_tok < pe
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, K, V, k_tok, kvh, stride_kt, stride_kh, stride_vt,
                                      stride_vh, offs_d, d_ok, n_ok[None, :], n_ok, qk_scale_log2, DOT_FP32, False)
        for n0 in range(p_full, pe, BLOCK_N):
            k_tok = n0 + offs_n
            n_ok = k_tok < pe
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, K, V, k_tok, kvh, stride_kt, stride_kh, stride_vt,
                                      stride_vh, offs_d, d_ok, n_ok[None, :], n_ok, qk_scale_log2, DOT_FP32, True)
    # key blocks [0, split) are wholly visible (below the diagonal / inside the sequence): no element mask;
    # [split, hi) straddle the diagonal or the sequence end; blocks past hi are skipped
    hi = L
    split = (L // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(L, m0 + BLOCK_M)
        split = m0  # BLOCK_M is a multiple of BLOCK_N
    for n0 in range(0, split, BLOCK_N):
        kn = n0 + offs_n
        n_ok = kn < L
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, K, V, start + kn, kvh, stride_kt, stride_kh, stride_vt,
                                  stride_vh, offs_d, d_ok, n_ok[None, :], n_ok, qk_scale_log2, DOT_FP32, False)
    for n0 in range(split, hi, BLOCK_N):
        kn = n0 + offs_n
        n_ok = kn < L
        mask = n_ok[None, :]
        if CAUSAL:
            mask = mask & (offs_m[:, None] >= kn[None, :])
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, K, V, start + kn, kvh, stride_kt, stride_kh, stride_vt,
                                  stride_vh, offs_d, d_ok, mask, n_ok, qk_scale_log2, DOT_FP32, True)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + (start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634
    tl.store(LSE + h * stride_lh + start + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,              # out, its gradient [total, Hq, D]; delta [Hq, total] fp32
    total,                     # number of tokens
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
    head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (t < total)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + t[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + t[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=ok, other=0.0)
    tl.store(DELTA + h * stride_dh + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=t < total)


@triton.jit
def _bwd_kv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, q_tok, h, mask, m_ok, offs_d, d_ok,
                 stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, qk_scale_log2, DOT_FP32: tl.constexpr):
    """Accumulate one query block's contribution to a key block's dK (unscaled) and dV."""
    ld = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=ld, other=0.0)
    do = tl.load(DO + q_tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=ld, other=0.0)
    lse = tl.load(LSE + h * stride_lh + q_tok, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * stride_lh + q_tok, mask=m_ok, other=0.0)
    s = _mm(q, tl.trans(k), DOT_FP32) * qk_scale_log2                                      # [BLOCK_M, BLOCK_N]
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    dv += _mm(tl.trans(p.to(do.dtype)), do, DOT_FP32)
    dp = _mm(do, tl.trans(v), DOT_FP32)
    ds = p * (dp - delta[:, None])
    dk += _mm(tl.trans(ds.to(q.dtype)), q, DOT_FP32)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA,   # as in the forward; DO like q; LSE, DELTA [Hq, total] fp32
    DK, DV,                    # outputs like k, v
    CU,                        # int32 [S + 1]
    QC_END,                    # int32 [S]: end of the query range of the segments whose parent is s (HAS_PREFIX)
    softmax_scale, qk_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_lh,
    n_kv_heads,                # Hkv
    group,                     # Hq // Hkv: q heads summed into this kv head, in order
    head_dim,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, HAS_PREFIX: tl.constexpr,
    BLOCK_M: tl.constexpr,     # queries per inner step
    BLOCK_N: tl.constexpr,     # keys per program
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_sh = tl.program_id(1)
    seq = pid_sh // n_kv_heads
    kvh = pid_sh % n_kv_heads
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= L:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < head_dim
    ld = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + (start + offs_n)[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=ld, other=0.0)
    v = tl.load(V + (start + offs_n)[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=ld, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M  # query blocks entirely before this key block never see it
    if HAS_PREFIX:
        qs = start + L
        qe = tl.load(QC_END + seq)
    for g in range(0, group):
        h = kvh * group + g
        for m0 in range(lo, L, BLOCK_M):
            qm = m0 + offs_m
            m_ok = qm < L
            mask = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                mask = mask & (qm[:, None] >= offs_n[None, :])
            dk, dv = _bwd_kv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, start + qm, h, mask, m_ok, offs_d, d_ok,
                                  stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, qk_scale_log2, DOT_FP32)
        if HAS_PREFIX:  # the child segments' queries see this prefix block fully
            for m0 in range(qs, qe, BLOCK_M):
                q_tok = m0 + offs_m
                m_ok = q_tok < qe
                dk, dv = _bwd_kv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, q_tok, h, m_ok[:, None] & n_ok[None, :],
                                      m_ok, offs_d, d_ok, stride_qt, stride_qh, stride_dot, stride_doh,
                                      stride_lh, qk_scale_log2, DOT_FP32)
    dk = dk * softmax_scale
    tl.store(DK + (start + offs_n)[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=ld)
    tl.store(DV + (start + offs_n)[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=ld)


@triton.jit
def _bwd_q_tile(dq, q, do, lse, delta, K, V, k_tok, kvh, mask, n_ok, offs_d, d_ok,
                stride_kt, stride_kh, stride_vt, stride_vh, qk_scale_log2, DOT_FP32: tl.constexpr,
                MASKED: tl.constexpr):
    """Accumulate one key block's contribution to a query block's dQ (unscaled); ``MASKED`` as in _fwd_tile."""
    ld = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + k_tok[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=ld, other=0.0)
    v = tl.load(V + k_tok[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=ld, other=0.0)
    s = _mm(q, tl.trans(k), DOT_FP32) * qk_scale_log2
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(mask, p, 0.0)
    dp = _mm(do, tl.trans(v), DOT_FP32)
    ds = p * (dp - delta[:, None])
    dq += _mm(ds.to(k.dtype), k, DOT_FP32)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA,   # as in _bwd_dkdv_kernel
    DQ,                        # output like q
    CU, PK_START, PK_END,      # as in the forward
    softmax_scale, qk_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    stride_lh,
    n_q_heads, group, head_dim,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, HAS_PREFIX: tl.constexpr,
    BLOCK_M: tl.constexpr,     # queries per program
    BLOCK_N: tl.constexpr,     # keys per inner step
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_sh = tl.program_id(1)
    seq = pid_sh // n_q_heads
    h = pid_sh % n_q_heads
    kvh = h // group
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 >= L:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < head_dim
    ld = m_ok[:, None] & d_ok[None, :]
    q_tok = start + offs_m
    q = tl.load(Q + q_tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=ld, other=0.0)
    do = tl.load(DO + q_tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=ld, other=0.0)
    lse = tl.load(LSE + h * stride_lh + q_tok, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * stride_lh + q_tok, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_PREFIX:
        ps = tl.load(PK_START + seq)
        pe = tl.load(PK_END + seq)
        p_full = ps + ((pe - ps) // BLOCK_N) * BLOCK_N
        for n0 in range(ps, p_full, BLOCK_N):
            k_tok = n0 + offs_n
            n_ok = k_tok < pe
            dq = _bwd_q_tile(dq, q, do, lse, delta, K, V, k_tok, kvh, m_ok[:, None] & n_ok[None, :], n_ok,
                             offs_d, d_ok, stride_kt, stride_kh, stride_vt, stride_vh, qk_scale_log2, DOT_FP32,
                             False)
        for n0 in range(p_full, pe, BLOCK_N):
            k_tok = n0 + offs_n
            n_ok = k_tok < pe
            dq = _bwd_q_tile(dq, q, do, lse, delta, K, V, k_tok, kvh, m_ok[:, None] & n_ok[None, :], n_ok,
                             offs_d, d_ok, stride_kt, stride_kh, stride_vt, stride_vh, qk_scale_log2, DOT_FP32,
                             True)
    hi = L
    split = (L // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(L, m0 + BLOCK_M)
        split = m0  # as in the forward
    for n0 in range(0, split, BLOCK_N):
        kn = n0 + offs_n
        n_ok = kn < L
        dq = _bwd_q_tile(dq, q, do, lse, delta, K, V, start + kn, kvh, n_ok[None, :], n_ok, offs_d, d_ok,
                         stride_kt, stride_kh, stride_vt, stride_vh, qk_scale_log2, DOT_FP32, False)
    for n0 in range(split, hi, BLOCK_N):
        kn = n0 + offs_n
        n_ok = kn < L
        mask = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            mask = mask & (offs_m[:, None] >= kn[None, :])
        dq = _bwd_q_tile(dq, q, do, lse, delta, K, V, start + kn, kvh, mask, n_ok, offs_d, d_ok,
                         stride_kt, stride_kh, stride_vt, stride_vh, qk_scale_log2, DOT_FP32, True)
    dq = dq * softmax_scale
    tl.store(DQ + q_tok[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=ld)


# --------------------------------------------------------------------------------------------------- launchers

def _blocks(head_dim: int, kernel: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for ``kernel`` in fwd/dkdv/dq. Small blocks under the interpreter.

    GPU choices compile for sm_90 without register spills (tests/test_varlen_attention.py checks this);
    not tuned on hardware yet.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if triton_interpret():
        return 16, 16, block_d, 4
    if kernel == "fwd":
        return (128, 64, block_d, 8) if block_d <= 64 else (64, 64, block_d, 8)
    if block_d <= 64:
        return 64, 64, block_d, 4
    return (32, 64, block_d, 8) if kernel == "dkdv" else (64, 32, block_d, 8)


def _dot_fp32(q: torch.Tensor) -> bool:
    return q.dtype == torch.float32 or triton_interpret()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[int, int, int]:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [total, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    total, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != total or k.shape[2] != d:
        raise ValueError(f"k and v must be [total={total}, kv_heads, head_dim={d}]; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if d > 256:
        raise ValueError(f"head_dim must be <= 256, got {d}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be int32 [S + 1] on {q.device}; got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
    return total, hq, d


def _last_contig(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def varlen_attn_fwd(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale: float, causal: bool,
                    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Forward. Returns ``(out [total, Hq, D], lse [Hq, total] fp32)``.

    ``prefix`` = ``(pk_start, pk_end, q_child_end)`` int32 ``[S]`` (see the module docstring) or None.
    """
    total, hq, d = _check(q, k, v, cu_seqlens)
    q, k, v = _last_contig(q, k, v)
    n_seq = cu_seqlens.numel() - 1
    # zero-initialised: tokens outside every sequence (cu_seqlens[-1] < total) get no program
    out = torch.zeros_like(q)
    lse = torch.zeros((hq, total), device=q.device, dtype=torch.float32)
    if total == 0 or n_seq <= 0 or max_seqlen <= 0:
        return out, lse
    bm, bn, bd, warps = _blocks(d, "fwd")
    pk_start, pk_end = (prefix[0], prefix[1]) if prefix is not None else (cu_seqlens, cu_seqlens)
    grid = (triton.cdiv(max_seqlen, bm), n_seq * hq)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, pk_start, pk_end, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), hq, hq // k.shape[1], d,
        CAUSAL=causal, DOT_FP32=_dot_fp32(q), HAS_PREFIX=prefix is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
    )
    return out, lse


def varlen_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, softmax_scale: float, causal: bool,
                    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Backward. Returns ``(dq, dk, dv)`` in the dtypes of ``q, k, v``. Deterministic (no atomics)."""
    total, hq, d = _check(q, k, v, cu_seqlens)
    dout, q, k, v, out = _last_contig(dout, q, k, v, out)
    hkv = k.shape[1]
    n_seq = cu_seqlens.numel() - 1
    # zero-initialised: tokens outside every sequence (cu_seqlens[-1] < total) get no program
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if total == 0 or n_seq <= 0 or max_seqlen <= 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    _bwd_preprocess_kernel[(triton.cdiv(total, 64), hq)](
        out, dout, delta, total, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0), d,
        BLOCK_M=64, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    has_prefix = prefix is not None
    pk_start, pk_end, qc_end = prefix if has_prefix else (cu_seqlens, cu_seqlens, cu_seqlens)
    scale_log2 = softmax_scale * LOG2E
    bm, bn, bd, warps = _blocks(d, "dkdv")
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, bn), n_seq * hkv)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, qc_end, softmax_scale, scale_log2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        hkv, hq // hkv, d,
        CAUSAL=causal, DOT_FP32=_dot_fp32(q), HAS_PREFIX=has_prefix, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
    )
    bm, bn, bd, warps = _blocks(d, "dq")
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, bm), n_seq * hq)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, pk_start, pk_end, softmax_scale, scale_log2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        hq, hq // hkv, d,
        CAUSAL=causal, DOT_FP32=_dot_fp32(q), HAS_PREFIX=has_prefix, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
    )
    return dq, dk, dv
