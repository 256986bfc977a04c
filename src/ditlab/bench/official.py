"""The official DiT training step, written here plainly as the reference every ditlab step is
measured against: the seed's ``models.py`` (on timm's ``PatchEmbed``/``Attention``/``Mlp``), the
IDDPM hybrid loss (numpy float64 tables indexed every step, as ``gaussian_diffusion.py`` does), fp32
with TF32 on, AdamW, and the per-parameter EMA loop of ``train.py``."""

from __future__ import annotations

import copy
import math
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

from ditlab.bench.common import sync


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
            device=t.device
        )
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class _LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop_ids, self.num_classes, labels)
        return self.embedding_table(labels)


class _Block(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class OfficialDiT(nn.Module):
    """The reference DiT (learn_sigma, class dropout 0.1), as in the seed's model code."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes):
        super().__init__()
        self.in_channels, self.out_channels, self.patch_size = in_channels, in_channels * 2, patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = _TimestepEmbedder(hidden_size)
        self.y_embedder = _LabelEmbedder(num_classes, hidden_size, 0.1)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([_Block(hidden_size, num_heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels, bias=True)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        return self.unpatchify(self.final_linear(_modulate(self.final_norm(x), shift, scale)))


# ------------------------------------------------------------------ the IDDPM hybrid loss, plainly


class OfficialLoss:
    """L_simple + L_vb (learned-range variance, frozen mean), linear schedule, T=1000, MSE loss type."""

    def __init__(self, steps: int = 1000):
        scale = 1000 / steps
        betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_ac, self.sqrt_1m_ac = np.sqrt(ac), np.sqrt(1.0 - ac)
        self.sqrt_recip_ac, self.sqrt_recipm1_ac = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.post_log_var = np.log(np.append(post_var[1], post_var[1:]))
        self.post_c1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.post_c2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)

    @staticmethod
    def _ex(arr, t, x):
        res = torch.from_numpy(arr).to(device=t.device)[t].float()
        return res.reshape(-1, *([1] * (x.dim() - 1))).expand(x.shape)

    def __call__(self, model, x0, t, y, noise):
        ex = self._ex
        xt = ex(self.sqrt_ac, t, x0) * x0 + ex(self.sqrt_1m_ac, t, x0) * noise
        out = model(xt, t, y)
        eps, var_values = torch.split(out, x0.shape[1], dim=1)
        mse = ((noise - eps) ** 2).mean(dim=list(range(1, x0.dim())))
        # vb term with the mean frozen (gradient to the variance only)
        true_mean = ex(self.post_c1, t, x0) * x0 + ex(self.post_c2, t, x0) * xt
        true_log_var = ex(self.post_log_var, t, x0)
        frac = (var_values + 1) / 2
        model_log_var = frac * ex(self.log_betas, t, x0) + (1 - frac) * true_log_var
        pred_x0 = ex(self.sqrt_recip_ac, t, x0) * xt - ex(self.sqrt_recipm1_ac, t, x0) * eps.detach()
        model_mean = ex(self.post_c1, t, x0) * pred_x0 + ex(self.post_c2, t, x0) * xt
        kl = 0.5 * (
            -1.0
            + model_log_var
            - true_log_var
            + torch.exp(true_log_var - model_log_var)
            + ((true_mean - model_mean) ** 2) * torch.exp(-model_log_var)
        )
        kl = kl.mean(dim=list(range(1, x0.dim()))) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = nll.mean(dim=list(range(1, x0.dim()))) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse + vb  # (N,)


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * torch.pow(v, 3))))

    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


@torch.no_grad()
def _official_update_ema(ema_model, model, decay=0.9999):
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def training_batches(args, device, count):
    """``count`` identical host batches (latents (B, C, S, S), labels (B,)), pinned on CUDA."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.spec["in_channels"], args.size, args.size, generator=g)
    y = torch.randint(0, args.spec["num_classes"], (args.batch,), generator=g)
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return [(x, y)] * count


def official_step_rate(model_name: str, args, device: torch.device) -> float:
    """img/s of the official step: fp32 + TF32, AdamW, per-parameter EMA loop."""
    spec = args.spec
    torch.backends.cuda.matmul.allow_tf32 = True  # as the official train.py sets
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = OfficialDiT(
        args.size,
        spec["patch_size"],
        spec["in_channels"],
        spec["hidden_size"],
        spec["depth"],
        spec["num_heads"],
        spec["num_classes"],
    )
    model = model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    loss_fn = OfficialLoss()
    times = []
    for i, (x, y) in enumerate(training_batches(args, device, args.warmup + args.steps)):
        start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t = torch.randint(0, 1000, (x.shape[0],), device=device)
        loss = loss_fn(model, x, t, y, torch.randn_like(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _official_update_ema(ema, model)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch / statistics.median(times)
