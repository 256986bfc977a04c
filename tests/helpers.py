"""Shared test helpers: tiny image folders and composed configs (the real conf/, tiny overrides)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

CONF_DIR = str(Path(__file__).resolve().parents[1] / "src" / "ditlab" / "conf")


def make_image_folder(
    root: Path, classes=("cat", "dog", "fox"), per_class: int = 10, size=(20, 24), corrupt: bool = True, seed: int = 0
) -> Path:
    """Small RGB PNGs, one sub-folder per class; each class has its own mean colour."""
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([60 * k, 255 - 60 * k, 128], dtype=np.float64)
            arr = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG this is not an image")
    return root


def compose_cfg(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=False)


def prepare_tiny_folder(tmp: Path, reference: str | None = None) -> Path:
    """Identity-VAE 'latents' (3, 8, 8) of a tiny 3-class image folder (16 images a class, 25% val);
    ``reference="clf"`` also trains a 2-second classifier and writes its FID reference statistics."""
    from omegaconf import open_dict

    from ditlab.data.preparation import prepare_dataset

    folder = make_image_folder(tmp / "images", per_class=16, size=(8, 8), corrupt=False)
    overrides = [
        "data=folder",
        f"data.source.root={folder}",
        "data.source.image_size=8",
        "data.source.val_fraction=0.25",
        "vae=identity",
        f"data.prepared_dir={tmp / 'latents'}",
        "encode.num_workers=0",
        "encode.progress=false",
        f"data.reference.extractor={reference or 'null'}",
        "data.reference.classifier_seconds=2",
    ]
    cfg = compose_cfg("prepare", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp)
    return prepare_dataset(cfg)


def randomised(model):
    """Non-zero weights everywhere (DiT starts with a zero output), pos_embed untouched, eval mode."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.05)
    return model.eval()


def tiny_overrides(prepared, root, steps=4, extra=()):
    """experiment=smoke pointed at the tiny prepared folder (3 classes, 8x8x3 identity latents)."""
    return [
        "experiment=smoke",
        "data=folder",
        f"data.prepared_dir={prepared}",
        "data.module.batch_size=8",
        "model.in_channels=3",
        "model.num_classes=3",
        "model.input_size=8",
        "model.patch_size=2",
        "sampler.steps=4",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        f"paths.root_dir={root}",
        "prepare_if_missing=false",
        "callbacks.throughput.window_steps=2",
        *extra,
    ]
