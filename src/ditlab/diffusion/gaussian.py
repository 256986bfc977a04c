"""Gaussian diffusion exactly as DiT trains and samples it (DDPM + Improved DDPM's learned variance).

The process: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) over ``num_timesteps`` steps with
float64 coefficients that are gathered per sample and cast to float32, as the official code does.
The model predicts epsilon; with ``learn_sigma`` it also outputs v in [-1, 1] and the log-variance
interpolates between log beta_t and the clipped posterior log-variance with frac = (v + 1) / 2.

A respaced process (``timestep_map`` given) visits a subset of the original steps; the model is
always called with the ORIGINAL timestep index, which is what it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ditlab.diffusion.schedules import named_betas, respaced_betas, space_timesteps

VARIANCE_TYPES = ("learned_range", "fixed_large", "fixed_small")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins, under N(means, exp(log_scales)^2)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # The edge bins extend to +-infinity.
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _extract(arr: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """arr[t] (float64 -> float32) shaped to broadcast against a batch of ``shape``."""
    out = arr.to(t.device)[t].float()
    return out.view(-1, *([1] * (len(shape) - 1)))


class GaussianDiffusion:
    """DDPM forward process, posterior and hybrid training loss (the solvers are in ``samplers``).

    Args:
        betas: float64 noise schedule of this process.
        variance_type: "learned_range" (model outputs eps and v), "fixed_large" (beta_t) or
            "fixed_small" (the posterior variance).
        timestep_map: original timestep index of each step of this (respaced) process.
        min_snr_gamma: if given, the eps MSE of step t is weighted by min(SNR_t, gamma) / SNR_t
            (Hang et al. 2023, "Min-SNR"): the nearly clean steps, easy and many, count less.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        variance_type: str = "learned_range",
        timestep_map: list[int] | None = None,
        min_snr_gamma: float | None = None,
    ):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; expected one of {VARIANCE_TYPES}")
        betas = betas.to(torch.float64)
        if not (betas.dim() == 1 and (betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D schedule with values in (0, 1]")
        self.betas = betas
        self.variance_type = variance_type
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(betas)))
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or null for DiT's unweighted MSE), got {min_snr_gamma}")
        self.min_snr_gamma = min_snr_gamma

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; clip the log there to the value at t = 1.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.mse_weights = torch.ones_like(snr) if min_snr_gamma is None else snr.clamp(max=min_snr_gamma) / snr

    # ---------------------------------------------------------------- the forward process
    @property
    def learn_sigma(self) -> bool:
        return self.variance_type == "learned_range"

    def sample_t(self, batch_size: int, device: torch.device | str = "cpu", generator=None) -> torch.Tensor:
        """Uniform training timesteps (indices of this process)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def t_at(self, fraction: float, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N,) the timestep ``fraction`` of the way from data (0) to noise (1): index round(f (T - 1))."""
        return torch.full((batch_size,), round(fraction * (self.num_timesteps - 1)), dtype=torch.long, device=device)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        return (
            mean,
            _extract(self.posterior_variance, t, x_t.shape),
            _extract(self.posterior_log_variance_clipped, t, x_t.shape),
        )

    # ---------------------------------------------------------------- the reverse process
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timestep indices the model was trained on, for indices of this process."""
        return self.timestep_map.to(t.device)[t]

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    def output_to_mean_variance(self, model_output, x, t, clip_denoised: bool = False):
        """p(x_{t-1} | x_t) from a model output already computed at (x, t)."""
        c = x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * c:
                raise ValueError(
                    f"learned variance needs {2 * c} output channels (eps, v); the model gave {model_output.shape[1]}"
                )
            eps, v = model_output[:, :c], model_output[:, c:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(torch.log(self.betas), t, x.shape)
            frac = (v + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output[:, :c]
            if self.variance_type == "fixed_large":
                # beta_t, except at t = 0 where the posterior variance (at t = 1) is a better log-likelihood
                var_table = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            else:
                var_table = self.posterior_variance
            log_table = torch.log(torch.cat([self.posterior_variance[1:2], var_table[1:]]))
            variance, log_variance = _extract(var_table, t, x.shape), _extract(log_table, t, x.shape)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(self, model: Callable, x, t, model_kwargs=None, clip_denoised: bool = False):
        output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.output_to_mean_variance(output, x, t, clip_denoised)

    # ---------------------------------------------------------------- training loss
    def vb_terms_bpd(self, output_mean_variance: dict, x_start, x_t, t) -> torch.Tensor:
        """Per-sample VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = output_mean_variance
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model: Callable, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses: ``mse`` (eps), ``vb`` (learned variance only) and ``loss`` = mse + vb.

        The VLB term sees the predicted mean through a stop-gradient, so it trains only the variance
        (Improved DDPM's hybrid loss, as DiT uses it).
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        c = x_start.shape[1]
        terms = {"mse": mean_flat((noise - output[:, :c]) ** 2)}
        if self.min_snr_gamma is not None:
            terms["mse"] = _extract(self.mse_weights, t, terms["mse"].shape) * terms["mse"]
        if self.learn_sigma:
            frozen = torch.cat([output[:, :c].detach(), output[:, c:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(self.output_to_mean_variance(frozen, x_t, t), x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # ---------------------------------------------------------------- respacing
    def respaced(self, spacing: str | int) -> GaussianDiffusion:
        """The process that visits only ``space_timesteps(T, spacing)`` of this full T-step process
        (``250``, ``"10,20"``, ``"ddim50"``); the model still receives the original timesteps."""
        if len(self.timestep_map) != self.num_timesteps or int(self.timestep_map[-1]) != self.num_timesteps - 1:
            raise ValueError("respacing needs the full (training) process, not an already respaced one")
        keep = space_timesteps(self.num_timesteps, spacing)
        if len(keep) == self.num_timesteps:
            return self
        return GaussianDiffusion(
            respaced_betas(self.alphas_cumprod, keep),
            self.variance_type,
            timestep_map=keep,
            min_snr_gamma=self.min_snr_gamma,
        )


def create_diffusion(
    timestep_respacing: str | int | None = None,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    diffusion_steps: int = 1000,
    min_snr_gamma: float | None = None,
) -> GaussianDiffusion:
    """DiT's ``create_diffusion``: the 1000-step linear process, optionally respaced
    (``"250"``, ``"ddim50"``, ``""``/None for every step)."""
    betas = named_betas(noise_schedule, diffusion_steps)
    variance_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    process = GaussianDiffusion(betas, variance_type, min_snr_gamma=min_snr_gamma)
    return process if timestep_respacing in (None, "") else process.respaced(timestep_respacing)
