"""The uncertainty beside every FID-type number, measured on synthetic Gaussian features whose true
Fréchet distance to the reference is known: the interval's coverage over repeated draws, the
extrapolated FID's bias against the raw FID's, and each metric's se against the spread of the metric
over repeated draws."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import mmd2

from ditlab.metrics import uncertainty
from ditlab.metrics.definitions import Gaussian, precision_recall
from ditlab.metrics.fidelity import compute_metrics, kernel_inception_distance
from ditlab.metrics.frechet import frechet_distance
from ditlab.metrics.protocol import FIDProtocol
from ditlab.metrics.reference import ReferenceStats
from ditlab.metrics.uncertainty import (
    Uncertainty,
    bias_corrected_interval,
    bootstrap_indices,
    counts_of,
    fid_bootstrap,
    fid_inf,
    half_sample_se,
    half_samples,
    kid_halves,
    recall_halves,
)

pytestmark = pytest.mark.unit


def gaussians(dim, seed=0):
    """A reference N(0, S_r) and a generator N(mu_g, S_g) apart by a Fréchet distance of a few units."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    sigma_r = (q * np.linspace(0.5, 2, dim)) @ q.T
    mixing = 1.2 * np.eye(dim) + 0.2 * rng.standard_normal((dim, dim)) / np.sqrt(dim)
    sigma_g = mixing @ sigma_r @ mixing.T
    mu_g = rng.standard_normal(dim) / np.sqrt(dim)
    reference = Gaussian(np.zeros(dim), sigma_r)
    return reference, mu_g, np.linalg.cholesky(sigma_g), frechet_distance(mu_g, sigma_g, reference.mu, sigma_r)


def polynomial_kernel(x, y):
    """KID's kernel, (x . y / D + 1)^3."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def draws(mu, root, count, repeats, seed):
    rng = np.random.default_rng(seed)
    return [mu + rng.standard_normal((count, len(mu))) @ root.T for _ in range(repeats)]


def test_the_interval_covers_the_true_distance_at_its_nominal_rate():
    """200 draws of N = 200 in 8 dimensions: FID_N is biased upwards by about one se, so an interval
    around FID_N (the resamples' 2.5-97.5% quantiles) misses the true distance about half the time; the
    reported, bias-corrected one covers it about 95% of the time (binomial sd over 200 draws: 0.015)."""
    reference, mu, root, true = gaussians(dim=8)
    settings = Uncertainty(resamples=100, level=0.95)
    covered, percentile_covered, raw, ses = [], [], [], []
    for i, x in enumerate(draws(mu, root, 200, 200, seed=1)):
        counts = counts_of(bootstrap_indices(len(x), settings.resamples, seed=i), len(x))
        replicates = fid_bootstrap(x, reference, counts)
        fid = Gaussian.of(x).distance(reference)
        interval = bias_corrected_interval("fid", fid, replicates, settings.z)
        covered.append(interval.low <= true <= interval.high)
        low, high = np.quantile(replicates.numpy(), [0.025, 0.975])
        percentile_covered.append(low <= true <= high)
        raw.append(fid)
        ses.append(interval.se)
    assert np.mean(raw) - true > 0.5 * np.std(raw)  # the bias this is about
    assert 0.91 <= np.mean(covered) <= 0.99, np.mean(covered)
    assert np.mean(percentile_covered) < 0.8, np.mean(percentile_covered)  # an uncorrected interval fails
    assert np.mean(ses) == pytest.approx(np.std(raw), rel=0.2)  # the se is the draw-to-draw spread


def test_fid_inf_is_closer_to_the_truth_than_fid_at_small_n():
    """N = 100 in 16 dimensions: FID_N is biased upwards by about three of its sds; FID_inf is not."""
    reference, mu, root, true = gaussians(dim=16, seed=2)
    raw, extrapolated = [], []
    for i, x in enumerate(draws(mu, root, 100, 60, seed=3)):
        raw.append(Gaussian.of(x).distance(reference))
        extrapolated.append(fid_inf(x, reference, seed=i))
    raw, extrapolated = np.array(raw), np.array(extrapolated)
    assert raw.mean() - true > 2 * raw.std()
    assert abs(extrapolated.mean() - true) < 0.25 * (raw.mean() - true)
    assert np.abs(extrapolated - true).mean() < 0.6 * np.abs(raw - true).mean()


def test_every_metric_has_an_se_that_matches_its_spread_over_draws():
    """Each metric's mean se over 30 draws against the standard deviation of its value over the same
    draws (itself known to about 13%): FID, IS, precision and sample accuracy from the bootstrap, recall
    from half-samples (KID: the next test)."""
    dim, count, classes = 4, 200, 5
    rng = np.random.default_rng(4)
    stats = ReferenceStats.from_features(torch.from_numpy(rng.standard_normal((400, dim))), "clf", keep=400)
    head = rng.standard_normal((dim, classes)) * 2
    values, ses = {}, {}
    for i in range(30):
        features = 0.3 + 1.2 * rng.standard_normal((count, dim))
        labels = torch.from_numpy(rng.integers(0, classes, count))
        generated = {"features": torch.from_numpy(features), "logits": torch.from_numpy(features @ head)}
        settings = Uncertainty(resamples=40, seed=i, fid_inf=False)
        out = compute_metrics(generated, stats, ("fid", "isc", "prc"), labels=labels, uncertainty=settings)
        for name in ("fid_clf", "is_clf", "precision_clf", "recall_clf", "sample_accuracy_clf"):
            values.setdefault(name, []).append(out[name])
            ses.setdefault(name, []).append(out[f"{name}_se"])
            assert out[f"{name}_ci_low"] < out[f"{name}_ci_high"]
    for name in values:
        assert np.mean(ses[name]) == pytest.approx(np.std(values[name]), rel=0.4), name


def test_kid_half_samples_are_the_unbiased_mmd_and_their_se_its_spread():
    """A "half" holding every sample is torch-fidelity's unbiased MMD^2 (KID of one subset that is the
    whole set) less its reference-only term; the halves' se matches the spread of that MMD^2 over draws."""
    rng = np.random.default_rng(7)
    reference = rng.standard_normal((100, 3))  # torch-fidelity's mmd2 takes sets of one size
    features = 0.3 + rng.standard_normal((100, 3))
    everything = kid_halves(features, reference, torch.arange(100)[None])
    k_rr = polynomial_kernel(reference, reference)
    reference_term = (k_rr.sum() - np.trace(k_rr)) / (100 * 99)
    expected = mmd2(polynomial_kernel(features, features), polynomial_kernel(features, reference), k_rr)
    assert float(everything[0]) + reference_term == pytest.approx(expected, rel=1e-10)
    full, ses = [], []
    for i in range(60):
        x = 0.3 + rng.standard_normal((100, 3))
        full.append(float(kid_halves(x, reference, torch.arange(100)[None])[0]))
        ses.append(half_sample_se(kid_halves(x, reference, half_samples(100, 50, seed=i))))
    assert np.mean(ses) == pytest.approx(np.std(full), rel=0.4)


@pytest.mark.parametrize("neighbours", [64, 4], ids=["nearest-neighbour lists", "exact fallback"])
def test_half_sample_values_are_the_metrics_of_the_halves(monkeypatch, neighbours):
    """A half's recall is ADM's recall of the half's samples (whether its radii come from the
    nearest-neighbour lists or, when those are too short, exactly); a half's KID term is the full-set
    value of the half alone."""
    monkeypatch.setattr(uncertainty, "NEIGHBOURS", neighbours)
    rng = np.random.default_rng(8)
    reference, samples = rng.standard_normal((70, 3)), 0.4 + rng.standard_normal((60, 3))
    halves = half_samples(60, 6, seed=0)
    recalls = recall_halves(samples, reference, halves, k=3)
    expected = [precision_recall(reference, samples[h.numpy()])[1] for h in halves]
    assert recalls.tolist() == expected and len(set(expected)) > 1
    kids = kid_halves(samples, reference, halves)
    alone = [float(kid_halves(samples[h.numpy()], reference, torch.arange(30)[None])[0]) for h in halves]
    assert kids.tolist() == pytest.approx(alone, rel=1e-12)


def test_names_and_settings():
    rng = np.random.default_rng(5)
    stats = ReferenceStats.from_features(torch.from_numpy(rng.standard_normal((80, 3))), "clf", keep=80)
    generated = {"features": torch.from_numpy(rng.standard_normal((60, 3))), "logits": torch.randn(60, 4).double()}
    out = compute_metrics(generated, stats, ("fid", "prc"), uncertainty=Uncertainty(resamples=20), variant="_unguided")
    tags = ("", "_se", "_ci_low", "_ci_high")
    expected = [f"fid_clf_unguided{t}" for t in (*tags, "_inf")]
    expected += [f"{m}_clf_unguided{t}" for m in ("precision", "recall") for t in tags]
    assert list(out) == expected
    again = compute_metrics(
        generated, stats, ("fid", "prc"), uncertainty=Uncertainty(resamples=20), variant="_unguided"
    )
    assert again == out  # the resamples are seeded: the same samples give the same interval
    assert 0 <= out["precision_clf_unguided_ci_low"] and out["precision_clf_unguided_ci_high"] <= 1
    plain = compute_metrics(generated, stats, ("fid",), uncertainty=Uncertainty(resamples=0, fid_inf=False))
    assert list(plain) == ["fid_clf"] and plain["fid_clf"] == out["fid_clf_unguided"]
    assert list(compute_metrics(generated, stats, ("fid",))) == ["fid_clf"]
    described = FIDProtocol(num_samples=4, uncertainty=Uncertainty(resamples=30, seed=2)).describe()
    assert described["uncertainty"] == {"resamples": 30, "seed": 2, "level": 0.95, "fid_inf": True}
    with pytest.raises(ValueError, match="uncertainty.resamples=1; expected 0 \\(off\\) or >= 2"):
        Uncertainty(resamples=1)
    with pytest.raises(ValueError, match="uncertainty.level=95; expected a confidence level in \\(0, 1\\)"):
        Uncertainty(level=95)


def test_the_suite_and_kid_values_are_unchanged_by_the_uncertainty():
    """The point values are the suite's and torch-fidelity's, whatever the resamples do."""
    rng = np.random.default_rng(6)
    reference_features, features = rng.standard_normal((90, 3)), 0.2 + rng.standard_normal((70, 3))
    stats = ReferenceStats.from_features(torch.from_numpy(reference_features), "clf", keep=90)
    generated = {"features": torch.from_numpy(features), "logits": torch.randn(70, 4).double()}
    out = compute_metrics(generated, stats, ("fid", "kid", "prc"), 50, uncertainty=Uncertainty(resamples=10))
    assert out["fid_clf"] == Gaussian.of(features).distance(Gaussian(stats.mu, stats.sigma))
    assert (out["precision_clf"], out["recall_clf"]) == precision_recall(reference_features, features)
    assert out["kid_clf"] == kernel_inception_distance(torch.from_numpy(features), stats.features, 50)
