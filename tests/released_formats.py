"""Small checkpoints in the released formats of SiT, REPA and LightningDiT, built here with random
weights, the official key names and shapes and the official file layouts, and plain restatements of
each official forward pass and sampler, written from the official code's arithmetic (willisma/SiT
models.py + transport/, sihyun-yu/REPA models/sit.py + samplers.py, hustvl/LightningDiT
models/lightningdit.py + transport/). Nothing here imports ditlab: the restatements compute from the
file's tensors alone, so ditlab's readers, models and samplers are compared with something independent.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ building the files
def sincos_table(dim: int, grid: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed (float32 grid, float64 frequencies), as (1, T, dim) float32."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
    table = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def eva_rope_tables(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LightningDiT's VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid) buffers: (T, head_dim)."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * grid
    freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, dim=-1)  # (G, dim): '... n -> ... (n r)'
    rows = freqs[:, None, :].expand(grid, grid, dim)
    cols = freqs[None, :, :].expand(grid, grid, dim)
    freqs = torch.cat([rows, cols], dim=-1)  # broadcat
    return freqs.cos().view(-1, head_dim), freqs.sin().view(-1, head_dim)


def official_state_dict(
    seed: int = 0,
    input_size: int = 8,
    patch: int = 2,
    channels: int = 4,
    hidden: int = 32,
    depth: int = 2,
    heads: int = 2,
    classes: int = 5,
    learn_sigma: bool = False,
    rmsnorm: bool = False,
    swiglu: bool = False,
    rope: bool = False,
    qknorm: bool = False,
    wo_shift: bool = False,
    projectors: tuple[int, ...] = (),
    projector_dim: int = 16,
    encoder_depth: int = 1,
) -> dict[str, torch.Tensor]:
    """Random weights under the official key names and shapes: DiT's / SiT's layout, REPA's
    ``projectors.K.{0,2,4}`` (one per feature dim in ``projectors``), LightningDiT's switches
    (RMSNorm gains, SwiGLU ``w12``/``w3``, RoPE buffers ``feat_rope.freqs_*``, q/k norms, adaLN
    without shift). The weights are random and not small, so that every part of the forward matters."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    c_out = 2 * channels if learn_sigma else channels
    mlp = int(2 / 3 * int(hidden * 4.0)) if swiglu else 4 * hidden
    head_dim = hidden // heads
    sd = {
        "x_embedder.proj.weight": rnd(hidden, channels, patch, patch, std=0.3),
        "x_embedder.proj.bias": rnd(hidden),
        "pos_embed": sincos_table(hidden, input_size // patch),
        "t_embedder.mlp.0.weight": rnd(hidden, 256),
        "t_embedder.mlp.0.bias": rnd(hidden),
        "t_embedder.mlp.2.weight": rnd(hidden, hidden, std=0.2),
        "t_embedder.mlp.2.bias": rnd(hidden),
        "y_embedder.embedding_table.weight": rnd(classes + 1, hidden, std=0.3),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = rnd(3 * hidden, hidden, std=0.2), rnd(3 * hidden)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rnd(hidden, hidden, std=0.2), rnd(hidden)
        if qknorm:
            for qk in ("q_norm", "k_norm"):
                sd[f"{b}attn.{qk}.weight"] = 1 + rnd(head_dim)
                if not rmsnorm:  # LightningDiT's LayerNorm (timm's default) has a bias too
                    sd[f"{b}attn.{qk}.bias"] = rnd(head_dim)
        if swiglu:
            sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"] = rnd(2 * mlp, hidden, std=0.2), rnd(2 * mlp)
            sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"] = rnd(hidden, mlp, std=0.2), rnd(hidden)
        else:
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rnd(mlp, hidden, std=0.2), rnd(mlp)
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rnd(hidden, mlp, std=0.2), rnd(hidden)
        mods = 4 if wo_shift else 6
        sd[b + "adaLN_modulation.1.weight"] = rnd(mods * hidden, hidden, std=0.2)
        sd[b + "adaLN_modulation.1.bias"] = rnd(mods * hidden)
        if rmsnorm:
            sd[b + "norm1.weight"], sd[b + "norm2.weight"] = 1 + rnd(hidden), 1 + rnd(hidden)
    sd["final_layer.adaLN_modulation.1.weight"] = rnd(2 * hidden, hidden, std=0.2)
    sd["final_layer.adaLN_modulation.1.bias"] = rnd(2 * hidden)
    sd["final_layer.linear.weight"] = rnd(patch * patch * c_out, hidden, std=0.2)
    sd["final_layer.linear.bias"] = rnd(patch * patch * c_out)
    if rmsnorm:
        sd["final_layer.norm_final.weight"] = 1 + rnd(hidden)
    if rope:
        sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = eva_rope_tables(head_dim, input_size // patch)
    for k, z_dim in enumerate(projectors):
        p = f"projectors.{k}."
        sd[p + "0.weight"], sd[p + "0.bias"] = rnd(projector_dim, hidden), rnd(projector_dim)
        sd[p + "2.weight"], sd[p + "2.bias"] = rnd(projector_dim, projector_dim), rnd(projector_dim)
        sd[p + "4.weight"], sd[p + "4.bias"] = rnd(z_dim, projector_dim), rnd(z_dim)
    return sd


def sit_training_checkpoint(ema: dict, model: dict, name: str = "SiT-XL/2", **args) -> dict:
    """What SiT's / REPA's train.py saves: ``{"model", "ema", "opt", "args"}`` (+ REPA's ``steps``)."""
    return {"model": model, "ema": ema, "opt": {}, "args": argparse.Namespace(model=name, **args), "steps": 10}


def lightningdit_training_checkpoint(ema: dict, model: dict, **switches) -> dict:
    """What LightningDiT's train.py saves: ``{"model", "ema", "opt", "config"}`` (its YAML config as a dict)."""
    config = {"model": {"model_type": "LightningDiT-XL/1", **switches}, "transport": {"path_type": "Linear"}}
    return {"model": model, "ema": ema, "opt": {}, "config": config}


# ------------------------------------------------------------------ the official forward passes
def linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def layer_norm(x, eps=1e-6, weight=None, bias=None):
    mean = x.mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight + bias


def rms_norm(x, weight, eps=1e-6):
    """LightningDiT's RMSNorm (Llama's): x * rsqrt(mean(x^2) + eps), in float32, times the gain."""
    return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x):
    """EVA's: pairs (x1, x2) -> (-x2, x1) ('... (d r) -> ... d r')."""
    x1, x2 = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).reshape(x.shape)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def official_forward(sd, x, t, y, heads, learn_sigma=False):
    """The official forward of DiT / SiT / REPA / LightningDiT, computed from the file's tensors:
    patchify + sin-cos table, GLIDE's timestep features, adaLN(-Zero) blocks (LayerNorm or RMSNorm with
    gain; GELU MLP or SwiGLU; q/k norms; EVA's RoPE from the file's buffers; with or without shift),
    the final layer, unpatchify; the learned-sigma half dropped (SiT's and LightningDiT's forward)."""
    n, c, _, _ = x.shape
    w = sd["x_embedder.proj.weight"]
    hidden, patch = w.shape[0], w.shape[-1]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c_vec = linear(F.silu(linear(t_freq, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    c_vec = c_vec + sd["y_embedder.embedding_table.weight"][y]
    rms = "blocks.0.norm1.weight" in sd

    def norm(v, name):
        return rms_norm(v, sd[name]) if rms else layer_norm(v)

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    d_h = hidden // heads
    for i in range(depth):
        b = f"blocks.{i}."
        mod = linear(F.silu(c_vec), sd, b + "adaLN_modulation.1")
        if mod.shape[1] == 4 * hidden:  # wo_shift
            scale1, gate1, scale2, gate2 = (m[:, None] for m in mod.chunk(4, dim=1))
            shift1 = shift2 = 0.0
        else:
            shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in mod.chunk(6, dim=1))
        a_in = norm(h, b + "norm1.weight") * (1 + scale1) + shift1
        qkv = linear(a_in, sd, b + "attn.qkv").reshape(n, -1, 3, heads, d_h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if b + "attn.q_norm.weight" in sd:
            if b + "attn.q_norm.bias" in sd:  # LayerNorm(head_dim): eps 1e-5, gain and bias
                q = layer_norm(q, 1e-5, sd[b + "attn.q_norm.weight"], sd[b + "attn.q_norm.bias"])
                k = layer_norm(k, 1e-5, sd[b + "attn.k_norm.weight"], sd[b + "attn.k_norm.bias"])
            else:
                q, k = rms_norm(q, sd[b + "attn.q_norm.weight"]), rms_norm(k, sd[b + "attn.k_norm.weight"])
        if "feat_rope.freqs_cos" in sd:
            cos, sin = sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attn = torch.softmax(q @ k.transpose(-2, -1) * d_h**-0.5, dim=-1) @ v
        h = h + gate1 * linear(attn.transpose(1, 2).reshape(n, -1, hidden), sd, b + "attn.proj")
        m_in = norm(h, b + "norm2.weight") * (1 + scale2) + shift2
        if b + "mlp.w12.weight" in sd:
            x1, x2 = linear(m_in, sd, b + "mlp.w12").chunk(2, dim=-1)
            m_out = linear(F.silu(x1) * x2, sd, b + "mlp.w3")
        else:
            m_out = linear(gelu_tanh(linear(m_in, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        h = h + gate2 * m_out
    shift, scale = linear(F.silu(c_vec), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = linear(
        norm(h, "final_layer.norm_final.weight") * (1 + scale[:, None]) + shift[:, None], sd, "final_layer.linear"
    )
    c_out = out.shape[-1] // (patch * patch)
    g = round(out.shape[1] ** 0.5)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(n, g, g, patch, patch, c_out)).reshape(
        n, c_out, g * patch, g * patch
    )
    return out.chunk(2, dim=1)[0] if learn_sigma else out


def forward_with_cfg(model, x, t, y, cfg_scale, cfg_interval_start=None):
    """SiT's and LightningDiT's forward_with_cfg: the first half of x twice, guidance on the first 3
    channels; LightningDiT's interval: below cfg_interval_start (its t[0]) the conditional output."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond + cfg_scale * (cond - uncond)
    if cfg_interval_start is not None and t[0] < cfg_interval_start:
        half_eps = cond
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


# ------------------------------------------------------------------ the official samplers
def sit_diffusion(form, s, norm=1.0):
    """SiT's ICPlan.compute_diffusion at its time s (alpha = s, sigma = 1 - s)."""
    if form == "constant":
        return torch.full_like(s, norm)
    if form == "SBDM":  # compute_drift's diffusion: alpha_ratio sigma^2 - sigma d_sigma
        return norm * ((1 / s) * (1 - s) ** 2 - (1 - s) * -1)
    if form in ("sigma", "linear"):
        return norm * (1 - s)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(np.pi * s) + 1) ** 2
    return norm * torch.sin(np.pi * s) ** 2  # its "inccreasing-decreasing"


def sit_score(v, x, s):
    """ICPlan.get_score_from_velocity: alpha = s, d_alpha = 1, sigma = 1 - s, d_sigma = -1."""
    alpha, d_alpha, sigma, d_sigma = s, 1.0, 1 - s, -1.0
    ratio = alpha / d_alpha
    var = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x) / var


def sit_sample_sde(model_fn, z, noises, steps, form="sigma", norm=1.0, last_step="Mean", last_step_size=0.04,
                   method="Euler", sample_eps=0.0):  # fmt: skip
    """SiT's Sampler.sample_sde + integrators.sde for a velocity model on the Linear path, in SiT's time
    (0 noise, 1 data). ``model_fn(x, t)`` -> velocity; ``noises[k]``: the k-th step's randn(x.size())."""
    if last_step is None:
        last_step_size = 0.0
    t0 = sample_eps if form == "SBDM" else 0  # check_interval(sde=True)
    t1 = 1 - sample_eps if last_step_size == 0 else 1 - last_step_size
    ts = torch.linspace(t0, t1, steps)
    dt = ts[1] - ts[0]

    def ones(s):
        return torch.ones(z.size(0)) * s

    def expand(s, x):
        return s.view(-1, *([1] * (x.dim() - 1)))

    def drift(x, s):
        v = model_fn(x, s)
        return v + sit_diffusion(form, expand(s, x), norm) * sit_score(v, x, expand(s, x))

    x = z
    for k, ti in enumerate(ts[:-1]):
        s = ones(ti)
        dw = noises[k] * torch.sqrt(dt)
        if method == "Euler":
            mean_x = x + drift(x, s) * dt
            x = mean_x + torch.sqrt(2 * sit_diffusion(form, expand(s, x), norm)) * dw
        else:  # Heun
            xhat = x + torch.sqrt(2 * sit_diffusion(form, expand(s, x), norm)) * dw
            k1 = drift(xhat, s)
            xp = xhat + dt * k1
            k2 = drift(xp, s + dt)
            x = xhat + 0.5 * dt * (k1 + k2)
    s = ones(t1)
    if last_step == "Mean":
        return x + drift(x, s) * last_step_size
    if last_step == "Tweedie":
        alpha, sigma = t1, 1 - t1
        return x / alpha + (sigma**2) / alpha * sit_score(model_fn(x, s), x, expand(s, x))
    if last_step == "Euler":
        return x + model_fn(x, s) * last_step_size
    return x


def repa_euler_maruyama(model, latents, y, noises, num_steps, cfg_scale, guidance_low, guidance_high, null_label):
    """REPA's samplers.euler_maruyama_sampler (path_type linear), in float64 as it runs; ``model``
    returns (x, zs) as REPA's SiT; ``noises[i]``: the i-th step's randn_like; ``null_label``: its
    hard-coded 1000 (ImageNet's class count), here the tiny model's."""
    y_null = torch.tensor([null_label] * y.size(0)) if cfg_scale > 1.0 else None
    _dtype = latents.dtype
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)])
    x_next = latents.to(torch.float64)

    def score(vt, xt, t):
        t = t.view(-1, *([1] * (xt.dim() - 1)))
        alpha_t, d_alpha_t = 1 - t, torch.ones_like(xt) * -1
        sigma_t, d_sigma_t = t, torch.ones_like(xt)
        ratio = alpha_t / d_alpha_t
        var = sigma_t**2 - ratio * d_sigma_t * sigma_t
        return (ratio * vt - xt) / var

    def drift(x_cur, t_cur):
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        model_input = torch.cat([x_cur] * 2) if guided else x_cur
        y_cur = torch.cat([y, y_null]) if guided else y
        time_input = torch.ones(model_input.size(0), dtype=torch.float64) * t_cur
        v = model(model_input.to(_dtype), time_input.to(_dtype), y_cur)[0].to(torch.float64)
        d = v - 0.5 * (2 * t_cur) * score(v, model_input, time_input)
        if guided:
            d_cond, d_uncond = d.chunk(2)
            d = d_uncond + cfg_scale * (d_cond - d_uncond)
        return d

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-2], t_steps[1:-1])):
        dt = t_next - t_cur
        x_cur = x_next
        deps = noises[i].to(torch.float64) * torch.sqrt(torch.abs(dt))
        x_next = x_cur + drift(x_cur, t_cur) * dt + torch.sqrt(2 * t_cur) * deps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    return x_next + (t_next - t_cur) * drift(x_next, t_cur)


def lightningdit_sample_ode(model_fn, z, num_steps, timestep_shift):
    """LightningDiT's Sampler.sample_ode (euler, torchdiffeq's fixed grid) for a velocity model in its
    time (0 noise, 1 data): num_steps grid points from 0 to 1, shifted by compute_tm."""
    t = torch.linspace(0, 1, num_steps)
    if timestep_shift > 0:
        t = torch.tensor([timestep_shift * t_n / (1 + (timestep_shift - 1) * t_n) for t_n in t])
    x = z
    for t0, t1 in zip(t[:-1], t[1:]):
        x = x + (t1 - t0) * model_fn(x, torch.ones(z.size(0)) * t0)
    return x
