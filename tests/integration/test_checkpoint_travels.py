"""A checkpoint carries what sampling needs: the codec (here the small VAE prepare trained: its
weights and scale), the class names, and the run's sampler and guidance (in its config). Copied
elsewhere with the prepared dir gone, it samples as its run's grid did, exports with its class
names and loads in ``load_model``; its run dir scores its FID curve (the reference statistics and
the classifier were kept in the run dir); ``vae_path=`` still overrides; an older checkpoint without
them falls back to the prepared dir and says so in one line."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from ditlab.evaluate import evaluate
from ditlab.inference import load_model
from ditlab.models.vae import codec_from_record, small_autoencoder
from ditlab.pipelines.export import export_pipeline
from ditlab.prepare import prepare_from_config
from ditlab.sample import main as sample_main
from ditlab.train import train
from helpers import compose_cfg, compose_run, folder_overrides, invoke_main, make_image_folder, read_meta

SMALL_VAE = [  # a small VAE of 3 steps: 8x8 RGB -> 4x4x4 latents (what matters is that its weights travel)
    "vae=small_kl",
    "vae.recipe.block_out_channels=[8,8]",
    "vae.recipe.norm_num_groups=4",
    "vae.recipe.max_steps=3",
    "vae.recipe.batch_size=8",
    "vae.recipe.scale_samples=16",
]
FID = [
    "fid_protocol.num_samples=6",
    "fid_protocol.batch_size=6",
    "+fid_protocol.sampler._target_=ditlab.diffusion.Sampler",
    "+fid_protocol.sampler.name=dpmpp_2m",
    "+fid_protocol.sampler.steps=3",
    "guidance.scale=2.0",
]


@pytest.fixture(scope="module")
def small_vae_run(tmp_path_factory):
    """A folder prepared with the small VAE (and a clf reference), and a 2-step run on it."""
    root = tmp_path_factory.mktemp("travel")
    folder = make_image_folder(root / "images", per_class=8, size=(8, 8), corrupt=False)
    prepared = root / "latents"
    cfg = compose_cfg(
        "prepare",
        folder_overrides(
            folder,
            prepared,
            vae=None,
            extra=["data.reference.extractor=clf", "data.reference.classifier_steps=10", *SMALL_VAE],
        ),
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(root)
    prepare_from_config(cfg)
    run = root / "run"
    metrics = train(compose_run(prepared, run, steps=2, extra=[*SMALL_VAE, *FID]))
    return prepared, run, metrics


def _gone(path: Path) -> Path:
    """Move ``path`` out of reach (restored by the caller): as if it had never been there."""
    away = path.with_name(path.name + ".away")
    path.rename(away)
    return away


def test_a_copied_checkpoint_samples_exports_and_scores_without_the_prepared_dir(
    small_vae_run, tmp_path, monkeypatch, capsys
):
    prepared, run, metrics = small_vae_run
    meta = read_meta(prepared)
    original_codec = codec_from_record(meta["vae"], prepared / "vae")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run, elsewhere)
    ckpt = elsewhere / "checkpoints" / "last.ckpt"
    carried = torch.load(ckpt, map_location="cpu", weights_only=True)["ditlab"]  # plain data and tensors
    codec_bytes = sum(t.numel() * t.element_size() for t in carried["codec"]["state_dict"].values())
    away = _gone(prepared)
    try:
        model = load_model(ckpt)
        assert model.classes == ["cat", "dog", "fox"] and model.latent_shape == (4, 4, 4)
        z = torch.randn(2, 4, 4, 4)
        with torch.no_grad():  # the small VAE's own weights and scale, not a fresh one
            assert torch.equal(model.codec.decode(z), original_codec.decode(z))
        assert model.codec.scale_factor == meta["vae"]["scale_factor"]

        # ditlab.sample draws the run's last grid again (its sampler and guidance, from the checkpoint)
        code, out, err = invoke_main(
            sample_main,
            "ditlab.sample",
            [f"ckpt={ckpt}", "grid=true", "per_class=2", f"out={tmp_path / 'grid'}"],  # experiment=smoke's grid
            monkeypatch,
            capsys,
        )
        assert code == 0, err[-2000:]
        ours = np.asarray(Image.open(tmp_path / "grid" / "grid.png")).astype(int)
        theirs = np.asarray(Image.open(run / "samples" / "step_0000002.png")).astype(int)
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1

        # the export names the classes
        folder = export_pipeline(ckpt, tmp_path / "export")
        index = json.loads((folder / "model_index.json").read_text())
        assert index["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}
        assert json.loads((folder / "ditlab.json").read_text())["classes"] == ["cat", "dog", "fox"]
        assert load_model(folder).classes == ["cat", "dog", "fox"]

        # the copied run dir scores its FID curve against the statistics it kept: the logged value
        scored = evaluate(compose_cfg("evaluate", [f"run_dir={elsewhere}", "progress=false"]))
        last = [row for row in scored["rows"] if row["step"] == "2"][0]
        assert math.isclose(float(last["fid_clf"]), metrics["val/fid_clf"], rel_tol=1e-6)

        # vae_path= still decides the codec
        other = tmp_path / "other_vae"
        small_autoencoder(3, 4, (8, 8), 4, 8).save_pretrained(other)
        assert load_model(ckpt, vae=str(other)).codec.path == str(other)
    finally:
        away.rename(prepared)
    print(f"\nthe small VAE a checkpoint carries: {codec_bytes / 1e6:.3f} MB of weights")


def test_an_older_checkpoint_falls_back_to_the_prepared_dir_and_says_so(small_vae_run, tmp_path, caplog):
    prepared, run, _ = small_vae_run
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    section = checkpoint["ditlab"]  # as written before checkpoints carried a record: the run config alone
    checkpoint["ditlab"] = {key: section[key] for key in ("config_yaml", "nonfinite", "rng")}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with caplog.at_level(logging.INFO, logger="ditlab.inference"):
        model = load_model(old)
    said = [r.getMessage() for r in caplog.records if "carries no codec" in r.getMessage()]
    assert said == [f"{old} carries no codec or class names (an older checkpoint): taken from {prepared}"]
    assert model.classes == ["cat", "dog", "fox"] and model.codec.kind == "small_kl"
    away = _gone(prepared)
    try:
        with pytest.raises(FileNotFoundError, match="no prepared dataset at"):
            load_model(old)
    finally:
        away.rename(prepared)
