"""Preference losses straight from the last hidden states and the LM head (the "fused" forms).

One base, :class:`FusedLinearPreferenceLoss`, runs every loss on ``fastpref.ops.fused_linear_chunked_loss`` (the
"eager" engine): the tokens are cut into chunks of whole pairs (whole sequences for KTO) with
``plan_chunks``; for each chunk the engine forms one ``[chunk, V]`` logits tile, the per-token log-probs, and
calls back here, where they are summed per sequence and handed to the *plain* loss of
``fastpref.losses.preference`` with ``reduction="none"``; the engine differentiates that small function and forms
``dhidden``/``dweight`` in the same pass. Every batch-wide quantity the plain loss needs (reference log-probs,
token counts, the mean chosen length of the SFT/NLL terms, KTO's ``z0``) is computed before the pass, so the sum
over chunks is exactly the batch loss. ``aot``/``aot_unpaired`` sort across the batch, so they are not separable:
they run on the recompute engine (``linear_logprobs`` + autograd) instead, same result, 8NHV instead of 6NHV
FLOPs; so does a batch with a pair longer than the chunk budget (``engine="auto"``), which keeps the extra memory
at one ``[chunk, V]`` tile however long the responses are.

Inputs (the packed-batch convention of the project):

* padded ``hidden [B, T, H]`` with ``targets [B, T]`` in TRL order: rows ``0..B/2-1`` are the chosen and rows
  ``B/2..B-1`` the rejected responses of the same prompts (KTO: one example per row);
* packed ``hidden [N, H]`` or ``[1, N, H]`` with ``cu_seqlens`` ``[S+1]``: pairs interleaved, sequence ``2i``
  chosen and ``2i+1`` rejected (KTO: any order). The chunks are planned on the host: pass the boundaries as host
  ints (a list or tuple), or the device tensor together with its host copy ``cu_seqlens_host`` (what the
  trainer does: ``fastpref.data.batch.Batch``); a device tensor alone is read back (one host sync).

``targets`` are already shifted (``targets[t]`` is the token predicted at ``t``) and hold ``ignore_index`` on
prompt, padding and last positions. The reference is given as precomputed per-sequence log-probs, or as reference
hidden states (same layout) with an optional reference head (default: ``weight``), run under ``no_grad`` with
``linear_logprobs``. Metrics are those of the plain form, computed from the gathered per-sequence log-probs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastpref.losses.preference import (BATCH_COUPLED_DPO_LOSS_TYPES, CPO_LOSS_TYPES, KTO_LOSS_TYPES, DPOOptionError,
                                        check_dpo_options, cpo_loss, dpo_loss, kto_loss, orpo_loss)
from fastpref.ops import default_chunk_rows, fused_linear_chunked_loss, linear_logprobs, plan_chunks, segment_sum
from fastpref.ops._chunks import logit_map

Tensor = torch.Tensor


@dataclass
class _Batch:
    """The batch after layout normalisation: flat tokens, sequence boundaries, per-sequence constants."""

    hidden: Tensor             # [N, H]
    targets: Tensor            # [N]
    bounds: list[int]          # sequence token boundaries [0, ..., N] (python ints)
    cu: Tensor                 # the same on the device
    lengths: Tensor            # [S] scored tokens per sequence (fp32)
    perm: Tensor | None        # row permutation applied to padded [B, T, H] input (pairs made adjacent)
    ref: Tensor | None = None  # [S] reference log-probs
    ref_tail: Tensor | None = None
    tail_weight: Tensor | None = None  # [N] 1.0 on tokens past the pair's shared length (LD-DPO)
    index: Tensor | None = None  # flat positions kept by skip_unscored (None: all)
    n_tokens: int = 0            # tokens before skip_unscored
    extra: dict | None = None


class FusedLinearPreferenceLoss(torch.nn.Module):
    """Shared engine of the fused preference losses; subclasses only say which plain loss to call.

    Args:
        ignore_index: target value of unscored positions.
        temperature: the final logits are divided by it (policy and reference alike).
        softcap, logit_scale: the model's final-logit transform, policy and reference alike (see
            ``fastpref.ops.linear_logprobs``: ``(hW^T + b) * logit_scale``, then ``softcap * tanh(. / softcap)``,
            then ``/ temperature``; Liger's ``softcap`` is the naming precedent). Mixed dtypes (bf16 hidden, fp32
            weight) follow autocast as in ``linear_logprobs``; gradients come back in each input's dtype.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"`` for the chunk kernels.
        chunk_size: tokens per chunk (rounded to whole pairs); default from the vocabulary size.
        reduction: ``"mean"`` over pairs/examples or ``"sum"``.
        validate: check token ids and NaN/inf in the per-sequence log-probs (a few host syncs); turn off on the
            trainer's hot path.
        skip_unscored: drop the positions whose target is ``ignore_index`` (prompt, padding) before the LM head,
            for the policy and the reference alike: often half the work of a DPO batch; results are identical.
            The chunks are planned from the per-sequence counts of scored tokens: pass them as
            ``scored_lengths_host`` (what a ``fastpref.data.Batch`` carries, ``batch.loss_layout()``) and it
            costs nothing, else one host sync per call reads them.
        engine: ``"eager"`` (chunks of whole pairs, gradients formed in the forward, 6NHV), ``"recompute"``
            (``linear_logprobs`` + autograd: chunks of any rows, 8NHV), or ``"auto"``: eager unless the loss
            couples the batch (``aot``) or a pair (sequence, for KTO) is longer than the chunk budget, where an
            eager chunk would have to exceed the budget's ``[chunk, V]`` tile.
    """

    paired = True
    needs_ref = True

    def __init__(self, *, ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                 logit_scale: float = 1.0, impl: str = "auto", chunk_size: int | None = None, reduction: str = "mean",
                 validate: bool = True, skip_unscored: bool = False, engine: str = "auto"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{type(self).__name__}: reduction must be 'mean' or 'sum', got {reduction!r}")
        logit_map(type(self).__name__, temperature, softcap, logit_scale)  # validates
        self.ignore_index, self.temperature, self.impl = ignore_index, float(temperature), impl
        self.softcap, self.logit_scale = softcap, float(logit_scale)
        self.chunk_size, self.reduction, self.validate = chunk_size, reduction, validate
        if engine not in ("auto", "eager", "recompute"):
            raise ValueError(f"{type(self).__name__}: engine must be 'auto', 'eager' or 'recompute', got {engine!r}")
        self.skip_unscored, self.engine = skip_unscored, engine

    # -- what a subclass provides -------------------------------------------------------------------------------
    separable = True
    needs_tail = False

    def plain(self, seq_logps: Tensor, seq_tail: Tensor | None, batch: _Batch, sl: slice, reduction: str):
        """The plain loss on sequences ``sl`` (whole units) given their policy log-probs -> ``(loss, metrics)``."""
        raise NotImplementedError

    def prepare(self, batch: _Batch, **kwargs) -> None:
        """Batch-wide constants (before the pass), stored in ``batch.extra``."""
        if kwargs:
            raise ValueError(f"{type(self).__name__}: unexpected arguments {sorted(kwargs)}")
        if self.paired:  # the SFT/NLL terms average over all chosen tokens of the batch
            batch.extra["mean_chosen_length"] = batch.lengths[0::2].mean().clamp(min=1.0)

    # -- the engine ---------------------------------------------------------------------------------------------
    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                cu_seqlens: Tensor | Sequence[int] | None = None, cu_seqlens_host: Sequence[int] | None = None,
                scored_lengths_host: Sequence[int] | None = None,
                ref_logps=None, ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None,
                ref_bias: Tensor | None = None, **kwargs):
        """``(loss, metrics)``; see the module docstring for the layouts. ``ref_logps``: ``(chosen [P],
        rejected [P])`` for pair losses, ``[B]`` for KTO (already LD-weighted if ``ld_alpha`` is used, as TRL's
        precomputed reference log-probs are). ``scored_lengths_host``: the scored tokens of each sequence (rows in
        the input's order) as Python ints, for ``skip_unscored`` without a host sync; ignored otherwise."""
        name = type(self).__name__
        b = self._layout(name, hidden, targets, cu_seqlens, cu_seqlens_host)
        if self.needs_tail:
            b.tail_weight = self._tail_weight(b)
        if self.skip_unscored:
            self._compact(name, b, scored_lengths_host)
        if self.needs_ref:
            self._reference(name, b, ref_logps, ref_hidden, ref_weight, ref_bias, weight)
        elif ref_logps is not None or ref_hidden is not None:
            raise ValueError(f"{name} is reference-free: do not pass ref_logps or ref_hidden")
        b.extra = {}
        self.prepare(b, **kwargs)
        n_units = len(b.bounds) - 1 if not self.paired else (len(b.bounds) - 1) // 2
        denom = float(max(n_units, 1)) if self.reduction == "mean" else 1.0
        common = dict(bias=bias, ignore_index=self.ignore_index, impl=self.impl, **self._head())

        step = 2 if self.paired else 1
        units = b.bounds[::step]
        budget = self.chunk_size or default_chunk_rows(weight.shape[0], max(units[-1], 1), b.hidden.device)
        longest = max((y - x for x, y in zip(units[:-1], units[1:])), default=0)
        if self.engine == "eager" and not self.separable:
            raise ValueError(f"{name}: engine='eager' needs a loss that is separable over pairs; this loss type "
                             "sorts across the batch (use engine='auto' or 'recompute')")
        if self.engine == "recompute" or not self.separable or (self.engine == "auto" and longest > budget):
            tok = linear_logprobs(b.hidden, weight, b.targets, chunk_size=self.chunk_size,
                                  check_targets=self.validate, **common)
            seq = segment_sum(tok, b.cu)
            tail = segment_sum(tok * b.tail_weight, b.cu) if self.needs_tail else None
            return self.plain(seq, tail, b, slice(None), self.reduction)

        chunks = plan_chunks(units, weight.shape[0], chunk_size=budget, device=b.hidden.device)
        # unit index of each chunk boundary (empty units go to the chunk after them; trailing ones to the last)
        first = [bisect.bisect_left(units, c) for c in chunks[:-1]] + [len(units) - 1]
        local = {}
        for s, i, j in zip(chunks[:-1], first[:-1], first[1:]):
            i, j = i * step, j * step
            local[s] = (i, j, torch.tensor([x - s for x in b.bounds[i:j + 1]], device=b.hidden.device))

        def chunk_loss(s, e, logp, _ent):
            i, j, lcu = local[s]
            seq = segment_sum(logp, lcu)
            tail = segment_sum(logp * b.tail_weight[s:e], lcu) if self.needs_tail else None
            per, _ = self.plain(seq, tail, b, slice(i, j), "none")
            aux = {"logps": seq.detach()}
            if tail is not None:
                aux["tail"] = tail.detach()
            return per.sum() / denom, aux

        if self.validate:
            self._check_targets(name, b.targets, weight.shape[0])
        if b.hidden.shape[0] == 0 or len(chunks) < 2:
            raise ValueError(f"{name}: the batch has no tokens")
        loss, aux = fused_linear_chunked_loss(b.hidden, weight, b.targets, chunk_loss, chunks, **common)
        seq = torch.cat([a["logps"] for a in aux])
        tail = torch.cat([a["tail"] for a in aux]) if self.needs_tail else None
        with torch.no_grad():
            _, metrics = self.plain(seq, tail, b, slice(None), self.reduction)
        return loss, metrics

    def _head(self) -> dict:
        """The final-logit keyword arguments of the ops (policy and reference alike)."""
        return dict(temperature=self.temperature, softcap=self.softcap, logit_scale=self.logit_scale)

    # -- layout -------------------------------------------------------------------------------------------------
    def _layout(self, name, hidden, targets, cu_seqlens, cu_seqlens_host=None) -> _Batch:
        if not isinstance(hidden, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ValueError(f"{name}: hidden and targets must be tensors")
        perm = None
        if cu_seqlens is None:
            if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
                raise ValueError(f"{name}: padded input needs hidden [B, T, H] and targets [B, T]; got "
                                 f"{tuple(hidden.shape)} and {tuple(targets.shape)} (packed input needs cu_seqlens)")
            B, T, H = hidden.shape
            if self.paired:
                if B % 2:
                    raise ValueError(f"{name}: padded pair input needs an even batch (chosen rows, then rejected "
                                     f"rows), got B={B}")
                p = torch.arange(B // 2, device=hidden.device)
                perm = torch.stack([p, p + B // 2], 1).reshape(-1)
                hidden, targets = hidden.index_select(0, perm), targets.index_select(0, perm)
            h, t = hidden.reshape(B * T, H), targets.reshape(B * T)
            bounds = list(range(0, B * T + 1, T)) if T else [0] * (B + 1)
        else:
            if hidden.dim() == 3 and hidden.shape[0] == 1:
                hidden, targets = hidden[0], targets.reshape(-1)
            if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
                raise ValueError(f"{name}: packed input needs hidden [N, H] (or [1, N, H]) and targets [N]; got "
                                 f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
            host = cu_seqlens_host if cu_seqlens_host is not None else cu_seqlens
            # a device tensor without its host copy costs one sync here (the chunks are planned on the host)
            bounds = [int(x) for x in (host.tolist() if isinstance(host, torch.Tensor) else host)]
            if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.numel() != len(bounds):
                raise ValueError(f"{name}: cu_seqlens_host has {len(bounds)} entries, cu_seqlens {cu_seqlens.numel()}")
            if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != hidden.shape[0] or any(
                    y < x for x, y in zip(bounds[:-1], bounds[1:])):
                raise ValueError(f"{name}: cu_seqlens must rise from 0 to N={hidden.shape[0]}, got {bounds[:8]}...")
            if self.paired and (len(bounds) - 1) % 2:
                raise ValueError(f"{name}: packed pairs need an even number of sequences (chosen, rejected "
                                 f"interleaved), got {len(bounds) - 1}")
            h, t = hidden, targets
        if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device == h.device:
            cu = cu_seqlens.long()  # the device copy: no host-to-device transfer
        else:
            cu = torch.tensor(bounds, device=h.device)
        lengths = segment_sum((t != self.ignore_index).float(), cu)
        return _Batch(hidden=h, targets=t, bounds=bounds, cu=cu, lengths=lengths, perm=perm)

    def _compact(self, name: str, b: _Batch, host_counts: Sequence[int] | None) -> None:
        """Keep only the scored positions; sequence k's scored tokens stay contiguous and in order. The counts
        per sequence come from ``host_counts`` (input row order; reordered here as the rows were), else from the
        device (one host sync)."""
        if host_counts is None:
            counts = [int(c) for c in b.lengths.tolist()]  # the one host sync of skip_unscored without host counts
        else:
            counts = [int(c) for c in host_counts]
            if len(counts) != len(b.bounds) - 1:
                raise ValueError(f"{name}: scored_lengths_host has {len(counts)} entries for {len(b.bounds) - 1} "
                                 "sequences")
            if b.perm is not None:  # padded pairs were interleaved (chosen_i, rejected_i): reorder the same way
                half = len(counts) // 2
                counts = [c for i in range(half) for c in (counts[i], counts[half + i])]
            if self.validate and counts != [int(c) for c in b.lengths.tolist()]:
                raise ValueError(f"{name}: scored_lengths_host {counts[:8]} does not match the targets' scored "
                                 f"tokens {[int(c) for c in b.lengths.tolist()][:8]}")
        n = sum(counts)
        keep = b.targets != self.ignore_index
        b.index = torch.argsort((~keep).to(torch.int8), stable=True)[:n]  # scored positions, in order, no sync
        b.n_tokens = b.hidden.shape[0]
        b.hidden, b.targets = b.hidden.index_select(0, b.index), b.targets.index_select(0, b.index)
        if b.tail_weight is not None:
            b.tail_weight = b.tail_weight.index_select(0, b.index)
        b.bounds = [0]
        for c in counts:
            b.bounds.append(b.bounds[-1] + c)
        b.cu = torch.tensor(b.bounds, device=b.hidden.device)

    def _check_targets(self, name, t, vocab):
        bad = (t != self.ignore_index) & ((t < 0) | (t >= vocab))
        if bad.any():
            raise ValueError(f"{name}: targets must be in [0, {vocab}) or ignore_index={self.ignore_index}; found "
                             f"{t[bad][:5].tolist()}")

    def _tail_weight(self, b: _Batch) -> Tensor:
        """1.0 on scored tokens past ``min(|y_w|, |y_l|)`` of their pair (LD-DPO's "excess" part)."""
        valid = (b.targets != self.ignore_index).float()
        seq_id = torch.repeat_interleave(torch.arange(len(b.bounds) - 1, device=valid.device),
                                         b.cu[1:] - b.cu[:-1], output_size=valid.shape[0])
        start = torch.cumsum(b.lengths, 0) - b.lengths
        pos = torch.cumsum(valid, 0) - start[seq_id]  # 1-based position among the scored tokens
        shared = torch.minimum(b.lengths[0::2], b.lengths[1::2]).repeat_interleave(2)
        return valid * (pos > shared[seq_id]).float()

    def _reference(self, name, b: _Batch, ref_logps, ref_hidden, ref_weight, ref_bias, weight):
        S = len(b.bounds) - 1
        if (ref_logps is None) == (ref_hidden is None):
            raise ValueError(f"{name}: pass exactly one of ref_logps (precomputed) or ref_hidden (reference hidden "
                             "states)")
        if ref_logps is not None:
            if self.paired:
                if not isinstance(ref_logps, (tuple, list)) or len(ref_logps) != 2:
                    raise ValueError(f"{name}: ref_logps must be (ref_chosen_logps [P], ref_rejected_logps [P])")
                rc, rr = ref_logps
                if rc.shape != (S // 2,) or rr.shape != (S // 2,):
                    raise ValueError(f"{name}: batch size mismatch: ref_logps are {tuple(rc.shape)} and "
                                     f"{tuple(rr.shape)} but the batch has {S // 2} pairs")
                ref = torch.stack([rc, rr], 1).reshape(-1)
            else:
                ref = ref_logps
                if not isinstance(ref, torch.Tensor) or ref.shape != (S,):
                    raise ValueError(f"{name}: batch size mismatch: ref_logps must be [{S}], got "
                                     f"{tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__}")
            b.ref = ref.detach().float()
            b.ref_tail = torch.zeros_like(b.ref) if self.needs_tail else None
            return
        rh = ref_hidden
        if b.perm is not None:
            rh = rh.index_select(0, b.perm)
        rh = rh.reshape(-1, rh.shape[-1])
        n = b.hidden.shape[0] if b.index is None else b.n_tokens
        if rh.shape[0] != n:
            raise ValueError(f"{name}: ref_hidden has {rh.shape[0]} tokens, hidden has {n}")
        if b.index is not None:
            rh = rh.index_select(0, b.index)
        with torch.no_grad():
            tok = linear_logprobs(rh.detach(), (weight if ref_weight is None else ref_weight).detach(), b.targets,
                                  bias=None if ref_bias is None else ref_bias.detach(),
                                  ignore_index=self.ignore_index, impl=self.impl, chunk_size=self.chunk_size,
                                  check_targets=self.validate, **self._head())
            b.ref = segment_sum(tok, b.cu)
            b.ref_tail = segment_sum(tok * b.tail_weight, b.cu) if self.needs_tail else None


def sequence_logps(hidden: Tensor, weight: Tensor, targets: Tensor, *, cu_seqlens: Tensor | Sequence[int] | None = None,
                   cu_seqlens_host: Sequence[int] | None = None, bias: Tensor | None = None,
                   temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                   ignore_index: int = -100, impl: str = "auto", chunk_size: int | None = None,
                   check_targets: bool = True) -> tuple[Tensor, Tensor]:
    """Per-sequence summed log-probs and scored-token counts, straight from hidden states (no full logits).

    ``temperature``, ``softcap``, ``logit_scale`` (the model's final-logit transform) and mixed dtypes as in
    ``fastpref.ops.linear_logprobs``.

    ``hidden [B, T, H]`` (one sequence per row, in row order) or packed ``[N, H]`` with ``cu_seqlens`` (host ints,
    or the device tensor with its host copy ``cu_seqlens_host``; a device tensor alone costs one sync for the
    shape check). Returns ``(logps [S] fp32, lengths [S] fp32)``; differentiable through ``linear_logprobs``
    (recompute engine). Use it under ``torch.no_grad()`` to precompute reference log-probs, or KTO's
    mismatched-pair log-probs for ``z0`` (``FusedLinearKTOLoss(..., kl_logps=(policy, ref))``). The trainer's
    model-level ``fastpref.train.modeling.sequence_logps`` is this function on the model's hidden states
    (``check_targets=False``: the collator built the targets; the check is a host sync).
    """
    if cu_seqlens is None:
        if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
            raise ValueError(f"sequence_logps: padded input needs hidden [B, T, H] and targets [B, T]; got "
                             f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
        tok = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                              logit_scale=logit_scale, ignore_index=ignore_index, impl=impl, chunk_size=chunk_size,
                              check_targets=check_targets)
        return tok.sum(-1), (targets != ignore_index).float().sum(-1)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    host = cu_seqlens_host if cu_seqlens_host is not None else (
        None if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens))
    cu = cu_seqlens.to(h.device) if isinstance(cu_seqlens, torch.Tensor) else torch.tensor(host, device=h.device)
    end = host[-1] if host is not None else int(cu[-1])  # int(): one sync when cu is on a device without a host copy
    if cu.dim() != 1 or t.shape[0] != h.shape[0] or end != h.shape[0] or (host is not None and len(host) != cu.numel()):
        raise ValueError(f"sequence_logps: packed input needs hidden [N, H], targets [N] and cu_seqlens ending at "
                         f"N={h.shape[0]}; got {tuple(hidden.shape)}, {tuple(targets.shape)}")
    tok = linear_logprobs(h, weight, t, bias=bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                          ignore_index=ignore_index, impl=impl, chunk_size=chunk_size, check_targets=check_targets)
    return segment_sum(tok, cu), segment_sum((t != ignore_index).float(), cu)


class FusedLinearDPOLoss(FusedLinearPreferenceLoss):
    """Fused :func:`~fastpref.losses.preference.dpo_loss` (every TRL loss type, lists with weights, label
    smoothing, f-DPO, R-DPO ``rdpo_alpha``, LD-DPO ``ld_alpha``, DPOP ``dpop_lambda``). Token counts, the SFT term's
    batch normaliser and the LD-DPO shared/excess split are computed from ``targets``; SPIN is this loss on (gold,
    generated) pairs. The options are checked once, here (:func:`~fastpref.losses.preference.check_dpo_options`)."""

    def __init__(self, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
                 loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0, rdpo_alpha: float = 0.0,
                 ld_alpha: float | None = None, discopop_tau: float = 0.05, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 0.5, dpop_lambda: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        try:
            types, weights = check_dpo_options(loss_type, loss_weights=loss_weights, beta=beta,
                                               label_smoothing=label_smoothing, rdpo_alpha=rdpo_alpha,
                                               ld_alpha=ld_alpha, discopop_tau=discopop_tau,
                                               f_divergence_type=f_divergence_type, dpop_lambda=dpop_lambda)
        except DPOOptionError as e:
            raise DPOOptionError(e.option, f"FusedLinearDPOLoss: {e}") from None
        self.opts = dict(beta=beta, loss_type=types, loss_weights=weights, label_smoothing=label_smoothing,
                         rdpo_alpha=rdpo_alpha, ld_alpha=ld_alpha, discopop_tau=discopop_tau,
                         f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                         dpop_lambda=dpop_lambda)
        self.separable = not set(types) & set(BATCH_COUPLED_DPO_LOSS_TYPES)
        self.needs_tail = ld_alpha is not None

    def plain(self, seq, tail, b, sl, reduction):
        ref, lens = b.ref[sl], b.lengths[sl]
        tails = None
        if self.needs_tail:
            rt = b.ref_tail[sl]
            tails = (tail[0::2], tail[1::2], rt[0::2], rt[1::2])
        return dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], chosen_lengths=lens[0::2],
                        rejected_lengths=lens[1::2], mean_chosen_length=b.extra["mean_chosen_length"],
                        tail_logps=tails, reduction=reduction, validate=self.validate and sl == slice(None),
                        **self.opts)


class FusedLinearKTOLoss(FusedLinearPreferenceLoss):
    """Fused :func:`~fastpref.losses.preference.kto_loss`. One example per sequence (padded rows or packed
    sequences, any order); ``forward(..., labels=[B] bool | None, kl=z0 | None, kl_logps=(policy [M], ref [M]) |
    None)``. ``z0`` is detached, so the mismatched-pair log-probs are computed by the caller (e.g.
    ``linear_logprobs`` under ``no_grad``) and the loss stays separable over examples."""

    paired = False

    def __init__(self, beta: float = 0.1, loss_type: str = "kto", desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"FusedLinearKTOLoss: unknown loss_type {loss_type!r}; valid values: "
                             f"{', '.join(map(repr, KTO_LOSS_TYPES))}")
        self.opts = dict(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                         undesirable_weight=undesirable_weight)

    def prepare(self, b, labels=None, kl=None, kl_logps=None):
        S = len(b.bounds) - 1
        if labels is None:
            if S % 2:
                raise ValueError(f"FusedLinearKTOLoss: labels=None means paired data (first half desirable) and "
                                 f"needs an even batch, got {S}")
            labels = torch.arange(S, device=b.hidden.device) < S // 2
        if labels.shape != (S,):
            raise ValueError(f"FusedLinearKTOLoss: batch size mismatch: labels {tuple(labels.shape)} for {S} "
                             "sequences")
        if kl is None and kl_logps is not None:
            pk, rk = kl_logps
            kl = (pk.detach().float() - rk.detach().float()).mean().clamp(min=0)
        b.extra.update(labels=labels.bool(), kl=kl)

    def plain(self, seq, tail, b, sl, reduction):
        return kto_loss(seq, b.ref[sl], b.extra["labels"][sl], kl=b.extra["kl"], reduction=reduction,
                        validate=self.validate and sl == slice(None), **self.opts)


class FusedLinearCPOLoss(FusedLinearPreferenceLoss):
    """Fused :func:`~fastpref.losses.preference.cpo_loss` (reference-free; sigmoid, hinge, ipo, simpo + NLL;
    AlphaPO with ``alpha != 0``)."""

    needs_ref = False

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 cpo_alpha: float = 1.0, simpo_gamma: float = 0.5, alpha: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.opts = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
                         simpo_gamma=simpo_gamma, alpha=alpha)
        if loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"{type(self).__name__}: unknown loss_type {loss_type!r}; valid values: "
                             f"{', '.join(map(repr, CPO_LOSS_TYPES))}")

    def plain(self, seq, tail, b, sl, reduction):
        lens = b.lengths[sl]
        return cpo_loss(seq[0::2], seq[1::2], lens[0::2], lens[1::2],
                        mean_chosen_length=b.extra["mean_chosen_length"], reduction=reduction,
                        validate=self.validate and sl == slice(None), **self.opts)


class FusedLinearSimPOLoss(FusedLinearCPOLoss):
    """Fused :func:`~fastpref.losses.preference.simpo_loss` (CPO with ``loss_type="simpo"``, ``cpo_alpha=0``)."""

    def __init__(self, beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0, alpha: float = 0.0,
                 **kwargs):
        super().__init__(beta=beta, loss_type="simpo", label_smoothing=label_smoothing, cpo_alpha=0.0,
                         simpo_gamma=simpo_gamma, alpha=alpha, **kwargs)


class FusedLinearORPOLoss(FusedLinearPreferenceLoss):
    """Fused :func:`~fastpref.losses.preference.orpo_loss` (reference-free; NLL + odds-ratio term)."""

    needs_ref = False

    def __init__(self, beta: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta

    def plain(self, seq, tail, b, sl, reduction):
        lens = b.lengths[sl]
        return orpo_loss(seq[0::2], seq[1::2], lens[0::2], lens[1::2], beta=self.beta,
                         mean_chosen_length=b.extra["mean_chosen_length"], reduction=reduction,
                         validate=self.validate and sl == slice(None))
