"""Images -> latent shards + FID reference statistics + meta.json: the stage ``python -m ditlab.prepare``
runs (and ``ditlab.train`` when ``prepare_if_missing`` is set), composed of

    fit the codec (the small VAE is trained here, or its cached copy loaded)
    -> extract every split (encode each image, write its shards)
    -> reference statistics (for fid_clf the dataset classifier is trained first)
    -> meta.json, written last: its presence means "prepared".

A rerun skips every part already complete. With several processes (``torchrun --nnodes=M
--nproc_per_node=N -m ditlab.prepare ...``, srun, or ``ditlab.train`` preparing under them) the
ranks meet through the prepared dir (a filesystem every node shares):

    rank 0 fits the small VAE; the others wait for it (``vae/`` appears whole)
    every rank encodes every world_size-th image into its own chunk files and leaves its counts
    rank 0 merges each split once every rank's shards are complete (``ditlab.data.shards``), adds
        the counts, computes the reference statistics, and writes meta.json last
    the other ranks wait for meta.json, so that nothing after prepare reads a dir half prepared

A wait longer than ``encode.wait_s`` is one error line. A rank that dies leaves no meta.json
(rank 0 never gets all the shards); a rerun resumes. A dir in an object store (``s3://``) is written
through local staging folders (``PreparedDir.local``, under ``data.module.cache_dir``), one a node,
and the ranks meet in the store itself, so that nodes need not share a filesystem: rank 0 uploads
the small VAE as soon as it is trained, each rank uploads its own shards and counts, rank 0 merges
the indexes from the store, and its meta.json, uploaded last, says that the dir is complete.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import ditlab
from ditlab.data import storage
from ditlab.data.extract import extract_split
from ditlab.data.prepared import PreparedDir
from ditlab.data.shards import INDEX_FILE, count_items, split_is_complete
from ditlab.models.vae import measure_latent_stats
from ditlab.pipelines.fit_vae import SmallVAERecipe
from ditlab.pipelines.reference import ReferenceSettings, write_reference
from ditlab.runtime.files import atomic_path, write_json
from ditlab.runtime.processes import process_rank, wait_until

log = logging.getLogger("ditlab.prepare")


@dataclass
class EncodeSettings:
    """``encode``: how images are encoded. device auto|cpu|cuda (on GPU the VAE encodes in bf16)."""

    device: str = "auto"
    batch_size: int = 256  # images per encoder batch (each with its flip when data.flip is on)
    num_workers: int = 2  # image decoding workers
    progress: bool = True
    wait_s: float = 3600.0  # several ranks: how long one waits for the others (rank 0's VAE, meta.json)

    def torch_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", process_rank().local_rank)


def fit_codec(
    recipe: SmallVAERecipe | None, make_codec: Callable | None, train_source, prepared, device, rank: int, wait_s: float
):
    """The codec to encode with: the small VAE (trained on ``train_source`` by rank 0, or loaded from
    the prepared dir) when there is a recipe, else the configured codec."""
    if recipe is None:
        return make_codec()
    if rank != 0:
        wait_until(lambda: prepared.take_shared(PreparedDir.VAE), wait_s, f"rank 0's small VAE in {prepared.vae}")
    codec = recipe.fit_or_load(train_source, prepared.vae, device, log=log.info)
    if rank == 0 and process_rank().world_size > 1:
        prepared.upload(PreparedDir.VAE)  # for the ranks on other nodes (an object store's dir)
    return codec


def prepare_from_config(cfg: DictConfig) -> Path:
    """``prepare_dataset`` with its arguments built from the ``data``, ``vae`` and ``encode`` config
    groups (what ``ditlab.prepare`` and ``ditlab.train``'s ``prepare_if_missing`` run)."""
    make_source = instantiate(cfg.data.source, _partial_=True)
    return prepare_dataset(
        PreparedDir(cfg.data.prepared_dir, OmegaConf.select(cfg, "data.module.cache_dir")),  # s3://: staged there
        dataset_name=cfg.data.name,
        make_source=lambda split: make_source(split=split),
        splits=list(cfg.data.splits),
        vae_name=cfg.vae.name,
        recipe=instantiate(cfg.vae.recipe) if cfg.vae.get("recipe") else None,
        make_codec=instantiate(cfg.vae.codec, _partial_=True) if cfg.vae.get("codec") else None,
        flip=cfg.data.flip,
        store_images=cfg.data.store_images,
        encode=instantiate(cfg.encode),
        reference=instantiate(cfg.data.reference) if cfg.data.get("reference") else None,
    )


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
    store_images: bool = False,
) -> Path:
    """Prepare the images ``make_source(split)`` gives into ``prepared``; returns its root.

    ``recipe`` (the small VAE) or ``make_codec`` (a pretrained or identity codec) encode; ``flip``
    also stores each image's mirror; ``reference`` (its extractor None: none) the FID statistics;
    ``store_images`` keeps each uint8 image beside its latents (representation alignment needs them)."""
    rank, world_size, _ = process_rank()
    device = encode.torch_device()
    wants_reference = reference is not None and reference.extractor is not None
    if prepared.is_prepared():
        prepared.check_vae_matches(vae_name, recipe, _codec_path(make_codec))
        if wants_reference and not prepared.reference(reference.extractor).is_file():
            # e.g. a directory prepared before its reference statistics were configured
            _add_reference(reference, make_source, splits, prepared, device, rank, encode.wait_s)
        else:
            log.info(f"{prepared.root} is already prepared; nothing to do (delete it to redo)")
        return prepared.root
    sources = {split: make_source(split) for split in splits}  # bad input fails here, before any write
    if len(sources["train"]) == 0:
        raise ValueError(f"{dataset_name} has no training images; expected images to prepare")
    for split, source in sources.items():  # a rank with nothing to write would leave rank 0 waiting for it
        if len(source) < world_size:
            raise ValueError(
                f"split {split!r} of {dataset_name} has {len(source)} images for {world_size} rank(s); expected at "
                "least one per rank (more images, another val fraction, or leave the split out of data.splits)"
            )
    prepared.local.mkdir(parents=True, exist_ok=True)  # a remote dir's staging folder (uploaded by write_meta)
    codec = fit_codec(recipe, make_codec, sources["train"], prepared, device, rank, encode.wait_s).to(device).eval()
    summaries = {
        split: _extract(split, source, codec, prepared, flip, store_images, encode, device)
        for split, source in sources.items()
    }
    if rank != 0:
        _hand_over_to_rank_zero(prepared, summaries, rank, encode.wait_s)
        return prepared.root
    summaries = {
        split: _all_ranks_counts(prepared, split, own, world_size, encode.wait_s) for split, own in summaries.items()
    }
    if wants_reference:
        write_reference(reference, sources, prepared, device)
    if codec.measure_stats:
        codec.set_latent_stats(**measure_codec_stats(codec, sources["train"], device))
        log.info(f"per-channel latent statistics of {STATS_SAMPLES} training images: {codec.describe()}")
    meta = _meta(dataset_name, sources["train"], codec, vae_name, flip, store_images, summaries)
    counts = _counts_dir(prepared)  # before meta.json: a remote dir's local folder changes with it
    prepared.write_meta(meta)
    _forget_counts(prepared, counts, list(summaries), world_size)
    log.info(
        f"prepared {prepared.root}: latents {meta['latent_shape']}, scale factor {meta['vae']['scale_factor']:.5f}"
    )
    return prepared.root


STATS_SAMPLES = 10000  # LightningDiT's compute_latent_stats: 10000 images


@torch.no_grad()
def measure_codec_stats(codec, source, device, count: int = STATS_SAMPLES, seed: int = 0) -> dict:
    """Per-channel mean and std of posterior samples of the first ``count`` training images (a
    codec with ``latent_stats: dataset``, VA-VAE's convention). LightningDiT measures a random
    subset drawn without a seed; here the first images and a seeded draw, so a rerun measures the same."""
    n = min(count, len(source))
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, n, 256):
        readable = [image for image, *_ in (source[i] for i in range(start, min(n, start + 256))) if image is not None]
        if not readable:
            continue
        mean, std = codec.encode(torch.stack(readable).to(device))
        samples.append((mean.float() + std.float() * torch.randn(mean.shape, generator=generator).to(device)).cpu())
    return measure_latent_stats(torch.cat(samples))


# ------------------------------------------------------------------------------------------ ranks
COUNTS_DIR = ".rank_counts"  # each rank's counts of a split, until rank 0 has written meta.json
# (a remote dir's: in the store, where ranks on other nodes put them; never read as data: a dot name)


def _counts_dir(prepared: PreparedDir) -> Path:
    # a remote dir's staging folder; never uploaded (a dot folder: storage.is_temporary)
    return prepared.local / COUNTS_DIR


def _counts_name(split: str, rank: int) -> str:
    return f"{split}.rank{rank}.json"


def _leave_counts(prepared: PreparedDir, split: str, rank: int, counts: dict) -> None:
    if prepared.remote:
        storage.write_bytes(prepared.location(f"{COUNTS_DIR}/{_counts_name(split, rank)}"), json.dumps(counts).encode())
    else:
        write_json(_counts_dir(prepared) / _counts_name(split, rank), counts)


def _left_counts(prepared: PreparedDir, split: str, rank: int) -> dict | None:
    """What rank ``rank`` left of ``split``; None while it has not."""
    if prepared.remote:
        data = storage.read_bytes(prepared.location(f"{COUNTS_DIR}/{_counts_name(split, rank)}"))
    else:
        path = _counts_dir(prepared) / _counts_name(split, rank)
        data = path.read_bytes() if path.is_file() else None
    return None if data is None else json.loads(data)


def _hand_over_to_rank_zero(prepared: PreparedDir, summaries: dict, rank: int, wait_s: float) -> None:
    """A rank > 0 leaves what it encoded of each split (count, per class, skipped) for rank 0's meta.json,
    then waits for meta.json: nothing after prepare may read the dir before it is complete."""
    for split, summary in summaries.items():
        _leave_counts(prepared, split, rank, {k: summary[k] for k in ("count", "per_class", "skipped")})
    wait_until(prepared.is_prepared, wait_s, f"rank 0 to write {prepared.location(PreparedDir.META)}")
    prepared.forget_staging()  # this node's copy of its share: the store holds it


def _all_ranks_counts(prepared: PreparedDir, split: str, own: dict, world_size: int, wait_s: float) -> dict:
    """Rank 0: the counts of ``split`` over every rank (its own ``own`` and what the others left).
    A split found complete (``per_class`` None: nothing was encoded now) is counted from its index."""
    if world_size == 1 or own["per_class"] is None:
        return own
    parts = [own]

    def every_rank_left() -> bool:
        while len(parts) < world_size and (left := _left_counts(prepared, split, len(parts))) is not None:
            parts.append(left)
        return len(parts) == world_size

    wait_until(every_rank_left, wait_s, f"every rank's counts of {split} in {prepared.location(COUNTS_DIR)}")
    per_class = Counter()
    for part in parts:
        per_class.update({int(k): v for k, v in part["per_class"].items()})
    return {
        "count": sum(part["count"] for part in parts),
        "per_class": dict(sorted(per_class.items())),
        "skipped": sorted(key for part in parts for key in part["skipped"]),
    }


def _forget_counts(prepared: PreparedDir, counts: Path, splits: list[str], world_size: int) -> None:
    if prepared.remote:
        for split in splits:
            for rank in range(1, world_size):
                storage.delete(prepared.location(f"{COUNTS_DIR}/{_counts_name(split, rank)}"))
    for f in counts.glob("*.json"):
        f.unlink()
    if counts.is_dir():
        counts.rmdir()


def _add_reference(reference, make_source, splits, prepared: PreparedDir, device, rank: int, wait_s: float) -> None:
    """The reference statistics of a dir prepared without them: rank 0 computes, the others wait."""
    if rank == 0:
        write_reference(reference, {s: make_source(s) for s in splits}, prepared, device)
        return

    def written() -> bool:  # asked anew each time: a remote dir's statistics are fetched once uploaded
        return prepared.reference(reference.extractor).is_file()

    wait_until(written, wait_s, f"rank 0 to write the {reference.extractor} reference statistics of {prepared.root}")


def _codec_path(make_codec) -> str | None:
    """The hub id or folder a pretrained codec factory loads (a ``functools.partial``'s ``path``)."""
    return getattr(make_codec, "keywords", {}).get("path")


def _extract(
    split: str, source, codec, prepared: PreparedDir, flip: bool, store_images: bool, encode: EncodeSettings, device
) -> dict:
    split_dir = prepared.split(split)
    if _split_is_complete(prepared, split):
        log.info(f"{split}: already written, skipped")
        return {"count": count_items(split_dir), "per_class": None, "skipped": []}
    rank, world_size, _ = process_rank()
    summary = extract_split(
        source,
        codec,
        split_dir,
        store_posterior=codec.has_posterior,
        flip=flip,
        batch_size=encode.batch_size,
        num_workers=encode.num_workers,
        device=device,
        rank=rank,
        world_size=world_size,
        progress=encode.progress,
        store_images=store_images,
        wait_s=encode.wait_s,
        store_dir=prepared.location(split) if prepared.remote else None,
    )
    log.info(
        f"{split}: {summary['count']} images at {summary['images_per_s']} img/s; per class "
        f"{summary['per_class']}; skipped {len(summary['skipped'])} unreadable: {summary['skipped'][:20]}"
    )
    return summary


def _split_is_complete(prepared: PreparedDir, split: str) -> bool:
    """Whether ``split`` is written: here, or in the store of a remote dir (its index.json, merged by
    rank 0 after every rank's shards, is then copied here: the split's count comes from it)."""
    split_dir = prepared.split(split)
    if split_is_complete(split_dir) or not prepared.remote:
        return split_is_complete(split_dir)
    index = storage.read_bytes(storage.join(prepared.location(split), INDEX_FILE))
    if index is None:
        return False
    with atomic_path(split_dir / INDEX_FILE) as tmp:
        tmp.write_bytes(index)
    return True


def _meta(
    dataset_name: str, train_source, codec, vae_name: str, flip: bool, store_images: bool, summaries: dict
) -> dict:
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
        "latent_format": "posterior" if codec.has_posterior else "sample",
        "latent_dtype": "float16",
        "views": 2 if flip else 1,  # each item: [image, its horizontal flip] or [image]
        "images": store_images,  # each item also holds its uint8 image
        "vae": {**codec.describe(), "name": vae_name},  # train checks it names the same VAE
        "ditlab_version": ditlab.__version__,
    }
