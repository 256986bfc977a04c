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

import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning import Callback
from omegaconf import OmegaConf, open_dict

from ditlab.bench.common import hardware as machine
from ditlab.bench.common import matmul_rate, sync
from ditlab.bench.official import official_step_rate, training_batches
from ditlab.models.dit import DIT_CONFIGS
from ditlab.models.flops import forward_macs
from ditlab.runtime import hardware
from ditlab.runtime.errors import CONF_DIR
from ditlab.train import build_module

# A model option leaves the latent channels and the class count to the data; a benchmark has none:
# SD-VAE latents and ImageNet's classes, unless ``--override model.in_channels=...`` says otherwise.
BENCH_DATA = ["model.in_channels=4", "model.num_classes=1000"]


def model_spec(model_name: str, size: int, overrides=()) -> dict:
    """The composed ``model=<model_name>`` config at latent size ``size`` with the ``model.*`` ones of
    ``overrides``, resolved (any model option, the paper sizes and e.g. ``dit_fmnist`` alike)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        model_overrides = [o for o in overrides if o.lstrip("+~").startswith("model.")]
        cfg = compose(
            "train",
            [f"model={model_name}", f"model.input_size={size}", *BENCH_DATA, *model_overrides, "paths.output_dir=/tmp"],
        )
    return OmegaConf.to_container(cfg.model, resolve=True)


def _label(model_name: str, spec: dict) -> str:
    """DiT-XL/2 for the paper sizes, else the config name."""
    for name, paper in DIT_CONFIGS.items():
        if all(spec[k] == v for k, v in paper.items()):
            return name
    return model_name


class StepTimer(Callback):
    """Wall time of the steps after the warm-up, from the start of the first to the end of the last
    (data, transfer, hooks: everything a run pays). The device is synchronized at the two ends only:
    a sync per step would hide what the host queues ahead of the GPU, which is what small models
    live on. With ``profile`` (a path) the timed steps also run under ``torch.profiler``: a Chrome
    trace there and the top operators printed."""

    def __init__(self, device, warmup: int, steps: int, profile: str | None = None):
        self.device, self.warmup, self.steps, self.profile = device, warmup, steps, profile
        self.seconds_per_step, self._start, self._profiler = None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync(self.device)
            if self.profile:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if self.device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self._profiler = torch.profiler.profile(activities=activities)
                self._profiler.__enter__()
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.warmup + self.steps:
            sync(self.device)
            self.seconds_per_step = (time.perf_counter() - self._start) / self.steps
            if self._profiler is not None:
                self._profiler.__exit__(None, None, None)
                _report_profile(self._profiler, self.device, self.profile)


def _report_profile(profiler, device, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(path)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=key, row_limit=30), flush=True)
    print(f"# profile: Chrome trace in {path}", flush=True)


def ditlab_step_rate(model_name: str, args, overrides: list[str], device: torch.device) -> tuple[float, object]:
    """img/s of ``DiTModule`` under a Lightning Trainer composed like ``ditlab.train`` does."""
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "train",
                [
                    f"model={model_name}",
                    f"model.input_size={args.size}",
                    *BENCH_DATA,
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
        module = build_module(cfg, instantiate(cfg.model))
        profile = None
        if args.profile:
            profile = str(Path(args.profile) / f"{model_name}_b{args.batch}_trace.json")
        timer = StepTimer(device, args.warmup, args.steps, profile)
        trainer = instantiate(
            trainer_cfg,
            callbacks=[timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        # batch_size=None: the loader hands over the ready batches as they are (no collation)
        batches = training_batches(args, device, args.warmup + args.steps + 1)
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
        return args.batch / timer.seconds_per_step, trainer_cfg


def bench_train(args) -> None:
    overrides = [f"trainer={args.trainer}"] if args.trainer != "auto" else []
    overrides += {"auto": [], "on": ["module.compile=true"], "off": ["module.compile=false"]}[args.compile]
    overrides += [f"module.activation_checkpointing={args.ac}", *args.override]
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
        args.spec = model_spec(model_name, args.size, args.override)
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
