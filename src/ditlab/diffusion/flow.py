"""Flow matching with the linear interpolant (SiT / rectified flow), as a second objective.

x_t = (1 - t) x_0 + t eps for t in [0, 1] (t = 1 is pure noise); the model predicts the velocity
dx_t/dt = eps - x_0. Sampling integrates the ODE from t = 1 to t = 0. The DiT model is reused
unchanged: it sees t * ``time_scale`` so continuous time covers the timestep embedding's usual range.
The solvers (``flow_euler``, ``flow_heun``, and SiT's stochastic ``flow_sde``) and the sampling
grid's timestep shift are in ``samplers``; they all work in this time (t = 1 noise).

The network's own time convention is the objective's to translate (``model_timesteps``, ``velocity``):

    family        what the network sees       what it predicts     FlowMatching(...)
    ditlab        t * 1000 (t = 1 noise)       eps - x_0            time_scale=1000 (the default)
    REPA          t (t = 1 noise)              eps - x_0            time_scale=1
    SiT,          1 - t (its time: 0 noise,    x_0 - eps            time_scale=1, data_at_one=true
    LightningDiT  1 data)

so that the released SiT / REPA / LightningDiT weights sample and fine-tune here unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ditlab.diffusion.gaussian import mean_flat

T_SAMPLINGS = ("uniform", "logit_normal")


class FlowMatching:
    """Args:
    time_scale: what the model sees for t = 1.
    t_sampling: "uniform" (SiT) or "logit_normal": t = sigmoid(N(t_mean, t_std)), which trains
        the middle of the path more than its ends (Esser et al. 2024, SD3).
    cos_coef: weight of LightningDiT's velocity-direction loss, ``loss = mse + cos_coef * cos`` with
        ``cos`` = 1 - cosine(predicted, target velocity); 0 (the default) trains on the MSE alone.
    """

    learn_sigma = False

    def __init__(
        self,
        time_scale: float = 1000.0,
        t_sampling: str = "uniform",
        t_mean: float = 0.0,
        t_std: float = 1.0,
        cos_coef: float = 0.0,
        data_at_one: bool = False,
    ):
        if not isinstance(data_at_one, bool):
            raise ValueError(f"data_at_one={data_at_one!r}; expected true or false")
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t_sampling {t_sampling!r}; expected one of {T_SAMPLINGS}")
        if t_std <= 0:
            raise ValueError(f"t_std must be > 0, got {t_std}")
        if cos_coef < 0:
            raise ValueError(f"cos_coef must be >= 0, got {cos_coef}")
        self.time_scale = float(time_scale)
        self.t_sampling, self.t_mean, self.t_std = t_sampling, float(t_mean), float(t_std)
        self.cos_coef = float(cos_coef)
        self.data_at_one = data_at_one

    def sample_t(self, batch_size: int, device: torch.device | str = "cpu", generator=None) -> torch.Tensor:
        if self.t_sampling == "uniform":
            return torch.rand(batch_size, device=device, generator=generator)
        z = torch.randn(batch_size, device=device, generator=generator)
        return torch.sigmoid(self.t_mean + self.t_std * z)

    def t_at(self, fraction: float, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N,) the time ``fraction`` of the way from data (0) to noise (1)."""
        return torch.full((batch_size,), float(fraction), device=device)

    def interpolate(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x_start.dim() - 1)))
        return (1 - t) * x_start + t * noise

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network sees for t (also the units of a guidance interval)."""
        if self.data_at_one:
            return (1 - t) * self.time_scale
        return t * self.time_scale

    def velocity(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs=None) -> torch.Tensor:
        """dx_t/dt = eps - x_0 at (x, t), from the network's output in its own convention."""
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        v = out[:, : x.shape[1]]  # a learn_sigma model's extra channels are ignored
        return -v if self.data_at_one else v  # SiT's and LightningDiT's networks predict x_0 - eps

    def training_losses(self, model: Callable, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample terms, same interface as GaussianDiffusion: ``mse`` (velocity MSE), ``cos`` (the
        direction term, logged whatever its weight) and ``loss`` = mse + cos_coef * cos."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.interpolate(x_start, t, noise)
        v_pred, v_target = self.velocity(model, x_t, t, model_kwargs), noise - x_start  # (N, C, H, W)
        mse = mean_flat((v_pred - v_target) ** 2)
        if self.cos_coef == 0:  # the MSE alone, bit for bit; the direction term is only watched
            return {"loss": mse, "mse": mse, "cos": velocity_direction_loss(v_pred.detach(), v_target)}
        cos = velocity_direction_loss(v_pred, v_target)
        return {"loss": mse + self.cos_coef * cos, "mse": mse, "cos": cos}


def velocity_direction_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """LightningDiT's cosine loss as its code computes it: 1 - cosine similarity of the predicted and
    target velocity over the channels at each position, averaged over positions: (N, C, ...) -> (N,).
    Per position, so each pixel's latent vector is pointed the right way, not only the latent as a
    whole. (With a single channel the cosine is a sign, and the term has no gradient.)"""
    return mean_flat(1 - F.cosine_similarity(v_pred, v_target, dim=1))
