"""Benchmarks: ``python -m ditlab.bench {sampling,data,train} [options]``.

Every figure is measured in the same process as its plain reference and printed with the
hardware, so a speed is always read as a ratio on a named machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


class CountingModel:
    """Wraps a model to count evaluations (NFE) per sample."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        return self.model(x, t, y)


def _bench_dit(args, learn_sigma: bool = True):
    """The benchmarked DiT: 4-channel latents of ``args.size``, patch 2, 4 heads, 10 classes."""
    from ditlab.models.dit import DiT

    return DiT(
        input_size=args.size,
        patch_size=2,
        in_channels=4,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=4,
        num_classes=10,
        learn_sigma=learn_sigma,
    )


# ------------------------------------------------------------------------------------------ sampling
ALL_SAMPLERS = "ddpm:250,ddpm:50,ddim:50,dpmpp_2m:20,unipc:20,ode_euler:50,ode_heun:25,flow_euler:50,flow_heun:25"


def _sampling_net(args, learn_sigma: bool):
    """``--model`` (any model config, e.g. dit_xl2) at ``--size``, else the small ``--hidden``/``--depth`` DiT."""
    if not args.model:
        return _bench_dit(args, learn_sigma)
    from hydra.utils import instantiate

    from ditlab.bench_train import _model_spec

    return instantiate({**_model_spec(args.model, args.size), "learn_sigma": learn_sigma})


def bench_sampling(args) -> None:
    """Seconds per image of each sampler through ``ditlab.inference.generate``, what ``ditlab.sample``
    and the FID callback run (per-sample noise streams, guidance batched, bf16 autocast on CUDA),
    latents out (no VAE decode). The reference is the first sampler listed (default DDPM-250)."""
    from ditlab.diffusion import FlowMatching, Sampler, create_diffusion
    from ditlab.inference import Guidance, generate

    device = torch.device(args.device)
    chosen = []
    for item in args.samplers.split(","):
        name, _, steps = item.partition(":")
        chosen.append(Sampler(name, int(steps)))  # an unknown name or bad steps: one line, before any work
    torch.manual_seed(0)
    results = []
    for objective in (create_diffusion(), FlowMatching()):
        samplers = [s for s in chosen if isinstance(objective, s.spec.objective)]
        if not samplers:
            continue
        learn_sigma = not isinstance(objective, FlowMatching)
        net = _sampling_net(args, learn_sigma).to(device).eval()
        with torch.no_grad():  # non-zero outputs so that every sampler does real work
            for p in net.final_layer.parameters():
                p.normal_(0, 0.02)
        counted = CountingModel(net)
        labels = torch.arange(args.batch) % net.num_classes
        kwargs = dict(
            latent_shape=(net.in_channels, net.input_size, net.input_size),
            null_label=net.num_classes,
            guidance=Guidance(args.cfg_scale),
            batch_size=args.batch,
            device=device,
        )
        for sampler in samplers:
            # A 2-step warm-up of this sampler first: its lazy imports (diffusers' schedulers) and
            # first-call costs are paid once per process, not per batch.
            generate(counted, objective, Sampler(sampler.name, 2), labels, torch.arange(args.batch), **kwargs)
            counted.calls = 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(counted, objective, sampler, labels, torch.arange(args.batch), **kwargs)  # synchronizes (.cpu())
            seconds = time.perf_counter() - start
            results.append((type(objective).__name__, sampler.name, sampler.steps, counted.calls, seconds / args.batch))
    what = args.model or f"DiT hidden {args.hidden} depth {args.depth}"
    print(
        f"# sampling: {what} on {args.size}x{args.size} latents, batch {args.batch}, cfg {args.cfg_scale} "
        f"(through generate: {'bf16 autocast' if device.type == 'cuda' else 'fp32'}); {hardware()}"
    )
    print(f"{'objective':<18}{'sampler':<12}{'steps':>6}{'NFE':>6}{'s/image':>10}{'img/s':>10}{'vs first':>10}")
    reference = results[0][4]
    for objective_name, name, steps, nfe, spi in results:
        print(f"{objective_name:<18}{name:<12}{steps:>6}{nfe:>6}{spi:>10.4f}{1 / spi:>10.2f}{reference / spi:>9.1f}x")


# ------------------------------------------------------------------------------------------ data
def _write_synthetic_shards(root: Path, count: int, latent_shape) -> Path:
    import json

    from ditlab.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    writer = ShardWriter(root / "train")
    block = rng.standard_normal((256, 2, 2, *latent_shape)).astype(np.float16)
    for i in range(count):
        writer.add(block[i % 256], i % 10)
    writer.finish()
    meta = {
        "num_classes": 10,
        "latent_shape": list(latent_shape),
        "vae": {"kind": "identity", "scale_factor": 0.5},
        "splits": {"train": {"count": count}},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def bench_data(args) -> None:
    from ditlab.data.datamodule import LatentDataModule

    shape = (4, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = _write_synthetic_shards(Path(tmp), args.count, shape)
        dm = LatentDataModule(str(root), batch_size=args.batch, num_workers=args.workers, pin_memory=False)
        loader = dm.train_dataloader()  # one loader, persistent workers, as in training
        rates, kept = [], []
        for _epoch in range(args.epochs):
            n, start = 0, time.perf_counter()
            for batch in loader:
                n += batch["latent"].shape[0]
                if len(kept) < 8:
                    kept.append(batch)
            rates.append(n / (time.perf_counter() - start))
        # The per-batch flip / posterior draw / scale runs where the batch lands (the GPU in training);
        # timed here on the CPU, separately, so the two costs are not confused.
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        n = sum(dm.to_model_batch(b, generator)[0].shape[0] for b in kept)
        transform_rate = n / (time.perf_counter() - start)
        del loader
    # Plain reference: a DataLoader over the same data already in memory as one tensor.
    data = torch.randn(args.count, 2, 2, *shape).half()
    labels = torch.randint(0, 10, (args.count,))
    ref_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data, labels), batch_size=args.batch, shuffle=True, num_workers=0, drop_last=True
    )
    start, n = time.perf_counter(), 0
    for block, _ in ref_loader:
        n += block.shape[0]
    ref_rate = n / (time.perf_counter() - start)
    median = statistics.median(rates)
    print(
        f"# data: LatentDataModule, {args.count} samples of 4x{args.size}x{args.size} stored as (image, flip) x "
        f"(mean, std) float16, batch {args.batch}, {args.workers} workers; {hardware()}"
    )
    print(f"loader, per epoch (samples/s): {', '.join(f'{r:,.0f}' for r in rates)}; median {median:,.0f}")
    print(
        f"reference, in-memory TensorDataset + DataLoader: {ref_rate:,.0f} samples/s "
        f"(loader = {median / ref_rate:.2f}x)"
    )
    print(f"batch transform (flip + posterior sample + scale) on this CPU: {transform_rate:,.0f} samples/s")


# ------------------------------------------------------------------------------------------ train step
def bench_train(args) -> None:
    from ditlab.bench_train import run

    run(args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ditlab.bench", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sampling", help="NFE and seconds per image of every sampler")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--size", type=int, default=8)
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--depth", type=int, default=6)
    s.add_argument("--model", default=None, help="a model config (e.g. dit_xl2 with --size 32) instead of hidden/depth")
    s.add_argument("--samplers", default=ALL_SAMPLERS, help="name:steps,... (the first is the reference)")
    s.add_argument("--cfg-scale", type=float, default=1.5)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d = sub.add_parser("data", help="samples/s the LatentDataModule delivers")
    d.add_argument("--count", type=int, default=20000)
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--batch", type=int, default=256)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--epochs", type=int, default=3)
    t = sub.add_parser("train", help="img/s, ratio, MFU, memory: the official DiT step vs ditlab's DiTModule")
    t.add_argument("--models", type=lambda v: v.split(","), default=["dit_s2", "dit_b4", "dit_xl2"])
    t.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[32, 128])
    t.add_argument("--size", type=int, default=32, help="latent size (32: 256x256 images)")
    t.add_argument("--trainer", default="auto", help="the trainer config group (auto|cpu|gpu|ddp|fsdp)")
    t.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="module.compile (auto: on GPUs)")
    t.add_argument("--ac", type=int, default=0, help="module.activation_checkpointing (0 off, k every k-th block)")
    t.add_argument("--override", nargs="*", default=[], help="further ditlab.train overrides")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--repeats", type=int, default=1, help="interleaved official/ditlab repeats (medians)")
    t.add_argument(
        "--official",
        type=lambda v: {"on": True, "off": False}[v],
        default=True,
        help="on|off: also run the official step (off: ditlab rows only, e.g. where the official step cannot fit)",
    )
    t.add_argument(
        "--profile",
        default=None,
        help="a directory: profile ditlab's timed steps (torch.profiler), write a Chrome trace there, print top ops",
    )
    args = parser.parse_args(argv)
    {"sampling": bench_sampling, "data": bench_data, "train": bench_train}[args.what](args)


if __name__ == "__main__":
    main()
