"""Mixed dtypes in fastpref's ops: one rule for the LM-head ops, the fused losses and the packed attention.

bf16 mixed precision keeps fp32 master weights and runs activations in bf16 under ``torch.autocast``, so an op can
see bf16 hidden states with an fp32 LM head, or fp32 ``q`` (after a norm) with bf16 ``k``/``v``. The ops follow
what PyTorch's own ops do there:

* inside ``torch.autocast(device_type, dtype)``: compute in autocast's dtype, every floating input cast to it --
  what ``nn.Linear`` (``lm_head``) and ``scaled_dot_product_attention`` do under autocast; float64 inputs are
  left alone, as autocast leaves them;
* outside autocast: compute in the promoted dtype of the inputs (``torch.promote_types``);
* gradients come back in each input's own dtype.

The custom autograd Functions run with autocast off (``no_autocast``), since their compute dtype is chosen here.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_AUTOCASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype an op on ``tensors`` (None entries skipped, all on one device) computes in (module docstring)."""
    ts = [t for t in tensors if t is not None]
    dev = ts[0].device.type
    if (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
            and all(t.dtype in _AUTOCASTABLE for t in ts)):
        return torch.get_autocast_dtype(dev)
    return functools.reduce(torch.promote_types, (t.dtype for t in ts))


def no_autocast(device: torch.device):
    """A context with autocast off on ``device`` (a no-op context where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each tensor in ``dtype`` (itself when it already is; None stays None). Differentiable: under autograd the
    gradient of each cast flows back in the tensor's own dtype."""
    return [None if t is None else t.to(dtype) for t in tensors]
