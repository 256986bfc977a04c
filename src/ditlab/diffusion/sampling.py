"""One entry point for every sampler: ``Sampler(name, steps)(model, objective, noise, y)``.

``model`` is any callable ``model(x, t, y)``: a DiT, a ``CFGModel`` wrapping one, or an analytic
function in tests. ``objective`` is the process the model was trained with (the 1000-step
``GaussianDiffusion`` or ``FlowMatching``); each sampler builds what it needs from it.

    ddpm    ancestral sampling on the respaced process (learned or fixed variance)
    ddim    DDIM on the respaced process (``eta`` = 0: deterministic)
    dpmpp   DPM-Solver++ 2M (diffusers), eps from the model, training betas
    unipc   UniPC (diffusers)
    euler   Gaussian: diffusers' Euler on the VE-form ODE; flow: Euler on the flow ODE
    heun    Gaussian: diffusers' Heun;                       flow: Heun on the flow ODE
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.schedules import respaced_betas, space_timesteps

GAUSSIAN_SAMPLERS = ("ddpm", "ddim", "dpmpp", "unipc", "euler", "heun")
FLOW_SAMPLERS = ("euler", "heun")


def _diffusers_scheduler(name: str, betas: torch.Tensor):
    import diffusers

    common = dict(num_train_timesteps=len(betas), trained_betas=betas.numpy(), prediction_type="epsilon")
    if name == "dpmpp":
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler(**common, solver_order=2)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**common)
    if name == "heun":
        return diffusers.HeunDiscreteScheduler(**common)
    raise ValueError(f"no diffusers scheduler for sampler {name!r}")


def respace(diffusion: GaussianDiffusion, spacing: str | int) -> GaussianDiffusion:
    """The process that visits only ``space_timesteps(T, spacing)`` of a full T-step process."""
    if (
        len(diffusion.timestep_map) != diffusion.num_timesteps
        or diffusion.timestep_map[-1] != diffusion.num_timesteps - 1
    ):
        raise ValueError("respace() needs the full (training) process, not an already respaced one")
    keep = space_timesteps(diffusion.num_timesteps, spacing)
    if len(keep) == diffusion.num_timesteps:
        return diffusion
    return GaussianDiffusion(respaced_betas(diffusion.alphas_cumprod, keep), diffusion.variance_type, timestep_map=keep)


@dataclass
class Sampler:
    """A validated sampler choice. ``steps`` is the number of solver steps (DDPM: respaced steps)."""

    name: str = "ddpm"
    steps: int = 250
    eta: float = 0.0

    def __post_init__(self):
        if self.name not in GAUSSIAN_SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; expected one of {GAUSSIAN_SAMPLERS}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler steps={self.steps!r} must be a positive integer")
        if self.eta < 0:
            raise ValueError(f"sampler eta={self.eta} must be >= 0")

    def check(self, objective) -> None:
        """Fail early (at config time) for a sampler the objective cannot run."""
        if isinstance(objective, FlowMatching):
            if self.name not in FLOW_SAMPLERS:
                raise ValueError(
                    f"sampler {self.name!r} needs a Gaussian diffusion; flow matching supports {FLOW_SAMPLERS}"
                )
        elif isinstance(objective, GaussianDiffusion):
            if self.steps > objective.num_timesteps:
                raise ValueError(
                    f"sampler steps={self.steps} exceeds the {objective.num_timesteps} steps of the diffusion process"
                )
        else:
            raise TypeError(f"unknown objective {type(objective).__name__}")

    def nfe(self) -> int:
        """Model evaluations per sample (guidance batches cond + uncond into the same evaluation)."""
        if self.name == "heun":
            return 2 * self.steps - 1
        return self.steps

    @torch.no_grad()
    def __call__(
        self,
        model: Callable,
        objective,
        noise: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        self.check(objective)
        kwargs = {"y": y}
        if isinstance(objective, FlowMatching):
            return objective.sample_ode(model, noise, self.steps, self.name, kwargs, progress)
        if self.name in ("ddpm", "ddim"):
            process = respace(objective, str(self.steps))
            if self.name == "ddpm":
                return process.p_sample_loop(model, noise.shape, noise, kwargs, progress=progress, generator=generator)
            return process.ddim_sample_loop(
                model, noise.shape, noise, kwargs, progress=progress, eta=self.eta, generator=generator
            )
        return self._diffusers_loop(model, objective, noise, kwargs, progress)

    def _diffusers_loop(self, model, diffusion: GaussianDiffusion, noise, kwargs, progress) -> torch.Tensor:
        scheduler = _diffusers_scheduler(self.name, diffusion.betas)
        scheduler.set_timesteps(self.steps, device=noise.device)
        x = noise * scheduler.init_noise_sigma
        c = noise.shape[1]
        for t in tqdm(scheduler.timesteps, disable=not progress, desc=self.name):
            model_input = scheduler.scale_model_input(x, t)
            t_batch = t.expand(x.shape[0])  # original (training) timestep, maybe fractional
            eps = model(model_input, t_batch, **kwargs)[:, :c]
            x = scheduler.step(eps, t, x).prev_sample
        return x
