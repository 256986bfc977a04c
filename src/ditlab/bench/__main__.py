"""Benchmarks: ``python -m ditlab.bench {sampling,data,train} [options]``.

Every figure is measured in the same process as its plain reference and printed with the
hardware, so a speed is always read as a ratio on a named machine.
"""

from __future__ import annotations

import argparse

import torch

from ditlab.bench.data import bench_data
from ditlab.bench.sampling import ALL_SAMPLERS, bench_sampling
from ditlab.bench.train import bench_train


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
    d = sub.add_parser("data", help="samples/s the LatentDataModule delivers from local disk and an S3 store")
    d.add_argument("--count", type=int, default=20000)
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--batch", type=int, default=256)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument(
        "--store",
        default="auto",
        help="auto: also read from a throwaway S3 server on 127.0.0.1 (moto); s3://bucket/prefix: that store "
        "(AWS_ENDPOINT_URL etc.; the prefix is overwritten); off: local disk only",
    )
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
