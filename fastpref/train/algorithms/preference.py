"""The paired preference algorithms: DPO (every TRL loss type), ORPO, SimPO and CPO.

Each builds a padded batch in TRL's order (chosen rows, then rejected rows), runs the policy's decoder for the
last hidden states, and calls the fused loss of ``fastpref.losses.fused_preference`` with the LM head weight, so
the ``[rows, T, V]`` logits never exist. DPO takes reference log-probs from ``self.rt.reference`` (copy, LoRA
base or precomputed cache; always no-grad); ORPO, SimPO and CPO are reference-free.
"""

from __future__ import annotations

from fastpref.data.collate import collate_preference, split_pairs
from fastpref.losses.preference import CPO_LOSS_TYPES, DPO_LOSS_TYPES
from fastpref.train.algorithms.base import Algorithm, register_algorithm
from fastpref.train.diagnostics import paired_length_metrics
from fastpref.train.modeling import decoder_hidden, lm_head, logit_transform


class _Paired(Algorithm):
    data_kind = "preference"

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        self.loss_fn = self.make_loss(**logit_transform(rt.model).kwargs())

    def make_loss(self, **head):
        """The fused loss; ``head`` is the model's logit transform (``softcap``, ``logit_scale``)."""
        raise NotImplementedError

    def collate(self, examples):
        return collate_preference(examples, self.rt.tokenizer.pad_token_id, device=self.rt.device,
                                  pack=self.cfg.data.pack)

    def compute_loss(self, batch):
        kw = {"cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else {}
        if self.needs_reference:
            kw["ref_logps"] = split_pairs(self.rt.reference.sequence_logps(batch), batch)
        hidden = decoder_hidden(self.rt.model, batch)
        w, b = lm_head(self.rt.model)
        loss, metrics = self.loss_fn(hidden, w, batch["targets"], bias=b, **kw)
        return loss, {**metrics, **paired_length_metrics(batch)}  # lengths/*: per-token diagnostics


@register_algorithm("dpo")
class DPO(_Paired):
    """DPO (Rafailov et al. 2023) and TRL's loss types (``loss.type``: sigmoid, hinge, ipo, robust, ...)."""

    needs_reference = True
    default_loss_type = "sigmoid"
    loss_types = DPO_LOSS_TYPES

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        import torch

        from fastpref.losses.preference import dpo_loss

        one = torch.zeros(1)  # the loss rejects bad option combinations (e.g. exo_pair without smoothing) now
        lc = cfg.loss
        dpo_loss(one, one, one, one, beta=lc.beta, loss_type=cls.default_loss_type if lc.type == "auto" else lc.type,
                 label_smoothing=lc.label_smoothing, chosen_lengths=one + 1, rejected_lengths=one + 1)

    def make_loss(self, **head):
        from fastpref.losses.fused_preference import FusedLinearDPOLoss

        lc = self.cfg.loss
        return FusedLinearDPOLoss(beta=lc.beta, loss_type=self.loss_type, label_smoothing=lc.label_smoothing, **head)


@register_algorithm("orpo")
class ORPO(_Paired):
    """ORPO (Hong et al. 2024): NLL on the chosen + ``loss.beta`` x log-odds-ratio penalty; reference-free."""

    def make_loss(self, **head):
        from fastpref.losses.fused_preference import FusedLinearORPOLoss

        return FusedLinearORPOLoss(beta=self.cfg.loss.beta, **head)


@register_algorithm("simpo")
class SimPO(_Paired):
    """SimPO (Meng et al. 2024): length-normalised implicit reward with margin ``loss.simpo_gamma``."""

    def make_loss(self, **head):
        from fastpref.losses.fused_preference import FusedLinearSimPOLoss

        lc = self.cfg.loss
        return FusedLinearSimPOLoss(beta=lc.beta, simpo_gamma=lc.simpo_gamma, label_smoothing=lc.label_smoothing,
                                    **head)


@register_algorithm("cpo")
class CPO(_Paired):
    """CPO (Xu et al. 2024): reference-free preference loss (``loss.type``) + ``loss.cpo_alpha`` x NLL."""

    default_loss_type = "sigmoid"
    loss_types = CPO_LOSS_TYPES

    def make_loss(self, **head):
        from fastpref.losses.fused_preference import FusedLinearCPOLoss

        lc = self.cfg.loss
        return FusedLinearCPOLoss(beta=lc.beta, loss_type=self.loss_type, label_smoothing=lc.label_smoothing,
                                  cpo_alpha=lc.cpo_alpha, simpo_gamma=lc.simpo_gamma, **head)
