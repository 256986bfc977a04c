"""``python -m ditlab.sample ckpt=... num_samples=N``: samples as an ADM-format .npz and/or PNGs.

ADM's evaluator reads ``arr_0``: uint8 (N, H, W, C). The class labels go beside it as ``labels``.
Beside ``samples_NxHxWxC.npz`` goes ``samples_NxHxWxC.json`` (``samples.json`` in a folder of PNGs):
what was sampled with (checkpoint and step, weights, sampler, guidance, count, seed, labels, batch
size, processes, device, versions, and the command that draws the same samples again), which
``ditlab.evaluate`` copies into its results.

With torchrun each rank samples indices rank, rank + world, ... and writes its own part; rank 0
merges the parts in index order. Sample i's noise comes from its own stream (seed, i), so the
result does not depend on the world size or the batch size (``ditlab.inference.generate``). The
ranks first agree on a launch id and the output folder (rank 0's, through a short-lived gloo group:
``${now:...}`` in ``out`` is resolved by each process); parts are named by the launch id and written
atomically, so rank 0 merges only complete parts of this launch, never a stale one of an earlier run.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from ditlab.data.transforms import model_range_to_uint8
from ditlab.diffusion import Sampler
from ditlab.diffusion.protocols import protocol_from_node
from ditlab.inference import (
    CLASS_DRAWS,
    check_labels,
    generate,
    grid_image,
    grid_labels,
    load_model,
    sample_labels,
    save_grid,
)
from ditlab.metrics.provenance import (
    guidance_values,
    library_versions,
    sample_command,
    sampler_values,
    sampling_record_path,
)
from ditlab.runtime.checkpoints import checkpoint_step
from ditlab.runtime.errors import exit_on_error, hydra_command
from ditlab.runtime.files import atomic_path, write_json
from ditlab.runtime.processes import launched_by_srun, process_rank

log = logging.getLogger("ditlab.sample")
FORMATS = ("npz", "png", "both")


def _labels(cfg, num_classes: int, count: int) -> torch.Tensor:
    if cfg.labels is None or cfg.labels in CLASS_DRAWS:
        return sample_labels(num_classes, count, cfg.seed, cfg.labels or "uniform")
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
    protocol = protocol_from_node("protocol=", cfg.protocol) if cfg.get("protocol") else None
    given_guidance = instantiate(cfg.guidance) if cfg.guidance.scale is not None else None
    given_guidance = given_guidance or (protocol.guidance if protocol else None)
    given_sampler = instantiate(cfg.sampler) if cfg.get("sampler") else None
    given_sampler = given_sampler or (protocol.sampler if protocol else None)
    rank, world, local_rank = process_rank()
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
    model = load_model(cfg.ckpt, cfg.ema, cfg.vae_path, cfg.family, cfg.num_heads, cfg.latent_stats)
    sampler = given_sampler or model.own_sampler()
    if cfg.steps is not None:
        sampler = Sampler(sampler.name, cfg.steps, **sampler.options)
    sampler.check(model.objective)
    guidance = given_guidance or model.own_guidance()
    labels = grid_labels(model.num_classes, cfg.per_class, cfg.max_classes) if cfg.grid else None
    labels = _labels(cfg, model.num_classes, cfg.num_samples) if labels is None else labels
    check_labels(labels, model.num_classes)
    launch, out = shared_launch(Path(cfg.out), world)
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
    _save_npz(part_path(out, launch, rank), arr_0=arr, index=mine.numpy())
    log.info(f"rank {rank}: {len(mine)} samples in {time.time() - start:.1f} s")
    if rank != 0:
        return out
    merged = merge_parts(out, launch, world, cfg.num_samples)
    record = sampling_record(cfg, model, sampler, guidance, world, device, out)
    written = []
    if cfg.format in ("npz", "both"):
        path = out / f"samples_{cfg.num_samples}x{'x'.join(map(str, merged.shape[1:]))}.npz"
        _save_npz(path, arr_0=merged, labels=labels.numpy())
        written.append(path)
        log.info(f"wrote {path} (arr_0 {merged.shape} uint8, labels)")
    if cfg.format in ("png", "both"):
        written.append(out)
    for samples in written:
        write_json(sampling_record_path(samples), record)
    log.info(f"sampling record beside the samples; to draw them again: {record['command']}")
    return written[0]


def shared_launch(out: Path, world: int) -> tuple[str, Path]:
    """(an id of this launch, the output folder), the same on every rank: rank 0's, sent to the others
    through a short-lived gloo group (each rank resolved ``out`` itself, ``${now:...}`` included)."""
    launch = uuid.uuid4().hex[:12]
    if world == 1:
        return launch, out
    import torch.distributed as dist

    rank = process_rank()
    if launched_by_srun() and "MASTER_ADDR" not in os.environ:
        # srun sets no rendezvous: the address and port Lightning's SLURMEnvironment derives (the first
        # node of the job, 15000 + the job id's last 4 digits), without building one: it refuses
        # ``srun -n 2`` jobs whose tasks per node were not given.
        nodes = os.environ.get("SLURM_NODELIST", "127.0.0.1")
        os.environ["MASTER_ADDR"] = SLURMEnvironment.resolve_root_node_address(nodes)
        os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ["SLURM_JOB_ID"][-4:])))
    dist.init_process_group("gloo", rank=rank.rank, world_size=rank.world_size)
    try:
        shared = [launch, str(out)]
        dist.broadcast_object_list(shared, src=0)
    finally:
        dist.destroy_process_group()
    if Path(shared[1]) != out and out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # the folder Hydra made for this rank's own ``out``: unused
    return shared[0], Path(shared[1])


def part_path(out: Path, launch: str, rank: int) -> Path:
    return out / f".part-{launch}-{rank}.npz"


def merge_parts(out: Path, launch: str, world: int, count: int) -> np.ndarray:
    """uint8 (count, H, W, C): the parts of this launch, each complete when it exists (written
    atomically), in sample order. Parts of other launches are never read, and are removed."""
    parts = [part_path(out, launch, r) for r in range(world)]
    while not all(p.exists() for p in parts):
        time.sleep(0.5)
    merged, covered = None, np.zeros(count, dtype=np.int64)
    for path in parts:
        with np.load(path) as part:
            images, index = part["arr_0"], part["index"]
        if len(images) == 0:
            continue
        if merged is None:
            merged = np.zeros((count, *images.shape[1:]), np.uint8)
        merged[index] = images
        np.add.at(covered, index, 1)
    if merged is None or not (covered == 1).all():
        raise RuntimeError(f"the parts of launch {launch} in {out} do not hold each of the {count} samples once")
    for path in parts:
        path.unlink()
    for stale in sorted(set(out.glob(".part-*.npz")) - set(parts)):
        log.warning(f"removed {stale.name}: a part of an earlier launch (not merged)")
        stale.unlink()
    return merged


def sampling_record(cfg, model, sampler: Sampler, guidance, world: int, device: torch.device, out: Path) -> dict:
    """What the samples were drawn with, as plain values, and the command that draws them again."""
    ckpt = Path(cfg.ckpt).resolve()
    record = {
        "checkpoint": {
            "path": str(ckpt),
            "step": checkpoint_step(ckpt) if model.record is not None else None,
            "weights": "ema" if cfg.ema else "raw",
            "source": model.source,
        },
        "vae_path": cfg.vae_path,
        "family": cfg.family if cfg.family != "auto" else None,
        "num_heads": cfg.num_heads,
        "latent_stats": cfg.latent_stats,
        "sampler": sampler_values(sampler),
        "sampler_text": sampler.describe(),
        "guidance": guidance_values(guidance),
        "guidance_text": guidance.describe(),
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        # None: uniform from the seed; "balanced": balanced from the seed; a list: cycled
        "labels": cfg.labels if cfg.labels is None or isinstance(cfg.labels, str) else list(cfg.labels),
        "batch_size": cfg.batch_size,
        "world_size": world,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "format": cfg.format,
        "out": str(out.resolve()),
        "versions": library_versions(),
    }
    record["command"] = sample_command(record)
    return record


@hydra_command("ditlab.sample", "sample")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.sample", sample, cfg)


if __name__ == "__main__":
    main()
