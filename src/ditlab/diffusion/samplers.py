"""Samplers: plain functions over any callable model, in one registry, with one signature
(k-diffusion's habit):

    x0 = SAMPLERS[name].fn(model, x, objective, steps, model_kwargs=..., noise=..., progress=..., **options)

``model(x, t, **model_kwargs)`` is a DiT, a ``CFGModel`` wrapping one, or an analytic function in
tests; guidance never appears here. ``objective`` is the process the model was trained with (the
1000-step ``GaussianDiffusion`` or ``FlowMatching``): it owns the math (posterior, x0 from eps,
velocity), the sampler owns the solver. ``noise(like)`` draws the fresh noise of stochastic
samplers (``generate`` passes per-sample streams; default ``torch.randn_like``).

    name          objective   algorithm                                                   NFE
    ddpm          gaussian    ancestral sampling on the respaced process (learned var)    steps
    ddim          gaussian    DDIM on the respaced process (``eta`` = 0: deterministic)    steps
    dpmpp_2m      gaussian    DPM-Solver++ 2M (diffusers' solver on the training betas)    steps
    unipc         gaussian    UniPC, order 2 (diffusers)                                   steps
    ode_euler     gaussian    Euler on the probability-flow ODE in VE form (k-diffusion)   steps
    ode_heun      gaussian    Heun on the same ODE                                         2 steps - 1
    flow_euler    flow        Euler on the flow ODE from t = 1 to 0                        steps
    flow_heun     flow        Heun on the flow ODE (Euler on the last interval)            2 steps - 1
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion


def _randn_like(like: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(like)


def _batch_t(value, x: torch.Tensor, dtype=torch.long) -> torch.Tensor:
    return torch.full((x.shape[0],), value, device=x.device, dtype=dtype)


# ------------------------------------------------------------------------------ Gaussian: respaced loops
def ddpm(model, x, objective: GaussianDiffusion, steps: int, model_kwargs=None, noise=None, progress=False):
    """Ancestral sampling: x_{t-1} ~ p(x_{t-1} | x_t) on the process respaced to ``steps``."""
    process = objective.respaced(steps)
    noise = noise or _randn_like
    for i in tqdm(range(process.num_timesteps - 1, -1, -1), disable=not progress, desc="ddpm"):
        out = process.p_mean_variance(model, x, _batch_t(i, x), model_kwargs)
        x = out["mean"] if i == 0 else out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise(x)
    return x


def ddim(model, x, objective: GaussianDiffusion, steps: int, model_kwargs=None, noise=None, progress=False, eta=0.0):
    """DDIM (Song et al. 2021) on the process respaced to ``steps``; ``eta`` > 0 adds noise (1: DDPM-like)."""
    if eta < 0:
        raise ValueError(f"sampler eta={eta} must be >= 0")
    process = objective.respaced(steps)
    noise = noise or _randn_like
    for i in tqdm(range(process.num_timesteps - 1, -1, -1), disable=not progress, desc="ddim"):
        t = _batch_t(i, x)
        out = process.p_mean_variance(model, x, t, model_kwargs)
        eps = process.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar, abar_prev = process.alphas_cumprod[i].item(), process.alphas_cumprod_prev[i].item()
        sigma = eta * ((1 - abar_prev) / (1 - abar)) ** 0.5 * (1 - abar / abar_prev) ** 0.5
        x = out["pred_xstart"] * abar_prev**0.5 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if eta > 0 and i > 0:
            x = x + sigma * noise(x)
    return x


# ------------------------------------------------------------------------------ Gaussian: diffusers solvers
def _diffusers_solver(make_scheduler: Callable, label: str):
    """A sampler that runs a diffusers scheduler built on the objective's training betas; the model
    sees the original (possibly fractional) training timesteps and only its eps channels are used."""

    def solve(model, x, objective: GaussianDiffusion, steps: int, model_kwargs=None, noise=None, progress=False):
        scheduler = make_scheduler(
            num_train_timesteps=objective.num_timesteps,
            trained_betas=objective.betas.numpy(),
            prediction_type="epsilon",
        )
        scheduler.set_timesteps(steps, device=x.device)
        x = x * scheduler.init_noise_sigma
        c = x.shape[1]
        for t in tqdm(scheduler.timesteps, disable=not progress, desc=label):
            eps = model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]), **(model_kwargs or {}))[:, :c]
            x = scheduler.step(eps, t, x).prev_sample
        return x

    solve.__name__ = label
    solve.__doc__ = f"{label}: diffusers' scheduler on the training betas (see the module table)."
    return solve


def _dpmpp_2m(**common):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)


def _unipc(**common):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**common, solver_order=2)


def _euler_ve(**common):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**common)


def _heun_ve(**common):
    from diffusers import HeunDiscreteScheduler

    return HeunDiscreteScheduler(**common)


dpmpp_2m = _diffusers_solver(_dpmpp_2m, "dpmpp_2m")
unipc = _diffusers_solver(_unipc, "unipc")
ode_euler = _diffusers_solver(_euler_ve, "ode_euler")
ode_heun = _diffusers_solver(_heun_ve, "ode_heun")


# ------------------------------------------------------------------------------ flow matching
def _flow_ode(model, x, objective: FlowMatching, steps: int, model_kwargs, progress, heun: bool, label: str):
    grid = torch.linspace(1.0, 0.0, steps + 1, device=x.device)  # t = 1 is pure noise
    for i in tqdm(range(steps), disable=not progress, desc=label):
        t, t_next = grid[i].expand(x.shape[0]), grid[i + 1].expand(x.shape[0])
        dt = (grid[i + 1] - grid[i]).item()  # negative
        v = objective.velocity(model, x, t, model_kwargs)
        x_euler = x + dt * v
        if heun and i < steps - 1:  # the last interval ends at t = 0, where Heun's second call is skipped
            x = x + dt * 0.5 * (v + objective.velocity(model, x_euler, t_next, model_kwargs))
        else:
            x = x_euler
    return x


def flow_euler(model, x, objective: FlowMatching, steps: int, model_kwargs=None, noise=None, progress=False):
    """Euler on dx/dt = v(x, t) from t = 1 to 0 on a uniform grid of ``steps`` intervals."""
    return _flow_ode(model, x, objective, steps, model_kwargs, progress, heun=False, label="flow_euler")


def flow_heun(model, x, objective: FlowMatching, steps: int, model_kwargs=None, noise=None, progress=False):
    """Heun (2nd order) on the flow ODE; NFE = 2 steps - 1."""
    return _flow_ode(model, x, objective, steps, model_kwargs, progress, heun=True, label="flow_heun")


# ------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class SamplerSpec:
    fn: Callable
    objective: type
    second_order: bool = False

    def nfe(self, steps: int) -> int:
        """Model evaluations per sample (guidance batches cond + uncond into the same evaluation)."""
        return 2 * steps - 1 if self.second_order else steps


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(ddpm, GaussianDiffusion),
    "ddim": SamplerSpec(ddim, GaussianDiffusion),
    "dpmpp_2m": SamplerSpec(dpmpp_2m, GaussianDiffusion),
    "unipc": SamplerSpec(unipc, GaussianDiffusion),
    "ode_euler": SamplerSpec(ode_euler, GaussianDiffusion),
    "ode_heun": SamplerSpec(ode_heun, GaussianDiffusion, second_order=True),
    "flow_euler": SamplerSpec(flow_euler, FlowMatching),
    "flow_heun": SamplerSpec(flow_heun, FlowMatching, second_order=True),
}


def samplers_for(objective) -> tuple[str, ...]:
    return tuple(name for name, spec in SAMPLERS.items() if isinstance(objective, spec.objective))


# The fast solver of each objective (what FID during training uses unless told otherwise):
# DPM-Solver++ 20 steps costs a twelfth of DDPM-250's evaluations.
FAST_SAMPLERS = {GaussianDiffusion: ("dpmpp_2m", 20), FlowMatching: ("flow_heun", 25)}


class Sampler:
    """A validated sampler choice from config: ``name``, ``steps`` (DDPM/DDIM: respaced steps) and
    the sampler's own options (``eta`` for ddim). ``sampler(model, objective, x, model_kwargs, noise)``."""

    def __init__(self, name: str = "ddpm", steps: int = 250, **options):
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; expected one of {tuple(SAMPLERS)}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"sampler steps={steps!r} must be a positive integer")
        accepted = set(inspect.signature(SAMPLERS[name].fn).parameters) - {
            "model",
            "x",
            "objective",
            "steps",
            "model_kwargs",
            "noise",
            "progress",
        }
        unknown = set(options) - accepted
        if unknown:
            raise ValueError(
                f"sampler {name!r} has no option {sorted(unknown)[0]!r}; its options: {sorted(accepted) or 'none'}"
            )
        if options.get("eta", 0) < 0:
            raise ValueError(f"sampler eta={options['eta']} must be >= 0")
        self.name, self.steps, self.options = name, steps, dict(options)

    @property
    def spec(self) -> SamplerSpec:
        return SAMPLERS[self.name]

    def check(self, objective) -> None:
        """Fail early (at config time) for a sampler the objective cannot run."""
        if not isinstance(objective, self.spec.objective):
            raise ValueError(
                f"sampler {self.name!r} needs a {self.spec.objective.__name__} objective; "
                f"{type(objective).__name__} supports {samplers_for(objective)}"
            )
        if isinstance(objective, GaussianDiffusion) and self.steps > objective.num_timesteps:
            raise ValueError(
                f"sampler steps={self.steps} exceeds the {objective.num_timesteps} steps of the diffusion process"
            )

    def nfe(self) -> int:
        return self.spec.nfe(self.steps)

    @classmethod
    def fast(cls, objective) -> Sampler:
        """The objective's fast solver (``FAST_SAMPLERS``)."""
        for kind, (name, steps) in FAST_SAMPLERS.items():
            if isinstance(objective, kind):
                return cls(name, steps)
        raise ValueError(
            f"no fast sampler for a {type(objective).__name__} objective; expected one of {list(FAST_SAMPLERS)}"
        )

    @torch.no_grad()
    def __call__(self, model: Callable, objective, x: torch.Tensor, model_kwargs=None, noise=None, progress=False):
        self.check(objective)
        return self.spec.fn(
            model, x, objective, self.steps, model_kwargs=model_kwargs, noise=noise, progress=progress, **self.options
        )

    def __repr__(self) -> str:
        return f"Sampler({self.describe()})"

    def describe(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{self.name} x {self.steps} steps{options}"
