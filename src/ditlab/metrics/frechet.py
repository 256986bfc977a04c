"""The Fréchet distance between two Gaussians, robust to ill-conditioned and rank-deficient covariances.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))

The usual implementation (TTUR, ADM's evaluator) takes ``scipy.linalg.sqrtm(S1 @ S2)``: S1 S2 is not
symmetric, so its square root can come back complex (dropped silently or rejected), NaN, or wrong
in one scipy build (LightningDiT #97). Here tr(sqrt(S1 S2)) comes from the symmetric PSD matrix
M = S1^{1/2} S2 S1^{1/2}, which has the eigenvalues of S1 S2 (AB and BA share their eigenvalues),
so tr(sqrt(S1 S2)) = sum(sqrt(eig(M))) with ``eigvalsh`` and eigenvalues clipped at 0: always real,
always finite, in float64.
"""

from __future__ import annotations

import numpy as np

# sigma counts as symmetric when |S - S^T| <= SYMMETRY_RTOL * max|S| (np.cov is symmetric to rounding)
SYMMETRY_RTOL = 1e-6


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D)."""
    mu1, sigma1 = validated_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = validated_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 has shape {mu1.shape} but mu2 {mu2.shape}; expected Gaussians of one dimension")
    diff = mu1 - mu2  # (D,)
    cross = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(S1 S2)) for symmetric PSD S1, S2 (D, D), through the symmetric S1^{1/2} S2 S1^{1/2}."""
    root1 = psd_sqrt(sigma1)  # (D, D)
    inner = root1 @ sigma2 @ root1  # (D, D), PSD; similar to S1 S2 where S1 is invertible
    inner = (inner + inner.T) / 2  # the products leave rounding-level asymmetry; eigvalsh reads one triangle
    eigenvalues = np.linalg.eigvalsh(inner).clip(min=0.0)  # rounding makes zero eigenvalues slightly negative
    return float(np.sqrt(eigenvalues).sum())


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric PSD matrix (D, D); negative eigenvalues clip to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)  # (D,), (D, D)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0.0))) @ eigenvectors.T


def validated_gaussian(mu, sigma, which: str = "") -> tuple[np.ndarray, np.ndarray]:
    """mu (D,) and sigma (D, D) as float64, finite, sigma symmetric; else a one-line ValueError."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{which} has shape {mu.shape}; expected a vector (D,)")
    if sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"sigma{which} has shape {sigma.shape}; expected {(len(mu), len(mu))} to match mu{which}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{which}/sigma{which} hold NaN or inf; expected finite statistics")
    asymmetry = float(np.abs(sigma - sigma.T).max(initial=0.0))
    if asymmetry > SYMMETRY_RTOL * float(np.abs(sigma).max(initial=0.0)):
        raise ValueError(f"sigma{which} is not symmetric (max |S - S^T| = {asymmetry:.3g}); expected a covariance")
    return mu, sigma
