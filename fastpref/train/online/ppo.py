"""PPO with a critic for RLHF, as in "The N Implementation Details of RLHF with PPO" (Huang et al. 2022) and
TRL's ``PPOTrainer``.

Per rollout: sample ``num_generations`` completions per prompt; score them with the reward function or a reward
model (``reward_model``: a sequence-classification checkpoint, e.g. from ``algorithm=rm``); in ``no_grad``,
compute the sampling policy's per-token log-probs (the fused LM-head op on the trunk's hidden states), the
critic's per-token values and the reference's log-probs; per-token rewards ``-kl_coef * KL_t`` plus the score on
the last token (``kl_penalty_rewards``); GAE and whitened advantages (``gae``). Then ``num_ppo_epochs`` trainer
steps on that rollout, each with the clipped policy loss (``policy_loss(loss_type="ppo")``: token mean over the
batch) plus ``vf_coef`` times the clipped value loss (``cliprange_value`` around the rollout's values).

The critic (``critic``):

* ``shared`` (default): a linear value head on the policy trunk (``value_head``, attached to the model, so the
  trainer's optimizer includes it, and ``final/``'s model file without LoRA, ``final/value_head.safetensors`` with
  LoRA; zero-initialised, so the first values are 0). One trunk pass gives the log-probs and the values, and the
  value loss also trains the trunk. The head's weights are part of the algorithm's checkpointed state as well:
  with LoRA the trainer's checkpoints hold only the adapters.
* ``separate``: a value model of its own (:class:`Critic`: a decoder trunk and a linear head ``H -> 1``), as
  TRL's ``value_model``. ``critic_path`` names its initial weights: a local Hugging Face directory or ``.gguf``
  file loaded as ``AutoModelForSequenceClassification(num_labels=1)`` (the ``score`` head of an ``algorithm=rm``
  output is kept, as TRL initialises the value model from the reward model; a causal LM gets a fresh zero head),
  or, when empty, a copy of the initial policy's trunk (LoRA merged in) with a fresh zero head. It lives on the
  policy's device in the policy's dtype and trains all its weights with its own AdamW from
  ``Runtime.build_optimizer`` (``critic_lr``; the ``optim`` betas, eps, weight decay, ``max_grad_norm``, the
  run's learning-rate schedule step for step, gradients averaged over ranks), stepped in ``on_step_end`` right
  after the policy's step; the value loss never reaches the policy. The trainer checkpoints its weights and
  optimizer with the run; ``final/critic/`` holds the trained trunk (``save_pretrained``) and
  ``value_head.safetensors``.

The implementation details of Huang et al. (and TRL / OpenRLHF): ``num_mini_batches`` shuffled mini-batches per
PPO epoch (TRL), the adaptive KL controller (``kl_target``, ``kl_horizon``; Ziegler et al. 2019), reward
normalisation on the initial policy's samples (``normalize_reward``, ``normalize_samples``), dropout off in every
model (``disable_dropout``), an entropy bonus (``entropy_coef``) and dual-clip PPO (``dual_clip``; Ye et al.
2020). ``docs/online.md`` has the full checklist: what is implemented, configurable, or absent and why.
``missing_eos_penalty`` is applied as in TRL.
"""

from __future__ import annotations

import copy
import logging
import os
import random
from dataclasses import dataclass

import torch

from fastpref.data.batch import Batch
from fastpref.losses.advantages import AdaptiveKLController, fit_reward_normalizer, gae, kl_penalty_rewards, whiten
from fastpref.losses.policy import policy_loss, value_loss
from fastpref.rewards import RewardModelScorer
from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.distributed import all_reduce_mean
from fastpref.train.modeling import base_model, decoder_hidden, disable_dropout, lm_head, token_logps
from fastpref.train.online.common import OnlineAlgorithm, OnlineConfig, OnlineMicroBatch, metrics_float
from fastpref.train.rollout import Rollout, pack_rollout, timed

CRITICS = ("shared", "separate")
log = logging.getLogger("fastpref.train")


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
    critic: str = "shared"
    """``shared``: a value head on the policy trunk; ``separate``: a value model of its own (``critic_path``)."""
    critic_path: str | None = None
    """Initial weights of the separate critic: a local Hugging Face model directory or ``.gguf`` file, loaded as a
    sequence-classification model with one label (an ``algorithm=rm`` output keeps its head, a causal LM gets a
    fresh zero head); null: a copy of the initial policy's trunk with a fresh zero head."""
    critic_lr: float | None = None
    """Learning rate of the separate critic's own AdamW (null: ``optim.lr``); it follows the run's schedule."""
    num_mini_batches: int = 1
    """Mini-batches per PPO epoch (TRL's ``num_mini_batches``): each epoch shuffles the rollout's sequences and
    takes one optimizer step per mini-batch, so a rollout lasts ``num_ppo_epochs * num_mini_batches`` trainer
    steps. 1: one full-batch step per epoch (no shuffle needed)."""
    kl_target: float | None = None
    """Adaptive KL controller's target KL per sequence (Ziegler et al. 2019; OpenRLHF's ``kl_target``, the paper's
    6.0); null: the fixed ``kl_coef``. ``kl_coef`` is then the controller's initial value."""
    kl_horizon: int = 10000
    """Adaptive KL controller's horizon in sequences (Ziegler et al. 2019 and OpenRLHF: 10000)."""
    normalize_reward: bool = False
    """Fit a gain and bias on the scores of ``normalize_samples`` samples of the initial policy so they have mean
    0 and std 1, and apply them to every score (Ziegler et al. 2019's reward normalisation)."""
    normalize_samples: int = 256
    """Initial-policy samples the reward normaliser is fitted on (lm-human-preferences: 256)."""
    entropy_coef: float = 0.0
    """Entropy bonus: ``entropy_coef * mean token entropy`` is subtracted from the loss (OpenRLHF's
    ``entropy_loss_coef``; 0: entropy is only logged)."""
    dual_clip: float | None = None
    """Dual-clip PPO (Ye et al. 2020; OpenRLHF's ``dual_clip``, e.g. 3): for negative advantages the ratio is
    capped at ``dual_clip`` (> 1 + cliprange); null: off."""
    disable_dropout: bool = True
    """Set every dropout of the policy, the reference and the critic to 0, so the rollout's log-probs and values
    (no_grad, train mode) are the ones the loss sees (TRL's PPOTrainer always does; blog detail "disable
    dropout")."""

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.num_ppo_epochs, int) and self.num_ppo_epochs >= 1):
            raise ValueError(f"ppo.num_ppo_epochs must be an int >= 1, got {self.num_ppo_epochs!r}")
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError(f"ppo.kl_coef and ppo.vf_coef must be >= 0, got {self.kl_coef}, {self.vf_coef}")
        if not 0 < self.cliprange < 1:
            raise ValueError(f"ppo.cliprange must be in (0, 1), got {self.cliprange}")
        if self.critic not in CRITICS:
            raise ValueError(f"ppo.critic must be one of {CRITICS}, got {self.critic!r}")
        if self.critic == "shared" and (self.critic_path or self.critic_lr is not None):
            raise ValueError("ppo.critic_path and ppo.critic_lr configure a separate critic: set ppo.critic=separate "
                             f"(got critic_path={self.critic_path!r}, critic_lr={self.critic_lr!r})")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ValueError(f"ppo.critic_lr must be > 0 (or null: optim.lr), got {self.critic_lr}")
        if not (isinstance(self.num_mini_batches, int) and self.num_mini_batches >= 1):
            raise ValueError(f"ppo.num_mini_batches must be an int >= 1, got {self.num_mini_batches!r}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"ppo.kl_target must be > 0 (or null: a fixed kl_coef), got {self.kl_target}")
        if not (isinstance(self.kl_horizon, int) and self.kl_horizon >= 1):
            raise ValueError(f"ppo.kl_horizon must be an int >= 1, got {self.kl_horizon!r}")
        if not (isinstance(self.normalize_samples, int) and self.normalize_samples >= 2):
            raise ValueError(f"ppo.normalize_samples must be an int >= 2, got {self.normalize_samples!r}")
        if not self.entropy_coef >= 0:
            raise ValueError(f"ppo.entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.dual_clip is not None and not self.dual_clip > 1 + self.cliprange:
            raise ValueError(f"ppo.dual_clip must be > 1 + ppo.cliprange = {1 + self.cliprange} (or null: off), got "
                             f"{self.dual_clip}")


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _split(items: list[int], n: int) -> list[list[int]]:
    """``items`` cut into ``n`` contiguous parts whose sizes differ by at most one."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (i < r)
        out.append(items[start:end])
        start = end
    return out


def to_padded(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Completion-token values of a packed ``[N]`` tensor as right-padded ``[S, T_max]`` (0 elsewhere)."""
    pos = (batch.targets != -100).nonzero(as_tuple=True)[0]
    lens = batch.scored_lengths
    starts = torch.cumsum(lens, 0) - lens
    rows = batch.token_seq_ids()[pos]
    cols = torch.arange(pos.numel(), device=pos.device) - torch.repeat_interleave(starts, lens)
    out = values.new_zeros(lens.numel(), max(int(lens.max()), 1))
    out[rows, cols] = values[pos]
    return out


def from_padded(padded: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Inverse of ``to_padded``: ``[S, T_max]`` back to packed ``[N]`` (0 off the completion tokens)."""
    pos = (batch.targets != -100).nonzero(as_tuple=True)[0]
    lens = batch.scored_lengths
    starts = torch.cumsum(lens, 0) - lens
    cols = torch.arange(pos.numel(), device=pos.device) - torch.repeat_interleave(starts, lens)
    out = padded.new_zeros(batch.targets.numel())
    out[pos] = padded[batch.token_seq_ids()[pos], cols]
    return out


def zero_value_head(hidden_size: int, like: torch.Tensor) -> torch.nn.Linear:
    """A fresh ``Linear(hidden_size, 1)`` with zero weight and bias (first values 0), on ``like``'s device and
    dtype."""
    head = torch.nn.Linear(hidden_size, 1, device=like.device, dtype=like.dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


class Critic(torch.nn.Module):
    """A value model: a decoder ``trunk`` (e.g. ``LlamaModel``) and a linear ``head`` ``H -> 1``. Calling it on a
    packed batch gives the per-token values ``[N]`` (fp32), from the trunk's last hidden states
    (``fastpref.train.modeling.decoder_hidden``: packed varlen attention when the trunk was loaded for packing,
    else right-padded)."""

    def __init__(self, trunk: torch.nn.Module, head: torch.nn.Linear, pad_id: int):
        super().__init__()
        self.trunk, self.head, self.pad_id = trunk, head, pad_id

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(decoder_hidden(self.trunk, batch)).squeeze(-1).float()


def _load_critic(path: str, policy: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """``(trunk, head)`` of the sequence-classification model at ``path`` (a directory or a ``.gguf`` file), in
    the policy's dtype and attention implementation; a head missing from the checkpoint is zero-initialised."""
    from transformers import AutoModelForSequenceClassification

    w, _ = lm_head(policy)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ValueError(f"ppo.critic_path={path!r}: no such file")
        src, kw = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    elif os.path.isdir(path):
        src, kw = path, {}
    else:
        raise ValueError(f"ppo.critic_path={path!r}: not a model directory or .gguf file")
    if getattr(base_model(policy).config, "_attn_implementation", None) == "fastpref":
        kw["attn_implementation"] = "fastpref"  # packed rows (data.pack=true) go through the varlen attention
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, dtype=w.dtype,
                                                                         output_loading_info=True, **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"ppo.critic_path={path!r}: cannot load it as a sequence-classification model ({e})") from None
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(f"ppo.critic_path={path!r}: expected a one-output linear `score` head, got {head!r}")
    if any(k.split(".")[0] == "score" for k in info["missing_keys"]):  # a causal LM: no head in the checkpoint
        torch.nn.init.zeros_(head.weight)
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < w.shape[0]:
        raise ValueError(f"ppo.critic_path={path!r}: its vocabulary ({vocab} tokens) is smaller than the policy's "
                         f"({w.shape[0]}); the critic reads the policy's tokens")
    return model.get_decoder(), head


def build_critic(path: str | None, policy: torch.nn.Module, *, pad_id: int, gradient_checkpointing: bool) -> Critic:
    """The separate critic (see the module docstring), on the policy's device, every weight trainable."""
    w, _ = lm_head(policy)
    if path:
        trunk, head = _load_critic(path, policy)
    else:
        src = copy.deepcopy(policy)
        if hasattr(src, "merge_and_unload"):  # PEFT: the base weights with the adapters merged in
            src = src.merge_and_unload()
        trunk = src.get_decoder()
        head = zero_value_head(trunk.config.hidden_size, w)
    if gradient_checkpointing:
        trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    critic = Critic(trunk, head, pad_id).to(w.device)
    for p in critic.parameters():
        p.requires_grad_(True)
    return critic.train()


@dataclass
class PPOMicroBatch(OnlineMicroBatch):
    """A PPO training micro-batch: packed completions of the buffered rollout with their rollout-time values
    (all ``[N]``, packed like the batch's tokens, 0 off the completion)."""

    old: torch.Tensor | None = None
    """Per-token log-probs of the sampling policy."""
    values: torch.Tensor | None = None
    """Per-token values at rollout time (for the clipped value loss)."""
    advantages: torch.Tensor | None = None
    """Per-token GAE advantages, whitened over the rollout."""
    returns: torch.Tensor | None = None
    """Per-token returns (advantages + values)."""


@register_algorithm("ppo")
class PPO(OnlineAlgorithm):
    """PPO with a shared value head or a separate critic (see the module docstring)."""

    config_class = PPOConfig
    micro_batch_type = PPOMicroBatch
    needs_reference = True

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        if cfg.train.precision == "fp16-mixed" and cfg.sections["ppo"].critic == "separate":
            raise ValueError("train.precision=fp16-mixed with ppo.critic=separate is not supported (the critic's "
                             "optimizer steps outside the gradient scaler); use bf16-mixed or ppo.critic=shared")
        sec = cfg.sections["ppo"]
        n_seqs = cfg.train.batch_size * sec.generation.num_generations
        if sec.num_mini_batches > n_seqs:
            raise ValueError(f"ppo.num_mini_batches={sec.num_mini_batches} exceeds the rollout's {n_seqs} sequences "
                             f"(train.batch_size x ppo.generation.num_generations)")

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        sec, model = self.sec, rt.model
        self.value_head = self.critic = None
        if sec.critic == "separate":
            self.critic = build_critic(sec.critic_path, model, pad_id=self.pad_id,
                                       gradient_checkpointing=cfg.model.gradient_checkpointing)
            self.critic_opt = rt.build_optimizer(self.critic, sec.critic_lr or cfg.optim.lr, name="critic")
        else:
            if not hasattr(model, "value_head"):
                w, _ = lm_head(model)
                model.add_module("value_head", zero_value_head(w.shape[1], w))
            self.value_head = model.value_head
        if sec.disable_dropout:
            for m in (model, self.critic, getattr(rt.reference, "model", None)):
                if m is not None:
                    disable_dropout(m)
        if sec.reward_model:
            from transformers import AutoModelForSequenceClassification

            rm = AutoModelForSequenceClassification.from_pretrained(sec.reward_model).to(rt.device).eval()
            if sec.disable_dropout:
                disable_dropout(rm)
            self.reward_fn = RewardModelScorer(rm, rt.tokenizer)
        self.kl_ctl = AdaptiveKLController(sec.kl_coef, sec.kl_target, sec.kl_horizon) if sec.kl_target else None
        self.reward_norm: tuple[float, float] | None = None  # (gain, bias), fitted on the first rollout
        self._plan: list[list[int]] = []  # per trainer step of the buffered rollout: indices into _buffer

    @property
    def kl_coef(self) -> float:
        """The KL penalty's current coefficient: the adaptive controller's value, else ``ppo.kl_coef``."""
        return self.kl_ctl.value if self.kl_ctl is not None else self.sec.kl_coef

    def _forward(self, batch: Batch, *, entropy: bool):
        """``(logp [N], entropy [N] or None, values [N])``: the policy's trunk pass through the one log-prob path
        (``fastpref.train.modeling.token_logps`` on its hidden states), the value head on the same hidden states,
        or the separate critic's own pass."""
        h = decoder_hidden(self.rt.model, batch)
        out = token_logps(self.rt.model, batch, temperature=self.sec.generation.temperature, entropy=entropy,
                          hidden=h)
        logp, ent = out if entropy else (out, None)
        values = self.critic(batch) if self.critic is not None else self.value_head(h).squeeze(-1).float()
        return logp, ent, values

    def _fit_reward_norm(self, ro: Rollout, scores: torch.Tensor, examples: list[dict]) -> None:
        """Fit ``(gain, bias)`` on at least ``normalize_samples`` scores of the initial policy: this first
        rollout's, then more samples on prompts of the training split (``rt.train_examples`` in a seeded
        order; the step's own prompts when the trainer hands none). Under torchrun the moments are averaged over
        ranks, so every rank applies the same normaliser."""
        need = self.sec.normalize_samples
        pool = self.rt.train_examples or examples
        order = list(range(len(pool)))
        random.Random(self.cfg.train.seed + 1).shuffle(order)
        all_scores, pos = [scores], 0
        while sum(x.numel() for x in all_scores) < need:
            take = [pool[order[(pos + i) % len(order)]] for i in range(len(examples))]
            pos += len(examples)
            extra = self.rollout(take)
            all_scores.append(self.score(extra, take))
        s = torch.cat(all_scores).double()
        if _world() > 1:  # every rank has as many samples: fit on all of them, the same normaliser everywhere
            import torch.distributed as dist

            parts = [torch.empty_like(s) for _ in range(_world())]
            dist.all_gather(parts, s)
            s = torch.cat(parts)
        self.reward_norm = fit_reward_normalizer(s)
        log.info("ppo: reward normaliser fitted on %d initial-policy samples: gain %.4g, bias %.4g",
                 s.numel(), *self.reward_norm)
        self.step_metrics["reward/norm_gain"], self.step_metrics["reward/norm_bias"] = self.reward_norm

    def _new_rollout(self, examples: list[dict]) -> tuple[list[dict], list[list[int]]]:
        """Sample, score and evaluate one rollout: ``(micro-batches, plan)`` where ``plan[k]`` lists the
        micro-batches of the ``k``-th trainer step on it (``num_ppo_epochs * num_mini_batches`` steps)."""
        sec, gen = self.sec, self.sec.generation
        ro = self.rollout(examples)
        scores = self.score(ro, examples)
        if sec.normalize_reward:
            if self.reward_norm is None:
                self._fit_reward_norm(ro, scores, examples)
            gain, bias = self.reward_norm
            scores = gain * scores + bias
        if sec.missing_eos_penalty is not None:
            scores = scores - sec.missing_eos_penalty * torch.tensor(ro.truncated, dtype=scores.dtype)
        S, T = len(ro), max(1, int(ro.lengths().max()))
        full = {k: torch.zeros(S, T, device=self.device) for k in ("old", "values", "adv", "ret", "mask")}
        kl_coef, stats = self.kl_coef, []
        parts = self.group_slices(S, ro.group_size, self.cfg.train.grad_accum)
        batches = []
        for idx in parts:  # the no-grad passes, in the micro-batches of grad_accum
            part = ro.select(idx)
            with timed(self._timings, "pack"):
                batch = pack_rollout(part, self.device)
            batches.append(batch)
            mask = batch.scored_mask
            with timed(self._timings, "old_ref_values"), torch.no_grad():
                old, _, values = self._forward(batch, entropy=False)
                with self.reference() as ref_model:
                    ref = token_logps(ref_model, batch, temperature=gen.temperature)
                m_pad = to_padded(mask, batch)
                rew = kl_penalty_rewards(scores[idx].to(self.device), to_padded(old, batch), to_padded(ref, batch),
                                         m_pad, kl_coef=kl_coef, kl_estimator=sec.kl_estimator)
                if sec.whiten_rewards:
                    rew = whiten(rew, m_pad, shift_mean=False)
                adv, ret = gae(rew, to_padded(values, batch), m_pad, gamma=sec.gamma, lam=sec.lam,
                               whiten_advantages=False)
            t = m_pad.shape[1]
            for k, v in (("old", to_padded(old, batch)), ("values", to_padded(values, batch)), ("adv", adv),
                         ("ret", ret), ("mask", m_pad)):
                full[k][idx, :t] = v
            stats.append({"kl_seq": ((old - ref) * mask).sum(), "non_score_reward": rew.sum() - scores[idx].sum(),
                          "val_sum": (values * mask).sum()})
        # Advantages whitened over the whole rollout (TRL's PPOTrainer), not per micro-batch.
        full["adv"] = whiten(full["adv"], full["mask"])
        n_tok = full["mask"].sum()
        kl = sum(st["kl_seq"] for st in stats) / S
        if self.kl_ctl is not None:  # one host read per rollout; the KL is averaged over ranks first
            kl_all = kl.detach().reshape(1).clone()
            if _world() > 1:
                all_reduce_mean([kl_all])
            self.kl_ctl.update(float(kl_all), S * _world())
        lengths = ro.lengths().float()
        non_score = sum(st["non_score_reward"] for st in stats) / S
        self.step_metrics.update(metrics_float({
            # TRL's PPOTrainer names where TRL has the metric (objective/*, completions/* as its GRPOTrainer)
            "objective/scores": scores.mean(), "reward_std": scores.std() if len(scores) > 1 else torch.zeros(()),
            "objective/kl": kl,
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": scores.mean() + non_score,
            "advantages/mean": (full["adv"] * full["mask"]).sum() / n_tok,
            "returns/mean": (full["ret"] * full["mask"]).sum() / n_tok,
            "values/rollout_mean": sum(st["val_sum"] for st in stats) / n_tok,
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": torch.tensor(sum(ro.truncated) / len(ro))}))
        self.step_metrics["objective/kl_coef"] = kl_coef

        def make(idx: list[int], batch: Batch | None = None) -> PPOMicroBatch:
            if batch is None:
                with timed(self._timings, "pack"):
                    batch = pack_rollout(ro.select(idx), self.device)
            return PPOMicroBatch(batch, **{name: from_padded(full[k][idx], batch) for name, k in (
                ("old", "old"), ("values", "values"), ("advantages", "adv"), ("returns", "ret"))})

        E, M = sec.num_ppo_epochs, sec.num_mini_batches
        if M == 1:  # one full-batch step per epoch: the same micro-batches every epoch
            mbs = [make(idx, b) for idx, b in zip(parts, batches)]
            return mbs, [list(range(len(mbs)))] * E
        mbs, plan = [], []
        for _ in range(E):  # TRL: a fresh permutation per epoch, cut into mini-batches, each into micro-batches
            perm = list(range(S))
            self.rng.shuffle(perm)
            for mini in _split(perm, M):
                step = []
                for micro in _split(mini, min(self.cfg.train.grad_accum, len(mini))):
                    step.append(len(mbs))
                    mbs.append(make(sorted(micro)))
                plan.append(step)
        return mbs, plan

    def micro_batches(self, examples: list[dict], step: int) -> list[PPOMicroBatch]:
        if self._uses_left == 0:
            self._buffer, self._plan = self._new_rollout(examples)
            self._uses_left = len(self._plan)
        step_mbs = [self._buffer[i] for i in self._plan[len(self._plan) - self._uses_left]]
        self._uses_left -= 1
        self.begin_train_phase(sum(mb.num_tokens for mb in step_mbs))
        return step_mbs

    def compute_loss(self, batch: dict):
        sec, packed = self.sec, batch.batch
        mask = packed.scored_mask
        logp, ent, values = self._forward(packed, entropy=True)
        pl, m = policy_loss(logp, batch.old, batch.advantages, mask, loss_type="ppo", eps_low=sec.cliprange,
                            entropy=ent, entropy_coef=sec.entropy_coef, delta=sec.dual_clip,
                            cu_seqlens=packed.cu_seqlens)
        vl, vm = value_loss(values, batch.values, batch.returns, mask, clip=sec.cliprange_value)
        return pl + sec.vf_coef * vl, {**m, **vm, "loss/policy": pl.detach(), "loss/value": vl.detach()}

    def on_step_end(self, step: int) -> None:
        if self.critic is not None:  # the separate critic's step on the gradients of the step's micro-batches,
            # at the learning rate the run's schedule gives this step (timed as part of the train stage)
            self.step_metrics.update(self.critic_opt.update())
        super().on_step_end(step)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["plan"] = self._plan
        sd["kl_coef"] = self.kl_coef
        sd["reward_norm"] = list(self.reward_norm) if self.reward_norm is not None else None
        sd["critic_kind"] = self.sec.critic  # a separate critic's weights and optimizer: the trainer's extra state
        if self.critic is None:
            sd["value_head"] = self.value_head.state_dict()
        return sd

    def save_final(self, directory: str) -> None:
        """``final/critic/``: a separate critic's trunk (``save_pretrained``) and ``value_head.safetensors``;
        ``final/value_head.safetensors``: the shared head under LoRA (without LoRA it is in the model's own file)."""
        from safetensors.torch import save_file

        if self.critic is not None:
            directory = os.path.join(directory, "critic")
            self.critic.trunk.save_pretrained(directory)
            head = self.critic.head
        elif hasattr(self.rt.model, "peft_config"):
            head = self.value_head
        else:
            return  # the head is in the model's own file
        save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
                  os.path.join(directory, "value_head.safetensors"))

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._plan = [list(p) for p in state["plan"]]
        if self.kl_ctl is not None:
            self.kl_ctl.value = float(state["kl_coef"])
        self.reward_norm = tuple(state["reward_norm"]) if state.get("reward_norm") is not None else None
        if state.get("critic_kind", "shared") != self.sec.critic:
            raise ValueError(f"resume: the checkpoint was written with another ppo.critic than this run's "
                             f"{self.sec.critic!r}")
        if self.critic is None and "value_head" in state:  # (older checkpoints hold the head in model.pt)
            self.value_head.load_state_dict(state["value_head"])
