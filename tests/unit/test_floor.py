import numpy as np
import pytest

from ditlab.metrics.floor import fid_floor, floor_subsets
from ditlab.metrics.frechet import frechet_distance
from ditlab.metrics.reference import ReferenceStats


def held_out(d=4, m=20000, classes=10, seed=0) -> ReferenceStats:
    """Held-out features from N(0, I_d), and the reference statistics of that very distribution."""
    rng = np.random.default_rng(seed)
    stats = ReferenceStats(np.zeros(d), np.eye(d), None, "clf")
    stats.floor_features, stats.floor_labels = rng.standard_normal((m, d)), rng.integers(0, classes, m)
    return stats


def test_the_floor_is_the_small_sample_bias_of_fid():
    """Real images drawn from the reference's own distribution score E[FID_n] ~ d / n (the mean) +
    d (d + 1) / (4 n) (the covariance's square root), to first order in 1 / n."""
    d = 4
    for n in (250, 1000):
        floor = fid_floor(held_out(d), n, "uniform", draws=40)
        expected = d / n + d * (d + 1) / (4 * n)
        assert 0.8 * expected < floor["mean"] < 1.2 * expected, (n, floor, expected)
        assert floor["num_samples"] == n and floor["draws"] == 40 and floor["sd"] > 0


def test_the_floor_is_each_draw_scored_as_fid_scores_it():
    """Both routes of the one-reference distances (N x N Gram below D, D x D above) give, draw by
    draw, the plain FID of the drawn images (with repeats where the held-out set is small)."""
    rng = np.random.default_rng(3)
    for n, m in ((6, 40), (60, 40)):  # N < D, and N > held-out images (drawn with repeats)
        stats = held_out(d=16, m=m, seed=2)
        root = rng.standard_normal((16, 16))
        stats.mu, stats.sigma = rng.standard_normal(16), root @ root.T / 16
        for draw in ("uniform", "balanced"):
            subsets = floor_subsets(stats.floor_labels, n, draw, draws=4, seed=0)
            plain = [
                frechet_distance(c.mean(0), np.cov(c, rowvar=False), stats.mu, stats.sigma)
                for c in (stats.floor_features[s] for s in subsets)
            ]
            floor = fid_floor(stats, n, draw, draws=4, seed=0)
            assert floor["mean"] == pytest.approx(np.mean(plain), rel=1e-7)  # float64 rounding of two eig routes
            assert floor["sd"] == pytest.approx(np.std(plain, ddof=1), rel=1e-5)


def test_balanced_floor_subsets_hold_every_class_equally_often_without_repeats():
    labels = np.repeat(np.arange(10), 100)
    for subset in floor_subsets(labels, 503, "balanced", draws=3, seed=1):
        counts = np.bincount(labels[subset], minlength=10)
        assert counts.sum() == 503 and set(counts.tolist()) == {50, 51}
        assert len(np.unique(subset)) == 503
    again = floor_subsets(labels, 503, "balanced", draws=3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, floor_subsets(labels, 503, "balanced", 3, 1)))


def test_no_held_out_features_no_floor():
    stats = held_out()
    stats.floor_features = stats.floor_labels = None
    assert fid_floor(stats, 100, "uniform") == {}


def test_held_out_features_survive_the_reference_file(tmp_path):
    stats = held_out(m=50)
    stats.save(tmp_path / "reference_clf.npz")
    loaded = ReferenceStats.load(tmp_path / "reference_clf.npz")
    assert np.array_equal(loaded.floor_features, stats.floor_features)
    assert np.array_equal(loaded.floor_labels, stats.floor_labels)
