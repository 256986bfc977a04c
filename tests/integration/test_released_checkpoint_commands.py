"""The family's released checkpoints through ditlab's commands, from locally built files in each
official format (``released_formats``): ``ditlab.sample`` draws an ADM .npz with the family's published
protocol and ``ditlab.evaluate`` scores it; ``init_from`` fine-tunes from each format (and the official
DiT file of a non-paper width, hidden 64, into model=dit_tiny); ``ditlab.export`` writes what diffusers
can hold and refuses the rest in one line."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from ditlab.data.datamodule import LatentDataModule
from ditlab.diffusion.protocols import published_protocol
from ditlab.evaluate import main as evaluate_main
from ditlab.export import main as export_main
from ditlab.inference import load_model, load_network
from ditlab.metrics.provenance import sampler_values
from ditlab.models.dit import DiT
from ditlab.models.vae import small_autoencoder
from ditlab.prepare import prepare_from_config
from ditlab.sample import main as sample_main
from ditlab.train import ConfigError, build, train
from helpers import compose_cfg, compose_run, folder_overrides, invoke_main, make_image_folder, randomised
from released_formats import lightningdit_training_checkpoint, official_state_dict, sit_training_checkpoint

MAINS = {"ditlab.sample": sample_main, "ditlab.evaluate": evaluate_main, "ditlab.export": export_main}
# 8x8 RGB images <-> 4x4x4 latents (the tiny VAE below), 3 classes: prepared_clf's images and classifier
LATENT = dict(input_size=4, patch=2, channels=4, hidden=32, depth=2, heads=2, classes=3)
LIGHTNING = dict(rmsnorm=True, swiglu=True, rope=True)  # its released config's blocks


@pytest.fixture
def run_module(monkeypatch, capsys):
    def run(module, args):
        code, out, err = invoke_main(MAINS[module], module, args, monkeypatch, capsys)
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny VAE folder, LightningDiT's latents_stats.pt, and one file per family in its format."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    vae = small_autoencoder(
        image_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4, sample_size=8
    )
    vae.save_pretrained(root / "vae")
    g = torch.Generator().manual_seed(0)
    stats = {"mean": torch.randn(1, 4, 1, 1, generator=g), "std": torch.rand(1, 4, 1, 1, generator=g) + 0.5}
    torch.save(stats, root / "latents_stats.pt")
    torch.save(official_state_dict(seed=0, learn_sigma=True, **LATENT), root / "SiT-XL-2-256x256.pt")
    repa = [official_state_dict(seed=s, projectors=(12,), **LATENT) for s in (0, 1)]
    torch.save(sit_training_checkpoint(*repa, encoder_depth=1), root / "0400000.pt")
    lightning = [official_state_dict(seed=s, **LIGHTNING, **LATENT) for s in (0, 1)]
    flags = dict(use_rmsnorm=True, use_swiglu=True, use_rope=True, use_qknorm=False, wo_shift=False)
    torch.save(lightningdit_training_checkpoint(*lightning, **flags), root / "lightningdit-xl-imagenet256-800ep.pt")
    return SimpleNamespace(
        root=root,
        vae=root / "vae",
        stats=root / "latents_stats.pt",
        files={"sit": root / "SiT-XL-2-256x256.pt", "repa": root / "0400000.pt", "lightningdit": lightning_path(root)},
    )


def lightning_path(root):
    return root / "lightningdit-xl-imagenet256-800ep.pt"


# ------------------------------------------------------------------ sample with the family's protocol, evaluate
@pytest.mark.parametrize("family", ["sit", "repa", "lightningdit"])
def test_sample_draws_a_released_checkpoint_by_its_protocol_and_evaluate_scores_it(
    family, released, prepared_clf, tmp_path, run_module
):
    extra = [f"latent_stats={released.stats}"] if family == "lightningdit" else ["num_heads=2"]  # hidden 32
    out = tmp_path / "samples"
    result = run_module(
        "ditlab.sample",
        [
            f"ckpt={released.files[family]}",
            f"vae_path={released.vae}",
            *extra,
            "num_samples=6",
            "batch_size=4",
            "steps=4",  # the protocol's sampler and guidance, on 4 steps instead of 250
            f"out={out}",
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    title = {"sit": "SiT", "repa": "REPA", "lightningdit": "LightningDiT"}[family]
    assert f"{title} format" in result.stdout + result.stderr  # the reader's line
    npz = out / "samples_6x8x8x3.npz"
    with np.load(npz) as data:
        assert data["arr_0"].shape == (6, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    record = json.loads(npz.with_suffix(".json").read_text())
    protocol = published_protocol(family)
    assert record["sampler"] == {**sampler_values(protocol.sampler), "steps": 4}
    assert record["guidance_text"] == protocol.guidance.describe()
    assert f"ckpt={released.files[family]}" in record["command"] and extra[0] in record["command"]
    scored = run_module(
        "ditlab.evaluate", [f"samples={npz}", f"reference={prepared_clf}", "extractor=clf", "metrics=[fid]"]
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads((out / "results.json").read_text())["evaluations"][-1]["metrics"]
    assert np.isfinite(metrics["fid_clf"]) and 0 <= metrics["sample_accuracy_clf"] <= 1


def test_a_released_checkpoint_misread_is_one_line(released, tmp_path, run_module):
    base = [f"vae_path={released.vae}", "num_samples=2", f"out={tmp_path / 'o'}"]
    cases = {
        "the head count": ([f"ckpt={released.files['sit']}"], "no tensor tells its head count; expected num_heads="),
        "another family": ([f"ckpt={released.files['repa']}", "family=sit"], "not SiT; expected family=repa"),
        "no statistics": ([f"ckpt={released.files['lightningdit']}"], "per channel; expected latent_stats=<its"),
    }
    for what, (args, message) in cases.items():
        result = run_module("ditlab.sample", [*args, *base])
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("ditlab.sample: error: ") and message in last, (what, last)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.npz"))


def test_protocol_option_samples_a_checkpoint_by_a_papers_protocol(released, tmp_path, run_module):
    result = run_module(
        "ditlab.sample",
        [
            f"ckpt={released.files['repa']}",
            f"vae_path={released.vae}",
            "num_heads=2",
            "protocol=sit",  # SiT's: guidance 1.5 on 3 channels instead of REPA's
            "steps=3",
            "num_samples=2",
            f"out={tmp_path / 'p'}",
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "p" / "samples_2x8x8x3.json").read_text())
    assert record["guidance_text"] == "guidance 1.5 on the first 3 channels"


# ------------------------------------------------------------------ fine-tune from each format
TINY_MODEL = dict(input_size=8, patch=2, channels=3, hidden=64, depth=2, heads=4, classes=3)  # dit_tiny on `prepared`


def test_an_official_dit_file_of_hidden_64_fine_tunes_into_dit_tiny(prepared, tmp_path):
    """The regression: a DiT trained with the official code at its own size (hidden 64: no paper width,
    so its file does not tell the head count) fine-tunes into model=dit_tiny, which names 4 heads."""
    net = randomised(
        DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=3)
    )
    torch.save(net.state_dict(), tmp_path / "DiT-tiny.pt")
    _, module = build(compose_run(prepared, tmp_path / "run", steps=1, extra=[f"init_from={tmp_path / 'DiT-tiny.pt'}"]))
    for key, value in net.state_dict().items():
        assert torch.equal(module.net.state_dict()[key], value), key


FLOW_RUN = ["sampler=flow_euler50"]


def test_init_from_sit_repa_and_lightningdit_files(prepared, tmp_path, caplog):
    root = tmp_path
    sit = official_state_dict(seed=5, learn_sigma=True, **TINY_MODEL)
    torch.save(sit, root / "SiT-XL-2-256x256.pt")
    repa = official_state_dict(seed=6, projectors=(12,), **TINY_MODEL)
    torch.save(sit_training_checkpoint(repa, repa, encoder_depth=1), root / "repa.pt")
    lightning = official_state_dict(seed=7, **LIGHTNING, **TINY_MODEL)
    torch.save(lightning, root / "lightningdit.pt")

    def start(name, extra):
        cfg = compose_run(prepared, root / name, steps=1, extra=[*FLOW_RUN, *extra])
        return build(cfg)[1].net.state_dict(), cfg

    # SiT: its time (diffusion=flow_sit); the learned-sigma head it never used is left out
    with caplog.at_level("INFO", logger="ditlab.finetune"):
        weights, sit_cfg = start("sit", ["diffusion=flow_sit", f"init_from={root / 'SiT-XL-2-256x256.pt'}"])
    assert "the learned-sigma head left out" in caplog.text
    keep = torch.arange(sit["final_layer.linear.weight"].shape[0]) % 6 < 3  # rows of channels 0..2 of 6
    assert torch.equal(weights["final_layer.linear.weight"], sit["final_layer.linear.weight"][keep])
    for key in set(weights) - {"final_layer.linear.weight", "final_layer.linear.bias"}:
        assert torch.equal(weights[key], sit[key]), key
    # REPA: its time (diffusion=flow_repa); the projectors are not the network's
    weights, _ = start("repa", ["diffusion=flow_repa", f"init_from={root / 'repa.pt'}"])
    assert all(torch.equal(weights[k], repa[k]) for k in weights)
    # LightningDiT: its blocks (model switches) and time (diffusion=flow_lightningdit); its RoPE buffers dropped
    blocks = ["model.norm=rms", "model.norm_gain=true", "model.mlp=swiglu", "model.pos=sincos_rope2d"]
    weights, _ = start("ldit", ["diffusion=flow_lightningdit", *blocks, f"init_from={root / 'lightningdit.pt'}"])
    assert all(torch.equal(weights[k], lightning[k]) for k in weights) and "feat_rope.freqs_cos" not in weights
    # ... each refused in one line where the run reads time otherwise, or has other blocks
    with pytest.raises(
        ConfigError,
        match=r"is a SiT checkpoint, whose network takes t in \[0, 1\] \(t = 1 the data\); expected diffusion=flow_sit",
    ):
        start("bad1", ["diffusion=flow", f"init_from={root / 'SiT-XL-2-256x256.pt'}"])
    with pytest.raises(
        ConfigError,
        match="has no blocks.0.mlp.w12.weight, which the model config has|has parameters this model does not",
    ):
        start("bad2", ["diffusion=flow_lightningdit", "model.mlp=swiglu", f"init_from={root / 'lightningdit.pt'}"])
    # and the run trains from there
    metrics = train(sit_cfg)
    assert np.isfinite(metrics["train/loss"])


# ------------------------------------------------------------------ export: what diffusers can hold
def test_export_writes_a_sit_transformer_and_refuses_what_diffusers_cannot_hold(released, tmp_path, run_module):
    sit = released.files["sit"]
    done = run_module("ditlab.export", [f"ckpt={sit}", f"out={tmp_path / 't'}", "what=transformer", "num_heads=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    ours = load_network(sit, num_heads=2)[0].state_dict()
    back = load_network(tmp_path / "t")[0].state_dict()  # a DiTTransformer2DModel folder: the same weights
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    refusals = {
        "pipeline": ([f"ckpt={sit}", "num_heads=2", f"vae_path={released.vae}"], "for DiTPipeline's schedulers"),
        "lightningdit": ([f"ckpt={released.files['lightningdit']}", "what=transformer"], "no diffusers counterpart"),
    }
    for what, (args, message) in refusals.items():
        result = run_module("ditlab.export", [*args, f"out={tmp_path / what}"])
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("ditlab.export: error: ") and message in last, (what, last)
        assert not (tmp_path / what).exists()


# ------------------------------------------------------------------ VA-VAE's per-channel latent statistics, end to end
def test_per_channel_latent_statistics_from_prepare_through_training_to_sampling(released, tmp_path):
    """vae=vavae_f16d32 (latent_stats: dataset): prepare measures each channel's mean and std of the
    latents and records them; training normalises by them; the checkpoint carries them to sampling."""
    folder = make_image_folder(tmp_path / "images", per_class=6, corrupt=False)
    vae = ["vae=vavae_f16d32", f"vae.codec.path={released.vae}"]
    cfg = compose_cfg("prepare", folder_overrides(folder, tmp_path / "prepared", 8, 0.25, None, vae))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    prepared = prepare_from_config(cfg)
    record = json.loads((prepared / "meta.json").read_text())["vae"]
    assert (
        len(record["latent_mean"]) == 4 and all(s > 0 for s in record["latent_std"]) and record["scale_factor"] == 1.0
    )
    dm = LatentDataModule(str(prepared), batch_size=6, num_workers=0, sample_posterior=False, flip=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    latents, _ = dm.to_model_batch(batch)
    raw = batch["latent"][:, 0, 0].float()  # the posterior mean of each item
    mean, std = (torch.tensor(record[k]).view(1, 4, 1, 1) for k in ("latent_mean", "latent_std"))
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-5)
    run = compose_run(
        prepared,
        tmp_path / "run",
        steps=1,
        extra=[*vae, *FLOW_RUN, "diffusion=flow_lightningdit", "model.patch_size=2"],
    )
    train(run)
    codec = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt").codec
    assert codec.latent_mean == record["latent_mean"] and codec.latent_std == record["latent_std"]
