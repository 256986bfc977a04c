"""``python -m ditlab.sample ckpt=... num_samples=N``: samples as an ADM-format .npz and/or PNGs.

ADM's evaluator reads ``arr_0``: uint8 (N, H, W, C). The class labels go beside it as ``labels``.
With torchrun each rank samples indices rank, rank + world, ... and writes its own part; rank 0
merges the parts in index order. Sample i's noise comes from its own stream (seed, i), so the
result does not depend on the world size or the batch size (``ditlab.inference.generate``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from ditlab.data.transforms import model_range_to_uint8
from ditlab.diffusion import Sampler
from ditlab.inference import check_labels, generate, grid_image, grid_labels, load_model, sample_labels, save_grid
from ditlab.runtime.errors import exit_on_error, hydra_command
from ditlab.runtime.files import atomic_path
from ditlab.runtime.processes import process_rank

log = logging.getLogger("ditlab.sample")
FORMATS = ("npz", "png", "both")


def _labels(cfg, num_classes: int, count: int) -> torch.Tensor:
    if cfg.labels is None:
        return sample_labels(num_classes, count, cfg.seed)
    given = torch.tensor(list(cfg.labels), dtype=torch.long)
    return given.repeat(-(-count // len(given)))[:count]


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp, format="PNG")


def _save_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def sample(cfg: DictConfig) -> Path:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}; expected one of {FORMATS}")
    if cfg.num_samples < 1:
        raise ValueError(f"num_samples={cfg.num_samples} must be >= 1")
    # Given choices are checked before anything is loaded; the checkpoint's own wait for it.
    given_guidance = instantiate(cfg.guidance) if cfg.guidance.scale is not None else None
    given_sampler = instantiate(cfg.sampler) if cfg.get("sampler") else None
    rank, world, local_rank = process_rank()
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
    model = load_model(cfg.ckpt, cfg.ema, cfg.vae_path)
    sampler = given_sampler or model.own_sampler()
    if cfg.steps is not None:
        sampler = Sampler(sampler.name, cfg.steps, **sampler.options)
    sampler.check(model.objective)
    guidance = given_guidance or model.own_guidance()
    labels = grid_labels(model.num_classes, cfg.per_class, cfg.max_classes) if cfg.grid else None
    labels = _labels(cfg, model.num_classes, cfg.num_samples) if labels is None else labels
    check_labels(labels, model.num_classes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    log.info(f"{model.source}; {sampler.describe()}, {guidance.describe()}; writing to {out}")

    def draw(indices: torch.Tensor) -> torch.Tensor:
        return generate(
            model.net,
            model.objective,
            sampler,
            labels[indices],
            indices,
            latent_shape=model.latent_shape,
            null_label=model.num_classes,
            codec=model.codec,
            guidance=guidance,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            device=device,
        )

    if cfg.grid:
        path = save_grid(grid_image(draw(torch.arange(len(labels))), cfg.per_class), out / "grid.png")
        log.info(f"wrote {path}")
        return path
    mine = torch.arange(rank, cfg.num_samples, world)  # this rank's sample indices
    images, start = [], time.time()
    for chunk in tqdm(mine.split(cfg.batch_size), desc=f"rank {rank}", disable=rank != 0):
        batch = model_range_to_uint8(draw(chunk)).numpy()  # (n, H, W, C)
        images.append(batch)
        if cfg.format in ("png", "both"):
            for index, array in zip(chunk.tolist(), batch):
                _save_png(array, out / f"{index:06d}.png")
    arr = np.concatenate(images) if images else np.zeros((0, 1, 1, 1), np.uint8)
    _save_npz(out / f".part-{rank}.npz", arr_0=arr, index=mine.numpy())
    log.info(f"rank {rank}: {len(mine)} samples in {time.time() - start:.1f} s")
    if rank == 0 and cfg.format in ("npz", "both"):
        _merge_parts(out, world, cfg.num_samples, labels.numpy())
    return out


def _merge_parts(out: Path, world: int, count: int, labels: np.ndarray) -> Path:
    parts = [out / f".part-{r}.npz" for r in range(world)]
    while not all(p.exists() for p in parts):
        time.sleep(0.5)
    arrays = [np.load(p) for p in parts]
    first = next(a["arr_0"] for a in arrays if len(a["arr_0"]))
    merged = np.zeros((count, *first.shape[1:]), np.uint8)
    for a in arrays:
        merged[a["index"]] = a["arr_0"]
    path = out / f"samples_{count}x{merged.shape[1]}x{merged.shape[2]}x{merged.shape[3]}.npz"
    _save_npz(path, arr_0=merged, labels=labels)
    for p in parts:
        p.unlink()
    log.info(f"wrote {path} (arr_0 {merged.shape} uint8, labels)")
    return path


@hydra_command("ditlab.sample", "sample")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.sample", sample, cfg)


if __name__ == "__main__":
    main()
