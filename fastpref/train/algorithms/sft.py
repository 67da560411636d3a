"""Supervised fine-tuning: token-mean cross-entropy on the response tokens, fused with the LM head.

``loss = mean over scored tokens of -log p(y_t | y_<t, x)`` via ``fastpref.ops.linear_cross_entropy`` on the last
hidden states (no ``[B, T, V]`` logits). Reads ``sft`` rows; preference rows give (prompt, chosen).
"""

from __future__ import annotations

import torch

from fastpref.data.collate import collate_single
from fastpref.train.algorithms.base import Algorithm, register_algorithm
from fastpref.train.modeling import decoder_hidden, lm_head, logit_transform


@register_algorithm("sft")
class SFT(Algorithm):
    data_kind = "sft"

    def collate(self, examples):
        return collate_single(examples, self.rt.tokenizer.pad_token_id, device=self.rt.device,
                              pack=self.cfg.data.pack)

    def compute_loss(self, batch):
        from fastpref.ops import linear_cross_entropy

        hidden = decoder_hidden(self.rt.model, batch)
        w, b = lm_head(self.rt.model)
        loss = linear_cross_entropy(hidden, w, batch["targets"], bias=b, reduction="mean", check_targets=False,
                                    **logit_transform(self.rt.model).kwargs())
        return loss, {"nll_loss": loss.detach(), "ppl": torch.exp(loss.detach())}
