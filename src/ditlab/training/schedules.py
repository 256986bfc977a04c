"""Learning-rate schedules: the two rules every training loop of ditlab uses (the DiT's, the small
VAE's, the classifier's), and the LambdaLR factories the optim configs build with ``_partial_: true``."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_factor(step: int, warmup_steps: int = 0) -> float:
    """The lr multiplier of a linear warm-up over ``warmup_steps``, then 1."""
    return min(1.0, (step + 1) / max(1, warmup_steps))


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """The warm-up multiplier times a cosine that falls from 1 at step 0 to ``min_ratio`` at
    ``total_steps`` (held there after it)."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
    return warmup_factor(step, warmup_steps) * (min_ratio + (1 - min_ratio) * cosine)


def warmup_constant(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up to the base lr, then constant (DiT trains at a constant 1e-4)."""
    return LambdaLR(optimizer, lambda step: warmup_factor(step, warmup_steps))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, and a cosine decay to ``min_ratio`` * base lr at ``total_steps``."""
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}")
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, min_ratio))
