"""``python -m ditlab.sample ckpt=... num_samples=N``: samples as an ADM-format .npz and/or PNGs.

ADM's evaluator reads ``arr_0``: uint8 (N, H, W, C). The class labels go beside it as ``labels``.
With torchrun each rank samples indices rank, rank + world, ... and writes its own part; rank 0
merges the parts in index order. Sample i's noise comes from its own stream (seed, i), so the
result does not depend on the world size or the batch size (``ditlab.inference.generate``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ditlab.cli import exit_on_error, hydra_command
from ditlab.inference import Guidance, check_labels, generate, load_model, sample_labels

log = logging.getLogger("ditlab.sample")
FORMATS = ("npz", "png", "both")


# What official checkpoints and diffusers folders sample with by default (DiT's FID protocol).
OFFICIAL_SAMPLER = {"_target_": "ditlab.diffusion.Sampler", "name": "ddpm", "steps": 250}
OFFICIAL_CFG_SCALE = 1.5


def run_sampler(sampler_cfg: DictConfig, run_cfg: DictConfig | None) -> DictConfig:
    """``sampler=run``: the checkpoint run's own sampler config (what its grids used), with the
    given ``steps`` if any; DDPM-250 without a run config. Any other choice as given."""
    if sampler_cfg.name != "run":
        return sampler_cfg
    own = run_cfg.sampler if run_cfg is not None and "sampler" in run_cfg else OmegaConf.create(OFFICIAL_SAMPLER)
    given = {k: v for k, v in sampler_cfg.items() if k not in ("_target_", "name") and v is not None}
    return OmegaConf.merge(own, given)


def run_guidance(run_cfg: DictConfig | None) -> Guidance:
    """``cfg_scale=null``: the checkpoint run's grid guidance (scale, channels, interval: what its
    grids showed); 1.5 everywhere without a run config (official checkpoints, diffusers folders)."""
    grid = OmegaConf.select(run_cfg, "callbacks.sample_grid") if run_cfg is not None else None
    if grid is None:
        return Guidance(OFFICIAL_CFG_SCALE)
    return Guidance(grid.cfg_scale, grid.get("guided_channels"), grid.get("guidance_interval"))


def _labels(cfg, num_classes: int, count: int) -> torch.Tensor:
    if cfg.labels is None:
        return sample_labels(num_classes, count, cfg.seed)
    given = torch.tensor(list(cfg.labels), dtype=torch.long)
    return given.repeat(-(-count // len(given)))[:count]


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    tmp.replace(path)


def run(cfg: DictConfig) -> Path:
    from hydra.utils import instantiate

    from ditlab.data.transforms import model_range_to_uint8

    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}; expected one of {FORMATS}")
    if cfg.num_samples < 1:
        raise ValueError(f"num_samples={cfg.num_samples} must be >= 1")
    # Given guidance is checked before anything is loaded; cfg_scale=null waits for the run's config.
    given = cfg.cfg_scale is not None
    guidance = Guidance(cfg.cfg_scale, cfg.guided_channels, cfg.guidance_interval) if given else None
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cuda.matmul.allow_tf32 = True
    bundle = load_model(cfg.ckpt, cfg.ema, cfg.vae_path)
    sampler = instantiate(run_sampler(cfg.sampler, bundle.run_config))
    sampler.check(bundle.objective)
    if not given:
        guidance = run_guidance(bundle.run_config)
    if cfg.grid:
        classes = min(bundle.num_classes, cfg.max_classes)
        labels = torch.arange(classes).repeat_interleave(cfg.per_class)  # one row per class
    else:
        labels = _labels(cfg, bundle.num_classes, cfg.num_samples)
    check_labels(labels, bundle.num_classes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle.to(device)
    log.info(f"{bundle.source}; {sampler.describe()}, {guidance.describe()}; writing to {out}")

    if cfg.grid:
        return _grid(bundle, sampler, guidance, labels, cfg, device, out)
    mine = torch.arange(rank, cfg.num_samples, world)  # this rank's sample indices
    images, start = [], time.time()
    for chunk in tqdm(mine.split(cfg.batch_size), desc=f"rank {rank}", disable=rank != 0):
        decoded = _generate(bundle, sampler, guidance, labels[chunk], chunk, cfg, device)
        batch = model_range_to_uint8(decoded).numpy()  # (n, H, W, C)
        images.append(batch)
        if cfg.format in ("png", "both"):
            for index, array in zip(chunk.tolist(), batch):
                _save_png(array, out / f"{index:06d}.png")
    part = out / f".part-{rank}.npz"
    arr = np.concatenate(images) if images else np.zeros((0, 1, 1, 1), np.uint8)
    np.savez(part.with_suffix(".tmp.npz"), arr_0=arr, index=mine.numpy())
    part.with_suffix(".tmp.npz").replace(part)
    log.info(f"rank {rank}: {len(mine)} samples in {time.time() - start:.1f} s")
    if rank == 0 and cfg.format in ("npz", "both"):
        _merge_parts(out, world, cfg.num_samples, labels.numpy())
    return out


def _generate(bundle, sampler, guidance, labels, indices, cfg, device) -> torch.Tensor:
    return generate(
        bundle.net,
        bundle.objective,
        sampler,
        labels,
        indices,
        latent_shape=bundle.latent_shape,
        null_label=bundle.num_classes,
        codec=bundle.codec,
        guidance=guidance,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        device=device,
    )


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
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, arr_0=merged, labels=labels)
    tmp.replace(path)
    for p in parts:
        p.unlink()
    log.info(f"wrote {path} (arr_0 {merged.shape} uint8, labels)")
    return path


def _grid(bundle, sampler, guidance, labels, cfg, device, out: Path) -> Path:
    from torchvision.utils import make_grid, save_image

    images = _generate(bundle, sampler, guidance, labels, torch.arange(len(labels)), cfg, device)
    path = out / "grid.png"
    save_image(make_grid((images + 1) / 2, nrow=cfg.per_class, padding=2, pad_value=1.0), path)
    log.info(f"wrote {path}")
    return path


@hydra_command("ditlab.sample", "sample")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.sample", run, cfg)


if __name__ == "__main__":
    main()
