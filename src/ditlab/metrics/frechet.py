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
import torch

# sigma counts as symmetric when |S - S^T| <= SYMMETRY_RTOL * max|S| (np.cov is symmetric to rounding)
SYMMETRY_RTOL = 1e-6


def frechet_distance(mu1, sigma1, mu2, sigma2, root2: np.ndarray | None = None) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D).
    ``root2``: sigma2^{1/2} where it is already known (a reference's, taken once for all its uses)."""
    mu1, sigma1 = validated_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = validated_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 has shape {mu1.shape} but mu2 {mu2.shape}; expected Gaussians of one dimension")
    diff = mu1 - mu2  # (D,)
    cross = trace_sqrt_product(sigma2, sigma1, root2)  # tr sqrt(S2 S1) = tr sqrt(S1 S2): one spectrum
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, root1: np.ndarray | None = None) -> float:
    """tr(sqrt(S1 S2)) for symmetric PSD S1, S2 (D, D), through the symmetric S1^{1/2} S2 S1^{1/2}
    (``root1``: S1^{1/2}, when known)."""
    root1 = psd_sqrt(sigma1) if root1 is None else root1  # (D, D)
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


# --- many weighted sample sets against one fixed reference (bootstrap resamples, nested subsets) ----


def frechet_distances_to_reference(
    features: torch.Tensor, weights: torch.Tensor, mu_ref, sigma_ref, chunk_elements: int = 1 << 25, root=None
) -> torch.Tensor:
    """Squared Fréchet distances of B weighted sets of the rows of ``features`` against one fixed
    N(mu_ref, sigma_ref): row b of ``weights`` (B, N) counts how often each feature vector is in set b
    (a bootstrap resample: multinomial counts; a subset: 0/1), n_b = its sum. Each set's statistics are
    its mean and covariance with ddof 1, as ``Gaussian.of`` of the repeated rows would give. (B,) float64,
    on ``features``' device.

    The reference's square root R = sigma_ref^{1/2} is taken once (or handed over as ``root``); then
    tr(sqrt(S_b sigma_ref)) is the sum of sqrt(eig(R S_b R)), the same symmetric PSD route as
    ``trace_sqrt_product``. R S_b R is the
    weighted covariance of Y = X R; its non-zero eigenvalues are computed from whichever is smaller:
    the D x D matrix, or the N x N weighted Gram matrix of the centred Y (the same non-zero eigenvalues,
    C^T C against C C^T), whose uncentred part Y Y^T is computed once for all sets."""
    x = features.double()  # (N, D)
    w = weights.to(x)  # (B, N)
    mu_ref = torch.as_tensor(np.asarray(mu_ref), dtype=torch.float64, device=x.device)  # (D,)
    if x.ndim != 2 or w.ndim != 2 or w.shape[1] != len(x) or mu_ref.shape != (x.shape[1],):
        raise ValueError(
            f"features {tuple(x.shape)}, weights {tuple(w.shape)}, mu_ref {tuple(mu_ref.shape)}; expected (N, D), "
            "(B, N) and (D,)"
        )
    sigma_ref = np.asarray(sigma_ref, dtype=np.float64)
    root = torch.as_tensor(psd_sqrt(sigma_ref) if root is None else root, device=x.device)  # (D, D)
    n = w.sum(1)  # (B,)
    if bool((n < 2).any()):
        raise ValueError("a weighted set holds fewer than 2 samples; expected >= 2 for a covariance")
    mean = (w @ x) / n[:, None]  # (B, D)
    mean_gap = (mean - mu_ref).square().sum(1)  # (B,)
    trace_s = (w @ x.square().sum(1) - n * mean.square().sum(1)) / (n - 1)  # (B,) tr S_b
    y = x @ root  # (N, D): in these coordinates the covariance of set b is R S_b R
    count, dim = y.shape
    roots = torch.empty(len(w), dtype=torch.float64, device=x.device)  # (B,) tr sqrt(R S_b R)
    size = min(count, dim)
    step = max(1, chunk_elements // (size * size))
    gram = y @ y.T if count < dim else None  # (N, N), once
    for start in range(0, len(w), step):
        wc, nc, mc = w[start : start + step], n[start : start + step], mean[start : start + step] @ root
        if gram is None:  # D x D: sum_i w_i y_i y_i^T - n m m^T
            inner = weighted_outer_sums(y, wc, chunk_elements) - nc[:, None, None] * mc[:, :, None] * mc[:, None, :]
        else:  # N x N, over the rows a set holds (a resample: ~63%): sqrt(w) (Y - m)(Y - m)^T sqrt(w)
            held = (wc > 0).to(torch.int8)
            rows = held.argsort(dim=1, descending=True, stable=True)[:, : int(held.sum(1).max())]  # (b, h)
            wk = wc.gather(1, rows)  # (b, h); 0 where a set holds fewer rows than h
            cross = (mc @ y.T).gather(1, rows)  # (b, h): y_i . m
            centred = gram[rows[:, :, None], rows[:, None, :]] - cross[:, :, None] - cross[:, None, :]
            centred = centred + mc.square().sum(1)[:, None, None]
            scale = wk.sqrt()
            inner = scale[:, :, None] * centred * scale[:, None, :]
        inner = (inner + inner.transpose(1, 2)) / (2 * (nc - 1)[:, None, None])
        roots[start : start + step] = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum(1)
    return mean_gap + trace_s + float(np.trace(sigma_ref)) - 2 * roots


def weighted_outer_sums(y: torch.Tensor, weights: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """(b, D, D): sum_i w_bi y_i y_i^T of (N, D) rows and (b, N) weights, over blocks of rows so that
    no temporary holds more than about ``chunk_elements`` numbers (50K Inception features: 800 MB each)."""
    count, dim = y.shape
    out = torch.zeros(len(weights), dim, dim, dtype=y.dtype, device=y.device)
    rows = max(1, chunk_elements // (len(weights) * dim))
    for start in range(0, count, rows):
        block = y[start : start + rows]  # (r, D)
        out += (weights[:, start : start + rows, None] * block).transpose(1, 2) @ block  # (b, D, r) @ (r, D)
    return out
