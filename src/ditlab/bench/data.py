"""``python -m ditlab.bench data``: samples/s the LatentDataModule delivers, against an in-memory loader."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ditlab.bench.common import hardware
from ditlab.data.datamodule import LatentDataModule
from ditlab.data.shards import ShardWriter


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


def bench_data(args) -> None:
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
