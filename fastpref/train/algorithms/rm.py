"""Reward model: a scalar head on the last non-padding token (``AutoModelForSequenceClassification``,
``num_labels=1``) trained with the Bradley-Terry loss of ``fastpref.losses.reward_model_loss`` on
(prompt, chosen, rejected) pairs. The head is ``hidden @ w_score``, so there are no vocabulary logits at all.
``final/`` loads with ``AutoModelForSequenceClassification.from_pretrained``. Always padded (``data.pack`` is
ignored): the classification head pools the last non-padding token of each row.

Rows with a ``margin`` (a number; TRL's ``RewardTrainer`` column, Llama 2's margin loss, arXiv:2307.09288 Eq. 2)
train ``-log sigmoid(r_c - r_r - margin)``; the data loader keeps it on the example (``fastpref.data.dataset``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastpref.data.collate import collate_preference
from fastpref.losses import reward_model_loss
from fastpref.losses.preference import REWARD_LOSS_TYPES
from fastpref.train.algorithms.base import Algorithm, register_algorithm
from fastpref.train.config import one_of, ranged


@dataclass
class RMConfig:
    """``rm:`` the reward-model loss (``fastpref.losses.reward_model_loss``): TRL's ``RewardConfig`` names. The
    per-pair margin is not a key: it is the rows' ``margin`` column, as in TRL."""

    loss_type: str = one_of(*REWARD_LOSS_TYPES)
    """``bradley_terry`` (``-log sigmoid(r_c - r_r - margin)``) or ``log_exp`` (ColossalChat's name of the same
    function, ``log(1 + exp(r_r - r_c + margin))``)."""
    center_rewards_coefficient: float | None = ranged(None, ">= 0")
    """Reward centring (Eisenstein et al. 2023, arXiv:2312.09244): adds ``coef * mean((r_c + r_r)^2)``; None: off."""


@register_algorithm("rm")
class RewardModel(Algorithm):
    data_kind = "preference"
    model_kind = "sequence_classification"
    config_class = RMConfig

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        sec = self.section  # validate=False: our collator's inputs, no host sync on the step
        self.loss_fn = functools.partial(reward_model_loss, loss_type=sec.loss_type,
                                         center_rewards_coefficient=sec.center_rewards_coefficient, validate=False)
        """``(rewards_chosen [P], rewards_rejected [P], margin=[P] | None) -> (loss, metrics)``."""

    def margins(self, examples: list[dict]) -> torch.Tensor | None:
        """The pairs' ``margin`` values ``[P]`` (fp32, on the device), or None when no example has one; a batch
        mixing rows with and without a margin is an error (TRL would silently drop or fail on it)."""
        have = ["margin" in e for e in examples]
        if not any(have):
            return None
        if not all(have):
            raise ValueError(f"rm: {have.count(False)} of {len(examples)} pairs in a batch have no 'margin' while the "
                             "others do; give every row a margin (0 for none) or none")
        return torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float32, device=self.rt.device)

    def collate(self, examples):
        batch = collate_preference(examples, self.rt.tokenizer.pad_token_id, device=self.rt.device)
        margin = self.margins(examples)
        if margin is not None:
            batch.margin = margin
        return batch

    def rewards(self, batch):
        """Scalar reward of every row ``[rows]`` (fp32)."""
        out = self.rt.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return out.logits[:, 0].float()

    def compute_loss(self, batch):
        r = self.rewards(batch)
        p = r.shape[0] // 2
        loss, metrics = self.loss_fn(r[:p], r[p:], margin=batch.margin)
        return loss, metrics
