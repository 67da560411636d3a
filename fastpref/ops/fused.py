"""The "eager" fused-loss engine: a loss of per-token log-probs, with its gradient formed in the forward.

For a loss that is a sum over chunks of whole sequences / pairs / groups -- every objective of
``fastpref.losses`` once its batch-wide normalisers (pair counts, token counts, advantages, reference
log-probs) are computed up front -- each chunk is handled completely in one pass::

    z_c   = h_c W^T + b                      one matmul, the only [chunk, V] tile alive
    logp_c, H_c = stats(z_c)                 per-token log-prob and entropy (fp32) of the final logits
                                             (logit_scale, softcap, temperature applied in the tile)
    loss_c, aux = chunk_loss_fn(logp_c, H_c) the loss's own code, on [chunk]-sized tensors
    g_c, ge_c = dloss_c/dlogp_c, dloss_c/dH_c  autograd on the small tensors only
    dz_c  = grad(z_c, g_c, ge_c)             in place
    dh_c  = dz_c W,   dW += dz_c^T h_c        formed now, stored

Backward only scales the stored gradients by the upstream scalar. 6NHV FLOPs in total (no recompute),
extra memory ``dh`` + ``dW`` + one tile. A loss that couples the whole batch non-linearly through the
log-probs must instead call ``linear_logprobs`` (the recompute engine) and let autograd do the rest.

The pass runs with autocast off: the matmuls in ``fastpref._amp.compute_dtype`` (autocast's dtype inside
``torch.autocast``, else the promoted input dtype), the loss callback in whatever dtype its tensors have (fp32
log-probs), the gradients returned in each input's own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastpref import _amp
from fastpref._impl import resolve_impl
from fastpref.ops import _chunks

ChunkLossFn = Callable[[int, int, torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, dict]"]


def plan_chunks(unit_bounds: Sequence[int], vocab_size: int, *, chunk_size: int | None = None,
                device: torch.device | str = "cuda") -> list[int]:
    """Group consecutive units (sequences, pairs, groups) into chunks of at most ``chunk_size`` tokens.

    ``unit_bounds`` are python ints ``[0, b1, ..., N]`` (token boundaries of the units). A unit longer than
    the budget becomes a chunk of its own. Returns chunk boundaries ``[0, ..., N]``, a subset of the units'.
    The default budget keeps ``chunk * V`` near 64M elements on GPU (4M on CPU; pass ``device``).
    """
    bounds = [int(b) for b in unit_bounds]
    if len(bounds) < 1 or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"plan_chunks: unit_bounds must start at 0 and be non-decreasing, got {bounds[:8]}...")
    budget = chunk_size or _chunks.default_chunk_rows(vocab_size, max(bounds[-1], 1), device)
    if budget <= 0:
        raise ValueError(f"plan_chunks: chunk_size must be positive, got {chunk_size}")
    return _greedy(bounds, budget)


def _greedy(bounds: list[int], budget: int) -> list[int]:
    out = [0]
    last = 0  # the last unit boundary seen that is not yet a chunk boundary
    for b in bounds[1:]:
        if b == out[-1]:
            continue
        if b - out[-1] > budget and last > out[-1]:
            out.append(last)
        last = b
    if last > out[-1]:
        out.append(last)
    return out


def segment_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``[N]`` int64 index of the sequence each token belongs to, from ``cu_seqlens`` ``[S+1]``."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=n_tokens)


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums ``[S]`` of per-token ``values`` ``[N]`` (e.g. sequence log-probs, token counts)."""
    ids = segment_ids(cu_seqlens.to(values.device), values.shape[0])
    out = values.new_zeros(cu_seqlens.numel() - 1)
    return out.index_add_(0, ids, values)


class _FusedChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, fn, bounds, lmap, dtype, need_entropy, impl, aux_out):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        hidden, weight, bias_c = _amp.cast(dtype, hidden, weight, bias)
        acc = _chunks.GradAccumulator(hidden, weight, bias_c, need_dh, need_dw, need_db and bias is not None,
                                      dtypes=dtypes)
        any_grad = need_dh or need_dw or need_db
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for s, e in zip(bounds[:-1], bounds[1:]):
            tgt = targets[s:e]
            z = _chunks.chunk_logits(hidden[s:e], weight, bias_c)
            zt, lse, ent = _chunks.stats(z, tgt, lmap, impl, need_entropy)
            valid = tgt >= 0
            logp = torch.where(valid, zt - lse, 0.0).requires_grad_(any_grad)
            ent_leaf = torch.where(valid, ent, 0.0).requires_grad_(any_grad) if need_entropy else None
            with torch.enable_grad():
                loss_c, aux = fn(s, e, logp, ent_leaf)
                if not isinstance(loss_c, torch.Tensor) or loss_c.dim() != 0:
                    raise ValueError("fused_linear_chunked_loss: chunk_loss_fn must return (0-dim tensor, dict)")
                if any_grad:
                    leaves = [logp] + ([ent_leaf] if need_entropy else [])
                    grads = torch.autograd.grad(loss_c, leaves, allow_unused=True)
            aux_out.append({k: v.detach() for k, v in aux.items()})
            total += loss_c.detach().float()
            if any_grad:
                g = torch.where(valid, grads[0], 0.0) if grads[0] is not None else torch.zeros_like(logp)
                ge = torch.where(valid, grads[1], 0.0) if need_entropy and grads[1] is not None else None
                dz = _chunks.grad_(z, tgt, lse, g.float().detach(), ge, ent if ge is not None else None,
                                   lmap, impl)
                acc.add(s, e, dz)
            del z
        ctx.save_for_backward(*[t for t in acc.grads(bias)])
        ctx.has = (acc.dh is not None, acc.dw is not None, bias is not None and acc.db is not None)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # The stored gradients are scaled in place (no second dW-sized buffer), so this graph can be
        # back-propagated once only.
        if ctx.used:
            raise RuntimeError("fused_linear_chunked_loss: backward through the same loss twice is not supported "
                               "(its gradients are formed in the forward and scaled in place)")
        ctx.used = True
        out = [t.mul_(grad_out.to(t.dtype)) if has and t is not None else None
               for has, t in zip(ctx.has, ctx.saved_tensors)]
        return (*out, None, None, None, None, None, None, None, None)


def fused_linear_chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_loss_fn: ChunkLossFn, chunk_bounds: Sequence[int], *,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              softcap: float | None = None, logit_scale: float = 1.0, ignore_index: int = -100,
                              need_entropy: bool = False, impl: str = "auto") -> tuple[torch.Tensor, list[dict]]:
    """Sum over chunks of ``chunk_loss_fn(start, end, logp_chunk, entropy_chunk)``, never forming full logits.

    Args:
        hidden: ``[N, H]`` packed hidden states; weight ``[V, H]``; targets ``[N]`` (``ignore_index`` skipped:
            ``logp = 0`` there, and no gradient). Mixed dtypes (e.g. bf16 hidden, fp32 weight) as in
            ``linear_logprobs``: autocast's dtype inside ``torch.autocast``, else promoted; gradients in each
            input's own dtype.
        temperature, softcap, logit_scale: the final-logit transform, as in ``linear_logprobs``
            (``(hW^T + b) * logit_scale``, then ``softcap * tanh(. / softcap)``, then ``/ temperature``).
        chunk_loss_fn: ``(start, end, logp [end-start] fp32, entropy or None) -> (loss_c 0-dim, aux dict)``.
            ``logp``/``entropy`` are autograd leaves; the function must depend only on its own chunk's tokens
            and on constants (batch-wide normalisers computed beforehand).
        chunk_bounds: python ints ``[0, ..., N]`` on unit boundaries (see ``plan_chunks``).
        need_entropy: compute the per-token entropy and pass it (its gradient is honoured).

    Returns:
        ``(loss, aux_list)``: the fp32 scalar loss (differentiable w.r.t. hidden, weight, bias) and the detached
        aux dicts, one per chunk, in order.
    """
    op = "fused_linear_chunked_loss"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden must be [N, H] and weight [V, H] with the same H; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"{op}: targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    lmap = _chunks.logit_map(op, temperature, softcap, logit_scale)
    bounds = [int(b) for b in chunk_bounds]
    if not bounds or bounds[0] != 0 or bounds[-1] != hidden.shape[0] or any(
            b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{op}: chunk_bounds must rise strictly from 0 to N={hidden.shape[0]}, got {bounds[:8]}")
    impl = resolve_impl(impl, hidden.device, op=op)
    t = targets.long()
    t = torch.where(t == ignore_index, torch.full_like(t, -1), t)
    h = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    aux: list[dict] = []
    dtype = _amp.compute_dtype(h, w, bias)
    with _amp.no_autocast(h.device):
        loss = _FusedChunkedLoss.apply(h, w, bias, t, chunk_loss_fn, bounds, lmap, dtype, bool(need_entropy), impl,
                                       aux)
    return loss, aux
