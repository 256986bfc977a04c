"""FID & friends on Fashion-MNIST with the offline classifier extractor."""

import numpy as np
import pytest
import torch

from ditlab.data.sources import FashionMNIST
from ditlab.data.transforms import model_range_to_uint8
from ditlab.metrics.fidelity import Extractor, ReferenceStats, compute_metrics, metric_suffix
from ditlab.models.classifier import load_classifier
from ditlab.pipelines.fit_classifier import train_classifier


def fmnist_uint8(split, start, count):
    source = FashionMNIST(split=split)
    images = torch.stack([source[i][0] for i in range(start, start + count)])
    return model_range_to_uint8(images).permute(0, 3, 1, 2), torch.tensor(source.labels[start : start + count])


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "classifier"
    train_set, val_set = FashionMNIST(split="train"), FashionMNIST(split="val")
    subset = torch.utils.data.Subset(train_set, range(20000))
    val = torch.utils.data.Subset(val_set, range(2000))
    # 100 steps of 64 (fixed, so the test is deterministic): enough for a feature space (~0.76 val
    # accuracy); prepare trains for data.reference.classifier_steps (accuracy in experiments/fmnist_cpu)
    trained, info = train_classifier(subset, val, 10, path, max_steps=100, batch_size=64)
    assert info["val_accuracy"] > 0.6
    extractor = Extractor("clf", str(path))
    extractor.trained = trained  # the in-memory model, for the round-trip test
    return extractor


def test_classifier_round_trip(extractor, tmp_path):
    """The saved classifier (safetensors + JSON) reloads into the very model that was trained."""
    loaded, trained = load_classifier(extractor.weights_path), extractor.trained
    assert not trained.training and not loaded.training
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(loaded(x), trained(x)):
            assert torch.equal(a, b)
    assert loaded.state_dict().keys() == trained.state_dict().keys()


def test_fid_self_halves_noise_and_other_metrics(extractor):
    a, labels_a = fmnist_uint8("train", 0, 1000)
    b, _ = fmnist_uint8("train", 1000, 1000)
    fa, fb = extractor(a), extractor(b)
    ref_a = ReferenceStats.from_features(fa["features"], "clf")
    ref_b = ReferenceStats.from_features(fb["features"], "clf")
    self_fid = compute_metrics(fa, ref_a, ("fid",))["fid_clf"]
    assert abs(self_fid) < 1e-6 * max(1.0, float(np.trace(ref_a.sigma)))
    kid = {"kid_subset_size": 250}  # KID's subsets of 1000 would cost most of this test
    halves = compute_metrics(fa, ref_b, ("fid", "kid", "prc", "isc"), labels=labels_a, **kid)
    noise = torch.randint(0, 256, a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noisy = compute_metrics(extractor(noise), ref_b, ("fid", "kid"), **kid)
    assert noisy["fid_clf"] > 20 * halves["fid_clf"]
    assert abs(halves["kid_clf"]) < 0.1 * noisy["kid_clf"]
    assert 0.5 < halves["precision_clf"] <= 1 and 0.5 < halves["recall_clf"] <= 1
    assert halves["is_clf"] > 3  # 10 balanced, confidently classified classes: IS well above 1
    assert halves["sample_accuracy_clf"] > 0.6


def test_reference_stats_save_load_and_adm_format(tmp_path, extractor):
    feats = torch.randn(500, 8).double()
    ref = ReferenceStats.from_features(feats, "clf", keep=100)
    ref.save(tmp_path / "ref.npz")
    loaded = ReferenceStats.load(tmp_path / "ref.npz", "clf")
    assert np.allclose(loaded.mu, ref.mu) and loaded.features.shape == (100, 8)
    with pytest.raises(ValueError, match="holds clf statistics; expected inception"):
        ReferenceStats.load(tmp_path / "ref.npz", "inception")
    # ADM's reference batches carry mu / sigma (Inception) beside arr_0
    np.savez(
        tmp_path / "VIRTUAL_ref.npz",
        arr_0=np.zeros((2, 4, 4, 3), np.uint8),
        mu=np.zeros(4, np.float32),
        sigma=np.eye(4, dtype=np.float32),
    )
    adm = ReferenceStats.load(tmp_path / "VIRTUAL_ref.npz", "inception")
    assert adm.extractor == "inception" and adm.sigma.dtype == np.float64
    assert metric_suffix("inception") == "" and metric_suffix("clf") == "_clf"
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics({"features": feats, "logits": feats}, ref, ("fid", "lpips"))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        Extractor("vgg")
