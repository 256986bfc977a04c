"""Images -> VAE latent shards (+ meta.json and FID reference statistics): the work of
``python -m ditlab.prepare``, also run by ``ditlab.train`` when ``prepare_if_missing`` is set.

A rerun skips every split (and the small VAE) already complete. With several processes
(``torchrun --nproc_per_node=N -m ditlab.prepare ...``) each rank encodes every N-th image and
writes its own chunk files; rank 0 merges the indexes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import ditlab
from ditlab.data.extract import extract_split
from ditlab.data.shards import META_FILE, count_items, read_meta, split_is_complete, write_json_atomic
from ditlab.metrics.reference import compute_reference

log = logging.getLogger("ditlab.prepare")


def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def prepare_dataset(cfg: DictConfig) -> Path:
    """Prepare ``cfg.data`` with ``cfg.vae`` (``cfg.encode``: device, batch size, workers); returns the prepared dir."""
    out_dir = Path(cfg.data.prepared_dir)
    rank, world_size = _dist_env()
    device = torch.device(
        cfg.encode.device if cfg.encode.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    reference = cfg.data.get("reference")
    make_source = instantiate(cfg.data.source, _partial_=True)
    if (out_dir / META_FILE).is_file():
        from ditlab.training.preflight import check_vae_matches

        check_vae_matches(cfg.vae, read_meta(out_dir), out_dir)  # prepared with another VAE: say so, not "done"
        missing_reference = (
            reference and reference.extractor and not (out_dir / f"reference_{reference.extractor}.npz").is_file()
        )
        if missing_reference and rank == 0:  # e.g. a directory prepared before the reference was configured
            compute_reference(reference, {s: make_source(split=s) for s in cfg.data.splits}, out_dir, device)
        else:
            log.info(f"{out_dir} is already prepared; nothing to do (delete it to redo)")
        return out_dir
    sources = {split: make_source(split=split) for split in cfg.data.splits}  # bad input fails here, before any write
    if len(sources["train"]) == 0:
        raise ValueError(f"data.source has no training images ({cfg.data.source}); expected images to prepare")
    out_dir.mkdir(parents=True, exist_ok=True)

    from ditlab.training.fit_vae import SmallVAERecipe

    codec = instantiate(cfg.vae.codec)
    if isinstance(codec, SmallVAERecipe):
        if rank != 0:
            raise RuntimeError("train the small VAE with one process first (it is cached), then rerun with several")
        codec = codec.fit_or_load(sources["train"], out_dir / "vae", device, log=log.info)
    codec = codec.to(device).eval()
    image_channels = sources["train"].channels
    latent_channels = codec.latent_channels(image_channels)
    store_posterior = codec.kind != "identity"

    summaries = {}
    for split, source in sources.items():
        split_dir = out_dir / split
        if split_is_complete(split_dir):
            log.info(f"{split}: already written, skipped")
            summaries[split] = {"count": count_items(split_dir), "per_class": None, "skipped": []}
            continue
        summary = extract_split(
            source,
            codec,
            split_dir,
            store_posterior,
            cfg.data.flip,
            cfg.encode.batch_size,
            cfg.encode.num_workers,
            device,
            rank,
            world_size,
            progress=cfg.encode.progress,
        )
        summaries[split] = summary
        log.info(
            f"{split}: {summary['count']} images at {summary['images_per_s']} img/s; per class "
            f"{summary['per_class']}; skipped {len(summary['skipped'])} unreadable: {summary['skipped'][:20]}"
        )
    if rank != 0:
        return out_dir
    if reference and reference.extractor:
        compute_reference(reference, sources, out_dir, device)

    size = sources["train"].image_size // codec.downsample
    meta = {
        "dataset": cfg.data.name,
        "classes": list(sources["train"].classes),
        "num_classes": len(sources["train"].classes),
        "splits": {
            s: {"count": v["count"], "per_class": v["per_class"], "skipped": v["skipped"]} for s, v in summaries.items()
        },
        "resolution": sources["train"].image_size,
        "image_channels": image_channels,
        "latent_shape": [latent_channels, size, size],
        "latent_format": "posterior" if store_posterior else "sample",
        "latent_dtype": "float16",
        "views": 2 if cfg.data.flip else 1,  # each item: [image, its horizontal flip] or [image]
        "vae": {**codec.describe(), "name": cfg.vae.name},  # train checks it names the same VAE
        "ditlab_version": ditlab.__version__,
    }
    write_json_atomic(out_dir / META_FILE, meta)
    log.info(f"prepared {out_dir}: latents {meta['latent_shape']}, scale factor {meta['vae']['scale_factor']:.5f}")
    return out_dir
