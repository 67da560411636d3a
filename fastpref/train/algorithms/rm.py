"""Reward model: a scalar head on the last non-padding token (``AutoModelForSequenceClassification``,
``num_labels=1``) trained with the Bradley-Terry loss of ``fastpref.losses.reward_model_loss`` on
(prompt, chosen, rejected) pairs. The head is ``hidden @ w_score``, so there are no vocabulary logits at all.
``final/`` loads with ``AutoModelForSequenceClassification.from_pretrained``. Always padded (``data.pack`` is
ignored): the classification head pools the last non-padding token of each row.
"""

from __future__ import annotations

from fastpref.data.collate import collate_preference
from fastpref.losses import reward_model_loss
from fastpref.losses.preference import REWARD_LOSS_TYPES
from fastpref.train.algorithms.base import Algorithm, register_algorithm


@register_algorithm("rm")
class RewardModel(Algorithm):
    data_kind = "preference"
    model_kind = "sequence_classification"
    default_loss_type = "bradley_terry"
    loss_types = REWARD_LOSS_TYPES

    def collate(self, examples):
        return collate_preference(examples, self.rt.tokenizer.pad_token_id, device=self.rt.device)

    def rewards(self, batch):
        """Scalar reward of every row ``[rows]`` (fp32)."""
        out = self.rt.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits[:, 0].float()

    def compute_loss(self, batch):
        r = self.rewards(batch)
        p = r.shape[0] // 2
        loss, metrics = reward_model_loss(r[:p], r[p:], loss_type=self.loss_type,
                                          center_rewards_coefficient=self.cfg.loss.center_rewards_coefficient)
        return loss, metrics
