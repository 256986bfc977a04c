"""Images -> VAE latents -> shards, for one split, on one rank's share of the images."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ditlab.data.shards import ShardWriter
from ditlab.data.sources import collate_skipping_failures
from ditlab.data.transforms import model_range_to_uint8
from ditlab.runtime.faults import fault_point


@torch.no_grad()
def encode_views(codec, images: torch.Tensor, store_posterior: bool, flip: bool = True) -> torch.Tensor:
    """(N, C, H, W) images -> (N, V, M, C', H', W') float16 latent blocks: V = 2 views (the image and
    its horizontal flip) or V = 1 (the image alone, ``flip=False``), each as [posterior mean, std]
    (M = 2) or [sample] (M = 1, deterministic codecs)."""
    views = torch.cat([images, images.flip(-1)], dim=0) if flip else images  # (V*N, C, H, W)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if views.is_cuda else nullcontext()
    with amp:
        mean, std = codec.encode(views)
    moments = torch.stack([mean.float(), std.float()], dim=1) if store_posterior else mean.float().unsqueeze(1)
    # (V*N, M, C', H', W') -> (N, V, M, C', H', W'): view v of image i sits at row v*N + i
    return moments.unflatten(0, (-1, images.shape[0])).transpose(0, 1).to(torch.float16)


def extract_split(
    source,
    codec,
    split_dir: Path,
    store_posterior: bool,
    flip: bool = True,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    store_images: bool = False,
    wait_s: float = 3600.0,
    store_dir: str | None = None,
) -> dict:
    """Encode this rank's images (every world_size-th, starting at rank), with their horizontal
    flips when ``flip``, and write its shards (with the uint8 images too when ``store_images``); rank 0
    waits up to ``wait_s`` for the other ranks' shards. ``store_dir``: the split's URL, where the ranks
    put their shards (``ShardWriter``). Returns a summary: counts per class, skipped (unreadable) keys,
    images/s."""
    indices = list(range(rank, len(source), world_size))
    loader = DataLoader(
        Subset(source, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping_failures
    )
    writer = ShardWriter(split_dir, rank, world_size, store_dir=store_dir)
    per_class: Counter = Counter()
    skipped: list[str] = []
    start = time.time()
    bar = tqdm(total=len(indices), unit="img", desc=f"encode {split_dir.name}", disable=not progress)
    for images, labels, _keys, failed in loader:
        skipped += failed
        if images is not None:
            latents = encode_views(codec, images.to(device), store_posterior, flip).cpu().numpy()
            stored = model_range_to_uint8(images).permute(0, 3, 1, 2).numpy() if store_images else [None] * len(latents)
            for latent, label, image in zip(latents, labels.tolist(), stored):
                writer.add(np.ascontiguousarray(latent), label, image if image is None else np.ascontiguousarray(image))
                per_class[label] += 1
        bar.update(len(failed) + (0 if images is None else len(images)))
        fault_point("prepare_batch")  # test-only: prepare killed half-way (ditlab.runtime.faults)
    bar.close()
    writer.finish(timeout_s=wait_s)
    seconds = time.time() - start
    count = sum(per_class.values())
    return {
        "count": count,
        "per_class": {int(k): v for k, v in sorted(per_class.items())},
        "skipped": skipped,
        "images_per_s": round(count / max(seconds, 1e-9), 1),
    }
