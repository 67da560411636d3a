"""The paired preference algorithms: DPO (every TRL loss type), ORPO, SimPO and CPO.

Each builds a padded batch in TRL's order (chosen rows, then rejected rows), runs the policy's decoder for the
last hidden states, and calls the fused loss of ``fastpref.losses.fused_preference`` with the LM head weight, so
the ``[rows, T, V]`` logits never exist. DPO takes reference log-probs from ``self.rt.reference`` (copy, LoRA
base or precomputed cache; always no-grad); ORPO, SimPO and CPO are reference-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastpref.data.collate import collate_preference
from fastpref.losses.preference import CPO_LOSS_TYPES, DPOOptionError, check_dpo_options
from fastpref.train.algorithms.base import Algorithm, FusedLossOptions, register_algorithm
from fastpref.train.config import one_of, ranged
from fastpref.train.diagnostics import paired_length_metrics
from fastpref.train.modeling import decoder_hidden, lm_head, logit_transform


class _Paired(Algorithm):
    data_kind = "preference"

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        self.loss_fn = self.make_loss(**self.section.fused_kwargs(), **logit_transform(rt.model).kwargs())

    def make_loss(self, **head):
        """The fused loss from this algorithm's section; ``head`` is the model's logit transform (``softcap``,
        ``logit_scale``) and the section's :class:`FusedLossOptions` (``skip_unscored``). Built with ``validate=False``: the inputs come from our collator, and the NaN / token-id
        checks would be host syncs on every step (the options were checked when the config was loaded)."""
        raise NotImplementedError

    def reference_inputs(self, batch) -> dict:
        """The reference's arguments of the fused loss: its per-sequence log-probs ``(chosen, rejected)`` from
        ``self.rt.reference`` (any reference mode, no grad)."""
        return {"ref_logps": batch.split_pairs(self.rt.reference.sequence_logps(batch))}

    def collate(self, examples):
        return collate_preference(examples, self.rt.tokenizer.pad_token_id, device=self.rt.device,
                                  pack=self.cfg.data.pack)

    def compute_loss(self, batch):
        kw = batch.loss_layout()
        if self.needs_reference:
            kw.update(self.reference_inputs(batch))
        hidden = decoder_hidden(self.rt.model, batch)
        w, b = lm_head(self.rt.model)
        loss, metrics = self.loss_fn(hidden, w, batch.targets, bias=b, **kw)
        return loss, {**metrics, **paired_length_metrics(batch)}  # lengths/*: per-token diagnostics


@dataclass
class DPOConfig(FusedLossOptions):
    """``dpo:`` the DPO loss (``fastpref.losses.dpo_loss``): TRL 1.16 ``DPOConfig``'s names and defaults."""

    beta: float = ranged(0.1, "> 0")
    """Inverse temperature of the implicit reward ``beta * log(pi / pi_ref)`` (IPO's tau for ``ipo``)."""
    loss_type: str | list[str] = "sigmoid"
    """A loss type of ``fastpref.losses.DPO_LOSS_TYPES`` (TRL's names: sigmoid, hinge, ipo, exo_pair, nca_pair,
    robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft), or a list of
    them combined as ``sum_k loss_weights[k] * loss_k`` (MPO; RPO is ``[sigmoid, sft]``)."""
    loss_weights: list[float] | None = None
    """One weight per entry of ``loss_type`` (None: 1 each)."""
    label_smoothing: float = ranged(0.0, "[0, 0.5)")
    """Label-flip probability epsilon: conservative DPO (sigmoid), Robust DPO (robust, < 0.5), EXO (exo_pair: needs
    > 0; the paper uses 1e-3), aot."""
    rpo_alpha: float | None = ranged(None, ">= 0")
    """RPO (Pang et al. 2024, arXiv:2404.19733): adds ``rpo_alpha`` x the NLL of the chosen tokens (token mean over
    the batch), i.e. ``loss_type`` + ``sft`` with weight ``rpo_alpha`` (TRL's ``rpo_alpha`` before 1.0; TRL 1.16
    spells it ``loss_type=[sigmoid, sft]``, ``loss_weights=[1, alpha]``). None: off."""
    rdpo_alpha: float = ranged(0.0, ">= 0")
    """R-DPO (Park et al. 2024, arXiv:2403.19159): ``alpha * (|y_w| - |y_l|)`` added to the pair logit (logit-based
    types: sigmoid, hinge, robust, exo_pair, discopop). 0: off."""
    ld_alpha: float | None = ranged(None, "[0, 1]")
    """LD-DPO (Liu et al. 2024, arXiv:2409.06411): weight of the log-probs past the shorter response's length
    (1: plain DPO, 0: masked). None: off."""
    dpop_lambda: float = ranged(0.0, ">= 0")
    """DPOP (Pal et al. 2024, "Smaug", arXiv:2402.13228): the pair logit becomes ``beta * (Delta - lambda *
    max(0, log pi_ref(y_w) - log pi(y_w)))``, against the chosen likelihood falling (logit-based types). 0: off."""
    discopop_tau: float = ranged(0.05, "> 0")
    """DiscoPOP's temperature (``loss_type=discopop``; Chris Lu et al. 2024, arXiv:2406.08414)."""
    f_divergence_type: str = one_of("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
    """f-DPO's divergence (Wang et al. 2023, arXiv:2309.16240); not reverse_kl only for the difference-based types
    (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft)."""
    f_alpha_divergence_coef: float = 0.5
    """Alpha of ``f_divergence_type=alpha_divergence``."""

    def loss_types_and_weights(self) -> tuple[list[str], list[float] | None]:
        """``loss_type`` as a list and its weights, with ``rpo_alpha`` as the ``sft`` term it stands for."""
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        weights = None if self.loss_weights is None else list(self.loss_weights)
        if self.rpo_alpha is not None:
            if "sft" in types:
                raise ValueError(f"rpo_alpha={self.rpo_alpha} adds the sft term, and loss_type={types} already has "
                                 "one: keep one of them")
            weights = (weights if weights is not None else [1.0] * len(types)) + [float(self.rpo_alpha)]
            types = types + ["sft"]
        return types, weights

    def loss_kwargs(self) -> dict:
        """The keyword arguments of ``dpo_loss`` / ``FusedLinearDPOLoss`` this section stands for."""
        types, weights = self.loss_types_and_weights()
        return dict(beta=self.beta, loss_type=types, loss_weights=weights, label_smoothing=self.label_smoothing,
                    rdpo_alpha=self.rdpo_alpha, ld_alpha=self.ld_alpha, dpop_lambda=self.dpop_lambda,
                    discopop_tau=self.discopop_tau, f_divergence_type=self.f_divergence_type,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef)

    def validate(self) -> None:
        """Every option and combination, by the loss's own check (``check_dpo_options``), before any model is
        built; the message starts with the key (``loss_type=...``)."""
        kw = self.loss_kwargs()
        kw.pop("f_alpha_divergence_coef")
        try:
            check_dpo_options(**kw)
        except DPOOptionError as e:
            value = getattr(self, e.option)
            if e.option == "loss_type" and isinstance(value, str):
                raise ValueError(f"loss_type={value!r} is not a dpo loss type ({e})") from None
            raise ValueError(f"{e.option}={value!r}: {e}") from None


@register_algorithm("dpo")
class DPO(_Paired):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) and TRL's loss types and options: the ``dpo:`` section."""

    needs_reference = True
    config_class = DPOConfig

    @classmethod
    def check_config(cls, cfg):
        if cfg.sections["dpo"].ld_alpha is not None and cfg.reference.mode == "precompute":
            raise ValueError("dpo.ld_alpha with reference.mode=precompute: LD-DPO weights the reference's tokens past "
                             "the shared length too, and the cache holds whole-sequence sums; use reference.mode=copy "
                             "or lora_base")

    def reference_inputs(self, batch) -> dict:
        """With LD-DPO (``dpo.ld_alpha``) the reference's hidden states and head (no grad), so that the loss
        weights the reference's excess tokens as the policy's (TRL's reference log-probs are LD-weighted too);
        otherwise its per-sequence log-probs."""
        if self.section.ld_alpha is None:
            return super().reference_inputs(batch)
        with torch.no_grad(), self.rt.reference.network() as net:
            hidden = decoder_hidden(net, batch)
            w, b = lm_head(net)
        return {"ref_hidden": hidden, "ref_weight": w, "ref_bias": b}

    def make_loss(self, **head):
        from fastpref.losses.fused_preference import FusedLinearDPOLoss

        return FusedLinearDPOLoss(**self.section.loss_kwargs(), validate=False, **head)


@dataclass
class ORPOConfig(FusedLossOptions):
    """``orpo:`` the ORPO loss (``fastpref.losses.orpo_loss``): TRL's ``ORPOConfig`` names and defaults."""

    beta: float = ranged(0.1, ">= 0")
    """Weight of the log-odds-ratio term (the paper's lambda; 0: plain SFT on the chosen)."""


@register_algorithm("orpo")
class ORPO(_Paired):
    """ORPO (Hong et al. 2024, arXiv:2403.07691): NLL on the chosen + ``orpo.beta`` x log-odds-ratio penalty;
    reference-free."""

    config_class = ORPOConfig

    def make_loss(self, **head):
        from fastpref.losses.fused_preference import FusedLinearORPOLoss

        return FusedLinearORPOLoss(beta=self.section.beta, validate=False, **head)


@dataclass
class SimPOConfig(FusedLossOptions):
    """``simpo:`` the SimPO loss (``fastpref.losses.simpo_loss``): TRL's ``CPOConfig`` with ``loss_type=simpo``,
    ``cpo_alpha=0`` (its names, ``simpo_gamma`` is ``gamma`` here)."""

    renamed: ClassVar[dict[str, str]] = {"simpo_gamma": "gamma"}
    """TRL's / the old ``loss.*`` names of this section's fields where they differ."""

    beta: float = ranged(0.1, "> 0")
    """Scale of the length-normalised implicit reward (the paper tunes 2..10)."""
    gamma: float = ranged(0.5, ">= 0")
    """Target reward margin (TRL's ``simpo_gamma``)."""
    label_smoothing: float = ranged(0.0, "[0, 0.5)")
    """Conservative (label-smoothed) form's epsilon."""
    alpha: float = 0.0
    """AlphaPO (Gupta et al. 2025, arXiv:2501.03884): each averaged log-prob ``l`` becomes ``(1 - exp(-alpha l)) /
    alpha`` (TRL's ``CPOConfig.alpha``, ``loss_type=alphapo``). 0: off."""


@register_algorithm("simpo")
class SimPO(_Paired):
    """SimPO (Meng et al. 2024, arXiv:2405.14734): length-normalised implicit reward with margin ``simpo.gamma``."""

    config_class = SimPOConfig

    def make_loss(self, **head):
        from fastpref.losses.fused_preference import FusedLinearSimPOLoss

        sec = self.section
        return FusedLinearSimPOLoss(beta=sec.beta, simpo_gamma=sec.gamma, label_smoothing=sec.label_smoothing,
                                    alpha=sec.alpha, validate=False, **head)


@dataclass
class CPOConfig(FusedLossOptions):
    """``cpo:`` the CPO loss (``fastpref.losses.cpo_loss``): TRL's ``CPOConfig`` names and defaults."""

    beta: float = ranged(0.1, "> 0")
    """Inverse temperature of the preference term."""
    loss_type: str = one_of(*CPO_LOSS_TYPES)
    """The preference term: sigmoid, hinge, ipo or simpo (CPO-SimPO with ``cpo_alpha > 0``)."""
    label_smoothing: float = ranged(0.0, "[0, 0.5)")
    """Conservative (label-smoothed) sigmoid's epsilon."""
    cpo_alpha: float = ranged(1.0, ">= 0")
    """Weight of the NLL on the chosen response (token mean over the batch)."""
    simpo_gamma: float = ranged(0.5, ">= 0")
    """Target margin of ``loss_type=simpo``."""
    alpha: float = 0.0
    """AlphaPO's reward shape (Gupta et al. 2025, arXiv:2501.03884; TRL's ``CPOConfig.alpha``). 0: off."""


@register_algorithm("cpo")
class CPO(_Paired):
    """CPO (Xu et al. 2024, arXiv:2401.08417): reference-free preference loss (``cpo.loss_type``) + ``cpo.cpo_alpha``
    x NLL."""

    config_class = CPOConfig

    def make_loss(self, **head):
        from fastpref.losses.fused_preference import FusedLinearCPOLoss

        sec = self.section
        return FusedLinearCPOLoss(beta=sec.beta, loss_type=sec.loss_type, label_smoothing=sec.label_smoothing,
                                  cpo_alpha=sec.cpo_alpha, simpo_gamma=sec.simpo_gamma, alpha=sec.alpha,
                                  validate=False, **head)
