"""What a number records beside it: hashes against hashlib, the reproduce command composed back into the
same sampler and guidance, sFID statistics in our reference files, skipped metrics named with their
reason, the unguided variant, and the merge of ditlab.sample's parts (complete parts of one launch only)."""

import hashlib
import shlex

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ditlab.diffusion import Guidance, Sampler
from ditlab.metrics.adm_reference import is_adm_reference, reference_image_size
from ditlab.metrics.fidelity import compute_metrics, unavailable_metrics
from ditlab.metrics.protocol import FIDProtocol
from ditlab.metrics.provenance import (
    evaluate_command,
    guidance_values,
    sample_command,
    sampler_values,
    sampling_record_path,
    sha256_of,
)
from ditlab.metrics.reference import ReferenceStats
from ditlab.metrics.uncertainty import Uncertainty
from ditlab.sample import _save_npz, merge_parts, part_path
from helpers import compose_cfg

pytestmark = pytest.mark.unit


def test_sha256_of_a_file_and_of_a_folder(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.png").write_bytes(b"bbb")
    (tmp_path / "d" / "sub" / "a.txt").write_bytes(b"a")
    assert sha256_of(tmp_path / "d" / "b.png") == hashlib.sha256(b"bbb").hexdigest()
    plain = hashlib.sha256(b"b.png\0bbb" + b"sub/a.txt\0a").hexdigest()
    assert sha256_of(tmp_path / "d") == plain
    assert sha256_of(tmp_path / "d", suffixes=(".png",)) == hashlib.sha256(b"b.png\0bbb").hexdigest()
    assert sha256_of(None) is None
    with pytest.raises(FileNotFoundError, match="missing"):
        sha256_of(tmp_path / "missing")
    assert sampling_record_path(tmp_path / "samples_4x8x8x3.npz") == tmp_path / "samples_4x8x8x3.json"
    assert sampling_record_path(tmp_path / "d") == tmp_path / "d" / "samples.json"


def record(sampler: Sampler, guidance: Guidance, labels=None, world=1) -> dict:
    return {
        "checkpoint": {"path": "/runs/a b/last.ckpt", "step": 7, "weights": "raw"},
        "vae_path": None,
        "sampler": sampler_values(sampler),
        "guidance": guidance_values(guidance),
        "num_samples": 12,
        "seed": 5,
        "labels": labels,
        "batch_size": 3,
        "world_size": world,
        "device": "cpu",
        "format": "npz",
        "out": "/tmp/out",
    }


@pytest.mark.parametrize(
    "sampler, guidance, labels",
    [
        (Sampler("ddim", 7, eta=0.5), Guidance(3.0, 3, (0.0, 600.0)), None),
        (Sampler("flow_sde", 9, shift=3.0, last_step="euler"), Guidance(1.0), [2, 0, 1]),
    ],
)
def test_sample_command_composes_back_to_the_recorded_choices(sampler, guidance, labels):
    command = sample_command(record(sampler, guidance, labels))
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "ditlab.sample"]
    cfg = compose_cfg("sample", words[3:])
    assert cfg.ckpt == "/runs/a b/last.ckpt" and cfg.ema is False
    assert (cfg.num_samples, cfg.batch_size, cfg.seed, cfg.device, cfg.out) == (12, 3, 5, "cpu", "/tmp/out")
    assert (None if cfg.labels is None else list(cfg.labels)) == labels
    rebuilt = instantiate(cfg.sampler)
    assert sampler_values(rebuilt) == sampler_values(sampler) and rebuilt.options == sampler.options
    assert instantiate(cfg.guidance) == guidance
    assert sample_command(record(sampler, guidance, labels, world=4)).startswith(
        "torchrun --nproc_per_node=4 -m ditlab.sample "
    )


def test_evaluate_command_composes_back(tmp_path):
    protocol = {
        "reference": "/data/VIRTUAL_imagenet256_labeled.npz",
        "extractor": "inception",
        "weights_path": "/w/inception.pth",
        "metrics": ["fid", "sfid"],
        "kid_subset_size": 100,
        "uncertainty": {"resamples": 40, "seed": 3, "level": 0.9, "fid_inf": False},
    }
    words = shlex.split(evaluate_command(tmp_path / "s.npz", protocol, "cuda"))
    cfg = compose_cfg("evaluate", words[3:])
    assert (cfg.samples, cfg.reference) == (str(tmp_path / "s.npz"), protocol["reference"])
    assert cfg.weights_path == "/w/inception.pth"
    assert list(cfg.metrics) == ["fid", "sfid"] and cfg.kid_subset_size == 100 and cfg.device == "cuda"
    assert instantiate(cfg.uncertainty) == Uncertainty(resamples=40, seed=3, level=0.9, fid_inf=False)


def test_inception_reference_keeps_spatial_statistics_and_its_size(tmp_path):
    rng = np.random.default_rng(0)
    pool, spatial = torch.from_numpy(rng.standard_normal((30, 5))), torch.from_numpy(rng.standard_normal((30, 4)))
    stats = ReferenceStats.from_features(pool, "inception", keep=10, image_size=16, spatial=spatial.float())
    stats.save(tmp_path / "ref.npz")
    loaded = ReferenceStats.load(tmp_path / "ref.npz", "inception")
    s = spatial.float().double().numpy()
    assert np.allclose(loaded.mu_s, s.mean(0)) and np.allclose(loaded.sigma_s, np.cov(s, rowvar=False))
    assert not is_adm_reference(tmp_path / "ref.npz") and reference_image_size(tmp_path / "ref.npz") == 16
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((3, 12, 12, 3), np.uint8), mu=np.zeros(2), sigma=np.eye(2))
    assert is_adm_reference(tmp_path / "adm.npz") and reference_image_size(tmp_path / "adm.npz") == 12
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2), sigma=np.eye(2))
    assert reference_image_size(tmp_path / "stats_only.npz") is None


def test_metrics_a_reference_cannot_give_are_named_with_the_reason():
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.standard_normal((20, 6)))
    generated = {"features": features, "logits": torch.from_numpy(rng.standard_normal((20, 4)))}
    clf = ReferenceStats.from_features(torch.from_numpy(rng.standard_normal((25, 6))), "clf", keep=0)
    asked = ("fid", "sfid", "isc", "kid", "prc")
    skipped = unavailable_metrics(asked, clf)
    assert set(skipped) == {"sfid_clf", "kid_clf", "precision_clf", "recall_clf"}
    assert "Inception" in skipped["sfid_clf"] and "feature subset" in skipped["kid_clf"]
    measured = compute_metrics(generated, clf, asked)
    assert set(measured) == {"fid_clf", "is_clf"}  # every asked metric is measured or skipped, never both
    inception = ReferenceStats.from_features(features, "inception", keep=20)
    assert "mu_s/sigma_s" in unavailable_metrics(("sfid",), inception)["sfid"]


def test_unguided_variant_only_where_guidance_does_something():
    guided = FIDProtocol(num_samples=4, guidance=Guidance(3.0, interval=(0, 500)), also_unguided=True)
    (first, same), (suffix, unguided) = guided.variants()
    assert first == "" and same is guided and suffix == "_unguided"
    assert unguided.guidance == Guidance() and unguided.seed == guided.seed and not unguided.also_unguided
    assert len(FIDProtocol(num_samples=4, also_unguided=True).variants()) == 1  # scale 1: nothing to add
    assert len(FIDProtocol(num_samples=4, guidance=Guidance(3.0)).variants()) == 1
    described = guided.describe()
    assert described["guidance"] == {"scale": 3.0, "channels": None, "interval": [0.0, 500.0]}
    with pytest.raises(ValueError, match="unknown metrics"):
        FIDProtocol(num_samples=4, metrics=["fid", "lpips"])


def test_merge_takes_the_parts_of_its_own_launch_only(tmp_path):
    def part(launch, rank, index, value):
        images = np.full((len(index), 2, 2, 1), value, np.uint8)
        np.savez(part_path(tmp_path, launch, rank), arr_0=images, index=np.array(index))

    part("old", 1, [1, 3], 99)  # an earlier run's rank 1
    part("new", 0, [0, 2, 4], 10)
    part("new", 1, [1, 3], 11)
    merged = merge_parts(tmp_path, "new", world=2, count=5)
    assert merged[:, 0, 0, 0].tolist() == [10, 11, 10, 11, 10]
    assert not list(tmp_path.glob(".part-*"))  # this launch's parts merged, the stale one removed
    part("x", 0, [0, 1], 1)
    part("x", 1, [1, 2], 2)  # sample 1 twice, sample 3 never: not a launch's parts
    with pytest.raises(RuntimeError, match="do not hold each of the 4 samples once"):
        merge_parts(tmp_path, "x", world=2, count=4)


def test_a_part_is_visible_under_its_name_only_once_complete(tmp_path, monkeypatch):
    """Rank 0 waits for a part's final name: a write that fails half way leaves neither it nor a temp."""

    def half_written(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", half_written)
    with pytest.raises(OSError, match="No space left"):
        _save_npz(part_path(tmp_path, "abc", 1), arr_0=np.zeros((1, 2, 2, 1), np.uint8), index=np.array([1]))
    assert list(tmp_path.iterdir()) == []
