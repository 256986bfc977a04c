"""The recipes researchers compare against, as written for ImageNet (SiT, REPA + SiT, LightningDiT):
each composes and trains 2 steps, shrunk to the tiny folder (same recipe, tiny sizes)."""

import pytest
import torch

from ditlab.train import train
from helpers import compose_run, prepare_tiny_folder

TINY = [
    "trainer=cpu",
    "trainer.devices=1",
    "data=folder",
    "vae=identity",
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.patch_size=2",
    "model.input_size=8",
    "model.in_channels=3",
    "model.num_classes=3",
    "data.module.batch_size=4",
    "data.module.num_workers=0",
    "callbacks.sample_grid=null",
    "callbacks.fid=null",
    "logger=csv",
    "sampler.steps=2",
]
REPA_TINY = [  # a random-weights ViT instead of DINOv2 (no network here), a narrow projector
    "repa.encoder.name=vit_tiny_patch16_224",
    "repa.encoder.image_size=32",
    "repa.encoder.pretrained=false",
    "repa.depth=1",
    "repa.projector_dim=16",
]


@pytest.fixture(scope="module")
def prepared_images(tmp_path_factory):
    return prepare_tiny_folder(tmp_path_factory.mktemp("recipes"), store_images=True)


@pytest.mark.parametrize(
    "experiment, extra",
    [
        ("imagenet256_sit_xl2", []),
        ("imagenet256_repa_sit_xl2", REPA_TINY),
        ("imagenet256_lightningdit_xl1", []),
    ],
)
def test_each_recipe_composes_and_trains_two_steps(experiment, extra, prepared_images, tmp_path):
    out = tmp_path / "run"
    overrides = [f"experiment={experiment}", *TINY, f"data.prepared_dir={prepared_images}", *extra]
    cfg = compose_run(prepared_images, out, steps=2, extra=overrides)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    if "repa" in experiment:
        assert any(k.startswith("repa.projector.") for k in ckpt["state_dict"]) and "train/repa" in metrics
    if "lightningdit" in experiment:  # the blocks it names are the ones built
        assert any(".mlp.w12." in k for k in ckpt["state_dict"]) and "train/cos" in metrics
