"""Noise schedules and timestep respacing: pure functions over float64 tensors."""

from __future__ import annotations

import math

import torch

NOISE_SCHEDULES = ("linear", "cosine")


def linear_betas(num_steps: int) -> torch.Tensor:
    # DDPM's 1e-4..0.02 for 1000 steps, stretched so other step counts keep the same endpoints' total.
    scale = 1000 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def betas_from_alpha_bar(num_steps: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_betas(num_steps: int) -> torch.Tensor:
    # Nichol & Dhariwal 2021, s = 0.008.
    return betas_from_alpha_bar(num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)


def named_betas(name: str, num_steps: int) -> torch.Tensor:
    if name == "linear":
        return linear_betas(num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise_schedule {name!r}; expected one of {NOISE_SCHEDULES}")


def space_timesteps(num_steps: int, spacing: str | int | list[int]) -> list[int]:
    """The original timesteps a respaced process keeps, ascending.

    ``"250"`` (or 250): 250 evenly strided steps; ``"10,15,20"``: that many steps in each of three
    equal sections; ``"ddim50"``: the integer stride that gives exactly 50 steps (DDIM's choice).
    A count the process cannot respace to is an error.
    """
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        desired = int(spacing[len("ddim") :])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == desired:
                return list(range(0, num_steps, stride))
        raise ValueError(f"cannot respace {num_steps} steps to {spacing!r}: no integer stride gives {desired} steps")
    if isinstance(spacing, int):
        counts = [spacing]
    elif isinstance(spacing, str):
        try:
            counts = [int(c) for c in spacing.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing={spacing!r} is not understood; expected e.g. '250', '10,20' or 'ddim50'"
            ) from None
    else:
        counts = [int(c) for c in spacing]
    size_per, extra = divmod(num_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(
                f"cannot respace a section of {size} steps to {count} steps (timestep_respacing={spacing!r})"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, not stride * j: the official code does so and rounding can differ
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def respaced_betas(alphas_cumprod: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Betas of the process that visits only ``keep``: each new beta bridges alpha-bar between kept steps."""
    betas, last = [], 1.0
    for i in keep:
        betas.append(1 - alphas_cumprod[i].item() / last)
        last = alphas_cumprod[i].item()
    return torch.tensor(betas, dtype=torch.float64)
