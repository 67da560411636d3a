"""The learning-rate schedule of a run, shared by the trainer's optimizer and every extra trainable module
(PPO's separate critic): the SFT warm-up phase at its own rate, then ``optim.warmup_steps`` of linear warm-up, then
``optim.schedule`` (constant, cosine or linear decay to ``optim.min_lr_ratio``) over the rest of the run."""

from __future__ import annotations

import math


def lr_lambda(cfg, total_steps: int):
    """``fn(done) -> factor`` of the base learning rate after ``done`` optimizer steps (``LambdaLR``'s form)."""
    o, t = cfg.optim, cfg.train
    warm = t.sft_warmup_steps
    warm_scale = (t.sft_warmup_lr if t.sft_warmup_lr is not None else o.lr) / o.lr

    def fn(done: int) -> float:  # ``done`` optimizer steps taken so far
        if done < warm:
            return warm_scale
        s, total = done - warm, max(1, total_steps - warm)
        if o.warmup_steps and s < o.warmup_steps:
            return (s + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        frac = min(1.0, (s - o.warmup_steps) / max(1, total - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if o.schedule == "cosine" else 1.0 - frac
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return fn
