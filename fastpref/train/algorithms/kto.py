"""KTO (Ethayarajh et al. 2024): unpaired desirable / undesirable examples against a reference point.

The reference point ``z0`` is TRL's: the detached, clamped mean of ``log pi - log pi_ref`` over *mismatched*
pairs (prompt ``i`` with the completion of example ``i+1``), computed here under ``no_grad`` from the same
hidden-state path. The loss is :class:`fastpref.losses.fused_preference.FusedLinearKTOLoss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.data.collate import collate_single
from fastpref.losses.preference import KTO_LOSS_TYPES
from fastpref.train.algorithms.base import Algorithm, FusedLossOptions, register_algorithm
from fastpref.train.config import one_of, ranged
from fastpref.train.diagnostics import labelled_length_metrics
from fastpref.train.modeling import decoder_hidden, lm_head, logit_transform, sequence_logps


@dataclass
class KTOConfig(FusedLossOptions):
    """``kto:`` the KTO loss (``fastpref.losses.kto_loss``): TRL's ``KTOConfig`` names and defaults."""

    beta: float = ranged(0.1, "> 0")
    """Inverse temperature of the implicit reward."""
    loss_type: str = one_of(*KTO_LOSS_TYPES)
    """``kto`` (Ethayarajh et al. 2024, arXiv:2402.01306) or ``apo_zero_unpaired`` (APO, arXiv:2408.06266)."""
    desirable_weight: float = ranged(1.0, "> 0")
    """Weight of the desirable (label true) examples' losses."""
    undesirable_weight: float = ranged(1.0, "> 0")
    """Weight of the undesirable (label false) examples' losses."""


@register_algorithm("kto")
class KTO(Algorithm):
    data_kind = "kto"
    needs_reference = True
    config_class = KTOConfig

    @classmethod
    def check_config(cls, cfg):
        if cfg.reference.mode == "precompute":
            # z0 needs reference log-probs of mismatched pairs that change with every batch: not cacheable
            raise ValueError("reference.mode=precompute is not supported for KTO (its reference point needs the "
                             "reference on mismatched pairs); use copy or lora_base")

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        from fastpref.losses.fused_preference import FusedLinearKTOLoss

        self.check_config(cfg)

        sec = self.section  # validate=False: our collator's inputs, no host syncs on the step
        self.loss_fn = FusedLinearKTOLoss(beta=sec.beta, loss_type=sec.loss_type, desirable_weight=sec.desirable_weight,
                                          undesirable_weight=sec.undesirable_weight, validate=False,
                                          **sec.fused_kwargs(), **logit_transform(rt.model).kwargs())

    def collate(self, examples):
        pad = self.rt.tokenizer.pad_token_id
        pack = self.cfg.data.pack
        batch = collate_single(examples, pad, device=self.rt.device, pack=pack)
        if len(examples) > 1:  # mismatched pairs for z0: prompt i with completion i+1
            shifted = [{"prompt_ids": e["prompt_ids"], "completion_ids": examples[(i + 1) % len(examples)]
                        ["completion_ids"]} for i, e in enumerate(examples)]
            batch.kl = collate_single(shifted, pad, device=self.rt.device, pack=pack)
        return batch

    def _z0(self, batch) -> torch.Tensor | None:
        if batch.kl is None:
            return None
        kl_batch = batch.kl
        with torch.no_grad():
            pol = sequence_logps(self.rt.model, kl_batch)
            ref = self.rt.reference.compute(kl_batch)
        return (pol - ref).mean().clamp(min=0)

    def compute_loss(self, batch):
        ref = self.rt.reference.sequence_logps(batch)
        z0 = self._z0(batch)
        hidden = decoder_hidden(self.rt.model, batch)
        w, b = lm_head(self.rt.model)
        kw = batch.loss_layout()
        loss, metrics = self.loss_fn(hidden, w, batch.targets, bias=b, ref_logps=ref, labels=batch.labels,
                                     kl=z0, **kw)
        if z0 is not None:
            metrics["kl"] = z0.detach()
        return loss, {**metrics, **labelled_length_metrics(batch)}  # lengths/*: per-token diagnostics
