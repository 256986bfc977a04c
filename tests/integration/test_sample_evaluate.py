"""ditlab.sample / ditlab.evaluate end to end, the official-checkpoint path, diffusers interop."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ditlab.models.dit as dit_module
from ditlab.evaluate import main as evaluate_main
from ditlab.inference import load_model
from ditlab.models.diffusers_dit import dit_kwargs, from_diffusers_state_dict, to_diffusers
from ditlab.models.dit import DiT, build_dit
from ditlab.models.vae import small_autoencoder
from ditlab.sample import main as sample_main
from ditlab.train import train
from helpers import compose_run, invoke_main, randomised

FID_RUN = [
    "fid_protocol.num_samples=12",
    "fid_protocol.batch_size=6",
    "fid_protocol.metrics=[fid,kid]",
    "fid_protocol.extractor=clf",
    "+fid_protocol.sampler._target_=ditlab.diffusion.Sampler",  # DPM-Solver++ 4 steps here
    "+fid_protocol.sampler.name=dpmpp_2m",
    "+fid_protocol.sampler.steps=4",
    "guidance.scale=3.0",  # the grid's and the FID's (ditlab.sample's default for this run)
    "guidance.interval=[0,600]",
    "callbacks.fid.every_n_steps=0",
]


@pytest.fixture(scope="module")
def trained_run(prepared_clf, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    return out, train(compose_run(prepared_clf, out, steps=3, extra=FID_RUN))


def test_fid_callback_logs_its_metric_in_a_training_run(trained_run):
    out, metrics = trained_run
    assert "val/fid_clf" in metrics and metrics["val/fid_clf"] > 0
    assert 0 <= metrics["val/sample_accuracy_clf"] <= 1
    summary = json.loads((out / "metrics.json").read_text())
    assert "val/fid_clf" in summary["metrics"]
    # beside each number its se and interval, in the loggers' metrics and in metrics.json
    for name in ("val/fid_clf", "val/kid_clf", "val/sample_accuracy_clf"):
        assert metrics[f"{name}_ci_low"] <= metrics[f"{name}_ci_high"] and metrics[f"{name}_se"] >= 0, name
        assert summary["metrics"][f"{name}_se"] == pytest.approx(metrics[f"{name}_se"]), name
    assert metrics["val/fid_clf_se"] > 0 and metrics["val/fid_clf_ci_low"] < metrics["val/fid_clf_ci_high"]
    assert "val/fid_clf_inf" in summary["metrics"] and summary["fid_protocol"]["uncertainty"]["resamples"] == 100
    assert summary["weights_used"] == {"SampleGrid": "ema", "FIDCallback": "ema"}
    # the metric's floor (held-out real images at the same N) beside it, and both in the headline
    assert summary["metrics"]["val/fid_clf_floor"] > 0 and summary["metrics"]["val/fid_clf_floor_sd"] > 0
    assert summary["headline"][0].startswith(f"final fid_clf {metrics['val/fid_clf']:.3f} (se ")
    assert "floor at the same N" in summary["headline"][0]


@pytest.fixture
def run_module(monkeypatch, capsys):
    """``python -m ditlab.sample|evaluate args``, run in this process (a fresh one costs seconds of imports)."""
    mains = {"ditlab.sample": sample_main, "ditlab.evaluate": evaluate_main}

    def run(module, args, cwd=None):
        code, out, err = invoke_main(mains[module], module, args, monkeypatch, capsys)
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def test_sample_writes_adm_npz_and_evaluate_reads_it(trained_run, prepared_clf, tmp_path, run_module):
    out, _ = trained_run
    ckpt = out / "checkpoints" / "last.ckpt"
    result = run_module(
        "ditlab.sample",
        [
            f"ckpt={ckpt}",
            "num_samples=10",
            "batch_size=4",
            "sampler=ddim50",
            "steps=3",
            "guidance.scale=2.0",
            "format=both",
            f"out={tmp_path / 's'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    npz = tmp_path / "s" / "samples_10x8x8x3.npz"
    with np.load(npz) as data:
        assert data["arr_0"].shape == (10, 8, 8, 3) and data["arr_0"].dtype == np.uint8
        assert data["labels"].shape == (10,) and data["labels"].max() < 3
    assert len(list((tmp_path / "s").glob("*.png"))) == 10
    result = run_module(
        "ditlab.evaluate",
        [f"samples={npz}", f"reference={prepared_clf}", "extractor=clf", "metrics=[fid,isc]"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fid_clf" in result.stdout
    written = json.loads((tmp_path / "s" / "results.json").read_text())["evaluations"][-1]
    assert written["protocol"]["num_samples"] == 10 and written["metrics"]["fid_clf"] > 0
    bad = run_module(
        "ditlab.sample", [f"ckpt={ckpt}", "num_samples=2", "labels=[5]", f"out={tmp_path / 'b'}"], cwd=tmp_path
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "ditlab.sample: error: label 5 is out of range; this model has classes 0..2"
    )


def test_sample_draws_a_checkpoint_as_its_run_did_unless_told_otherwise(trained_run, tmp_path, run_module):
    """No sampler, no guidance: the run's own sampler (DDIM, 4 steps) and grid guidance (3.0 on
    [0, 600]), so ditlab.sample grid=true redraws the run's last grid; an official checkpoint gets
    DDPM-250 and 1.5."""
    from PIL import Image

    out, _ = trained_run
    result = run_module(
        "ditlab.sample",
        [f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "grid=true", "per_class=2", f"out={tmp_path / 'g'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ddim x 4 steps, eta=0.0, guidance 3 for t in [0, 600]" in result.stdout + result.stderr
    ours = np.asarray(Image.open(tmp_path / "g" / "grid.png")).astype(int)
    theirs = np.asarray(Image.open(out / "samples" / "step_0000003.png")).astype(int)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
    # without a training config (official checkpoints, diffusers folders): DiT's protocol
    model = load_model(out / "checkpoints" / "last.ckpt")
    assert model.own_sampler().describe() == "ddim x 4 steps, eta=0.0"
    model.record = None
    assert model.own_sampler().describe() == "ddpm x 250 steps"
    assert model.own_guidance().scale == 1.5 and model.own_guidance().interval is None


def test_fid_during_training_equals_sample_then_evaluate(trained_run, prepared_clf, tmp_path, run_module):
    """One generation path: ditlab.sample + ditlab.evaluate on last.ckpt's EMA, with the FID protocol's
    sampler, guidance, seed and sample count (but another batch size), give the callback's fid_clf."""
    out, metrics = trained_run
    sampled = run_module(
        "ditlab.sample",
        [
            f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
            "num_samples=12",
            "batch_size=5",
            "sampler=dpmpp20",
            "steps=4",
            "guidance.scale=3.0",
            "guidance.interval=[0,600]",
            "seed=0",
            f"out={tmp_path / 's'}",
        ],
        cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    npz = tmp_path / "s" / "samples_12x8x8x3.npz"
    evaluated = run_module(
        "ditlab.evaluate",
        [f"samples={npz}", f"reference={prepared_clf}", "extractor=clf", "metrics=[fid]"],
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    written = json.loads(npz.with_name("results.json").read_text())["evaluations"][-1]["metrics"]
    assert written["fid_clf"] == pytest.approx(metrics["val/fid_clf"], rel=1e-3)
    assert written["sample_accuracy_clf"] == pytest.approx(metrics["val/sample_accuracy_clf"])


def test_sample_from_an_official_checkpoint_with_a_local_vae(tmp_path, run_module):
    net = randomised(build_dit("DiT-S/8", input_size=8, num_classes=5))
    torch.save(net.state_dict(), tmp_path / "DiT-S-8-64.pt")
    small_autoencoder(
        image_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=64
    ).save_pretrained(tmp_path / "vae")
    result = run_module(
        "ditlab.sample",
        [
            f"ckpt={tmp_path / 'DiT-S-8-64.pt'}",
            f"vae_path={tmp_path / 'vae'}",
            "num_samples=3",
            "sampler=ddpm50",
            "steps=4",
            "guidance.scale=1.5",
            "guidance.channels=3",
            f"out={tmp_path / 'o'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "o" / "samples_3x64x64x3.npz") as data:
        assert data["arr_0"].shape == (3, 64, 64, 3)


def test_diffusers_export_matches_diffusers_implementation_and_round_trips():
    model = randomised(
        DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=7)
    )
    theirs = to_diffusers(model)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 3, 6])
    t0 = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        ours = model(x, t0, y)
        out = theirs(x, timestep=t0, class_labels=y).sample
    assert torch.allclose(ours, out, atol=1e-5)
    # At t > 0 the two differ only by diffusers' timestep frequencies (exp(-ln(1e4) i / 127) instead
    # of i / 128): with that one change our model reproduces diffusers' output exactly.
    t = torch.tensor([10, 500, 999])
    with torch.no_grad():
        out = theirs(x, timestep=t, class_labels=y).sample
        assert not torch.allclose(model(x, t, y), out, atol=1e-4)

        def diffusers_frequencies(steps, dim, max_period=10000.0):
            half = dim // 2
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1))
            args = steps[:, None].float() * freqs[None]
            return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dit_module, "timestep_embedding", diffusers_frequencies)
            assert torch.allclose(model(x, t, y), out, atol=1e-5)
    back = from_diffusers_state_dict(theirs.state_dict(), dit_kwargs(theirs.config))
    for key, value in model.state_dict().items():
        assert torch.equal(value, back[key]), key
