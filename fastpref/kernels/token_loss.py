"""Triton kernel for the per-token clipped policy loss of GRPO / DAPO / GSPO / PPO (no autograd, no policy).

Every RL policy objective of ``fastpref.losses.policy`` is written as ``L = sum_t w_t * l_t`` with per-token
weights ``w_t`` fixed before the pass (``1/(B |o_i|)``, ``1/sum(mask)``, ...; 0 on prompt and padding), so one
element-wise kernel computes, per token ``t`` (fp32 math whatever the caller's dtypes)::

    lr_t   = logp_t - old_t                  (token level; 0 when there are no old log-probs: on-policy)
           = seq_lr_t                        (sequence level, GSPO: the mean log-ratio of t's sequence)
    r_t    = exp(lr_t)
    l_t    = -min(min(r_t, delta) A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) + beta * kl_t
    kl_t   = k1: logp - ref  |  k2: (logp - ref)^2 / 2  |  k3: exp(ref - logp) - (ref - logp) - 1

and the gradient pieces the fused engine needs::

    gr_t = w_t * dl_t/dlr_t = -w_t A_t r_t  when the unclipped branch is taken and r_t <= delta, else 0
    g_t  = w_t * beta * dkl_t/dlogp_t  (+ gr_t at token level, where dlr_t/dlogp_t = 1)

At sequence level ``lr_t`` depends on every token of the sequence (``dlr/dlogp_t = mask_t / |o_i|``), so the
caller adds ``mask_t / |o_i| * sum_{t' in i} gr_t'`` to ``g_t`` (a segment sum; ``fastpref.ops.token_loss``).
Tokens with ``w_t == 0`` produce zeros everywhere (their inputs may be garbage, e.g. ``-inf``).
Also written: ``r_t`` and the clip flags (bit 0: low-clipped, ``r < 1-eps_low`` and ``A < 0``; bit 1:
high-clipped, ``r > 1+eps_high`` and ``A > 0``), as TRL counts them, and ``kl_t``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KL_KINDS = {"k1": 0, "k2": 1, "k3": 2}


@triton.jit
def _token_loss_kernel(
    LOGP,  # [N] fp32 current-policy log-probs of the sampled tokens
    OLD,  # [N] fp32 behaviour-policy log-probs (read only when HAS_OLD)
    REF,  # [N] fp32 reference-model log-probs (read only when HAS_REF)
    SEQ_LR,  # [N] fp32 per-token copy of the sequence's mean log-ratio (read only when SEQ_RATIO)
    ADV,  # [N] fp32 advantage of each token (per-sequence advantages broadcast by the caller)
    WGT,  # [N] fp32 token weight w_t of the loss (0 on tokens that do not count)
    OUT_LOSS,  # [N] fp32 out: w_t * l_t
    OUT_G,  # [N] fp32 out: direct dL/dlogp_t (all of it at token level; the KL part at sequence level)
    OUT_GR,  # [N] fp32 out: w_t * dl_t/dlr_t (written only when SEQ_RATIO)
    OUT_RATIO,  # [N] fp32 out: r_t (0 where w_t == 0)
    OUT_KL,  # [N] fp32 out: kl_t (written only when HAS_REF; 0 where w_t == 0)
    OUT_CLIP,  # [N] int8 out: bit 0 low-clipped, bit 1 high-clipped
    n,  # number of tokens N
    eps_low,  # lower clip: ratio clipped at 1 - eps_low
    eps_high,  # upper clip: ratio clipped at 1 + eps_high
    delta,  # dual-clip bound on the unclipped ratio (+inf: none)
    beta,  # KL coefficient
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, SEQ_RATIO: tl.constexpr,
    KL_KIND: tl.constexpr,  # 0: k1, 1: k2, 2: k3
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    w = tl.load(WGT + offs, mask=inb, other=0.0).to(tl.float32)
    on = w != 0.0
    logp = tl.where(on, tl.load(LOGP + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    adv = tl.where(on, tl.load(ADV + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    if SEQ_RATIO:
        lr = tl.load(SEQ_LR + offs, mask=inb, other=0.0).to(tl.float32)
    elif HAS_OLD:
        lr = logp - tl.load(OLD + offs, mask=inb, other=0.0).to(tl.float32)
    else:
        lr = tl.zeros([BLOCK], tl.float32)
    lr = tl.where(on, lr, 0.0)
    r = tl.exp(lr)
    r1 = tl.minimum(r, delta)
    r2 = tl.minimum(tl.maximum(r, 1.0 - eps_low), 1.0 + eps_high)
    unclipped = (r1 * adv <= r2 * adv) & (r <= delta)
    loss = -tl.minimum(r1 * adv, r2 * adv)
    gr = tl.where(unclipped, -adv * r, 0.0)
    if HAS_REF:
        d = tl.where(on, tl.load(REF + offs, mask=inb, other=0.0).to(tl.float32), 0.0) - logp
        if KL_KIND == 0:
            kl = -d
            dkl = tl.full([BLOCK], 1.0, tl.float32)
        elif KL_KIND == 1:
            kl = 0.5 * d * d
            dkl = -d
        else:
            ed = tl.exp(d)
            kl = ed - d - 1.0
            dkl = 1.0 - ed
        kl = tl.where(on, kl, 0.0)
        loss += beta * kl
        g = w * beta * dkl
        tl.store(OUT_KL + offs, kl, mask=inb)
    else:
        g = tl.zeros([BLOCK], tl.float32)
    gr = w * gr
    if SEQ_RATIO:
        tl.store(OUT_GR + offs, gr, mask=inb)
    else:
        g += gr
    low = on & (r < 1.0 - eps_low) & (adv < 0.0)
    high = on & (r > 1.0 + eps_high) & (adv > 0.0)
    tl.store(OUT_LOSS + offs, w * loss, mask=inb)
    tl.store(OUT_G + offs, g, mask=inb)
    tl.store(OUT_RATIO + offs, tl.where(on, r, 0.0), mask=inb)
    tl.store(OUT_CLIP + offs, (low.to(tl.int8) + 2 * high.to(tl.int8)).to(tl.int8), mask=inb)


def token_loss_fwd(logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor, *,
                   old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, seq_log_ratio: torch.Tensor | None,
                   eps_low: float, eps_high: float, delta: float, beta: float, kl_estimator: str):
    """Launch ``_token_loss_kernel`` on ``[N]`` fp32 contiguous tensors on one device.

    Returns ``(loss_t, g, gr, ratio, kl, clip)``: ``gr`` is None unless ``seq_log_ratio`` is given, ``kl`` is
    None unless ``ref_logp`` is given. See the module docstring for the formulas.
    """
    n = logp.shape[0] if logp.dim() == 1 else -1
    named = {"logp": logp, "advantages": advantages, "weights": weights, "old_logp": old_logp,
             "ref_logp": ref_logp, "seq_log_ratio": seq_log_ratio}
    for name, t in named.items():
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"token_loss_fwd: {name} must be 1-D [N] with N = logp's length; got "
                             f"{tuple(t.shape)} (logp {tuple(logp.shape)})")
        if t.dtype != torch.float32:
            raise ValueError(f"token_loss_fwd: {name} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"token_loss_fwd: {name} must be contiguous")
        if t.device != logp.device:
            raise ValueError(f"token_loss_fwd: {name} is on {t.device} but logp is on {logp.device}")
    if kl_estimator not in KL_KINDS:
        raise ValueError(f"token_loss_fwd: kl_estimator must be one of {tuple(KL_KINDS)}, got {kl_estimator!r}")
    out = torch.empty((5, n), device=logp.device, dtype=torch.float32)
    loss_t, g, gr, ratio, kl = out.unbind(0)
    clip = torch.empty(n, device=logp.device, dtype=torch.int8)
    if n:
        BLOCK = 1024 if n >= 1024 else max(16, triton.next_power_of_2(n))
        _token_loss_kernel[(triton.cdiv(n, BLOCK),)](
            logp, old_logp if old_logp is not None else logp, ref_logp if ref_logp is not None else logp,
            seq_log_ratio if seq_log_ratio is not None else logp, advantages, weights,
            loss_t, g, gr, ratio, kl, clip, n, float(eps_low), float(eps_high), float(delta), float(beta),
            HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None, SEQ_RATIO=seq_log_ratio is not None,
            KL_KIND=KL_KINDS[kl_estimator], BLOCK=BLOCK,
        )
    return (loss_t, g, gr if seq_log_ratio is not None else None, ratio,
            kl if ref_logp is not None else None, clip)
