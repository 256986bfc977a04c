"""``python -m ditlab.prepare data=<dataset> vae=<vae>``: images -> VAE latent shards, FID reference
statistics and meta.json in ``data.prepared_dir`` (the stage is ``ditlab.pipelines.prepare``).

A rerun skips every part already complete. With several processes (``torchrun
--nproc_per_node=N -m ditlab.prepare ...``) each rank encodes every N-th image and writes its own
chunk files; rank 0 merges the indexes.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ditlab.data.prepared import PreparedDir
from ditlab.pipelines.prepare import prepare_dataset
from ditlab.runtime.errors import exit_on_error, hydra_command


def prepare_from_config(cfg: DictConfig) -> Path:
    """Build the stage's arguments from the ``data``, ``vae`` and ``encode`` config groups and run it."""
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


@hydra_command("ditlab.prepare", "prepare")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.prepare", prepare_from_config, cfg)


if __name__ == "__main__":
    main()
