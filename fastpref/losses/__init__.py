"""Every preference and RL objective, plain (from log-probs) and fused (from hidden states + LM head)."""
from fastpref.losses.preference import (  # noqa: E402  (preference losses, plain forms)
    DPO_LOSS_TYPES, cpo_loss, dpo_loss, kto_loss, orpo_loss, reward_model_loss, simpo_loss, spin_loss)
from fastpref.losses.fused_preference import (  # noqa: E402  (preference losses, fused forms)
    FusedLinearCPOLoss, FusedLinearDPOLoss, FusedLinearKTOLoss, FusedLinearORPOLoss, FusedLinearPreferenceLoss,
    FusedLinearSimPOLoss, sequence_logps)
from fastpref.losses.advantages import (  # noqa: E402  (RL advantages and reward shaping)
    AdaptiveKLController, fit_reward_normalizer, gae, group_advantages, kl_penalty_rewards, overlong_penalty,
    rloo_advantages, whiten)
from fastpref.losses.policy import (  # noqa: E402  (RL policy losses, plain forms)
    LOSS_TYPES as POLICY_LOSS_TYPES, kl_estimate, per_token_policy_loss, policy_loss, token_weights, value_loss)
from fastpref.losses.fused_policy import FusedLinearPolicyLoss  # noqa: E402  (RL policy loss, fused form)
