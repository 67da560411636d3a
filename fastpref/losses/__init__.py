"""Every preference and RL objective, plain (from log-probs) and fused (from hidden states + LM head)."""
from fastpref.losses.preference import (  # noqa: E402  (preference losses, plain forms)
    DPO_LOSS_TYPES, cpo_loss, dpo_loss, kto_loss, orpo_loss, reward_model_loss, simpo_loss, spin_loss)
from fastpref.losses.fused_preference import (  # noqa: E402  (preference losses, fused forms)
    FusedLinearCPOLoss, FusedLinearDPOLoss, FusedLinearKTOLoss, FusedLinearORPOLoss, FusedLinearPreferenceLoss,
    FusedLinearSimPOLoss)
