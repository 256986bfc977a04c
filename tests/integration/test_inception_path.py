"""The Inception path end to end, offline, from a random weights file built here (plumbing, not values):
prepare's reference (with sFID statistics), the FID callback during training (guided and unguided,
the protocol logged once), ditlab.sample + ditlab.evaluate against the prepared dir and against an
ADM reference batch built in the test. Images are 8x8 and few: Inception upsamples them to 299."""

import json

import numpy as np
import pytest
import yaml
from omegaconf import open_dict

from ditlab.evaluate import main as evaluate_main
from ditlab.metrics.inception_weights import write_random_inception_weights
from ditlab.metrics.provenance import sha256_of
from ditlab.metrics.reference import ReferenceStats
from ditlab.metrics.uncertainty import derived_name
from ditlab.prepare import prepare_from_config
from ditlab.sample import main as sample_main
from ditlab.train import train
from helpers import compose_cfg, compose_run, invoke_main, make_image_folder

SUITE = ("fid", "sfid", "is", "precision", "recall")
# the FID protocol of the run; ditlab.sample below draws the same samples
FID_SAMPLES, FID_STEPS, FID_SCALE = 6, 2, 2.0


def values(metrics: dict) -> list[str]:
    """The metrics' names without their se, intervals and extrapolations."""
    return [name for name in metrics if not derived_name(name) and not name.endswith("_inf")]


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """(random weights file, a prepared dir whose reference is Inception's: 9 train images of 8x8)."""
    root = tmp_path_factory.mktemp("inception")
    weights = write_random_inception_weights(root / "random-inception.pth", seed=0)
    folder = make_image_folder(root / "images", per_class=4, size=(8, 8), corrupt=False)
    cfg = compose_cfg(
        "prepare",
        [
            "data=folder",
            f"data.source.root={folder}",
            "data.source.image_size=8",
            "data.source.val_fraction=0.25",
            "vae=identity",
            f"data.prepared_dir={root / 'latents'}",
            "encode.num_workers=0",
            "encode.progress=false",
            "data.reference.extractor=inception",
            f"data.reference.weights_path={weights}",
        ],
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(root)
    return weights, prepare_from_config(cfg)


@pytest.fixture(scope="module")
def inception_run(inception, tmp_path_factory):
    weights, prepared = inception
    out = tmp_path_factory.mktemp("inception_run") / "run"
    extra = [
        "data.module.batch_size=4",
        "data.reference.extractor=inception",
        f"data.reference.weights_path={weights}",
        "fid_protocol.extractor=inception",
        f"fid_protocol.num_samples={FID_SAMPLES}",
        f"fid_protocol.batch_size={FID_SAMPLES}",
        "fid_protocol.metrics=[fid,sfid,isc,prc]",
        "fid_protocol.also_unguided=true",
        "fid_protocol.uncertainty.resamples=4",  # plumbing: each resample costs 2048-d matrix roots
        "+fid_protocol.sampler._target_=ditlab.diffusion.Sampler",
        "+fid_protocol.sampler.name=dpmpp_2m",
        f"+fid_protocol.sampler.steps={FID_STEPS}",
        f"guidance.scale={FID_SCALE}",
        "callbacks.fid.every_n_steps=0",
        "callbacks.fid.use_ema=false",  # the EMA of 2 steps is still the zero-output init: guidance changes nothing
        "optim.optimizer.lr=0.02",  # and 2 steps at a large lr move the raw weights enough for guidance to show
        "callbacks.sample_grid=null",
    ]
    return out, train(compose_run(prepared, out, steps=2, extra=extra))


def test_prepare_writes_inception_statistics_with_sfid_ones(inception):
    weights, prepared = inception
    stats = ReferenceStats.load(prepared / "reference_inception.npz", "inception")
    assert stats.mu.shape == (2048,) and stats.features.shape == (9, 2048) and stats.image_size == 8
    assert stats.mu_s.shape == (2023,) and stats.sigma_s.shape == (2023, 2023)
    assert np.isfinite(stats.sigma).all() and np.isfinite(stats.sigma_s).all() and stats.sigma_s.trace() > 0


def test_fid_callback_measures_through_inception_and_logs_its_protocol(inception, inception_run):
    weights, prepared = inception
    out, metrics = inception_run
    for name in SUITE:
        assert np.isfinite(metrics[f"val/{name}"]) and np.isfinite(metrics[f"val/{name}_unguided"]), name
    assert metrics["val/fid"] != metrics["val/fid_unguided"]  # two sample sets: guided and not
    summary = json.loads((out / "metrics.json").read_text())
    protocol = summary["fid_protocol"]
    assert protocol["extractor"] == "inception" and protocol["extractor_model"] == "inception-v3-compat"
    assert protocol["weights_path"] == str(weights) and protocol["weights_sha256"] == sha256_of(weights)
    assert protocol["reference"] == str(prepared / "reference_inception.npz")
    assert protocol["reference_sha256"] == sha256_of(prepared / "reference_inception.npz")
    assert protocol["sampler"] == {"name": "dpmpp_2m", "steps": FID_STEPS} and protocol["weights"] == "raw"
    assert protocol["guidance"]["scale"] == FID_SCALE and protocol["also_unguided"] is True
    assert {"ditlab", "torch", "torch-fidelity"} <= set(protocol["versions"])
    hparams = yaml.safe_load((out / "csv" / "run" / "hparams.yaml").read_text())
    assert hparams["fid_protocol_used"] == protocol  # the loggers got the same record


def test_sample_and_evaluate_through_inception_against_ours_and_an_adm_batch(
    inception, inception_run, tmp_path, monkeypatch, capsys
):
    weights, prepared = inception
    out, metrics = inception_run
    sample_args = [
        f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
        "ema=false",
        f"num_samples={FID_SAMPLES}",
        f"batch_size={FID_SAMPLES}",
        "sampler=dpmpp20",
        f"steps={FID_STEPS}",
        f"guidance.scale={FID_SCALE}",
        f"out={tmp_path / 's'}",
    ]
    code, _, err = invoke_main(sample_main, "ditlab.sample", sample_args, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    npz = tmp_path / "s" / f"samples_{FID_SAMPLES}x8x8x3.npz"
    measure = [f"samples={npz}", "extractor=inception", f"weights_path={weights}", "progress=false"]
    measure.append("uncertainty.resamples=4")  # as the run's: the intervals' plumbing, at a small cost
    io = (monkeypatch, capsys)
    code, stdout, err = invoke_main(evaluate_main, "ditlab.evaluate", [*measure, f"reference={prepared}"], *io)
    assert code == 0, err[-2000:]
    ours = json.loads((tmp_path / "s" / "results.json").read_text())["evaluations"][-1]
    assert values(ours["metrics"]) == [*SUITE, "kid"] and ours["skipped"] == {}
    # the callback's numbers, from the same samples through the same extractor
    for name in SUITE:
        assert ours["metrics"][name] == pytest.approx(metrics[f"val/{name}"], rel=1e-4), name
    assert ours["protocol"]["weights_sha256"] == sha256_of(weights)

    # an ADM reference batch: our statistics as its mu/sigma/mu_s/sigma_s, 5 reference images in arr_0
    stats = ReferenceStats.load(prepared / "reference_inception.npz")
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    adm = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(adm, arr_0=images, mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    code, stdout, err = invoke_main(evaluate_main, "ditlab.evaluate", [*measure, f"reference={adm}"], *io)
    assert code == 0, err[-2000:]
    theirs = json.loads((tmp_path / "s" / "results.json").read_text())["evaluations"]
    assert len(theirs) == 2 and theirs[-1]["skipped"] == {}  # every metric, none skipped
    assert values(theirs[-1]["metrics"]) == [*SUITE, "kid"]
    assert theirs[-1]["metrics"]["fid"] == ours["metrics"]["fid"]  # the file's statistics are ours
    assert theirs[-1]["metrics"]["sfid"] == ours["metrics"]["sfid"]
    assert theirs[-1]["protocol"]["reference_sha256"] == sha256_of(adm)
    assert "| FID | FID∞ | sFID | sFID∞ | IS | Precision | Recall | KID |" in stdout
