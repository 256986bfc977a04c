"""``python -m ditlab.prepare data=<dataset> vae=<vae>``: images -> VAE latent shards (+ meta.json).

A rerun skips every split (and the small VAE) already complete. With several processes
(``torchrun --nproc_per_node=N -m ditlab.prepare ...``) each rank encodes every N-th image and
writes its own chunk files; rank 0 merges the indexes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import ditlab
from ditlab.data.extract import extract_split
from ditlab.data.shards import META_FILE, count_items, split_is_complete, write_json_atomic
from ditlab.data.sources import collate_skipping_failures
from ditlab.vae import SmallVAERecipe

log = logging.getLogger("ditlab.prepare")


def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def prepare(cfg: DictConfig) -> Path:
    """Run the preparation described by a composed config; returns the prepared directory."""
    out_dir = Path(cfg.data.prepared_dir)
    rank, world_size = _dist_env()
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    reference = cfg.data.get("reference")
    make_source = instantiate(cfg.data.source, _partial_=True)
    if (out_dir / META_FILE).is_file():
        missing_reference = (
            reference and reference.extractor and not (out_dir / f"reference_{reference.extractor}.npz").is_file()
        )
        if missing_reference and rank == 0:  # e.g. a directory prepared before the reference was configured
            prepare_reference(reference, {s: make_source(split=s) for s in cfg.data.splits}, out_dir, device)
        else:
            log.info(f"{out_dir} is already prepared; nothing to do (delete it to redo)")
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {split: make_source(split=split) for split in cfg.data.splits}

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
            cfg.batch_size,
            cfg.num_workers,
            device,
            rank,
            world_size,
            progress=cfg.progress,
        )
        summaries[split] = summary
        log.info(
            f"{split}: {summary['count']} images at {summary['images_per_s']} img/s; per class "
            f"{summary['per_class']}; skipped {len(summary['skipped'])} unreadable: {summary['skipped'][:20]}"
        )
    if rank != 0:
        return out_dir
    if reference and reference.extractor:
        prepare_reference(reference, sources, out_dir, device)

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
        "vae": codec.describe(),
        "ditlab_version": ditlab.__version__,
    }
    write_json_atomic(out_dir / META_FILE, meta)
    log.info(f"prepared {out_dir}: latents {meta['latent_shape']}, scale factor {meta['vae']['scale_factor']:.5f}")
    return out_dir


def prepare_reference(ref_cfg, sources: dict, out_dir: Path, device) -> Path:
    """FID reference statistics of a split (and, for ``clf``, the classifier that defines them)."""
    from ditlab.data.transforms import model_range_to_uint8
    from ditlab.metrics.classifier import train_classifier
    from ditlab.metrics.fidelity import Extractor, ReferenceStats

    kind = ref_cfg.extractor
    path = out_dir / f"reference_{kind}.npz"
    if path.is_file():
        log.info(f"{path.name}: already computed, skipped")
        return path
    weights = ref_cfg.weights_path
    if kind == "clf":
        weights = str(out_dir / "classifier")
        if not (Path(weights) / "classifier.json").is_file():
            num_classes = len(sources["train"].classes)
            train_classifier(
                sources["train"],
                sources.get("val", sources["train"]),
                num_classes,
                weights,
                seconds=ref_cfg.classifier_seconds,
                log=log.info,
                device=device,
            )
    extractor = Extractor(kind, weights, device=str(device))
    source = sources[ref_cfg.split]
    count = len(source) if ref_cfg.max_images is None else min(len(source), ref_cfg.max_images)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(source, range(count)), batch_size=500, collate_fn=collate_skipping_failures
    )
    features = []
    for images, _labels, _keys, _failed in loader:
        if images is not None:
            features.append(extractor(model_range_to_uint8(images).permute(0, 3, 1, 2))["features"])
    ReferenceStats.from_features(torch.cat(features), kind).save(path)
    log.info(f"{path.name}: statistics of {count} {ref_cfg.split} images")
    return path


@hydra.main(version_base="1.3", config_path=str(Path(__file__).parent / "conf"), config_name="prepare")
def main(cfg: DictConfig) -> None:
    log.debug(OmegaConf.to_yaml(cfg))
    prepare(cfg)


if __name__ == "__main__":
    main()
