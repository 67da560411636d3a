"""RL policy losses from per-token log-probs: GRPO, BNPO, Dr. GRPO, DAPO, GSPO, GSPO-token, PPO; and the value loss.

Every loss type is ``L = sum_t w_t l_t`` where ``l_t`` is the clipped surrogate (plus ``beta`` times a KL
estimate) and the token weights ``w_t`` depend only on the masks (``token_weights``), so they are known before
the forward pass. That split makes the losses separable over chunks of whole sequences, which the fused engine
(``fastpref.losses.fused_policy``) relies on. Per token, with ratio ``r_t`` and advantage ``A_t``::

    l_t = -min(min(r_t, delta) A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) + beta * KL_t

=============  ===========================================  ========================  ====================
loss_type      w_t (m = completion mask, S sequences)       ratio r_t                 clip defaults
=============  ===========================================  ========================  ====================
grpo           m_t / (S |o_i|)  (token mean, then mean)     exp(logp_t - old_t)       0.2 / 0.2
bnpo           m_t / sum(m)     (token mean over batch)     token                     0.2 / 0.2
dr_grpo        m_t / (S L_max)  (L_max = max_completion)    token                     0.2 / 0.2
dapo           m_t / num_items_in_batch (default sum(m))    token                     0.2 / 0.28
gspo           as grpo                                      exp(mean_i(logp - old))   3e-4 / 4e-4
gspo_token     as grpo                                      sg[s_i] pi_t / sg[pi_t]   3e-4 / 4e-4
ppo            as bnpo                                      token                     0.2 / 0.2
=============  ===========================================  ========================  ====================

The formulas, defaults and normalisations are TRL 1.16's ``GRPOTrainer._compute_loss`` (``loss_type`` grpo,
bnpo, dr_grpo, dapo; GSPO = TRL's ``importance_sampling_level="sequence"`` with ``loss_type="grpo"``; ``delta``
= TRL's two-sided clip of INTELLECT-2, which for ``delta > 1 + eps_high`` equals the dual clip of Ye et al. 2020
used with PPO) and of TRL's ``PPOTrainer`` (``ppo``: token mean over the batch). Differences from TRL:
``dapo`` divides by ``num_items_in_batch`` when given (TRL's global token count over processes and
accumulation steps) and by the local token count otherwise; ``gspo_token`` is the GSPO paper's GSPO-token
(TRL 1.16 no longer has it); TRL's gradient-accumulation division is left to the caller.
"""

from __future__ import annotations

import torch

from fastpref.ops.fused import segment_ids
from fastpref.ops.token_loss import KL_ESTIMATORS, token_policy_loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "gspo_token", "ppo")
# loss_type -> (default eps_low, default eps_high or None for "= eps_low", importance-sampling level)
_DEFAULTS = {
    "grpo": (0.2, None, "token"), "bnpo": (0.2, None, "token"), "dr_grpo": (0.2, None, "token"),
    "dapo": (0.2, 0.28, "token"), "gspo": (3e-4, 4e-4, "sequence"), "gspo_token": (3e-4, 4e-4, "sequence_token"),
    "ppo": (0.2, None, "token"),
}
_NORM = {"grpo": "seq", "gspo": "seq", "gspo_token": "seq", "bnpo": "tok", "ppo": "tok", "dapo": "items",
         "dr_grpo": "max_len"}
IS_LEVELS = ("token", "sequence", "sequence_token")


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || ref) estimates from samples of pi (Schulman 2020, "Approximating KL divergence").

    With ``d = ref - logp``: ``k1 = -d`` (unbiased, high variance), ``k2 = d^2 / 2`` (biased, low variance),
    ``k3 = exp(d) - d - 1`` (unbiased, low variance; TRL's GRPO term).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimate: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    d = ref_logps - logps
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


def resolve_loss_config(loss_type: str, eps_low: float | None, eps_high: float | None,
                        importance_sampling_level: str | None) -> tuple[float, float, str]:
    """``(eps_low, eps_high, level)`` with the loss type's defaults filled in; validates the combination."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    d_low, d_high, d_level = _DEFAULTS[loss_type]
    low = d_low if eps_low is None else float(eps_low)
    high = (d_high if d_high is not None else low) if eps_high is None else float(eps_high)
    level = d_level if importance_sampling_level is None else importance_sampling_level
    if level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {level!r}")
    if loss_type in ("gspo", "gspo_token") and level != d_level:
        raise ValueError(f"loss_type={loss_type!r} implies importance_sampling_level={d_level!r}, got {level!r}")
    if not (0 <= low < 1 and high >= 0):
        raise ValueError(f"eps_low must lie in [0, 1) and eps_high be >= 0, got {low}, {high}")
    return low, high, level


def _flat_layout(mask: torch.Tensor, cu_seqlens: torch.Tensor | None, fn: str):
    """(flat fp32 mask [N], seq_ids [N], number of sequences S, padded T or None) of a padded or packed mask."""
    if mask.dim() == 2:
        B, T = mask.shape
        ids = torch.arange(B, device=mask.device).repeat_interleave(T)
        return mask.reshape(-1).to(torch.float32), ids, B, T
    if mask.dim() == 1:
        if cu_seqlens is None:
            raise ValueError(f"{fn}: a packed 1-D mask [N] needs cu_seqlens [S+1]")
        ids = segment_ids(cu_seqlens.to(mask.device), mask.shape[0])
        return mask.to(torch.float32), ids, cu_seqlens.numel() - 1, None
    raise ValueError(f"{fn}: mask must be [B, T] (padded) or [N] (packed), got shape {tuple(mask.shape)}")


def token_weights(mask: torch.Tensor, loss_type: str, *, cu_seqlens: torch.Tensor | None = None,
                  max_completion_length: int | None = None,
                  num_items_in_batch: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-token weights ``w_t`` of ``loss_type`` (see the module table), fp32, same shape as ``mask``.

    ``mask``: ``[B, T]`` padded, or ``[N]`` packed with ``cu_seqlens`` ``[S+1]``. ``max_completion_length``
    (``dr_grpo``) defaults to ``T`` for a padded mask and is required for a packed one. ``num_items_in_batch``
    (``dapo``) defaults to ``sum(mask)``. An empty sequence counts in ``S`` (TRL's ``.mean()`` over rows).
    """
    fn = "token_weights"
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{fn}: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    m, ids, S, T = _flat_layout(mask, cu_seqlens, fn)
    norm = _NORM[loss_type]
    if norm == "seq":
        counts = m.new_zeros(S).index_add_(0, ids, m).clamp(min=1.0)
        w = m / (S * counts)[ids]
    elif norm == "tok":
        w = m / m.sum().clamp(min=1.0)
    elif norm == "items":
        n = m.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        w = m / n
    else:
        L = T if max_completion_length is None else max_completion_length
        if not isinstance(L, int) or L < 1:
            raise ValueError(f"{fn}: dr_grpo needs max_completion_length (a positive int; required for a packed "
                             f"mask), got {max_completion_length!r}")
        w = m / (S * L)
    return w.view(mask.shape)


def per_token_policy_loss(logps: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                          seq_ids: torch.Tensor, n_seqs: int, *, old_logps: torch.Tensor | None,
                          ref_logps: torch.Tensor | None, entropy: torch.Tensor | None,
                          entropy_weights: torch.Tensor | None,
                          level: str, eps_low: float, eps_high: float, delta: float | None, beta: float,
                          kl_estimator: str, impl: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_t w_t l_t - sum_t e_t H_t`` on flat ``[N]`` tensors, plus the metric SUMS (separable over chunks).

    The flat building block of ``policy_loss`` and of the fused chunk function: ``weights`` from
    ``token_weights``, ``entropy_weights`` ``e_t`` (the entropy bonus, ``coef * m_t / sum(m)``) or None,
    ``seq_ids`` ``[N]`` in ``[0, n_seqs)``. Every sequence must be whole in the inputs. Returns
    ``(loss, sums)``; ``finalize_metrics`` turns summed ``sums`` into the metrics.
    """
    f32 = torch.float32
    counts = mask.new_zeros(n_seqs, dtype=f32).index_add_(0, seq_ids, mask)
    inv_len = torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), torch.zeros_like(counts))
    loss, st = token_policy_loss(
        logps, advantages, weights, mask, old_logp=old_logps, ref_logp=ref_logps, level=level,
        seq_ids=seq_ids, seq_inv_len=inv_len, eps_low=eps_low, eps_high=eps_high, delta=delta, beta=beta,
        kl_estimator=kl_estimator, impl=impl)
    # metric weights: every masked token counts once at token level, every non-empty sequence once otherwise
    mw = mask if level == "token" else mask * inv_len[seq_ids]
    low, high = (st.clip & 1).to(f32), ((st.clip >> 1) & 1).to(f32)
    sums = {
        "clip_ratio/low_mean": (mw * low).sum(), "clip_ratio/high_mean": (mw * high).sum(),
        "clip_ratio/region_mean": (mw * torch.maximum(low, high)).sum(), "ratio/mean": (mw * st.ratio).sum(),
        "_n_metric": mw.sum(), "_n_tokens": mask.sum(),
    }
    if st.kl is not None:
        sums["kl"] = (mask * st.kl).sum()
    if entropy is not None:
        sums["entropy"] = (mask * entropy.detach()).sum()
        if entropy_weights is not None:
            loss = loss - (entropy_weights * entropy).sum()
    return loss, sums


def finalize_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Metrics (detached means) from the metric sums of ``per_token_policy_loss`` (summed over chunks)."""
    n_metric, n_tok = sums["_n_metric"].clamp(min=1.0), sums["_n_tokens"].clamp(min=1.0)
    out = {}
    for k, v in sums.items():
        if k.startswith("_"):
            continue
        out[k] = (v / (n_tok if k in ("kl", "entropy") else n_metric)).detach()
    return out


def _per_token(x: torch.Tensor | None, name: str, mask: torch.Tensor, ids: torch.Tensor, S: int, fn: str,
               per_seq_ok: bool = False):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a tensor, got {type(x).__name__}")
    if tuple(x.shape) == tuple(mask.shape):
        return x.reshape(-1).to(torch.float32)
    if per_seq_ok and tuple(x.shape) == (S,):
        return x.to(torch.float32)[ids]
    want = f"[S] = [{S}] or " if per_seq_ok else ""
    raise ValueError(f"{fn}: {name} must be {want}the mask's shape {tuple(mask.shape)}, got {tuple(x.shape)}")


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                *, loss_type: str = "dapo", eps_low: float | None = None, eps_high: float | None = None,
                importance_sampling_level: str | None = None, ref_logps: torch.Tensor | None = None,
                beta: float = 0.0, kl_estimator: str = "k3", delta: float | None = None,
                max_completion_length: int | None = None, num_items_in_batch: torch.Tensor | float | None = None,
                entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                cu_seqlens: torch.Tensor | None = None, impl: str = "auto") -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss of ``loss_type`` (module table) from per-token log-probs.

    Args:
        logps: ``[B, T]`` (right-padded) or ``[N]`` (packed, with ``cu_seqlens``) log-probs of the sampled
            completion tokens under the current policy.
        old_logps: same shape, from the policy that sampled (no grad), or None: on-policy, the ratio is
            ``exp(logp - sg[logp]) = 1`` with ``logp``'s gradient (TRL's ``num_iterations == 1`` shortcut).
        advantages: ``[B]`` per sequence or per token (the mask's shape).
        mask: completion mask (1 on completion tokens that count), same shape as ``logps``.
        loss_type: grpo, bnpo, dr_grpo, dapo (TRL 1.16's default), gspo, gspo_token, ppo.
        eps_low, eps_high: clip range; None takes the loss type's default (0.2 / 0.2; dapo 0.2 / 0.28;
            gspo 3e-4 / 4e-4, the GSPO paper's).
        importance_sampling_level: None (the loss type's), ``"token"`` or ``"sequence"`` (GSPO's sequence ratio
            with another normalisation, e.g. ``loss_type="grpo"`` = TRL's GSPO recipe).
        ref_logps, beta, kl_estimator: KL penalty ``beta * KL_t`` added per token (k1, k2, k3).
        delta: dual-clip bound (> 1 + eps_high) on the unclipped ratio, or None.
        max_completion_length: dr_grpo's ``L_max`` (default: ``T``; required for packed inputs).
        num_items_in_batch: dapo's normaliser (default: the local token count).
        entropy: per-token entropies (for the ``entropy`` metric); ``entropy_coef`` > 0 subtracts
            ``coef * mean_masked(entropy)`` (TRL's entropy bonus: a token mean whatever the loss type).
        impl: the token-loss kernel (``auto``: Triton on CUDA) or its PyTorch twin.

    Returns:
        ``(loss, metrics)``: fp32 scalar; metrics ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean``, ``ratio/mean``, and ``kl`` / ``entropy`` when given (detached, no sync).
        Clip and ratio metrics are token means, or sequence means at sequence level (as TRL).
    """
    fn = "policy_loss"
    low, high, level = resolve_loss_config(loss_type, eps_low, eps_high, importance_sampling_level)
    if not isinstance(logps, torch.Tensor) or not isinstance(mask, torch.Tensor) or logps.shape != mask.shape:
        raise ValueError(f"{fn}: logps and mask must be tensors of one shape, got "
                         f"{getattr(logps, 'shape', type(logps))} and {getattr(mask, 'shape', type(mask))}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"{fn}: beta={beta} needs ref_logps")
    if entropy_coef and entropy is None:
        raise ValueError(f"{fn}: entropy_coef={entropy_coef} needs the per-token entropy")
    m, ids, S, _ = _flat_layout(mask, cu_seqlens, fn)
    w = token_weights(mask, loss_type, cu_seqlens=cu_seqlens, max_completion_length=max_completion_length,
                      num_items_in_batch=num_items_in_batch).reshape(-1)
    adv = _per_token(advantages, "advantages", mask, ids, S, fn, per_seq_ok=True)
    old = _per_token(old_logps, "old_logps", mask, ids, S, fn)
    ref = _per_token(ref_logps, "ref_logps", mask, ids, S, fn) if beta != 0.0 or ref_logps is not None else None
    ent = _per_token(entropy, "entropy", mask, ids, S, fn)
    ent_w = m * (entropy_coef / m.sum().clamp(min=1.0)) if (ent is not None and entropy_coef) else None
    loss, sums = per_token_policy_loss(
        logps.reshape(-1).to(torch.float32), adv, w, m, ids, S, old_logps=old, ref_logps=ref, entropy=ent,
        entropy_weights=ent_w, level=level, eps_low=low, eps_high=high, delta=delta, beta=beta,
        kl_estimator=kl_estimator, impl=impl)
    return loss, finalize_metrics(sums)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip: float | None = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped value loss ``0.5 * mean_masked(max((V - R)^2, (clip(V, V_old +- c) - R)^2))``.

    As TRL's ``PPOTrainer`` (``cliprange_value = 0.2``, the 0.5 factor, a token mean over the batch). ``clip=None``
    gives the unclipped ``0.5 * mean((V - R)^2)``. Metrics: ``value/clipfrac`` (tokens where the clipped term is
    larger) and ``value/mean``.
    """
    fn = "value_loss"
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        if not isinstance(t, torch.Tensor) or t.shape != mask.shape:
            raise ValueError(f"{fn}: {name} must have the mask's shape {tuple(mask.shape)}, got "
                             f"{getattr(t, 'shape', type(t))}")
    if clip is not None and not clip > 0:
        raise ValueError(f"{fn}: clip must be > 0 or None, got {clip}")
    m = mask.to(values.dtype)
    n = m.sum().clamp(min=1.0)
    l1 = (values - returns) ** 2
    if clip is None:
        per_tok, frac = l1, torch.zeros((), device=values.device)
    else:
        vc = torch.clamp(values, old_values - clip, old_values + clip)
        l2 = (vc - returns) ** 2
        per_tok = torch.maximum(l1, l2)
        frac = ((l2 > l1).to(values.dtype) * m).sum() / n
    loss = 0.5 * (per_tok * m).sum() / n
    return loss, {"value/clipfrac": frac.detach(), "value/mean": ((values * m).sum() / n).detach()}
