"""``python -m ditlab.bench data``: samples/s the LatentDataModule delivers from local disk and from an
S3-protocol object store, against an in-memory loader.

The store is a throwaway server on 127.0.0.1 (moto, ``--store auto``) unless ``--store s3://bucket/prefix``
names one (endpoint and credentials from the AWS environment; the prefix is overwritten). Its first
epoch fetches every chunk into an empty cache; the later ones read that cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ditlab.bench.common import hardware
from ditlab.bench.s3_server import LocalS3Server
from ditlab.data import storage
from ditlab.data.datamodule import LatentDataModule
from ditlab.data.prepared import PreparedDir
from ditlab.data.shards import ShardWriter

BENCH_BUCKET = "ditlab-bench"


def _write_synthetic_shards(root: Path, count: int, latent_shape) -> Path:
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


def _epoch_rates(dm: LatentDataModule, epochs: int, kept: list | None = None) -> list[float]:
    """samples/s of each epoch through one loader (persistent workers, as in training)."""
    loader = dm.train_dataloader()
    rates = []
    for _epoch in range(epochs):
        n, start = 0, time.perf_counter()
        for batch in loader:
            n += batch["latent"].shape[0]
            if kept is not None and len(kept) < 8:
                kept.append(batch)
        rates.append(n / (time.perf_counter() - start))
    return rates


@contextlib.contextmanager
def _store(where: str):
    """The URL to put the shards at, with the AWS environment pointing at its server."""
    if where != "auto":
        storage.split_url(where)
        yield where.rstrip("/")
        return
    with LocalS3Server() as server, _environment(server.environment):
        server.create_bucket(BENCH_BUCKET)
        yield f"s3://{BENCH_BUCKET}/bench"


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _publish(local: Path, url: str) -> float:
    """Upload a prepared dir as prepare does (meta.json last); returns MB/s."""
    start = time.perf_counter()
    storage.upload(local / "train", storage.join(url, "train"))
    storage.upload_file(local / PreparedDir.META, storage.join(url, PreparedDir.META))
    size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    return size / 1e6 / (time.perf_counter() - start)


def bench_data(args) -> None:
    shape = (4, args.size, args.size)
    loader_args = {"batch_size": args.batch, "num_workers": args.workers, "pin_memory": False}
    store = None
    with tempfile.TemporaryDirectory() as tmp:
        root = _write_synthetic_shards(Path(tmp) / "local", args.count, shape)
        dm = LatentDataModule(str(root), **loader_args)
        kept = []
        rates = _epoch_rates(dm, args.epochs, kept)
        # The per-batch flip / posterior draw / scale runs where the batch lands (the GPU in training);
        # timed here on the CPU, separately, so the two costs are not confused.
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        n = sum(dm.to_model_batch(b, generator)[0].shape[0] for b in kept)
        transform_rate = n / (time.perf_counter() - start)
        if args.store != "off":
            with _store(args.store) as url:
                upload_rate = _publish(root, url)
                remote = LatentDataModule(url, cache_dir=str(Path(tmp) / "cache"), **loader_args)
                store = (url, storage.endpoint(), upload_rate, _epoch_rates(remote, args.epochs))
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
    print(f"loader, local disk, per epoch (samples/s): {', '.join(f'{r:,.0f}' for r in rates)}; median {median:,.0f}")
    if store is not None:
        url, endpoint, upload_rate, remote_rates = store
        cached = statistics.median(remote_rates[1:]) if len(remote_rates) > 1 else None
        print(
            f"loader, object store {url} at {endpoint}, per epoch (samples/s): "
            f"{', '.join(f'{r:,.0f}' for r in remote_rates)} (the first fetches every chunk"
            + (f"; median of the cached epochs {cached:,.0f})" if cached else ")")
            + f"; upload {upload_rate:,.1f} MB/s"
        )
    ratios = f"local loader = {median / ref_rate:.2f}x"
    if store is not None:
        ratios += f", object store first epoch = {remote_rates[0] / ref_rate:.2f}x"
        ratios += f", cached epochs = {cached / ref_rate:.2f}x" if cached else ""
    print(f"reference, in-memory TensorDataset + DataLoader: {ref_rate:,.0f} samples/s ({ratios})")
    print(f"batch transform (flip + posterior sample + scale) on this CPU: {transform_rate:,.0f} samples/s")
