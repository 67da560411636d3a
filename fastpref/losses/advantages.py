"""Advantages and reward shaping for on-line RL: GRPO group baselines, RLOO, GAE, whitening, PPO KL rewards, DAPO.

All functions are plain PyTorch, device-agnostic, with no host sync. Layouts: ``rewards`` ``[B]`` with the
``G = num_generations`` completions of a prompt consecutive (``B = P * G``), as TRL and fastpref's packed
batches order them; per-token tensors are right-padded ``[B, T]`` with a completion ``mask`` ``[B, T]``
(ones then zeros).
"""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")


def _check_groups(rewards: torch.Tensor, num_generations: int, fn: str) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"{fn}: rewards must be a 1-D float tensor [B], got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    if not isinstance(num_generations, int) or num_generations < 1 or rewards.shape[0] % num_generations:
        raise ValueError(f"{fn}: num_generations must be a positive int dividing B = {rewards.shape[0]}, "
                         f"got {num_generations!r}")


def group_advantages(rewards: torch.Tensor, num_generations: int, *, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantages ``A_i = (r_i - mean_group(r)) / (std + eps)`` (Shao et al. 2024).

    ``scale_rewards`` as TRL's ``GRPOConfig.scale_rewards``: ``"group"`` divides by the group's std,
    ``"batch"`` by the whole batch's std (PPO-Lite, Liu et al. 2025; the mean is still the group's), ``"none"``
    does not divide (Dr. GRPO, Liu et al. 2025: the std term biases towards too-easy/too-hard prompts).
    The std is the unbiased (Bessel) one and ``eps = 1e-4``, as TRL. A group of one completion
    (``num_generations == 1``) has std 0, so its advantage is 0 (TRL: the same).
    """
    fn = "group_advantages"
    _check_groups(rewards, num_generations, fn)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"{fn}: scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1, keepdim=True)
    adv = (grouped - mean).view(-1)
    if scale_rewards == "none":
        return adv
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if num_generations > 1 else 0.0
    else:
        std = rewards.std() if rewards.numel() > 1 else 0.0
    return adv / (std + eps)


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages ``A_i = r_i - mean_{j != i in group} r_j`` (Ahmadian et al. 2024).

    Equal to ``G / (G - 1) * (r_i - mean_group(r))``; needs ``G >= 2``.
    """
    fn = "rloo_advantages"
    _check_groups(rewards, num_generations, fn)
    if num_generations < 2:
        raise ValueError(f"{fn}: num_generations must be >= 2 for a leave-one-out baseline, got {num_generations}")
    grouped = rewards.view(-1, num_generations)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - baseline).view(-1)


def _check_tokens(fn: str, mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{fn}: mask must be a [B, T] tensor")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(mask.shape):
            raise ValueError(f"{fn}: {name} must have the mask's shape {tuple(mask.shape)}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over the tokens where ``mask`` is set (all tokens when ``mask`` is None)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening ``(x - mean) / sqrt(var + eps)`` over the masked tokens (batch-level normalisation).

    The variance is unbiased (Bessel's correction over the masked count), as TRL's ``masked_whiten`` used by
    PPO. ``shift_mean=False`` keeps the mean (PPO whitens rewards that way). Masked-out entries come back 0.
    """
    m = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    if m.shape != values.shape:
        raise ValueError(f"whiten: mask shape {tuple(m.shape)} must equal values shape {tuple(values.shape)}")
    n = m.sum()
    mean = (values * m).sum() / n.clamp(min=1.0)
    var = (((values - mean) * m) ** 2).sum() / (n - 1).clamp(min=1.0)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95,
        whiten_advantages: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, with ``V`` and ``r`` 0 after
    each response's last token (the episode ends there). ``returns = A + V`` (before whitening); the advantages are
    then whitened over the mask when ``whiten_advantages`` (TRL's PPO). Defaults ``gamma=1``, ``lam=0.95`` as
    TRL's ``PPOConfig``. Returns ``(advantages, returns)``, both ``[B, T]`` and 0 off the mask.
    """
    fn = "gae"
    _check_tokens(fn, mask, rewards=rewards, values=values)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"{fn}: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask.to(values.dtype)
    r, v = rewards * m, values * m
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    T = v.shape[1]
    for t in range(T - 1, -1, -1):
        nxt = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        last = r[:, t] + gamma * nxt - v[:, t] + gamma * lam * last
        adv[:, t] = last
    adv = adv * m
    returns = (adv + v) * m
    if whiten_advantages:
        adv = whiten(adv, m)
    return adv, returns


def kl_penalty_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *,
                       kl_coef: float = 0.05, kl_estimator: str = "k1") -> torch.Tensor:
    """PPO's per-token rewards: ``-kl_coef * kl_t`` on every response token, plus the sequence score on the last.

    As in "The N Implementation Details of RLHF with PPO" (Huang et al. 2022) and TRL's ``PPOTrainer``: the
    reward model's score is a sparse reward at the last response token and the KL to the reference is a dense
    per-token penalty, ``kl_t = logp_t - ref_t`` (``k1``; ``k2``/``k3`` also accepted, see
    ``fastpref.losses.policy.kl_estimate``). ``kl_coef`` defaults to TRL's 0.05. Returns ``[B, T]``, 0 off the mask;
    a response with no token gets nothing (its score is dropped).
    """
    from fastpref.losses.policy import kl_estimate

    fn = "kl_penalty_rewards"
    _check_tokens(fn, mask, logps=logps, ref_logps=ref_logps)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"{fn}: scores must be [B] = [{mask.shape[0]}], got {tuple(scores.shape)}")
    m = mask.to(logps.dtype)
    rewards = -kl_coef * kl_estimate(logps, ref_logps, kl_estimator) * m
    pos = torch.arange(m.shape[1], device=m.device, dtype=m.dtype)
    last = (pos * m).argmax(dim=1, keepdim=True)  # index of the last response token (0 for an empty row)
    has = (m.sum(dim=1, keepdim=True) > 0).to(rewards.dtype)
    return rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1) * has)


def overlong_penalty(lengths: torch.Tensor, max_completion_length: int, cache_length: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), to add to the rewards.

    ``0`` for ``|y| <= L_max - L_cache``, ``((L_max - L_cache) - |y|) / L_cache`` in between, ``-1`` beyond
    ``L_max``. Same as TRL's ``get_soft_overlong_punishment``, on a tensor of lengths ``[B]``.
    """
    fn = "overlong_penalty"
    if not (isinstance(max_completion_length, int) and isinstance(cache_length, int)
            and 0 < cache_length <= max_completion_length):
        raise ValueError(f"{fn}: need ints 0 < cache_length <= max_completion_length, got "
                         f"cache_length={cache_length!r}, max_completion_length={max_completion_length!r}")
    soft_start = max_completion_length - cache_length
    x = lengths.to(torch.float32)
    pen = ((soft_start - x) / cache_length).clamp(max=0.0)
    return torch.where(x > max_completion_length, torch.full_like(pen, -1.0), pen)


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences",
    Sec. 2.2; ``lm_human_preferences/train_policy.py`` ``AdaptiveKLController``, also TRL < 0.12's and OpenRLHF's
    ``kl_target`` / ``kl_horizon``): a proportional controller that moves ``value`` so the policy's KL to the
    reference tracks ``target``::

        e_t = clip(KL_t / target - 1, -0.2, 0.2)        beta_{t+1} = beta_t (1 + e_t * n_t / horizon)

    with ``KL_t`` the batch's mean per-sequence KL and ``n_t`` the number of sequences in the batch (so the
    horizon is counted in samples, as in the paper). Plain Python floats: the caller reads the KL once per
    rollout (one host sync there, none per micro-batch).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not (init_kl_coef >= 0 and target > 0 and horizon > 0):
            raise ValueError(f"AdaptiveKLController: need init_kl_coef >= 0, target > 0, horizon > 0, got "
                             f"{init_kl_coef}, {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Fold in one batch's mean KL (over ``n_steps`` sequences); returns the new coefficient."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def fit_reward_normalizer(scores: torch.Tensor, *, target_mean: float = 0.0, target_std: float = 1.0,
                          eps: float = 1e-8) -> tuple[float, float]:
    """``(gain, bias)`` with ``gain * scores + bias`` of mean ``target_mean`` and std ``target_std`` over
    ``scores`` -- the reward normalisation of Ziegler et al. 2019 (``lm_human_preferences/train_reward.py``
    ``normalize``: the reward model's gain and bias fitted on samples of the initial policy, "The N Implementation
    Details of RLHF with PPO", reward-model detail 3). Population std, as the reference code's ``tf.nn.moments``.
    A constant sample (std 0) gets ``gain = 1`` and only the mean shift (nothing to scale)."""
    s = scores.detach().double().flatten()
    if s.numel() == 0:
        raise ValueError("fit_reward_normalizer: no scores")
    mean, std = float(s.mean()), float(s.std(unbiased=False))
    gain = target_std / std if std > eps else 1.0
    return gain, target_mean - gain * mean
