"""Images -> latent shards + FID reference statistics + meta.json: the stage ``python -m ditlab.prepare``
runs (and ``ditlab.train`` when ``prepare_if_missing`` is set), composed of

    fit the codec (the small VAE is trained here, or its cached copy loaded)
    -> extract every split (encode each image, write its shards)
    -> reference statistics (for fid_clf the dataset classifier is trained first)
    -> meta.json, written last: its presence means "prepared".

A rerun skips every part already complete. With several processes (``torchrun
--nproc_per_node=N -m ditlab.prepare ...``) each rank encodes every N-th image and writes its own
chunk files; rank 0 merges the indexes, computes the statistics and writes meta.json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import ditlab
from ditlab.data.extract import extract_split
from ditlab.data.prepared import PreparedDir
from ditlab.data.shards import count_items, split_is_complete
from ditlab.pipelines.fit_vae import SmallVAERecipe
from ditlab.pipelines.reference import ReferenceSettings, write_reference
from ditlab.runtime.processes import process_rank

log = logging.getLogger("ditlab.prepare")


@dataclass
class EncodeSettings:
    """``encode``: how images are encoded. device auto|cpu|cuda (on GPU the VAE encodes in bf16)."""

    device: str = "auto"
    batch_size: int = 256  # images per encoder batch (each with its flip when data.flip is on)
    num_workers: int = 2  # image decoding workers
    progress: bool = True

    def torch_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", process_rank().local_rank)


def check_vae_matches(
    vae_name: str, recipe: SmallVAERecipe | None, codec_path: str | None, meta: dict, prepared: PreparedDir
) -> None:
    """The prepared latents were made with the VAE the config names (else decoding them is garbage)."""
    stored = meta.get("vae", {})
    if "name" in stored and stored["name"] != vae_name:
        raise ValueError(
            f"vae={vae_name} but {prepared.root} was prepared with vae={stored['name']}; "
            f"expected vae={stored['name']} (or another data.prepared_dir)"
        )
    if recipe is not None:
        recipe.check_cached(prepared.vae)
    if codec_path and stored.get("path") and stored["path"] != codec_path:
        raise ValueError(
            f"vae.codec.path={codec_path} but {prepared.root} was encoded with {stored['path']}; expected the same VAE"
        )


def fit_codec(recipe: SmallVAERecipe | None, make_codec: Callable | None, train_source, prepared, device, rank: int):
    """The codec to encode with: the small VAE (trained on ``train_source`` or loaded from the prepared
    dir) when there is a recipe, else the configured codec."""
    if recipe is None:
        return make_codec()
    if rank != 0 and not (prepared.vae.is_dir()):
        raise RuntimeError("train the small VAE with one process first (it is cached), then rerun with several")
    return recipe.fit_or_load(train_source, prepared.vae, device, log=log.info)


def prepare_dataset(
    prepared: PreparedDir,
    dataset_name: str,
    make_source: Callable[[str], torch.utils.data.Dataset],
    splits: Sequence[str],
    vae_name: str,
    recipe: SmallVAERecipe | None,
    make_codec: Callable | None,
    flip: bool,
    encode: EncodeSettings,
    reference: ReferenceSettings | None,
) -> Path:
    """Prepare the images ``make_source(split)`` gives into ``prepared``; returns its root.

    ``recipe`` (the small VAE) or ``make_codec`` (a pretrained or identity codec) encode; ``flip``
    also stores each image's mirror; ``reference`` (its extractor None: none) the FID statistics."""
    rank, world_size, _ = process_rank()
    device = encode.torch_device()
    wants_reference = reference is not None and reference.extractor is not None
    if prepared.is_prepared():
        check_vae_matches(vae_name, recipe, _codec_path(make_codec), prepared.read_meta(), prepared)
        if wants_reference and not prepared.reference(reference.extractor).is_file() and rank == 0:
            # e.g. a directory prepared before its reference statistics were configured
            write_reference(reference, {s: make_source(s) for s in splits}, prepared, device)
        else:
            log.info(f"{prepared.root} is already prepared; nothing to do (delete it to redo)")
        return prepared.root
    sources = {split: make_source(split) for split in splits}  # bad input fails here, before any write
    if len(sources["train"]) == 0:
        raise ValueError(f"{dataset_name} has no training images; expected images to prepare")
    prepared.local.mkdir(parents=True, exist_ok=True)  # a remote dir's staging folder (uploaded by write_meta)
    codec = fit_codec(recipe, make_codec, sources["train"], prepared, device, rank).to(device).eval()
    summaries = {
        split: _extract(split, source, codec, prepared, flip, encode, device) for split, source in sources.items()
    }
    if rank != 0:
        return prepared.root
    if wants_reference:
        write_reference(reference, sources, prepared, device)
    meta = _meta(dataset_name, sources["train"], codec, vae_name, flip, summaries)
    prepared.write_meta(meta)
    log.info(
        f"prepared {prepared.root}: latents {meta['latent_shape']}, scale factor {meta['vae']['scale_factor']:.5f}"
    )
    return prepared.root


def _codec_path(make_codec) -> str | None:
    """The hub id or folder a pretrained codec factory loads (a ``functools.partial``'s ``path``)."""
    return getattr(make_codec, "keywords", {}).get("path")


def _extract(split: str, source, codec, prepared: PreparedDir, flip: bool, encode: EncodeSettings, device) -> dict:
    split_dir = prepared.split(split)
    if split_is_complete(split_dir):
        log.info(f"{split}: already written, skipped")
        return {"count": count_items(split_dir), "per_class": None, "skipped": []}
    rank, world_size, _ = process_rank()
    summary = extract_split(
        source,
        codec,
        split_dir,
        store_posterior=codec.kind != "identity",
        flip=flip,
        batch_size=encode.batch_size,
        num_workers=encode.num_workers,
        device=device,
        rank=rank,
        world_size=world_size,
        progress=encode.progress,
    )
    log.info(
        f"{split}: {summary['count']} images at {summary['images_per_s']} img/s; per class "
        f"{summary['per_class']}; skipped {len(summary['skipped'])} unreadable: {summary['skipped'][:20]}"
    )
    return summary


def _meta(dataset_name: str, train_source, codec, vae_name: str, flip: bool, summaries: dict) -> dict:
    size = train_source.image_size // codec.downsample
    return {
        "dataset": dataset_name,
        "classes": list(train_source.classes),
        "num_classes": len(train_source.classes),
        "splits": {
            s: {"count": v["count"], "per_class": v["per_class"], "skipped": v["skipped"]} for s, v in summaries.items()
        },
        "resolution": train_source.image_size,
        "image_channels": train_source.channels,
        "latent_shape": [codec.latent_channels(train_source.channels), size, size],
        "latent_format": "sample" if codec.kind == "identity" else "posterior",
        "latent_dtype": "float16",
        "views": 2 if flip else 1,  # each item: [image, its horizontal flip] or [image]
        "vae": {**codec.describe(), "name": vae_name},  # train checks it names the same VAE
        "ditlab_version": ditlab.__version__,
    }
