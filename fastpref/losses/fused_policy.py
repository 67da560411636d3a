"""Fused RL policy loss straight from the last hidden states and the LM head: the full logits never exist.

``FusedLinearPolicyLoss`` runs the eager engine ``fastpref.ops.fused_linear_chunked_loss`` over chunks of whole
completions. Every normaliser is computed from the masks before the pass (``token_weights``: the per-token
weights of ``L = sum_t w_t l_t``; the entropy-bonus weights), so each chunk's loss and its ``g_t = dL/dlogp_t``
are final as soon as the chunk's log-probs are: the chunk function calls the token-loss op
(``fastpref.ops.token_policy_loss``, the Triton kernel on CUDA), whose forward writes ``g_t``, and the engine
turns ``g_t`` into ``dhidden`` / ``dweight`` in the same pass. 6NHV FLOPs, one ``[chunk, V]`` tile of memory.

* ``old_logps=None``: on-policy (ratio 1 with the gradient of ``logp``), no second forward.
* GSPO's sequence ratio ``s_i = exp(mean_t(logp - old))`` needs the whole sequence: chunks hold whole
  sequences, so it is local to the chunk (``plan_chunks`` gives a sequence longer than the chunk budget a chunk
  of its own, so this stays exact, with a larger tile). ``two_pass=True`` is the path for when that tile is
  too large: pass 1 computes every ``logp`` (and entropy) with ``linear_logprobs`` under ``no_grad`` (2NHV),
  which gives each ``s_i`` and so every ``g_t`` (the token-loss op on all ``[N]`` tokens); pass 2 runs the
  engine on chunks of any size, split inside sequences, with the linear surrogate ``sum_t sg[g_t] logp_t``
  (6NHV): 8NHV in total, the same loss value and gradients. Any loss type accepts it.
* ``need_entropy=True`` computes the per-token entropy for the ``entropy`` metric and the optional
  ``entropy_coef`` bonus (its gradient flows through the engine's entropy path).
"""

from __future__ import annotations

import bisect

import torch

from fastpref.losses.policy import (_per_token, finalize_metrics, per_token_policy_loss, resolve_loss_config,
                                    token_weights)
from fastpref.ops._chunks import logit_map
from fastpref.ops.fused import fused_linear_chunked_loss, plan_chunks, segment_ids
from fastpref.ops.logprobs import linear_logprobs


class FusedLinearPolicyLoss(torch.nn.Module):
    """GRPO / BNPO / Dr. GRPO / DAPO / GSPO / GSPO-token / PPO policy loss from hidden states (see ``policy_loss``).

    Args (constructor): the loss configuration of ``fastpref.losses.policy_loss`` (``loss_type`` defaults to
        ``"dapo"``, TRL 1.16's default), plus ``temperature`` (the final logits are divided by it; old/ref
        log-probs must be computed at the same temperature), ``softcap`` and ``logit_scale`` (the model's
        final-logit transform, applied before the temperature as in ``fastpref.ops.linear_logprobs``; Liger's
        ``softcap`` is the naming precedent), ``ignore_index``, ``chunk_size`` (tokens per chunk; default from the
        vocabulary size), ``two_pass`` (chunks may split sequences, at the cost of a log-prob-only first pass;
        see the module docstring) and ``impl`` (``auto``: Triton on CUDA).
    """

    def __init__(self, loss_type: str = "dapo", *, eps_low: float | None = None, eps_high: float | None = None,
                 importance_sampling_level: str | None = None, beta: float = 0.0, kl_estimator: str = "k3",
                 delta: float | None = None, max_completion_length: int | None = None, entropy_coef: float = 0.0,
                 temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                 ignore_index: int = -100, chunk_size: int | None = None, two_pass: bool = False, impl: str = "auto"):
        super().__init__()
        self.eps_low, self.eps_high, self.level = resolve_loss_config(loss_type, eps_low, eps_high,
                                                                      importance_sampling_level)
        if delta is not None and not delta > 1.0 + self.eps_high:
            raise ValueError(f"FusedLinearPolicyLoss: delta must be > 1 + eps_high = {1 + self.eps_high}, got {delta}")
        logit_map("FusedLinearPolicyLoss", temperature, softcap, logit_scale)  # validates
        self.softcap, self.logit_scale = softcap, float(logit_scale)
        self.loss_type, self.beta, self.kl_estimator, self.delta = loss_type, float(beta), kl_estimator, delta
        self.max_completion_length, self.entropy_coef = max_completion_length, float(entropy_coef)
        self.temperature, self.ignore_index, self.chunk_size, self.impl = temperature, ignore_index, chunk_size, impl
        self.two_pass = bool(two_pass)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, *,
                cu_seqlens: torch.Tensor | list[int] | None = None, old_logps: torch.Tensor | None = None,
                ref_logps: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | float | None = None,
                need_entropy: bool = False) -> tuple[torch.Tensor, dict]:
        """``(loss, metrics)`` of the batch.

        Args:
            hidden: ``[N, H]`` packed (with ``cu_seqlens``) or ``[B, T, H]`` padded (one completion per row; pass
                only the completion positions, as TRL's ``logits_to_keep``, or prompt rows cost matmul time).
            weight: LM head ``[V, H]``; bias ``[V]`` or None.
            targets: ``[N]`` / ``[B, T]`` next tokens, ``ignore_index`` on prompt, padding and each last token.
            advantages: ``[S]`` per sequence, or per token (``targets``' shape).
            cu_seqlens: ``[S+1]`` token boundaries of the packed sequences, a CPU tensor or a list (chunk planning
                happens on the host; a CUDA tensor would cost a sync and is refused).
            old_logps, ref_logps: per-token log-probs (``targets``' shape) or None (on-policy / no KL).
            num_items_in_batch: dapo's normaliser (default: the local completion-token count).
            need_entropy: compute the entropy (``entropy`` metric; required by ``entropy_coef``).
        """
        fn = "FusedLinearPolicyLoss"
        if hidden.dim() == 3:
            B, T, H = hidden.shape
            if cu_seqlens is not None:
                raise ValueError(f"{fn}: padded hidden [B, T, H] takes no cu_seqlens")
            cu = list(range(0, B * T + 1, T)) if T else [0] * (B + 1)
            h = hidden.reshape(B * T, H)
        elif hidden.dim() == 2:
            if cu_seqlens is None:
                raise ValueError(f"{fn}: packed hidden [N, H] needs cu_seqlens [S+1]")
            if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type != "cpu":
                raise ValueError(f"{fn}: cu_seqlens must be a CPU tensor or a list (keep a CPU copy for planning)")
            cu = [int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
            h = hidden
        else:
            raise ValueError(f"{fn}: hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
        if tuple(targets.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"{fn}: targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                             f"got {tuple(targets.shape)}")
        N = h.shape[0]
        if not cu or cu[0] != 0 or cu[-1] != N or any(b < a for a, b in zip(cu[:-1], cu[1:])):
            raise ValueError(f"{fn}: cu_seqlens must rise from 0 to N={N}, got {cu[:8]}...")
        if self.beta != 0.0 and ref_logps is None:
            raise ValueError(f"{fn}: beta={self.beta} needs ref_logps")
        if self.entropy_coef and not need_entropy:
            raise ValueError(f"{fn}: entropy_coef={self.entropy_coef} needs need_entropy=True")
        S = len(cu) - 1
        mask_shaped = (targets != self.ignore_index).to(torch.float32)
        cu_dev = torch.tensor(cu, device=h.device)
        w = token_weights(mask_shaped, self.loss_type, cu_seqlens=cu_dev if hidden.dim() == 2 else None,
                          max_completion_length=self.max_completion_length,
                          num_items_in_batch=num_items_in_batch).reshape(-1)
        m = mask_shaped.reshape(-1)
        ids = segment_ids(cu_dev, N)
        seq_shape = mask_shaped if hidden.dim() == 3 else m
        adv = _per_token(advantages, "advantages", seq_shape, ids, S, fn, per_seq_ok=True)
        old = _per_token(old_logps, "old_logps", seq_shape, ids, S, fn)
        ref = _per_token(ref_logps, "ref_logps", seq_shape, ids, S, fn)
        ent_w = m * (self.entropy_coef / m.sum().clamp(min=1.0)) if self.entropy_coef else None
        if N == 0:
            raise ValueError(f"{fn}: empty batch (N = 0 tokens)")
        kw = dict(level=self.level, eps_low=self.eps_low, eps_high=self.eps_high, delta=self.delta, beta=self.beta,
                  kl_estimator=self.kl_estimator, impl=self.impl)
        tgt = targets.reshape(-1)
        if self.two_pass:
            return self._two_pass(h, weight, bias, tgt, need_entropy, adv, w, m, ids, S, old, ref, ent_w, kw)
        bounds = plan_chunks(cu, weight.shape[0], chunk_size=self.chunk_size, device=h.device)

        def chunk_loss(s: int, e: int, logp: torch.Tensor, ent: torch.Tensor | None):
            first = bisect.bisect_right(cu, s) - 1  # the sequence holding token s (chunks hold whole sequences)
            last = bisect.bisect_right(cu, e - 1) - 1
            sl = slice(s, e)
            return per_token_policy_loss(
                logp, adv[sl], w[sl], m[sl], ids[sl] - first, last - first + 1,
                old_logps=None if old is None else old[sl], ref_logps=None if ref is None else ref[sl],
                entropy=ent, entropy_weights=None if ent_w is None else ent_w[sl], **kw)

        loss, aux = fused_linear_chunked_loss(h, weight, tgt, chunk_loss, bounds, bias=bias,
                                              ignore_index=self.ignore_index, need_entropy=need_entropy,
                                              impl=self.impl, **self._head())
        sums = {k: torch.stack([a[k] for a in aux]).sum() for k in aux[0]}
        return loss, finalize_metrics(sums)

    def _head(self) -> dict:
        return dict(temperature=self.temperature, softcap=self.softcap, logit_scale=self.logit_scale)

    def _two_pass(self, h, weight, bias, tgt, need_entropy, adv, w, m, ids, S, old, ref, ent_w, kw):
        """Pass 1: all log-probs without grad, then the loss and ``g_t`` on ``[N]``; pass 2: the surrogate."""
        with torch.no_grad():
            out = linear_logprobs(h, weight, tgt, bias=bias, ignore_index=self.ignore_index,
                                  return_entropy=need_entropy, impl=self.impl, check_targets=False, **self._head())
        logp, ent = out if need_entropy else (out, None)
        logp = logp.requires_grad_()
        ent = ent.requires_grad_() if ent is not None else None
        with torch.enable_grad():
            full, sums = per_token_policy_loss(logp, adv, w, m, ids, S, old_logps=old, ref_logps=ref, entropy=ent,
                                               entropy_weights=ent_w, **kw)
            grads = torch.autograd.grad(full, [logp] + ([ent] if ent is not None else []), allow_unused=True)
        g = grads[0] if grads[0] is not None else torch.zeros_like(logp)
        ge = grads[1] if ent is not None and grads[1] is not None else None
        # chunks of any tokens (units of one token): the surrogate is separable token by token
        bounds = plan_chunks(range(h.shape[0] + 1), weight.shape[0], chunk_size=self.chunk_size, device=h.device)

        def surrogate(s: int, e: int, lp_c: torch.Tensor, ent_c: torch.Tensor | None):
            val = (g[s:e] * lp_c).sum()
            if ge is not None:
                val = val + (ge[s:e] * ent_c).sum()
            return val, {}

        surr, _ = fused_linear_chunked_loss(h, weight, tgt, surrogate, bounds, bias=bias,
                                            ignore_index=self.ignore_index, need_entropy=ge is not None,
                                            impl=self.impl, **self._head())
        return full.detach() + (surr - surr.detach()), finalize_metrics(sums)
