"""The fused per-token policy loss (GRPO / DAPO / GSPO / PPO) as a differentiable op, with its PyTorch twin.

``token_policy_loss`` returns ``L = sum_t w_t l_t`` (formulas: ``fastpref.kernels.token_loss``) and keeps
``g_t = dL/dlogp_t``, computed in the forward by the kernel (or its twin), for the backward: the backward is
one multiply. That is what the eager fused engine (``fused_linear_chunked_loss``) needs: its chunk function
calls this op and gets ``g_t`` straight from the kernel.

Importance-sampling levels:

* ``"token"``: ``lr_t = logp_t - old_t`` (PPO, GRPO, DAPO, ...).
* ``"sequence"`` (GSPO, Zheng et al. 2025): ``lr_t = s_i = sum_{t in i} m_t (logp_t - old_t) / |o_i|`` for every
  token of sequence ``i``. ``dL/dlogp_t = g_t^{direct} + m_t / |o_i| * sum_{t' in i} w_t' dl_t'/ds_i``: the
  kernel writes the per-token terms, a segment sum over the sequence finishes the gradient. Exact for per-token
  advantages too.
* ``"sequence_token"`` (GSPO-token): ratio value ``s_i`` but gradient ``sg[s_i] * d(pi_t / sg[pi_t])``, so
  ``dlr_t/dlogp_t = 1`` as at token level.

``old_logp=None`` is on-policy: ``lr = 0`` (ratio 1) with the gradient of ``exp(logp - sg[logp])``, i.e. what
``old = logp.detach()`` gives, without a second forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastpref._impl import resolve_impl

LEVELS = ("token", "sequence", "sequence_token")
KL_ESTIMATORS = ("k1", "k2", "k3")


class TokenLossStats(NamedTuple):
    """Detached per-token by-products of ``token_policy_loss`` (0 where the weight is 0)."""

    ratio: torch.Tensor
    """``[N]`` importance ratio ``r_t`` (the sequence ratio at sequence level)."""
    kl: torch.Tensor | None
    """``[N]`` per-token KL estimate to the reference, or None without ``ref_logp``."""
    clip: torch.Tensor
    """``[N]`` int8: bit 0 low-clipped (``r < 1-eps_low``, ``A < 0``), bit 1 high-clipped (``r > 1+eps_high``,
    ``A > 0``)."""


def _torch_token_loss_fwd(logp, advantages, weights, *, old_logp, ref_logp, seq_log_ratio, eps_low, eps_high, delta,
                          beta, kl_estimator):
    """PyTorch twin of ``fastpref.kernels.token_loss.token_loss_fwd`` (same signature, same outputs)."""
    on = weights != 0
    zero = torch.zeros_like(logp)
    lp = torch.where(on, logp, zero)
    adv = torch.where(on, advantages, zero)
    if seq_log_ratio is not None:
        lr = seq_log_ratio
    elif old_logp is not None:
        lr = lp - old_logp
    else:
        lr = zero
    r = torch.where(on, lr, zero).exp()
    r1 = r.clamp(max=delta)
    r2 = r.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(r1 * adv, r2 * adv)
    gr = weights * torch.where((r1 * adv <= r2 * adv) & (r <= delta), -adv * r, zero)
    kl = None
    g = zero
    if ref_logp is not None:
        d = torch.where(on, ref_logp, zero) - lp
        if kl_estimator == "k1":
            kl, dkl = -d, torch.ones_like(d)
        elif kl_estimator == "k2":
            kl, dkl = 0.5 * d * d, -d
        else:
            kl, dkl = d.exp() - d - 1.0, 1.0 - d.exp()
        kl = torch.where(on, kl, zero)
        loss = loss + beta * kl
        g = weights * beta * dkl
    if seq_log_ratio is None:
        g = g + gr
    clip = ((on & (r < 1.0 - eps_low) & (adv < 0)).to(torch.int8)
            + 2 * (on & (r > 1.0 + eps_high) & (adv > 0)).to(torch.int8))
    return (weights * loss, g, gr if seq_log_ratio is not None else None, torch.where(on, r, zero), kl, clip)


def _seq_sum(values: torch.Tensor, seq_ids: torch.Tensor, n_seqs: int) -> torch.Tensor:
    return values.new_zeros(n_seqs).index_add_(0, seq_ids, values)


class _TokenPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, advantages, weights, mask, old_logp, ref_logp, seq_ids, seq_inv_len, level, eps_low,
                eps_high, delta, beta, kl_estimator, impl):
        seq_lr = None
        if level != "token":
            n_seqs = seq_inv_len.shape[0]
            lr = torch.zeros_like(logp) if old_logp is None else torch.where(mask != 0, logp - old_logp, 0.0)
            seq_lr = (_seq_sum(lr, seq_ids, n_seqs) * seq_inv_len)[seq_ids].contiguous()
        if impl == "triton":
            from fastpref.kernels.token_loss import token_loss_fwd as fwd
        else:
            fwd = _torch_token_loss_fwd
        loss_t, g, gr, ratio, kl, clip = fwd(logp, advantages, weights, old_logp=old_logp, ref_logp=ref_logp,
                                             seq_log_ratio=seq_lr, eps_low=eps_low, eps_high=eps_high,
                                             delta=delta, beta=beta, kl_estimator=kl_estimator)
        if level == "sequence":
            g = g + mask * (_seq_sum(gr, seq_ids, seq_inv_len.shape[0]) * seq_inv_len)[seq_ids]
        elif level == "sequence_token":
            g = g + gr
        ctx.save_for_backward(g)
        kl = kl if kl is not None else torch.zeros(0, device=logp.device)
        ctx.mark_non_differentiable(ratio, kl, clip)
        return loss_t.sum(), ratio, kl, clip

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (g,) = ctx.saved_tensors
        return (g * grad_loss,) + (None,) * 14


def token_policy_loss(logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, *,
                      old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                      level: str = "token", seq_ids: torch.Tensor | None = None,
                      seq_inv_len: torch.Tensor | None = None, eps_low: float = 0.2, eps_high: float = 0.2,
                      delta: float | None = None, beta: float = 0.0, kl_estimator: str = "k3",
                      impl: str = "auto") -> tuple[torch.Tensor, TokenLossStats]:
    """``sum_t w_t l_t`` of the clipped policy loss, differentiable w.r.t. ``logp`` only.

    Args:
        logp: ``[N]`` fp32 log-probs of the sampled tokens under the current policy (requires grad).
        advantages: ``[N]`` fp32 per-token advantages (broadcast per-sequence ones first).
        weights: ``[N]`` fp32 token weights ``w_t`` (``fastpref.losses.policy.token_weights``), 0 off the mask.
        mask: ``[N]`` fp32 (0/1) completion mask; used for the sequence-level mean log-ratio.
        old_logp / ref_logp: ``[N]`` fp32 or None (on-policy / no KL term).
        level: ``"token"``, ``"sequence"`` (GSPO) or ``"sequence_token"`` (GSPO-token).
        seq_ids: ``[N]`` int64 sequence of each token; seq_inv_len: ``[S]`` fp32 ``1/|o_i|`` (0 for an empty
            sequence). Both needed unless ``level == "token"``.
        eps_low / eps_high: the clip range ``[1 - eps_low, 1 + eps_high]``; delta: dual-clip bound or None.
        beta, kl_estimator: KL coefficient and estimator (``k1``, ``k2``, ``k3``).
        impl: ``auto`` (Triton on CUDA), ``triton`` or ``torch``.

    Returns:
        ``(loss, TokenLossStats)``: fp32 scalar loss, and detached per-token ratio / KL / clip flags.
    """
    op = "token_policy_loss"
    impl = resolve_impl(impl, logp.device, op=op)
    if level not in LEVELS:
        raise ValueError(f"{op}: level must be one of {LEVELS}, got {level!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{op}: kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not (eps_low >= 0 and eps_high >= 0):
        raise ValueError(f"{op}: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if delta is not None and not delta > 1.0 + eps_high:
        raise ValueError(f"{op}: delta (dual clip) must be > 1 + eps_high = {1.0 + eps_high}, got {delta}")
    if logp.dim() != 1:
        raise ValueError(f"{op}: logp must be 1-D [N], got shape {tuple(logp.shape)}")
    n = logp.shape[0]
    named = {"logp": logp, "advantages": advantages, "weights": weights, "mask": mask, "old_logp": old_logp,
             "ref_logp": ref_logp}
    for name, t in named.items():
        if t is None:
            continue
        if tuple(t.shape) != (n,):
            raise ValueError(f"{op}: {name} must be [N] = [{n}], got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be float32, got {t.dtype}")
        if t.device != logp.device:
            raise ValueError(f"{op}: {name} is on {t.device} but logp is on {logp.device}")
    if level != "token":
        if seq_ids is None or seq_inv_len is None:
            raise ValueError(f"{op}: level={level!r} needs seq_ids [N] and seq_inv_len [S]")
        if tuple(seq_ids.shape) != (n,) or seq_ids.dtype != torch.int64 or seq_inv_len.dim() != 1:
            raise ValueError(f"{op}: seq_ids must be int64 [N] = [{n}] and seq_inv_len 1-D [S]; got "
                             f"{seq_ids.dtype} {tuple(seq_ids.shape)} and {tuple(seq_inv_len.shape)}")
    contig = [t.contiguous() if t is not None else None for t in (advantages, weights, mask, old_logp, ref_logp)]
    loss, ratio, kl, clip = _TokenPolicyLoss.apply(
        logp.contiguous(), *contig, seq_ids, seq_inv_len, level, float(eps_low), float(eps_high),
        float("inf") if delta is None else float(delta), float(beta), kl_estimator, impl)
    return loss, TokenLossStats(ratio, kl if ref_logp is not None else None, clip)
