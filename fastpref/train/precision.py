"""``train.precision``: what the trainer's forward passes run under, and the gradient scaler of ``fp16-mixed``.

``model.dtype`` is the storage dtype of the weights (and so of the gradients and AdamW's states, which
``torch.optim.AdamW`` keeps in each parameter's dtype). ``train.precision`` adds autocast on top:

* ``auto`` / ``fp32`` / ``bf16``: no autocast; every op runs in the storage dtype (``fp32`` and ``bf16`` only state
  it: :func:`fastpref.train.config.validate_config` checks ``model.dtype`` agrees).
* ``bf16-mixed`` / ``fp16-mixed``: fp32 weights, the policy's forward and loss, the reference's forward and the
  on-line rollouts run under ``torch.autocast(device, dtype)`` (autocast's mixed precision, as TRL's
  ``bf16=True`` / ``fp16=True`` through Accelerate and Lightning's ``bf16-mixed`` / ``16-mixed``); the backward
  runs outside it. ``fp16-mixed`` also scales the loss with a ``torch.amp.GradScaler`` (Micikevicius et al. 2018,
  "Mixed Precision Training"): gradients are unscaled before clipping, and a step whose gradients hold inf/nan
  is skipped (optimizer and schedule), the scale halved; see :class:`fastpref.train.distributed.Parallel`.
"""

from __future__ import annotations

import contextlib

import torch

from fastpref.train.config import Config

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


class Precision:
    """The autocast context of ``cfg.train.precision`` on ``device`` (a no-op without mixed precision)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.name = cfg.train.precision
        self.dtype: torch.dtype | None = _AUTOCAST.get(self.name)
        """The autocast dtype, or None (no autocast)."""
        self.device_type = device.type

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast(device_type, dtype)`` for the mixed modes, else a null context."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def grad_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` on ``device`` for ``train.precision=fp16-mixed``, else None."""
    return torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16-mixed" else None
