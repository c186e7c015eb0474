"""The learning-rate schedule: linear warm-up, then constant, linear decay or cosine decay (``train.scheduler``).

Formula, for optimizer step ``s`` (0-based, the step about to be taken), ``W = warmup_steps``, ``S = total_steps``:

    s < W:   lr * (s + 1) / W
    else:    lr * f(p),  p = (s - W) / max(1, S - W)
             f = 1 (constant) | max(0, 1 - p) (linear) | (1 + cos(pi * min(1, p))) / 2 (cosine)

Example: lr 1e-3, W = 2, S = 6, cosine: steps 0..5 get 5e-4, 1e-3, 1e-3, 8.54e-4, 5e-4, 1.46e-4.
The engine sets the value on DeepSpeed's parameter groups before each step (0 for a skipped, non-finite step).
"""

from __future__ import annotations

import math

SCHEDULERS = ("constant", "linear", "cosine")


def lr_at(step: int, train, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` for ``train`` (palu_ds.config.TrainConfig: lr, warmup_steps,
    scheduler) in a run of ``total_steps`` steps."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * ((step + 1) / train.warmup_steps)
    frac = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    factor = {"constant": 1.0, "linear": max(0.0, 1 - frac),
              "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))}[train.scheduler]
    return train.lr * factor
