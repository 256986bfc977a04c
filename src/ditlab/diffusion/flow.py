"""Flow matching with the linear interpolant (SiT / rectified flow), as a second objective.

x_t = (1 - t) x_0 + t eps for t in [0, 1] (t = 1 is pure noise); the model predicts the velocity
dx_t/dt = eps - x_0. Sampling integrates the ODE from t = 1 to t = 0. The DiT model is reused
unchanged: it sees t * ``time_scale`` so continuous time covers the timestep embedding's usual range.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ditlab.diffusion.gaussian import mean_flat

FLOW_SOLVERS = ("euler", "heun")


class FlowMatching:
    learn_sigma = False

    def __init__(self, time_scale: float = 1000.0):
        self.time_scale = float(time_scale)

    def sample_t(self, batch_size: int, device: torch.device | str = "cpu", generator=None) -> torch.Tensor:
        return torch.rand(batch_size, device=device, generator=generator)

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

    @torch.no_grad()
    def sample_ode(
        self,
        model: Callable,
        noise: torch.Tensor,
        steps: int,
        solver: str = "euler",
        model_kwargs=None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from t = 1 to 0 on a uniform grid of ``steps`` intervals.

        Heun (2nd order) costs two evaluations per interval except the last, where the second one
        would be taken at t = 0 exactly; NFE = 2 * steps - 1.
        """
        if solver not in FLOW_SOLVERS:
            raise ValueError(f"unknown flow solver {solver!r}; expected one of {FLOW_SOLVERS}")
        x = noise
        grid = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
        n = x.shape[0]
        for i in tqdm(range(steps), disable=not progress, desc=f"flow-{solver}"):
            t, t_next = grid[i].expand(n), grid[i + 1].expand(n)
            dt = (grid[i + 1] - grid[i]).item()  # negative
            v = self.velocity(model, x, t, model_kwargs)
            x_euler = x + dt * v
            if solver == "heun" and i < steps - 1:
                v_next = self.velocity(model, x_euler, t_next, model_kwargs)
                x = x + dt * 0.5 * (v + v_next)
            else:
                x = x_euler
        return x
