"""ADM's definition of each metric on features (openai/guided-diffusion ``evaluations/evaluator.py``),
whatever the feature space (Inception's, or the dataset classifier's).

- FID / sFID: the Fréchet distance of two ``Gaussian``s. Sample statistics are the mean and ``np.cov``
  (ddof 1); the distance is ``ditlab.metrics.frechet`` (ADM: scipy sqrtm).
- IS: scores of consecutive splits of 5000 samples (10 for 50K, the last one shorter when N is not a
  multiple), unshuffled, averaged; each split's score is exp(mean_i KL(p_i || mean_j p_j)).
- Precision and recall: ADM's ``ManifoldEstimator`` with k = 3. The radius of a point is its squared
  distance to the 4th nearest point of its own set, itself included (the k-th neighbour besides
  itself); a point is in a manifold when it lies within the radius of any point of that set.
  Precision = fraction of samples in the reference manifold; recall = fraction of reference points in
  the sample manifold. Distances in blocks of 10000 rows and columns, as ADM.

Where this differs, on purpose: statistics, softmax and distances are computed in float64 (ADM:
float32 features, float32 means, a float32 softmax whose zero probabilities make ``0 * log 0`` NaN,
and pairwise distances in float16 when those are finite), and the Fréchet distance never goes
through a non-symmetric matrix square root.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ditlab.metrics.frechet import frechet_distance, psd_sqrt

IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000): 10 splits for 50K samples
PR_NEIGHBOURHOOD = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
PR_BATCH_SIZE = 10000  # ADM's row_batch_size = col_batch_size


@dataclass
class Gaussian:
    """Mean (D,) and covariance (D, D) in float64: the statistics FID and sFID compare."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> Gaussian:
        """ADM's compute_statistics: mean and np.cov (ddof 1) of (N, D) features."""
        features = np.asarray(features)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"features have shape {features.shape}; expected (N >= 2, D) for a covariance")
        return cls(features.mean(axis=0, dtype=np.float64), np.cov(features, rowvar=False, dtype=np.float64))

    def distance(self, other: Gaussian) -> float:
        """The Fréchet distance to ``other``, a reference: its root is taken once for every use."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, root2=other.root)

    @cached_property
    def root(self) -> np.ndarray:
        """sigma^{1/2}, computed once: a reference's, for every resample and every measurement of a run."""
        return psd_sqrt(self.sigma)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's compute_inception_score from (N, K) logits: mean over consecutive splits of
    exp(mean_i KL(p_i || mean_j p_j)), p = softmax(logits), in float64."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; expected (N >= 1, K)")
    if split_size < 1:
        raise ValueError(f"split_size={split_size}; expected a positive number of samples per split")
    return float(inception_score_of_log_probs(logits.log_softmax(dim=1), split_size))  # finite where softmax is 0


def inception_score_of_log_probs(log_p: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> torch.Tensor:
    """IS from log-probabilities (..., N, K): the mean score of consecutive splits of ``split_size`` along
    N; (...), a batch of sets at once (the bootstrap's resamples)."""
    return torch.stack([split_inception_score(part) for part in log_p.split(split_size, dim=-2)], -1).mean(-1)


def split_inception_score(log_p: torch.Tensor) -> torch.Tensor:
    """exp(mean KL(p_i || q)) of one split of log-probabilities (..., n, K); q is the split's mean p."""
    log_q = torch.logsumexp(log_p, dim=-2, keepdim=True) - np.log(log_p.shape[-2])  # (..., 1, K) log mean p
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (..., n)
    return kl.mean(dim=-1).exp()


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(A, D), (B, D) -> (A, B) squared Euclidean distances, ADM's |u|^2 - 2 u.v + |v|^2 clipped at 0."""
    return (u.square().sum(1)[:, None] - 2 * u @ v.T + v.square().sum(1)[None, :]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, batch_size: int = PR_BATCH_SIZE):
    """(N, D) -> (N,) squared distance of each point to its (k+1)-th nearest point of ``features``,
    itself included (ADM's manifold_radii)."""
    if len(features) <= k:
        raise ValueError(f"{len(features)} feature vectors; expected more than k={k} for k-NN radii")
    radii = []
    for rows in features.split(batch_size):
        # the k+1 smallest of every column block hold the k+1 smallest of the whole row
        candidates = [
            squared_distances(rows, cols).topk(min(k + 1, len(cols)), dim=1, largest=False).values
            for cols in features.split(batch_size)
        ]
        radii.append(torch.cat(candidates, dim=1).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def within_any_radius(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int):
    """(P, D) -> (P,) bool: does each point lie within the radius of some centre (C, D), radii (C,)."""
    inside = []
    for rows in points.split(batch_size):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for cols, col_radii in zip(centres.split(batch_size), radii.split(batch_size)):
            hit |= (squared_distances(rows, cols) <= col_radii[None, :]).any(dim=1)
        inside.append(hit)
    return torch.cat(inside)


def precision_recall(
    reference: np.ndarray,
    samples: np.ndarray,
    k: int = PR_NEIGHBOURHOOD,
    batch_size: int = PR_BATCH_SIZE,
    device: str = "cpu",
) -> tuple[float, float]:
    """ADM's compute_prec_recall on pool features: reference (R, D) and samples (S, D)."""
    in_reference, in_samples = manifold_membership(reference, samples, k, batch_size, device)
    return float(in_reference.mean()), float(in_samples.mean())


def manifold_membership(
    reference: np.ndarray,
    samples: np.ndarray,
    k: int = PR_NEIGHBOURHOOD,
    batch_size: int = PR_BATCH_SIZE,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(S,) bool: which samples lie in the reference manifold (precision is the mean); (R,) bool: which
    reference points lie in the sample manifold (recall is the mean)."""
    if k < 1 or batch_size < 1:
        raise ValueError(f"k={k}, batch_size={batch_size}; expected positive integers")
    ref = validated_features(reference, "reference features", device)
    smp = validated_features(samples, "sample features", device)
    if ref.shape[1] != smp.shape[1]:
        raise ValueError(f"reference features have {ref.shape[1]} dims but samples {smp.shape[1]}; expected equal")
    in_reference = within_any_radius(smp, ref, manifold_radii(ref, k, batch_size), batch_size)
    in_samples = within_any_radius(ref, smp, manifold_radii(smp, k, batch_size), batch_size)
    return in_reference.cpu().numpy(), in_samples.cpu().numpy()


def validated_features(features: np.ndarray, what: str, device: str) -> torch.Tensor:
    """(N, D) finite features as a float64 tensor on ``device``."""
    tensor = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
    if tensor.ndim != 2:
        raise ValueError(f"{what} have shape {tuple(tensor.shape)}; expected (N, D)")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} hold NaN or inf; expected finite features")
    return tensor
