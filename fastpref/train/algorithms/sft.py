"""Supervised fine-tuning: token-mean cross-entropy on the response tokens, fused with the LM head.

``loss = mean over scored tokens of -log p(y_t | y_<t, x)`` via ``fastpref.ops.linear_cross_entropy`` on the last
hidden states (no ``[B, T, V]`` logits). Reads ``sft`` rows; preference rows give (prompt, chosen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.data.collate import collate_single
from fastpref.train.algorithms.base import Algorithm, register_algorithm
from fastpref.train.config import one_of
from fastpref.train.modeling import decoder_hidden, lm_head, logit_transform


@dataclass
class SFTConfig:
    """``sft:`` the SFT loss (also the ``train.sft_warmup_steps`` warm-up's): TRL's ``SFTConfig.loss_type``."""

    loss_type: str = one_of("nll")
    """``nll``: token-mean cross-entropy of the response tokens (TRL's default). TRL's ``dft`` (Dynamic
    Fine-Tuning, Wu et al. 2025, arXiv:2508.05629) is not implemented."""


@register_algorithm("sft")
class SFT(Algorithm):
    data_kind = "sft"
    config_class = SFTConfig

    def collate(self, examples):
        return collate_single(examples, self.rt.tokenizer.pad_token_id, device=self.rt.device,
                              pack=self.cfg.data.pack)

    def compute_loss(self, batch):
        from fastpref.ops import linear_cross_entropy

        hidden = decoder_hidden(self.rt.model, batch)
        w, b = lm_head(self.rt.model)
        loss = linear_cross_entropy(hidden, w, batch.targets, bias=b, reduction="mean", check_targets=False,
                                    **logit_transform(self.rt.model).kwargs())
        return loss, {"nll_loss": loss.detach(), "ppl": torch.exp(loss.detach())}
