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
    flow_sde      flow        SiT's stochastic sampler on the reverse SDE: Euler-Maruyama  steps
                              (``solver`` heun: SiT's Heun SDE, 2 evaluations a noisy step),
                              ``diffusion`` form and ``diffusion_norm``, the last step
                              without noise (``last_step``: mean | euler | tweedie | none)

The flow samplers take ``shift`` (default 1.0: none), SD3's timestep shift of the sampling grid,
t' = s t / (1 + (s - 1) t) with t = 1 pure noise: s > 1 spends more steps at high noise. It is an
option of the sampler, not of the objective, because it changes where the solver evaluates the
model, not what the model learned. LightningDiT's ``timestep_shift`` counts time the other way
(t = 1 is data there), so its 0.3 is ``shift`` = 1 / 0.3 here.
"""

from __future__ import annotations

import inspect
import math
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


def check_eta(eta: float) -> None:
    if eta < 0:
        raise ValueError(f"sampler eta={eta} must be >= 0")


def ddim(model, x, objective: GaussianDiffusion, steps: int, model_kwargs=None, noise=None, progress=False, eta=0.0):
    """DDIM (Song et al. 2021) on the process respaced to ``steps``; ``eta`` > 0 adds noise (1: DDPM-like)."""
    check_eta(eta)
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
LAST_STEPS = ("mean", "euler", "tweedie", "none")
SDE_SOLVERS = ("euler", "heun")
# SiT's diffusion coefficients w(t) of the reverse SDE (``ICPlan.compute_diffusion``, its "sigma" the
# command-line default); written in ditlab's time (t = 1 noise), where SiT's time is 1 - t.
DIFFUSION_FORMS = ("sigma", "sbdm", "constant", "linear", "decreasing", "increasing_decreasing")


def check_shift(shift: float) -> None:
    if not shift > 0 or shift == float("inf"):
        raise ValueError(f"sampler shift={shift} must be a finite number > 0 (1: no shift)")


def check_last_step(last_step: str) -> None:
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown sampler last_step={last_step!r}; expected one of {LAST_STEPS}")


def check_last_step_size(last_step_size: float) -> None:
    if not 0 < last_step_size < 1:
        raise ValueError(f"sampler last_step_size={last_step_size} must be in (0, 1)")


def check_diffusion(diffusion: str) -> None:
    if diffusion not in DIFFUSION_FORMS:
        raise ValueError(f"unknown sampler diffusion={diffusion!r}; expected one of {DIFFUSION_FORMS}")


def check_diffusion_norm(diffusion_norm: float) -> None:
    if not diffusion_norm >= 0 or diffusion_norm == float("inf"):
        raise ValueError(f"sampler diffusion_norm={diffusion_norm} must be a finite number >= 0")


def check_solver(solver: str) -> None:
    if solver not in SDE_SOLVERS:
        raise ValueError(f"unknown sampler solver={solver!r}; expected one of {SDE_SOLVERS}")


def check_sample_eps(sample_eps: float) -> None:
    if not 0 <= sample_eps < 1:
        raise ValueError(f"sampler sample_eps={sample_eps} must be in [0, 1)")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift (Esser et al. 2024): t' = s t / (1 + (s - 1) t). It keeps 0 and 1 and is
    monotone; s = 1 is the identity bit for bit (1 * t / (1 + 0 * t) = t in floating point)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """The ODE solvers' ``steps + 1`` times from t = 1 (pure noise) to 0: uniform, then shifted."""
    check_shift(shift)
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def sde_time_grid(
    steps: int, last_step_size: float, shift: float = 1.0, device=None, start: float = 1.0, last_step: bool = True
) -> torch.Tensor:
    """``flow_sde``'s times: ``steps - 1`` Euler-Maruyama intervals from t = ``start`` (1: pure noise)
    to ``last_step_size``, then the last interval to 0 (``steps + 1`` times). Without a last step
    (``last_step=False``, SiT's ``last_step=None``) the ``steps - 1`` intervals run to
    ``last_step_size`` (SiT: its sample_eps, 0 for velocity models) and stop there (``steps`` times).
    The shift moves the inner times, not the ends: the uniform part runs between the points that the
    shift maps onto the ends."""
    check_shift(shift)
    if last_step or last_step_size > 0:
        check_last_step_size(last_step_size)

    def unshifted(t: float) -> float:  # the inverse shift; the ends 0 and 1 stay exactly
        return t if t in (0.0, 1.0) else shift_time(torch.tensor(t, dtype=torch.float64), 1 / shift).item()

    noisy = shift_time(torch.linspace(unshifted(start), unshifted(last_step_size), steps, device=device), shift)
    return torch.cat([noisy, noisy.new_zeros(1)]) if last_step else noisy


def _flow_ode(model, x, objective: FlowMatching, steps: int, model_kwargs, progress, heun: bool, label: str, shift):
    grid = flow_time_grid(steps, shift, device=x.device)  # t = 1 is pure noise
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


def flow_euler(model, x, objective: FlowMatching, steps: int, model_kwargs=None, noise=None, progress=False, shift=1.0):
    """Euler on dx/dt = v(x, t) from t = 1 to 0 on ``steps`` intervals (uniform, then shifted)."""
    return _flow_ode(model, x, objective, steps, model_kwargs, progress, heun=False, label="flow_euler", shift=shift)


def flow_heun(model, x, objective: FlowMatching, steps: int, model_kwargs=None, noise=None, progress=False, shift=1.0):
    """Heun (2nd order) on the flow ODE; NFE = 2 steps - 1."""
    return _flow_ode(model, x, objective, steps, model_kwargs, progress, heun=True, label="flow_heun", shift=shift)


def flow_score(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad log p_t(x) from the velocity, for x_t = (1 - t) x_0 + t eps: x_0 = eps - v gives
    E[eps | x_t] = x_t + (1 - t) v, and the score of the Gaussian noise part is -E[eps | x_t] / t."""
    return -(x + (1 - t) * v) / t


def diffusion_coefficient(form: str, t: torch.Tensor, norm: float = 1.0) -> torch.Tensor:
    """SiT's w(t) (``ICPlan.compute_diffusion``) at ditlab's t (t = 1 noise; SiT's time s = 1 - t):
    sigma and linear norm * t (SiT's sigma_s = 1 - s), sbdm norm * t / (1 - t) (its compute_drift's
    "diffusion", infinite at pure noise), constant norm, decreasing 0.25 (norm cos(pi s) + 1)^2,
    increasing_decreasing norm sin(pi s)^2 (SiT's code spells that key "inccreasing-decreasing", so
    its command line cannot reach it; the formula is the one it holds)."""
    s = 1 - t
    if form in ("sigma", "linear"):
        return norm * t
    if form == "sbdm":
        return norm * t / s
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * s) + 1) ** 2
    return norm * torch.sin(math.pi * s) ** 2  # increasing_decreasing


def flow_sde(
    model,
    x,
    objective: FlowMatching,
    steps: int,
    model_kwargs=None,
    noise=None,
    progress=False,
    shift=1.0,
    last_step="mean",
    last_step_size=0.04,
    diffusion="sigma",
    diffusion_norm=1.0,
    solver="euler",
    sample_eps=0.0,
):
    """SiT's stochastic sampler (Ma et al. 2024, ``Sampler.sample_sde``; its command-line defaults are
    this function's): the reverse SDE that has the flow's marginals,

        dx = [v(x, t) - w(t) score(x, t)] dt + sqrt(2 w(t)) dW,   t from 1 to 0 (dt < 0),

    with the score from the velocity (``flow_score``) and SiT's diffusion coefficient w
    (``diffusion``, ``diffusion_norm``: ``diffusion_coefficient``; "sigma", w(t) = t, is much noise
    early and none at the data). ``steps - 1`` noisy steps to t = ``last_step_size``, then one step to
    t = 0 without noise, where the score divides by t: ``last_step`` "mean" (the SDE's drift, SiT's
    default), "euler" (the ODE's velocity), "tweedie" (x_0 = (x + t^2 score) / (1 - t) at
    t = last_step_size: the posterior mean) or "none" (no last step: the noisy steps run to 0).
    ``solver``: "euler" (Euler-Maruyama) or "heun" (SiT's Heun SDE: noise first, then Heun on the
    drift, 2 evaluations a step). ``sample_eps`` (SiT's): SBDM's noisy steps start at t = 1 - sample_eps,
    and without a last step they end at t = sample_eps. SiT's velocity models force it to 0, where
    SBDM's w is infinite (NaN there): refused here.
    NFE: (steps - 1) x (1 or 2) + (1 with a last step); noise from ``noise(like)``."""
    for check, value in ((check_last_step, last_step), (check_diffusion, diffusion), (check_solver, solver)):
        check(value)
    check_diffusion_norm(diffusion_norm)
    check_sample_eps(sample_eps)
    if steps < 2:
        raise ValueError(f"sampler flow_sde needs steps >= 2 (noisy steps, then the last one), got {steps}")
    check_sde_options(dict(diffusion=diffusion, sample_eps=sample_eps))
    noise = noise or _randn_like
    has_last = last_step != "none"
    # SiT's check_interval: SBDM starts sample_eps from the noise; without a last step the noisy steps
    # end sample_eps from the data (else at last_step_size, where the last step takes over)
    start = 1 - sample_eps if diffusion == "sbdm" else 1.0
    grid = sde_time_grid(steps, last_step_size if has_last else sample_eps, shift, x.device, start, has_last)

    def sde_drift(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = objective.velocity(model, x, t.expand(x.shape[0]), model_kwargs)
        return v - diffusion_coefficient(diffusion, t, diffusion_norm) * flow_score(x, v, t), v

    noisy_steps = steps - 1
    for i in tqdm(range(noisy_steps), disable=not progress, desc="flow_sde"):
        t, t_next = grid[i], grid[i + 1]  # 0-d tensors, no host sync
        dt = t_next - t  # < 0
        w = diffusion_coefficient(diffusion, t, diffusion_norm)
        if solver == "euler":
            drift, _ = sde_drift(x, t)
            x = x + dt * drift + torch.sqrt(-2 * w * dt) * noise(x)
        else:  # SiT's Heun SDE: the step's noise first, then Heun on the drift from there
            x_hat = x + torch.sqrt(-2 * w * dt) * noise(x)
            k1, _ = sde_drift(x_hat, t)
            k2, _ = sde_drift(x_hat + dt * k1, t_next)
            x = x_hat + 0.5 * dt * (k1 + k2)
    if not has_last:
        return x
    t = grid[noisy_steps]  # = last_step_size; the last interval ends at t = 0
    drift, v = sde_drift(x, t)
    if last_step == "mean":
        return x - t * drift
    if last_step == "euler":
        return x - t * v
    return (x + t**2 * flow_score(x, v, t)) / (1 - t)  # tweedie: x / alpha + sigma^2 / alpha * score


def check_sde_options(options: dict) -> None:
    """What one option cannot check alone: SBDM's coefficient t / (1 - t) is infinite at t = 1."""
    if options.get("diffusion") == "sbdm" and options.get("sample_eps", 0.0) == 0:
        raise ValueError(
            "sampler diffusion=sbdm starts where its coefficient t / (1 - t) is infinite (t = 1, pure noise); "
            "expected sample_eps > 0 (SiT's velocity models force sample_eps = 0 there: NaN)"
        )


def flow_sde_nfe(steps: int, options: dict) -> int:
    per_step = 2 if options.get("solver", "euler") == "heun" else 1
    return (steps - 1) * per_step + (options.get("last_step", "mean") != "none")


# ------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class SamplerSpec:
    fn: Callable
    objective: type
    second_order: bool = False
    min_steps: int = 1
    count_nfe: Callable[[int, dict], int] | None = None  # where the options decide it
    check_options: Callable[[dict], None] | None = None  # options checked together, at config time

    def nfe(self, steps: int, options: dict | None = None) -> int:
        """Model evaluations per sample (guidance batches cond + uncond into the same evaluation)."""
        if self.count_nfe is not None:
            return self.count_nfe(steps, options or {})
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
    "flow_sde": SamplerSpec(
        flow_sde, FlowMatching, min_steps=2, count_nfe=flow_sde_nfe, check_options=check_sde_options
    ),
}


# The samplers' own options, checked when a Sampler is configured (before any model is built).
OPTION_CHECKS: dict[str, Callable] = {
    "eta": check_eta,
    "shift": check_shift,
    "last_step": check_last_step,
    "last_step_size": check_last_step_size,
    "diffusion": check_diffusion,
    "diffusion_norm": check_diffusion_norm,
    "solver": check_solver,
    "sample_eps": check_sample_eps,
}


def samplers_for(objective) -> tuple[str, ...]:
    return tuple(name for name, spec in SAMPLERS.items() if isinstance(objective, spec.objective))


# The fast solver of each objective (what FID during training uses unless told otherwise):
# DPM-Solver++ 20 steps costs a twelfth of DDPM-250's evaluations.
FAST_SAMPLERS = {GaussianDiffusion: ("dpmpp_2m", 20), FlowMatching: ("flow_heun", 25)}


class Sampler:
    """A validated sampler choice from config: ``name``, ``steps`` (DDPM/DDIM: respaced steps) and
    the sampler's own options (``eta`` for ddim; ``shift`` for the flow samplers, and ``last_step``,
    ``last_step_size``, ``diffusion``, ``diffusion_norm``, ``solver``, ``sample_eps`` for flow_sde).
    ``sampler(model, objective, x, model_kwargs, noise)``."""

    def __init__(self, name: str = "ddpm", steps: int = 250, **options):
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; expected one of {tuple(SAMPLERS)}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < SAMPLERS[name].min_steps:
            raise ValueError(f"sampler steps={steps!r} must be an integer >= {SAMPLERS[name].min_steps} for {name}")
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
        for option, value in options.items():
            if option in OPTION_CHECKS:
                OPTION_CHECKS[option](value)
        if SAMPLERS[name].check_options is not None:
            SAMPLERS[name].check_options(options)
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
        return self.spec.nfe(self.steps, self.options)

    @classmethod
    def fast(cls, objective) -> Sampler:
        """The objective's fast solver (``FAST_SAMPLERS``)."""
        for kind, (name, steps) in FAST_SAMPLERS.items():
            if isinstance(objective, kind):
                return cls(name, steps)
        kinds = [kind.__name__ for kind in FAST_SAMPLERS]
        raise ValueError(f"no fast sampler for a {type(objective).__name__} objective; expected one of {kinds}")

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
