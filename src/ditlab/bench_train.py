"""``python -m ditlab.bench train``: the official DiT training step against what a ditlab user runs.

The official step is written here, plainly, from the reference code (the seed's ``models.py``,
built on timm's ``PatchEmbed``/``Attention``/``Mlp``) and the IDDPM hybrid loss (numpy float64
tables indexed every step, as ``gaussian_diffusion.py`` does): fp32 with TF32 on, AdamW, the
per-parameter EMA loop of ``train.py``. The ditlab step is ``DiTModule`` run by a Lightning
``Trainer`` built from the same config groups as ``ditlab.train`` (trainer, precision, compile,
strategy, activation checkpointing), fed the same batches. Each row gives img/s, the ratio to the
official step at the same model and batch, MFU (3 x forward FLOPs x img/s over the measured matmul
rate of this device) and peak memory.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

CONF_DIR = str(Path(__file__).parent / "conf")

# ------------------------------------------------------------------ the official model (seed code)


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
        from timm.models.vision_transformer import Attention, Mlp

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
        from timm.models.vision_transformer import PatchEmbed

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


# ------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s of this device in ``dtype`` (8192^3 on GPUs, 1024^3 on CPUs)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _batches(args, device, count):
    """``count`` identical host batches (latents (B, C, S, S), labels (B,)), pinned on CUDA."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.spec["in_channels"], args.size, args.size, generator=g)
    y = torch.randint(0, args.spec["num_classes"], (args.batch,), generator=g)
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return [(x, y)] * count


def official_step_rate(model_name: str, args, device: torch.device) -> float:
    """img/s of the official step: fp32 + TF32, AdamW, per-parameter EMA loop."""
    import copy

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
    for i, (x, y) in enumerate(_batches(args, device, args.warmup + args.steps)):
        start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t = torch.randint(0, 1000, (x.shape[0],), device=device)
        loss = loss_fn(model, x, t, y, torch.randn_like(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _official_update_ema(ema, model)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch / statistics.median(times)


def _model_spec(model_name: str, size: int, overrides=()) -> dict:
    """The composed ``model=<model_name>`` config at latent size ``size`` with the ``model.*`` ones of
    ``overrides``, resolved (any model option, the paper sizes and e.g. ``dit_fmnist`` alike)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        model_overrides = [o for o in overrides if o.lstrip("+~").startswith("model.")]
        cfg = compose(
            "train", [f"model={model_name}", f"model.input_size={size}", *model_overrides, "paths.output_dir=/tmp"]
        )
    return OmegaConf.to_container(cfg.model, resolve=True)


def _label(model_name: str, spec: dict) -> str:
    """DiT-XL/2 for the paper sizes, else the config name."""
    from ditlab.models.dit import DIT_CONFIGS

    for name, paper in DIT_CONFIGS.items():
        if all(spec[k] == v for k, v in paper.items()):
            return name
    return model_name


class _StepTimer:
    """Wall time of the steps after the warm-up, from the start of the first to the end of the last
    (data, transfer, hooks: everything a run pays). The device is synchronized at the two ends only:
    a sync per step would hide what the host queues ahead of the GPU, which is what small models
    live on. With ``profile`` (a path) the timed steps also run under ``torch.profiler``: a Chrome
    trace there and the top operators printed."""

    def __new__(cls, device, warmup: int, steps: int, profile: str | None = None):
        from lightning import Callback

        class StepTimer(Callback):
            def __init__(self):
                self.seconds_per_step, self._start, self._profiler = None, None, None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == warmup:
                    _sync(device)
                    if profile:
                        activities = [torch.profiler.ProfilerActivity.CPU]
                        if device.type == "cuda":
                            activities.append(torch.profiler.ProfilerActivity.CUDA)
                        self._profiler = torch.profiler.profile(activities=activities)
                        self._profiler.__enter__()
                    self._start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx + 1 == warmup + steps:
                    _sync(device)
                    self.seconds_per_step = (time.perf_counter() - self._start) / steps
                    if self._profiler is not None:
                        self._profiler.__exit__(None, None, None)
                        _report_profile(self._profiler, device, profile)

        return StepTimer()


def _report_profile(profiler, device, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(path)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=key, row_limit=30), flush=True)
    print(f"# profile: Chrome trace in {path}", flush=True)


def ditlab_step_rate(model_name: str, args, overrides: list[str], device: torch.device) -> tuple[float, object]:
    """img/s of ``DiTModule`` under a Lightning Trainer composed like ``ditlab.train`` does."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from ditlab.training import hardware

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "train",
                [
                    f"model={model_name}",
                    f"model.input_size={args.size}",
                    f"paths.root_dir={tmp}",
                    f"paths.output_dir={tmp}",
                    f"trainer.max_steps={args.warmup + args.steps + 1}",
                    *overrides,
                ],
            )
        trainer_cfg = hardware.select(cfg.trainer)
        with open_dict(trainer_cfg):
            trainer_cfg.limit_val_batches = 0
        torch.manual_seed(0)
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
        module = instantiate(
            cfg.module,
            net=instantiate(cfg.model),
            objective=instantiate(cfg.diffusion.objective),
            optimizer=instantiate(cfg.optim.optimizer),
            scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        )
        profile = None
        if args.profile:
            profile = str(Path(args.profile) / f"{model_name}_b{args.batch}_trace.json")
        timer = _StepTimer(device, args.warmup, args.steps, profile)
        trainer = instantiate(
            trainer_cfg,
            callbacks=[timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        # batch_size=None: the loader hands over the ready batches as they are (no collation)
        loader = torch.utils.data.DataLoader(_batches(args, device, args.warmup + args.steps + 1), batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
        return args.batch / timer.seconds_per_step, trainer_cfg


def run(args) -> None:
    from hydra.utils import instantiate

    from ditlab.bench import hardware as machine
    from ditlab.models.flops import forward_macs
    from ditlab.training import hardware

    overrides = [f"trainer={args.trainer}"] if args.trainer != "auto" else []
    overrides += {"auto": [], "on": ["module.compile=true"], "off": ["module.compile=false"]}[args.compile]
    overrides += [f"module.activation_checkpointing={args.ac}", *args.override]
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        probe = compose("train", [*overrides, "paths.output_dir=/tmp"])
    picked = hardware.select(probe.trainer)
    device = torch.device("cuda" if picked.accelerator in ("gpu", "cuda") else "cpu")
    bf16 = str(picked.precision).startswith("bf16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    print(
        f"# train step, {args.size}x{args.size} latents; official: median step of {args.steps} after {args.warmup} "
        f"(synchronized per step, as its loss.item() does); ditlab: mean of {args.steps} steps after {args.warmup} "
        "(synchronized at both ends); "
        f"median of {args.repeats} interleaved repeat(s)"
    )
    print(f"# {machine()}")
    print(
        f"# ditlab: {hardware.describe(picked)}, compile {args.compile}, activation checkpointing {args.ac}; "
        f"MFU against the {'bf16' if bf16 else 'fp32'} matmul rate measured before each model and batch"
    )
    print("| model | batch | config | img/s | vs official | MFU | peak memory | matmul TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        args.spec = _model_spec(model_name, args.size, args.override)
        spec = _label(model_name, args.spec)
        flops = 2 * forward_macs(instantiate(args.spec))
        for batch in args.batches:
            args.batch = batch
            rates, results = [], {"official fp32+TF32": [], "ditlab": []}
            if not args.official:
                del results["official fp32+TF32"]
            # official, ditlab, official, ditlab, ...: on a shared machine the load drifts; the
            # medians of interleaved repeats compare the two at the same loads
            for _ in range(args.repeats):
                rates.append(matmul_rate(device, dtype))
                for name, fn, fn_args in (
                    ("official fp32+TF32", official_step_rate, (model_name, args, device)),
                    ("ditlab", lambda *a: ditlab_step_rate(*a)[0], (model_name, args, overrides, device)),
                ):
                    if name not in results:
                        continue
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    try:
                        img_s = fn(*fn_args)
                        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "-"
                    except torch.OutOfMemoryError:
                        img_s, mem = None, "out of memory"
                    results[name].append((img_s, mem))
            rate = statistics.median(rates)
            rows = []
            for name, runs in results.items():
                ok = [r for r, _ in runs if r is not None]
                rows.append((name, statistics.median(ok) if ok else None, runs[-1][1]))
            ref = rows[0][1] if args.official else None
            for name, img_s, mem in rows:
                if img_s is None:
                    print(f"| {spec} | {batch} | {name} | out of memory | | | | |")
                    continue
                ratio = f"{img_s / ref:.2f}x" if ref else ""
                mfu = 3 * flops * img_s / rate
                cells = [spec, batch, name, f"{img_s:,.1f}", ratio, f"{100 * mfu:.1f}%", mem, f"{rate / 1e12:.3f}"]
                print("| " + " | ".join(map(str, cells)) + " |")
