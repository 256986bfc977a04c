"""The robust Fréchet distance against plain references: an SVD route written here, closed forms for
commuting covariances, and scipy's sqrtm where that one is well defined."""

import numpy as np
import pytest
import torch

from ditlab.metrics.frechet import frechet_distance, frechet_distances_to_reference, trace_sqrt_product

pytestmark = pytest.mark.unit


def random_orthogonal(dim, rng):
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def covariance_with_spectrum(eigenvalues, basis):
    sigma = (basis * eigenvalues) @ basis.T
    return (sigma + sigma.T) / 2


def reference_root(sigma):
    """S^{1/2} by eigendecomposition (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(sigma)
    return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T


def reference_trace_sqrt(sigma1, sigma2):
    """tr(sqrt(S1 S2)) = sum of the singular values of S1^{1/2} S2^{1/2} (another route than the module's)."""
    return np.linalg.svd(reference_root(sigma1) @ reference_root(sigma2), compute_uv=False).sum()


def reference_frechet(mu1, sigma1, mu2, sigma2):
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * reference_trace_sqrt(sigma1, sigma2)


def sample_gaussians(rng, dim, count):
    """Two correlated, well-conditioned Gaussians' sample statistics."""
    mixing1 = np.eye(dim) + 0.5 * rng.standard_normal((dim, dim)) / np.sqrt(dim)
    mixing2 = 2 * np.eye(dim) + 0.5 * rng.standard_normal((dim, dim)) / np.sqrt(dim)
    a = rng.standard_normal((count, dim)) @ mixing1
    b = 0.5 + rng.standard_normal((count, dim)) @ mixing2
    return a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)


def test_well_conditioned_matches_the_svd_reference_and_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mu1, s1, mu2, s2 = sample_gaussians(np.random.default_rng(0), dim=16, count=400)
    assert np.linalg.cond(s1) < 1e3 and np.linalg.cond(s2) < 1e3
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(reference_frechet(mu1, s1, mu2, s2), rel=1e-10)
    # ADM's / TTUR's formula, where sqrtm of the non-symmetric product is well defined
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(covmean)).max() < 1e-8
    diff = mu1 - mu2
    adm = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean))
    assert ours == pytest.approx(adm, rel=1e-9)
    assert ours > 1.0  # two different Gaussians: the comparison above is not 0 == 0


def test_commuting_ill_conditioned_covariances_match_the_closed_form():
    """Shared eigenvectors: tr(sqrt(S1 S2)) = sum(sqrt(l1 * l2)) exactly, with condition numbers 1e12."""
    rng = np.random.default_rng(1)
    dim = 24
    basis = random_orthogonal(dim, rng)
    l1 = np.logspace(0, -12, dim)
    l2 = rng.permutation(np.logspace(1, -11, dim))
    s1, s2 = covariance_with_spectrum(l1, basis), covariance_with_spectrum(l2, basis)
    assert np.linalg.cond(s1) > 1e11
    expected = np.sqrt(l1 * l2).sum()
    # the square root of eigenvalues near 0 amplifies rounding: |error| ~ sqrt(eps * |S1| |S2|) per eigenvalue
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, abs=dim * 1e-7)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    closed_form = (mu1 - mu2) @ (mu1 - mu2) + l1.sum() + l2.sum() - 2 * expected
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form, abs=dim * 1e-6)


def test_ill_conditioned_covariances_match_the_svd_reference():
    rng = np.random.default_rng(2)
    dim = 32
    s1 = covariance_with_spectrum(np.logspace(0, -12, dim), random_orthogonal(dim, rng))
    s2 = covariance_with_spectrum(np.logspace(2, -10, dim), random_orthogonal(dim, rng))
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(ours, float) and np.isfinite(ours)
    scale = np.trace(s1) + np.trace(s2)
    assert ours == pytest.approx(reference_frechet(mu1, s1, mu2, s2), abs=1e-7 * scale)


def test_rank_deficient_covariances_fewer_samples_than_dims():
    rng = np.random.default_rng(3)
    dim = 40
    a = rng.standard_normal((9, dim)) * np.linspace(0.1, 3, dim)  # rank 8 covariance
    b = 0.3 + rng.standard_normal((15, dim))  # rank 14
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert np.linalg.matrix_rank(s1) == 8 and np.linalg.matrix_rank(s2) == 14
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(ours, float) and np.isfinite(ours)
    scale = np.trace(s1) + np.trace(s2)
    assert ours == pytest.approx(reference_frechet(mu1, s1, mu2, s2), abs=1e-7 * scale)
    assert ours > 0.1 * scale  # far apart: a distance of 0 would not pass


def test_symmetric_in_its_arguments_and_zero_for_identical_inputs():
    rng = np.random.default_rng(4)
    mu1, s1, mu2, s2 = sample_gaussians(rng, dim=12, count=60)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    few = rng.standard_normal((5, 30))  # rank 4 in 30 dims: zero eigenvalues round to +-eps
    mu, sigma = few.mean(0), np.cov(few, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


@pytest.mark.parametrize(
    "mu1, sigma1, mu2, sigma2, message",
    [
        (np.zeros(3), np.eye(3), np.zeros(4), np.eye(4), "mu1 has shape \\(3,\\) but mu2 \\(4,\\)"),
        (np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3), "mu1 has shape \\(3, 1\\); expected a vector"),
        (np.zeros(3), np.eye(4), np.zeros(3), np.eye(3), "sigma1 has shape \\(4, 4\\); expected \\(3, 3\\)"),
        (np.zeros(3), np.eye(3), np.array([0, np.nan, 0]), np.eye(3), "mu2/sigma2 hold NaN or inf"),
        (np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), np.eye(3), "sigma1 is not symmetric"),
    ],
)
def test_bad_inputs_raise_one_line_value_errors(mu1, sigma1, mu2, sigma2, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(mu1, sigma1, mu2, sigma2)


# --- many weighted sets against one reference (the bootstrap's and FID_inf's route) -----------------


@pytest.mark.parametrize("count, dim", [(60, 6), (12, 30)], ids=["D x D route", "N x N Gram route"])
def test_weighted_sets_equal_the_robust_distance_of_their_rows(count, dim):
    """A resample (counts) or a subset (0/1) of the rows, against a fixed reference: the same number as
    ``frechet_distance`` of the statistics of the rows it holds, repeated as counted."""
    rng = np.random.default_rng(5)
    x = 0.3 + rng.standard_normal((count, dim)) @ (np.eye(dim) + 0.4 * rng.standard_normal((dim, dim)) / np.sqrt(dim))
    reference = rng.standard_normal((dim + 20, dim))
    mu_r, s_r = reference.mean(0), np.cov(reference, rowvar=False)
    rows = [np.arange(count), rng.integers(0, count, count), rng.integers(0, count, count), np.arange(count // 2)]
    weights = np.stack([np.bincount(r, minlength=count) for r in rows]).astype(float)
    got = frechet_distances_to_reference(torch.from_numpy(x), torch.from_numpy(weights), mu_r, s_r).numpy()
    expected = [frechet_distance(x[r].mean(0), np.cov(x[r], rowvar=False), mu_r, s_r) for r in rows]
    # N < D: rank-deficient set covariances, whose zero eigenvalues' square roots amplify rounding
    scale = np.trace(np.cov(x, rowvar=False)) + np.trace(s_r)
    tolerance = {"rel": 1e-9} if count > dim else {"abs": 1e-7 * scale}
    assert got == pytest.approx(expected, **tolerance)
    assert len(set(np.round(expected, 6))) == len(rows)  # four different sets: four different numbers
    # in chunks of sets and blocks of rows (how 50K Inception features stay within memory): the same
    chunked = frechet_distances_to_reference(torch.from_numpy(x), torch.from_numpy(weights), mu_r, s_r, 50).numpy()
    assert chunked == pytest.approx(got, **tolerance)


def test_weighted_sets_against_a_rank_deficient_reference():
    rng = np.random.default_rng(6)
    dim = 20
    reference = rng.standard_normal((8, dim))  # rank 7
    mu_r, s_r = reference.mean(0), np.cov(reference, rowvar=False)
    x = rng.standard_normal((50, dim))
    got = frechet_distances_to_reference(torch.from_numpy(x), torch.ones(1, 50, dtype=torch.float64), mu_r, s_r)
    expected = frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu_r, s_r)
    assert float(got[0]) == pytest.approx(expected, abs=1e-7 * (np.trace(s_r) + np.trace(np.cov(x, rowvar=False))))
    with pytest.raises(ValueError, match="fewer than 2 samples"):
        frechet_distances_to_reference(torch.from_numpy(x), torch.eye(1, 50, dtype=torch.float64), mu_r, s_r)
