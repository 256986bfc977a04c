"""Flow matching with the linear interpolant (SiT / rectified flow), as a second objective.

x_t = (1 - t) x_0 + t eps for t in [0, 1] (t = 1 is pure noise); the model predicts the velocity
dx_t/dt = eps - x_0. Sampling integrates the ODE from t = 1 to t = 0. The DiT model is reused
unchanged: it sees t * ``time_scale`` so continuous time covers the timestep embedding's usual range.
The ODE solvers (``flow_euler``, ``flow_heun``) are in ``samplers``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditlab.diffusion.gaussian import mean_flat

T_SAMPLINGS = ("uniform", "logit_normal")


class FlowMatching:
    """Args:
    time_scale: what the model sees for t = 1.
    t_sampling: "uniform" (SiT) or "logit_normal": t = sigmoid(N(t_mean, t_std)), which trains
        the middle of the path more than its ends (Esser et al. 2024, SD3).
    """

    learn_sigma = False

    def __init__(
        self, time_scale: float = 1000.0, t_sampling: str = "uniform", t_mean: float = 0.0, t_std: float = 1.0
    ):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t_sampling {t_sampling!r}; expected one of {T_SAMPLINGS}")
        if t_std <= 0:
            raise ValueError(f"t_std must be > 0, got {t_std}")
        self.time_scale = float(time_scale)
        self.t_sampling, self.t_mean, self.t_std = t_sampling, float(t_mean), float(t_std)

    def sample_t(self, batch_size: int, device: torch.device | str = "cpu", generator=None) -> torch.Tensor:
        if self.t_sampling == "uniform":
            return torch.rand(batch_size, device=device, generator=generator)
        z = torch.randn(batch_size, device=device, generator=generator)
        return torch.sigmoid(self.t_mean + self.t_std * z)

    def interpolate(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x_start.dim() - 1)))
        return (1 - t) * x_start + t * noise

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.time_scale

    def velocity(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs=None) -> torch.Tensor:
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return out[:, : x.shape[1]]  # a learn_sigma model's extra channels are ignored

    def training_losses(self, model: Callable, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample velocity MSE (``loss`` = ``mse``), same interface as GaussianDiffusion."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.interpolate(x_start, t, noise)
        mse = mean_flat((self.velocity(model, x_t, t, model_kwargs) - (noise - x_start)) ** 2)
        return {"loss": mse, "mse": mse}
