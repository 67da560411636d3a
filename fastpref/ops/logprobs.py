"""Per-token log-probabilities and cross-entropy straight from hidden states and the LM head.

The ``[tokens, vocab]`` logits tensor is never materialised. Forward keeps only ``logp``, ``lse`` (and the
entropy) per token; backward recomputes the logits chunk by chunk and turns the per-token upstream gradient
``g_t = dL/dlogp_t`` into ``dhidden``, ``dweight`` and ``dbias`` (the "recompute" engine:
2NHV forward + 6NHV backward FLOPs, extra memory ``O(N + chunk * V)``).

``impl="triton"`` runs the fused matmul + online-logsumexp forward kernel (no logits at all) and the
row-wise gradient kernel; ``impl="torch"`` is the PyTorch twin with the same chunking and memory bound;
``impl="auto"`` picks Triton on CUDA and the twin elsewhere.

The model's final-logit transform (``logit_scale``, Gemma's ``softcap``; Liger's ``softcap`` is the naming
precedent) is applied inside the tile, before the temperature; mixed dtypes follow autocast (``_chunks``).
"""

from __future__ import annotations

import torch

from fastpref import _amp
from fastpref._impl import resolve_impl
from fastpref.ops import _chunks


_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _validate(hidden, weight, targets, bias, op: str):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must be a tensor [..., H], got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{op}: weight must be a 2-D tensor [V, H], got shape "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden's last dim ({hidden.shape[-1]}) must equal weight's second dim "
                         f"({weight.shape[1]}); weight is [V, H] = {tuple(weight.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _FLOATS:
            raise ValueError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: targets must be an int64 tensor, got "
                         f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{op}: {name} is on {t.device} but hidden is on {hidden.device}")


class _LinearLogprobs(torch.autograd.Function):
    """Runs with autocast off (the caller's ``no_autocast``); ``dtype`` is the matmul's compute dtype. The inputs
    are saved in their own dtypes and cast again in backward (no compute-dtype copy of W held in between)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lmap, dtype, want_entropy, impl, chunk_rows, num_splits):
        n = hidden.shape[0]
        h, w, b = _amp.cast(dtype, hidden, weight, bias)
        if impl == "triton" and n:
            from fastpref.kernels.logprobs import fused_forward

            zt, lse, ent = fused_forward(h, w, b, targets, lmap.pre, lmap.post, num_splits)
        else:
            zt = hidden.new_empty(n, dtype=torch.float32)
            lse, ent = torch.empty_like(zt), torch.empty_like(zt)
            for s in range(0, n, chunk_rows):
                e = min(s + chunk_rows, n)
                z = _chunks.chunk_logits(h[s:e], w, b)
                zt[s:e], lse[s:e], ent[s:e] = _chunks.stats(z, targets[s:e], lmap, impl, want_entropy)
                del z
        del h, w, b
        valid = targets >= 0
        logp = torch.where(valid, zt - lse, torch.zeros_like(lse))
        ent = torch.where(valid, ent, torch.zeros_like(ent))
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent if want_entropy else None)
        ctx.cfg = (lmap, dtype, impl, chunk_rows)
        # An output nobody differentiates (the entropy when it is only logged) comes back as None, not as zeros:
        # then the backward takes the cheaper path without the entropy term (TRL does the same).
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ent = ent.new_empty(0)
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        with _amp.no_autocast(hidden.device):
            return _LinearLogprobs._backward(ctx, hidden, weight, bias, targets, lse, ent, g_logp, g_ent)

    @staticmethod
    def _backward(ctx, hidden, weight, bias, targets, lse, ent, g_logp, g_ent):
        lmap, dtype, impl, chunk_rows = ctx.cfg
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        valid = targets >= 0
        g = torch.zeros_like(lse) if g_logp is None else torch.where(valid, g_logp.float(), 0.0)
        ge = None
        if ent is not None and g_ent is not None and g_ent.numel():
            ge = torch.where(valid, g_ent.float(), 0.0)
        h, w, b = _amp.cast(dtype, hidden, weight, bias)
        acc = _chunks.GradAccumulator(h, w, b, need_dh, need_dw, need_db and bias is not None,
                                      dtypes=(hidden.dtype, weight.dtype, None if bias is None else bias.dtype))
        n = hidden.shape[0]
        for s in range(0, n, chunk_rows):
            e = min(s + chunk_rows, n)
            z = _chunks.chunk_logits(h[s:e], w, b)
            dz = _chunks.grad_(z, targets[s:e], lse[s:e], g[s:e], None if ge is None else ge[s:e],
                               None if ge is None else ent[s:e], lmap, impl)
            acc.add(s, e, dz)
            del z, dz
        dh, dw, db = acc.grads(bias)
        return dh, dw, db, None, None, None, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                    logit_scale: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    impl: str = "auto", chunk_size: int | None = None, check_targets: bool = True,
                    num_splits: int | None = None):
    """Log-probability of each target token under ``softmax(z / temperature)``, ``z`` the model's final logits.

    ``z = (hidden @ weight.T + bias) * logit_scale``, then ``z = softcap * tanh(z / softcap)`` if ``softcap`` is
    set, then ``/ temperature`` -- the order of the models (Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``, Gemma 2/3's ``final_logit_softcapping``) and of TRL/vLLM sampling. Applied inside the
    tile, forward and backward (``fastpref.kernels.logprobs``); the name ``softcap`` follows Liger's
    ``LigerFusedLinearCrossEntropyLoss(softcap=...)``.

    Mixed dtypes: inside ``torch.autocast`` the matmul runs in autocast's dtype (both operands cast, as the
    model's own ``lm_head`` would); outside, in the promoted dtype of ``hidden``, ``weight`` and ``bias``.

    Args:
        hidden: ``[..., H]`` last hidden states (fp32, bf16, fp16 or fp64); leading dims are flattened.
        weight: ``[V, H]`` LM head weight, any of those dtypes (fp32 master weights with bf16 hidden states
            work; see above).
        targets: ``[...]`` int64 token ids (same leading shape as ``hidden``); ``ignore_index`` marks
            positions to skip (prompt, padding), which get ``logp = 0`` and ``entropy = 0`` and no gradient.
        bias: optional ``[V]`` LM head bias (any float dtype).
        temperature: divides the final logits (as in sampling); a finite number > 0.
        softcap: final-logit softcapping (``config.final_logit_softcapping``); None or a finite number > 0.
        logit_scale: multiplies the raw logits (``config.logit_scale``, ``1 / config.logits_scaling``); > 0.
        return_entropy: also return the entropy of each position's distribution (differentiable).
        impl: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
        chunk_size: rows per recomputed logits chunk (default: about 64M logits elements per chunk).
        check_targets: raise ``ValueError`` on ids outside ``[0, V)`` (costs one host sync).
        num_splits: Triton forward only: vocabulary splits per row block (default: fill the GPU).

    Returns:
        ``logp`` ``[...]`` float32, or ``(logp, entropy)`` with ``return_entropy=True``. Gradients flow to
        ``hidden``, ``weight`` and ``bias`` in their own dtypes.
    """
    op = "linear_logprobs"
    _validate(hidden, weight, targets, bias, op)
    lmap = _chunks.logit_map(op, temperature, softcap, logit_scale)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    ignored = t == ignore_index
    if check_targets and t.numel():
        # One host sync; the trainer validates token ids when it loads the data and turns this off.
        bad = ~ignored & ((t < 0) | (t >= weight.shape[0]))
        if bad.any():
            raise ValueError(f"{op}: targets must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}; "
                             f"found {t[bad][:5].tolist()} (first at flat index {int(bad.nonzero()[0])})")
    t = torch.where(ignored, torch.full_like(t, -1), t)
    impl = resolve_impl(impl, hidden.device, op=op)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    chunk_rows = chunk_size or _chunks.default_chunk_rows(weight.shape[0], max(h.shape[0], 1), h.device)
    if h.stride(-1) != 1:
        h = h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    dtype = _amp.compute_dtype(h, w, bias)
    with _amp.no_autocast(h.device):
        logp, ent = _LinearLogprobs.apply(h, w, bias, t, lmap, dtype, bool(return_entropy), impl, chunk_rows,
                                          num_splits)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                         logit_scale: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                         impl: str = "auto", chunk_size: int | None = None, check_targets: bool = True) -> torch.Tensor:
    """Cross-entropy ``-logp`` of the targets (the SFT loss) on the same chunked engine.

    ``temperature``, ``softcap``, ``logit_scale`` and mixed dtypes as in :func:`linear_logprobs`.
    ``reduction="mean"`` averages over non-ignored positions (as ``torch.nn.functional.cross_entropy``;
    0 when every position is ignored), ``"sum"`` sums them, ``"none"`` returns ``[...]`` with 0 at ignored.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _chunks.logit_map("linear_cross_entropy", temperature, softcap, logit_scale)  # errors under this op's name
    logp = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                           logit_scale=logit_scale, ignore_index=ignore_index, impl=impl, chunk_size=chunk_size,
                           check_targets=check_targets)
    nll = -logp
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)
