"""Gaussian diffusion and flow matching: analytic checks, not just "it runs"."""

import math

import pytest
import torch

from ditlab.diffusion import SAMPLERS, CFGModel, FlowMatching, Sampler, create_diffusion, official_forward_with_cfg
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.schedules import cosine_betas, linear_betas, space_timesteps
from ditlab.models.dit import DiT

# Data std: x0 ~ N(0, S^2 I). With S = 2 the first-order solvers' discretisation error at 50 steps is
# ~3% (measured: DDIM-50 0.973 S, DPM-Solver++-20 1.008 S, DDPM-250 0.991 S); at S = 0.5 the
# coarse steps at low noise cost DDIM-50 5% (0.947 S), which is the solver, not a bug.
S = 2.0


def optimal_eps_model(diffusion: GaussianDiffusion, learned_variance: bool = False):
    """E[eps | x_t] for Gaussian data, as a 'model' called with original (maybe fractional) timesteps."""
    abar_table = diffusion.alphas_cumprod

    def abar(t):
        t = t.double().cpu()
        lo, hi = t.floor().long(), t.ceil().long().clamp(max=len(abar_table) - 1)
        w = t - lo
        return ((1 - w) * abar_table[lo] + w * abar_table[hi]).float().view(-1, 1, 1, 1)

    def model(x, t, y=None):
        a = abar(t)
        eps = torch.sqrt(1 - a) * x / (a * S**2 + 1 - a)
        if learned_variance:  # v = -1: frac = 0, the (clipped) posterior variance
            return torch.cat([eps, -torch.ones_like(eps)], dim=1)
        return eps

    return model


def check_gaussian_samples(samples, rel=0.05):
    assert samples.std().item() == pytest.approx(S, rel=rel)
    assert abs(samples.mean().item()) < 0.03 * S


@pytest.mark.parametrize(
    "name,steps,learn_sigma,rel",
    [
        ("ddpm", 250, False, 0.03),
        ("ddpm", 250, True, 0.03),
        ("ddim", 50, False, 0.05),
        ("ddim", 50, True, 0.05),
        ("dpmpp_2m", 20, False, 0.02),
        ("unipc", 20, False, 0.02),
        ("ode_euler", 50, False, 0.05),
        ("ode_heun", 20, False, 0.03),
    ],
)
def test_samplers_recover_gaussian_data(name, steps, learn_sigma, rel):
    diffusion = create_diffusion(learn_sigma=learn_sigma)
    noise = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(2000, dtype=torch.long)
    gen = torch.Generator().manual_seed(2)
    fresh_noise = lambda like: torch.randn(like.shape, generator=gen)  # noqa: E731
    model = optimal_eps_model(diffusion, learn_sigma)
    samples = Sampler(name, steps)(model, diffusion, noise, {"y": y}, noise=fresh_noise)
    check_gaussian_samples(samples, rel)


def test_every_registered_sampler_is_tested_against_its_objective():
    tested = {"ddpm", "ddim", "dpmpp_2m", "unipc", "ode_euler", "ode_heun", "flow_euler", "flow_heun", "flow_sde"}
    assert set(SAMPLERS) == tested


def test_ddim_with_eta_one_is_as_noisy_as_ddpm_and_eta_zero_is_deterministic():
    diffusion = create_diffusion(learn_sigma=False)
    model = optimal_eps_model(diffusion)
    x = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    a = Sampler("ddim", 20)(model, diffusion, x, noise=lambda like: torch.randn_like(like))
    b = Sampler("ddim", 20)(model, diffusion, x, noise=lambda like: torch.randn_like(like))
    assert torch.equal(a, b)  # eta = 0 never draws
    noisy = Sampler("ddim", 250, eta=1.0)(model, diffusion, x)  # stochastic: needs more steps
    check_gaussian_samples(noisy, 0.05)
    with pytest.raises(ValueError, match="has no option 'eta'"):
        Sampler("ddpm", 50, eta=1.0)


def optimal_velocity(x, t, y=None):
    t = (t / 1000.0).view(-1, 1, 1, 1)  # the model sees t * time_scale
    return (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * x


@pytest.mark.parametrize("name,steps,rel", [("flow_euler", 50, 0.05), ("flow_heun", 10, 0.02)])
def test_flow_samplers_recover_gaussian_data(name, steps, rel):
    noise = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    samples = Sampler(name, steps)(optimal_velocity, FlowMatching(), noise)
    check_gaussian_samples(samples, rel)


def test_flow_optimal_velocity_beats_others_in_loss():
    flow = FlowMatching()
    x0, noise = S * torch.randn(20000, 1, 2, 2), torch.randn(20000, 1, 2, 2)
    t = flow.sample_t(20000)
    best = flow.training_losses(optimal_velocity, x0, t, noise=noise)["loss"].mean()
    worse = flow.training_losses(lambda x, tt, y=None: 1.5 * optimal_velocity(x, tt), x0, t, noise=noise)["loss"].mean()
    assert best < worse


def test_q_sample_mean_and_variance():
    diffusion = create_diffusion()
    x0 = torch.full((20000, 1, 1, 1), 2.0)
    t = torch.full((20000,), 300, dtype=torch.long)
    xt = diffusion.q_sample(x0, t)
    abar = diffusion.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(2.0 * math.sqrt(abar), abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.03)


def test_true_noise_gives_zero_mse():
    diffusion = create_diffusion(learn_sigma=False)
    x0, noise = torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4)
    t = diffusion.sample_t(8)
    terms = diffusion.training_losses(lambda x, tt, y=None: noise, x0, t, noise=noise)
    assert torch.equal(terms["mse"], torch.zeros(8)) and torch.equal(terms["loss"], terms["mse"])


def test_vb_term_equals_independent_gaussian_kl():
    diffusion = create_diffusion(learn_sigma=True)
    betas = linear_betas(1000)
    abar = torch.cumprod(1 - betas, 0)
    x0, noise = torch.randn(6, 2, 4, 4).double(), torch.randn(6, 2, 4, 4).double()
    v = torch.rand(6, 2, 4, 4).double() * 2 - 1
    eps_hat = noise + 0.3 * torch.randn(6, 2, 4, 4).double()
    t = torch.tensor([1, 5, 100, 400, 800, 999])
    out = lambda x, tt, y=None: torch.cat([eps_hat, v], dim=1).float()  # noqa: E731
    terms = diffusion.training_losses(out, x0.float(), t, noise=noise.float())

    # Independent computation in float64 from the textbook formulas.
    a_t, a_prev, b_t = abar[t].view(-1, 1, 1, 1), abar[t - 1].view(-1, 1, 1, 1), betas[t].view(-1, 1, 1, 1)
    xt = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    post_var = b_t * (1 - a_prev) / (1 - a_t)
    mean_q = (a_prev.sqrt() * b_t / (1 - a_t)) * x0 + ((1 - b_t).sqrt() * (1 - a_prev) / (1 - a_t)) * xt
    x0_hat = (xt - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
    mean_p = (a_prev.sqrt() * b_t / (1 - a_t)) * x0_hat + ((1 - b_t).sqrt() * (1 - a_prev) / (1 - a_t)) * xt
    frac = (v + 1) / 2
    logvar_p = frac * b_t.log() + (1 - frac) * post_var.log()
    kl = 0.5 * (logvar_p - post_var.log() + (post_var + (mean_q - mean_p) ** 2) / logvar_p.exp() - 1)
    expected = kl.mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(terms["vb"].double(), expected, rtol=2e-3, atol=1e-5)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_term_trains_only_the_variance():
    diffusion = create_diffusion(learn_sigma=True)
    out = torch.randn(4, 4, 2, 2, requires_grad=True)
    terms = diffusion.training_losses(
        lambda x, t, y=None: out, torch.randn(4, 2, 2, 2), torch.tensor([3, 50, 500, 900])
    )
    terms["vb"].sum().backward()
    assert torch.equal(out.grad[:, :2], torch.zeros(4, 2, 2, 2)) and out.grad[:, 2:].abs().sum() > 0


def test_respaced_process_hands_model_original_timesteps():
    base = create_diffusion(learn_sigma=False)
    seen = []

    def model(x, t, y=None):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    Sampler("ddpm", 250)(model, base, torch.randn(1, 1, 2, 2))
    assert seen == sorted(space_timesteps(1000, "250"), reverse=True)
    assert seen[0] == 999 and seen[-1] == 0 and len(seen) == 250
    ddim = create_diffusion("ddim50")
    assert ddim.timestep_map.tolist() == list(range(0, 1000, 20))
    # the respaced process keeps alpha-bar at the kept steps
    assert torch.allclose(ddim.alphas_cumprod, base.alphas_cumprod[ddim.timestep_map])
    assert torch.allclose(base.respaced(250).alphas_cumprod, create_diffusion("250").alphas_cumprod)
    with pytest.raises(ValueError, match="already respaced"):
        ddim.respaced(10)


def test_schedules_and_respacing_errors():
    assert linear_betas(1000)[0].item() == pytest.approx(1e-4) and linear_betas(1000)[-1].item() == pytest.approx(0.02)
    assert linear_betas(1000).dtype == torch.float64
    assert (cosine_betas(1000) <= 0.999).all()
    with pytest.raises(ValueError, match="ddim999"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot respace"):
        space_timesteps(1000, "2000")
    with pytest.raises(ValueError, match="unknown noise_schedule"):
        create_diffusion(noise_schedule="quadratic")
    with pytest.raises(ValueError, match="unknown sampler 'ddmp'"):
        Sampler("ddmp", 10)
    with pytest.raises(ValueError, match="steps=0"):
        Sampler("ddim", 0)
    with pytest.raises(ValueError, match="FlowMatching supports .'flow_euler', 'flow_heun'."):
        Sampler("dpmpp_2m", 10).check(FlowMatching())
    with pytest.raises(ValueError, match="GaussianDiffusion supports"):
        Sampler("flow_euler", 10).check(create_diffusion())
    with pytest.raises(ValueError, match="exceeds"):
        Sampler("ddpm", 2000).check(create_diffusion())


def test_guidance_scale_one_is_conditional_and_interval_limits_it():
    def model(x, t, y):
        return x * 0 + y.float().view(-1, 1, 1, 1) + torch.arange(2).float().view(1, 2, 1, 1) * 0

    x = torch.randn(3, 2, 2, 2)
    y = torch.tensor([1, 2, 3])
    t = torch.tensor([100, 500, 900])
    assert torch.equal(CFGModel(model, 1.0, null_label=10, in_channels=2)(x, t, y), model(x, t, y))
    guided = CFGModel(model, 2.0, null_label=10, in_channels=2)(x, t, y)
    assert torch.equal(guided[:, 0, 0, 0], 10 + 2.0 * (y.float() - 10))
    limited = CFGModel(model, 2.0, null_label=10, in_channels=2, interval=(200, 600))(x, t, y)
    assert torch.equal(limited[:, 0, 0, 0], torch.tensor([1.0, 10 + 2.0 * (2 - 10), 3.0]))
    with pytest.raises(ValueError, match="guided_channels=5"):
        CFGModel(model, 2.0, null_label=10, in_channels=4, guided_channels=5)


def test_guidance_outside_its_interval_costs_one_forward():
    batch_sizes = []

    def model(x, t, y):
        batch_sizes.append(x.shape[0])
        return x + y.float().view(-1, 1, 1, 1)

    x, y = torch.randn(3, 2, 2, 2), torch.tensor([1, 2, 3])
    limited = CFGModel(model, 4.0, null_label=10, in_channels=2, interval=(0, 500))
    assert torch.equal(limited(x, torch.full((3,), 800), y), x + y.float().view(-1, 1, 1, 1))  # the conditional output
    assert batch_sizes == [3]
    limited(x, torch.full((3,), 300), y)  # inside: conditional and unconditional halves
    assert batch_sizes == [3, 6]


def test_guidance_takes_an_interval_from_a_config_list():
    from ditlab.diffusion import Guidance

    assert Guidance(4.0, None, [0, 500]).interval == (0.0, 500.0)  # comparable with a tuple, hashable
    with pytest.raises(ValueError, match=r"guidance.interval=\[0, 500, 900\]; expected \[t_lo, t_hi\]"):
        Guidance(4.0, None, [0, 500, 900])


def test_cfg_wrapper_matches_model_forward_with_cfg_for_dit():
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([7, 7]), torch.tensor([1, 3])
    official = official_forward_with_cfg(
        model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 5)]), 3.0, guided_channels=3
    )
    wrapped = CFGModel(model, 3.0, null_label=5, in_channels=4, guided_channels=3)(x, t, y)
    assert torch.allclose(official[:2], wrapped, atol=1e-6)


@pytest.mark.integration  # 200 optimizer steps
@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_tiny_dit_training_loss_falls(objective):
    torch.manual_seed(0)
    diffusion = create_diffusion(learn_sigma=True) if objective == "ddpm" else FlowMatching()
    model = DiT(
        input_size=4,
        patch_size=2,
        in_channels=2,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=2,
        learn_sigma=objective == "ddpm",
    )
    latents = torch.randn(8, 2, 4, 4)
    labels = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    losses = []
    for _ in range(200):
        t = diffusion.sample_t(8)
        loss = diffusion.training_losses(model, latents, t, {"y": labels})["mse"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20


def test_min_snr_weights_the_eps_mse_by_min_snr_over_snr():
    plain, weighted = create_diffusion(learn_sigma=True), create_diffusion(learn_sigma=True, min_snr_gamma=5.0)
    model = DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    x0, noise = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    t, y = torch.tensor([0, 40, 300, 999]), torch.tensor([0, 1, 0, 1])
    a, b = (d.training_losses(model, x0, t, {"y": y}, noise=noise) for d in (plain, weighted))
    # SNR_t = abar / (1 - abar) from the linear schedule, written out: 1 / SNR below 5, 1 above
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]
    snr = abar / (1 - abar)
    expected = torch.where(snr > 5, 5 / snr, torch.ones_like(snr)).float()
    assert snr[0] > 5 > snr[3]  # both branches are exercised
    assert torch.allclose(b["mse"], expected * a["mse"], rtol=1e-5)
    assert torch.equal(b["vb"], a["vb"])  # the variance term is not reweighted
    assert weighted.respaced(50).min_snr_gamma == 5.0
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        create_diffusion(min_snr_gamma=0.0)


def test_logit_normal_t_is_a_sigmoid_of_the_given_normal():
    t = FlowMatching(t_sampling="logit_normal", t_mean=-0.5, t_std=0.8).sample_t(
        50000, generator=torch.Generator().manual_seed(0)
    )
    assert ((t > 0) & (t < 1)).all()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(-0.5, abs=0.02)
    assert logit.std().item() == pytest.approx(0.8, rel=0.02)
    with pytest.raises(ValueError, match="unknown t_sampling 'lognormal'"):
        FlowMatching(t_sampling="lognormal")
    with pytest.raises(ValueError, match="t_std must be > 0"):
        FlowMatching(t_sampling="logit_normal", t_std=0.0)


# ------------------------------------------------------------------ SiT's SDE sampler, timestep shift, cosine loss
def seeded_noise(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=gen)


@pytest.mark.parametrize(
    "steps,last_step,shift,rel",
    [(250, "mean", 1.0, 0.01), (100, "euler", 1.0, 0.02), (100, "mean", 3.0, 0.02)],
)
def test_flow_sde_recovers_gaussian_data(steps, last_step, shift, rel):
    """Euler-Maruyama is first order: at S = 2 its std is 2% low at 50 steps, 1% at 100, 0.1% at 250."""
    start = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    sampler = Sampler("flow_sde", steps, last_step=last_step, shift=shift)
    samples = sampler(optimal_velocity, FlowMatching(), start, noise=seeded_noise(2))
    check_gaussian_samples(samples, rel)
    # stochastic: the end forgets part of its start (the ODE maps it linearly: correlation 1)
    corr = torch.corrcoef(torch.stack([samples.flatten(), start.flatten()]))[0, 1].item()
    assert corr < 0.9
    ode = Sampler("flow_euler", 50)(optimal_velocity, FlowMatching(), start)
    assert torch.corrcoef(torch.stack([ode.flatten(), start.flatten()]))[0, 1].item() > 0.999


def test_flow_sde_step_is_euler_maruyama_with_sits_coefficient():
    """One noisy step and the last step, against the SDE written out: drift v - w score with w(t) = t and
    score = -(x + (1 - t) v) / t, noise sqrt(2 w |dt|); noise comes from the given callable only."""
    x = torch.randn(3, 2, 2, 2)
    z = torch.randn(3, 2, 2, 2)
    seen_t = []

    def model(xx, tt, y=None):
        seen_t.append(tt[0].item())
        return 0.3 * xx + 0.1  # any velocity field

    calls = []
    out = Sampler("flow_sde", 2, last_step_size=0.25)(model, FlowMatching(), x, noise=lambda like: calls.append(1) or z)
    assert seen_t == [1000.0, 250.0] and len(calls) == 1  # the model sees t * time_scale; one noisy step
    t, dt = 1.0, -0.75
    v = 0.3 * x + 0.1
    score = -(x + (1 - t) * v) / t
    x1 = x + dt * (v - t * score) + math.sqrt(-2 * t * dt) * z
    t, dt = 0.25, -0.25
    v = 0.3 * x1 + 0.1
    expected = x1 + dt * (v - t * (-(x1 + (1 - t) * v) / t))  # the "mean" last step: the drift, no noise
    assert torch.allclose(out, expected, atol=1e-6)
    euler_last = Sampler("flow_sde", 2, last_step_size=0.25, last_step="euler")(
        model, FlowMatching(), x, noise=lambda like: z
    )
    assert torch.allclose(euler_last, x1 + dt * v, atol=1e-6)


def test_timestep_shift_one_is_the_identity_bit_for_bit():
    from ditlab.diffusion.samplers import flow_time_grid, sde_time_grid, shift_time

    t = torch.rand(10000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shift_time(t, 1.0), t)
    for steps in (1, 7, 50, 250):
        assert torch.equal(flow_time_grid(steps, 1.0), torch.linspace(1.0, 0.0, steps + 1))
        assert torch.equal(
            sde_time_grid(steps + 1, 0.04, 1.0), torch.cat([torch.linspace(1.0, 0.04, steps + 1), torch.zeros(1)])
        )
    start = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    plain, shifted = (
        Sampler("flow_heun", 10, **kw)(optimal_velocity, FlowMatching(), start) for kw in ({}, {"shift": 1.0})
    )
    assert torch.equal(plain, shifted)


def test_timestep_shift_is_sd3s_formula_and_lightningdits_reversed():
    from ditlab.diffusion.samplers import flow_time_grid, sde_time_grid, shift_time

    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(shift_time(t, 3.0), 3 * t / (1 + 2 * t))
    grid = flow_time_grid(20, 3.0)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0 and (grid.diff() < 0).all()
    assert (grid[1:-1] > torch.linspace(1, 0, 21)[1:-1]).all()  # s > 1: the grid leans toward noise
    # LightningDiT: time 0 = noise, t' = s t / (1 + (s - 1) t) with timestep_shift 0.3, on linspace(0, 1, 250)
    theirs = torch.linspace(0, 1, 250, dtype=torch.float64)
    theirs = 0.3 * theirs / (1 + (0.3 - 1) * theirs)
    assert torch.allclose(flow_time_grid(249, 1 / 0.3).double(), 1 - theirs, atol=1e-6)
    # SDE grid: shifted inside, its ends kept (1, last_step_size, 0)
    sde = sde_time_grid(30, 0.04, 3.0)
    assert sde[0].item() == 1.0 and sde[-2].item() == pytest.approx(0.04) and sde[-1].item() == 0.0
    start = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    check_gaussian_samples(Sampler("flow_heun", 15, shift=3.0)(optimal_velocity, FlowMatching(), start), 0.02)


def test_flow_sampler_options_are_checked_at_config_time():
    with pytest.raises(ValueError, match="shift=0.0 must be a finite number > 0"):
        Sampler("flow_euler", 10, shift=0.0)
    with pytest.raises(
        ValueError, match=r"unknown sampler last_step='median'; expected one of \('mean', 'euler', 'tweedie', 'none'\)"
    ):
        Sampler("flow_sde", 10, last_step="median")
    with pytest.raises(ValueError, match="last_step_size=1.5 must be in"):
        Sampler("flow_sde", 10, last_step_size=1.5)
    with pytest.raises(ValueError, match="steps=1 must be an integer >= 2 for flow_sde"):
        Sampler("flow_sde", 1)
    with pytest.raises(ValueError, match="has no option 'shift'"):
        Sampler("ddpm", 50, shift=3.0)
    with pytest.raises(ValueError, match="has no option 'last_step'"):
        Sampler("flow_heun", 10, last_step="mean")
    assert Sampler("flow_sde", 50).nfe() == 50 and Sampler("flow_sde", 2).steps == 2


def test_flow_sde_draws_from_the_noise_it_is_given():
    start = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    sampler = Sampler("flow_sde", 20)
    a, b = (sampler(optimal_velocity, FlowMatching(), start, noise=seeded_noise(5)) for _ in range(2))
    c = sampler(optimal_velocity, FlowMatching(), start, noise=seeded_noise(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def cosine_loss_ref(v_pred, v_target):
    """1 - cosine over the channels at each position, averaged over the positions: (N, C, H, W) -> (N,)."""
    dot = (v_pred * v_target).sum(dim=1)
    norms = v_pred.square().sum(dim=1).sqrt() * v_target.square().sum(dim=1).sqrt()
    return (1 - dot / norms).mean(dim=(1, 2))


def test_cosine_loss_is_the_plain_formula_and_adds_with_its_coefficient():
    x0, noise = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    v_pred = (noise - x0) + 0.7 * torch.randn(5, 4, 3, 3)
    t = torch.rand(5)
    terms = FlowMatching(cos_coef=0.5).training_losses(lambda x, tt, y=None: v_pred, x0, t, noise=noise)
    expected_cos = cosine_loss_ref(v_pred, noise - x0)
    expected_mse = ((v_pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["cos"], expected_cos, atol=1e-6)
    assert torch.allclose(terms["loss"], expected_mse + 0.5 * expected_cos, atol=1e-6)
    assert torch.allclose(terms["mse"], expected_mse, atol=1e-6)
    # the direction term is 0 for the right direction at any length, 2 for the opposite one
    assert torch.allclose(cosine_loss_ref(3 * (noise - x0), noise - x0), torch.zeros(5), atol=1e-6)
    same = FlowMatching(cos_coef=1.0).training_losses(lambda x, tt, y=None: 3 * (noise - x0), x0, t, noise=noise)
    assert torch.allclose(same["cos"], torch.zeros(5), atol=1e-6)
    with pytest.raises(ValueError, match="cos_coef must be >= 0, got -1"):
        FlowMatching(cos_coef=-1.0)


def test_cosine_coefficient_zero_is_todays_loss_bit_for_bit():
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    model.final_layer.linear.weight.data.normal_(0, 0.1)  # a non-zero output
    model.eval()  # no label dropout: two forwards are the same computation
    x0, noise, t, y = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4), torch.rand(4), torch.tensor([0, 1, 0, 1])

    def todays_loss():  # FlowMatching.training_losses before the cosine term, written out
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = model(x_t, t * 1000.0, y)[:, :4]
        return ((v - (noise - x0)) ** 2).mean(dim=[1, 2, 3])

    def grads(loss):
        model.zero_grad()
        loss.mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    terms = FlowMatching().training_losses(model, x0, t, {"y": y}, noise=noise)
    assert set(terms) == {"loss", "mse", "cos"}
    today = todays_loss()
    assert torch.equal(terms["loss"], today) and terms["loss"] is terms["mse"]
    assert not terms["cos"].requires_grad  # watched, not trained on
    assert all(torch.equal(a, b) for a, b in zip(grads(terms["loss"]), grads(todays_loss())))
    weighted = FlowMatching(cos_coef=1.0).training_losses(model, x0, t, {"y": y}, noise=noise)
    assert not torch.equal(weighted["loss"], today)


def test_recipe_configs_compose_and_reach_their_objects():
    """The new sampler options and the flow objective's cos_coef build from conf/; AdamW gets its betas."""
    from hydra.utils import instantiate

    from helpers import compose_cfg

    for option, name, steps, shift in [
        ("flow_sde50", "flow_sde", 50, 1.0),
        ("flow_sde250", "flow_sde", 250, 1.0),
        ("flow_euler_lightningdit", "flow_euler", 249, 1 / 0.3),
    ]:
        cfg = compose_cfg("train", ["diffusion=flow", f"sampler={option}"])  # (experiment=smoke sets steps)
        sampler = instantiate(cfg.sampler)
        sampler.check(instantiate(cfg.diffusion.objective))
        assert (sampler.name, sampler.steps, sampler.options["shift"]) == (name, steps, pytest.approx(shift))
    cfg = compose_cfg(
        "train",
        ["experiment=smoke", "diffusion=flow", "diffusion.objective.cos_coef=1.0", "optim.optimizer.betas=[0.9,0.95]"],
    )
    assert instantiate(cfg.diffusion.objective).cos_coef == 1.0
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
