"""PPO with a critic for RLHF, as in "The N Implementation Details of RLHF with PPO" (Huang et al. 2022) and
TRL's ``PPOTrainer``.

Per rollout: sample ``num_generations`` completions per prompt; score them with the reward function or a reward
model (``reward_model``: a sequence-classification checkpoint, e.g. from ``algorithm=rm``); in ``no_grad``,
compute the sampling policy's per-token log-probs and values (one trunk pass: the fused LM-head op for the
log-probs, the value head on the same hidden states) and the reference's log-probs; per-token rewards
``-kl_coef * KL_t`` plus the score on the last token (``kl_penalty_rewards``); GAE and whitened advantages
(``gae``). Then ``num_ppo_epochs`` trainer steps on that rollout, each with the clipped policy loss
(``policy_loss(loss_type="ppo")``: token mean over the batch) plus ``vf_coef`` times the clipped value loss.

The critic is a linear value head on the policy trunk (``value_head``, attached to the model so that the
trainer's optimizer, checkpoints and ``final/`` include it; zero-initialised, so the first values are 0).
Differences from TRL: the critic shares the policy trunk (TRL uses a separate value model initialised from the
reward model); each PPO epoch is one trainer step over the whole rollout (in ``train.grad_accum``
micro-batches) instead of TRL's shuffled mini-batches; ``missing_eos_penalty`` is applied as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.losses.advantages import gae, kl_penalty_rewards, whiten
from fastpref.losses.policy import policy_loss, value_loss
from fastpref.ops import linear_logprobs
from fastpref.rewards import RewardModelScorer
from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.modeling import lm_head
from fastpref.train.online.common import OnlineAlgorithm, OnlineConfig, metrics_float, micro_batch, token_logps
from fastpref.train.rollout import PackedBatch, pack_rollout, policy_hidden, timed


@dataclass
class PPOConfig(OnlineConfig):
    """PPO settings (prompts per step: ``train.batch_size``)."""

    num_ppo_epochs: int = 4
    """Trainer steps (optimizer updates) per rollout."""
    kl_coef: float = 0.05
    """Per-token KL penalty in the reward (TRL's default)."""
    kl_estimator: str = "k1"
    """KL estimator of the penalty (k1 as TRL; k2, k3)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip."""
    cliprange_value: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (mean kept) before GAE."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a completion without EOS (None: off)."""
    reward_model: str | None = None
    """Path of a sequence-classification reward model (uses the policy's tokenizer); overrides ``reward``."""

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.num_ppo_epochs, int) and self.num_ppo_epochs >= 1):
            raise ValueError(f"ppo.num_ppo_epochs must be an int >= 1, got {self.num_ppo_epochs!r}")
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError(f"ppo.kl_coef and ppo.vf_coef must be >= 0, got {self.kl_coef}, {self.vf_coef}")
        if not 0 < self.cliprange < 1:
            raise ValueError(f"ppo.cliprange must be in (0, 1), got {self.cliprange}")


def to_padded(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Completion-token values of a packed ``[N]`` tensor as right-padded ``[S, T_max]`` (0 elsewhere)."""
    pos = (batch.targets != -100).nonzero(as_tuple=True)[0]
    lens = batch.completion_lengths
    starts = torch.cumsum(lens, 0) - lens
    rows = batch.seq_ids[pos]
    cols = torch.arange(pos.numel(), device=pos.device) - torch.repeat_interleave(starts, lens)
    out = values.new_zeros(lens.numel(), max(int(lens.max()), 1))
    out[rows, cols] = values[pos]
    return out


def from_padded(padded: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Inverse of ``to_padded``: ``[S, T_max]`` back to packed ``[N]`` (0 off the completion tokens)."""
    pos = (batch.targets != -100).nonzero(as_tuple=True)[0]
    lens = batch.completion_lengths
    starts = torch.cumsum(lens, 0) - lens
    cols = torch.arange(pos.numel(), device=pos.device) - torch.repeat_interleave(starts, lens)
    out = padded.new_zeros(batch.targets.numel())
    out[pos] = padded[batch.seq_ids[pos], cols]
    return out


@register_algorithm("ppo")
class PPO(OnlineAlgorithm):
    """PPO with a value head on the policy trunk (see the module docstring)."""

    config_class = PPOConfig
    needs_reference = True

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        model = rt.model
        if not hasattr(model, "value_head"):
            w, _ = lm_head(model)
            head = torch.nn.Linear(w.shape[1], 1, device=w.device, dtype=w.dtype)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
            model.add_module("value_head", head)
        self.value_head = model.value_head
        if self.sec.reward_model:
            from transformers import AutoModelForSequenceClassification

            rm = AutoModelForSequenceClassification.from_pretrained(self.sec.reward_model).to(rt.device).eval()
            self.reward_fn = RewardModelScorer(rm, rt.tokenizer)

    def _forward(self, batch: PackedBatch, *, entropy: bool):
        """``(logp [N], entropy [N] or None, values [N])`` from one trunk pass."""
        h = policy_hidden(self.rt.model, batch, self.pad_id)
        w, b = lm_head(self.rt.model)
        out = linear_logprobs(h, w, batch.targets, bias=b, temperature=self.sec.generation.temperature,
                              return_entropy=entropy, check_targets=False)
        logp, ent = out if entropy else (out, None)
        values = self.value_head(h).squeeze(-1).float()
        return logp, ent, values

    def _new_rollout(self, examples: list[dict]) -> list[dict]:
        sec, gen = self.sec, self.sec.generation
        ro = self.rollout(examples)
        scores = self.score(ro, examples)
        if sec.missing_eos_penalty is not None:
            scores = scores - sec.missing_eos_penalty * torch.tensor(ro.truncated, dtype=scores.dtype)
        out, stats = [], []
        for idx in self.group_slices(len(ro), ro.group_size, self.cfg.train.grad_accum):
            part = ro.select(idx)
            with timed(self._timings, "pack"):
                batch = pack_rollout(part, self.device)
            mask = batch.mask
            with timed(self._timings, "old_ref_values"), torch.no_grad():
                old, _, values = self._forward(batch, entropy=False)
                with self.reference() as ref_model:
                    ref = token_logps(ref_model, batch, temperature=gen.temperature, pad_id=self.pad_id)
                m_pad = to_padded(mask, batch)
                rew = kl_penalty_rewards(scores[idx].to(self.device), to_padded(old, batch), to_padded(ref, batch),
                                         m_pad, kl_coef=sec.kl_coef, kl_estimator=sec.kl_estimator)
                if sec.whiten_rewards:
                    rew = whiten(rew, m_pad, shift_mean=False)
                adv, ret = gae(rew, to_padded(values, batch), m_pad, gamma=sec.gamma, lam=sec.lam)
            out.append(micro_batch(batch, old=old, values=values, advantages=from_padded(adv, batch),
                                   returns=from_padded(ret, batch)))
            n = m_pad.sum()
            stats.append({"kl_seq": ((old - ref) * mask).sum() / len(idx),
                          "non_score_reward": (rew.sum() - scores[idx].sum()) / len(idx),
                          "adv_mean": (adv * m_pad).sum() / n, "ret_mean": (ret * m_pad).sum() / n,
                          "val_mean": (values * mask).sum() / n})
        k = len(stats)
        lengths = ro.lengths().float()
        self.step_metrics.update(metrics_float({
            "reward/mean": scores.mean(), "reward/std": scores.std() if len(scores) > 1 else torch.zeros(()),
            "objective/kl": sum(s["kl_seq"] for s in stats) / k,
            "objective/non_score_reward": sum(s["non_score_reward"] for s in stats) / k,
            "advantages/mean": sum(s["adv_mean"] for s in stats) / k,
            "returns/mean": sum(s["ret_mean"] for s in stats) / k,
            "values/rollout_mean": sum(s["val_mean"] for s in stats) / k,
            "completion/mean_length": lengths.mean(),
            "completion/truncated_frac": torch.tensor(sum(ro.truncated) / len(ro))}))
        return out

    def micro_batches(self, examples: list[dict], step: int) -> list[dict]:
        return self.reuse_rollout(examples, self.sec.num_ppo_epochs, self._new_rollout)

    def compute_loss(self, batch: dict):
        sec, packed = self.sec, batch["packed"]
        mask = packed.mask
        logp, ent, values = self._forward(packed, entropy=True)
        pl, m = policy_loss(logp, batch["old"], batch["advantages"], mask, loss_type="ppo", eps_low=sec.cliprange,
                            entropy=ent, cu_seqlens=packed.cu_seqlens)
        vl, vm = value_loss(values, batch["values"], batch["returns"], mask, clip=sec.cliprange_value)
        return pl + sec.vf_coef * vl, {**m, **vm, "loss/policy": pl.detach(), "loss/value": vl.detach()}
