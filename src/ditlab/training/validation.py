"""A validation loss that compares across steps and runs: the fixed-timestep loss (as SD3's training
and torchtitan's diffusion trainer report it).

The usual validation loss draws new timesteps and noise at every validation, so its changes mix that
draw with progress. Here everything but the weights is fixed: the held-out latents (each one's
posterior mean, unflipped: ``LatentDataModule`` hands validation batches that way), a grid of times
(fractions of the way from data, 0, to noise, 1; ``objective.t_at``) and the noise of each (batch, t),
drawn on the CPU from ``seed`` (not the run's seed) and the batch's place in the validation set. Two
validations of the same weights give the same number, in any run on the same data (the same
validation batches: batch size and processes); a change of the number is a change of the weights.
Logged as ``val/loss_fixed`` (the mean over samples and grid) and per time, ``val/loss_fixed_t<f>``
with f the fraction in thousandths (``val/loss_fixed_t500``: halfway).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditlab.seeding import stream_generator

FIXED_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)  # five times, away from the ends where the loss says little
NOISE_STREAM = "val_fixed_noise"


def fixed_timestep_losses(
    net, objective, latents: torch.Tensor, labels: torch.Tensor, grid: Sequence[float], seed: int, key=()
) -> torch.Tensor:
    """(N, T): the loss of each held-out latent (N, C, H, W) with its label (N,) at each time of the
    grid (T fractions in [0, 1]), its noise drawn from (``seed``, ``key``, the time's place in the
    grid); ``key`` names the batch (e.g. (rank, batch index)). ``net`` in eval mode (no label dropout)."""
    losses = []
    for j, fraction in enumerate(grid):
        generator = stream_generator("cpu", seed, NOISE_STREAM, *key, j)  # the CPU's numbers on any device
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = objective.t_at(fraction, len(latents), latents.device)
        losses.append(objective.training_losses(net, latents, t, {"y": labels}, noise=noise)["loss"])  # (N,)
    return torch.stack(losses, dim=1)


def fixed_loss_names(grid: Sequence[float]) -> list[str]:
    """The per-time metric names: val/loss_fixed_t100 for 0.1."""
    return [f"val/loss_fixed_t{round(fraction * 1000):03d}" for fraction in grid]


def fixed_loss_values(losses: torch.Tensor, grid: Sequence[float]) -> dict[str, torch.Tensor]:
    """(N, T) losses -> the batch's values to log: val/loss_fixed (mean over both) and one per time."""
    return {"val/loss_fixed": losses.mean(), **dict(zip(fixed_loss_names(grid), losses.mean(dim=0)))}


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(f) for f in grid)
    if not grid or any(not 0.0 <= f <= 1.0 for f in grid) or len(set(fixed_loss_names(grid))) != len(grid):
        raise ValueError(f"module.val_grid={list(grid)}; expected distinct fractions in [0, 1] (0: data, 1: noise)")
    return grid
