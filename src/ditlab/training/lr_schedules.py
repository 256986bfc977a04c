"""Learning-rate schedules as LambdaLR factories (configured with ``_partial_: true``)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_constant(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up to the base lr, then constant (DiT trains at a constant 1e-4)."""
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_ratio`` * base lr at ``total_steps``."""
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
