"""How far a FID-type number can be trusted: a standard error and a confidence interval from the
samples themselves, against the fixed reference.

The features of the N samples are computed once; every estimate below resamples feature rows, never
images, so it adds seconds to a measurement, not a sampling run.

- fid, sfid, is (plug-in statistics of the whole set, biased at finite N): a bootstrap over the
  samples, ``resamples`` multinomial resamples of N rows (seeded by ``seed``). Each resample's FID is
  a Fréchet distance against the fixed reference statistics (``frechet_distances_to_reference``: one
  symmetric eigendecomposition a resample). ``se`` is the standard deviation of the resampled values.
  FID is biased upwards at finite N (E[FID_N] ~ FID + c / N: the floor of real images scored at small
  N), and a resample of N rows is biased against the sample set in the same way, so the reported
  interval is **bias-corrected**: centred on 2 FID_N - mean(FID*), +- z se. It is an interval for the
  Fréchet distance of the generator's distribution to the reference (N -> infinity), and it may lie
  below the raw FID_N when the bias is large against the noise (small N, many feature dimensions).
  An interval around FID_N itself would miss that value, by the bias, more often than its level says
  (``tests/unit/test_uncertainty.py`` measures both). Where N is not many times the feature dimension
  the resamples' spread overstates the draw-to-draw spread and the interval is conservative, and the
  bias correction only approximate (experiments/uncertainty/README.md).
- precision, sample_accuracy (means of per-sample indicators, unbiased): the same resamples of the
  indicators; interval value +- z se.
- recall, kid: these compare the samples with each other (k-NN radii within the sample set, the
  kernel between samples), which a resample's repeated rows would distort (a repeated point is its
  own nearest neighbour). Their se comes from half-samples instead: ``resamples`` random halves
  without repetition, se = the standard deviation of the halves' values (the delete-N/2 jackknife,
  whose factor (N - d) / d is 1). KID's half-values are the full-set unbiased MMD^2 with KID's kernel,
  so its se is the samples' part of KID's error, not that of torch-fidelity's draw of subsets. Above
  ``HALF_SAMPLE_CAP`` samples the halves are drawn from a random ``HALF_SAMPLE_CAP`` of them and the
  se scaled by sqrt(cap / N). Interval value +- z se (no bias correction). Below 4 samples (KID) or
  2 (k + 1) samples (recall) the halves are too small, and these two have no interval.
- fid_inf: Chong & Forsyth 2020 ("Effectively Unbiased FID and Inception Score and where to find
  them"): FID of nested random subsets of 15 sizes evenly spaced from N / 5 to N, a least-squares line
  against 1 / n, its value at 1 / n = 0. An estimate of the same N -> infinity value, noisier than
  FID_N but without its 1 / N bias; no interval of its own. (The paper's sizes run from N / 10; at N
  near the feature dimension the smallest subsets then leave the 1 / n regime.)

Names: beside ``fid_clf`` come ``fid_clf_se``, ``fid_clf_ci_low``, ``fid_clf_ci_high`` and ``fid_clf_inf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from ditlab.metrics.definitions import (
    IS_SPLIT_SIZE,
    PR_NEIGHBOURHOOD,
    Gaussian,
    inception_score_of_log_probs,
)
from ditlab.metrics.frechet import frechet_distances_to_reference
from ditlab.metrics.inception import InceptionFeatures
from ditlab.metrics.reference_side import ReferenceSide

DERIVED = ("se", "ci_low", "ci_high")  # the names beside a metric: fid_clf_se, fid_clf_ci_low, fid_clf_ci_high
EXTRAPOLATED = "inf"  # fid_inf, fid_clf_inf: Chong & Forsyth's N -> infinity FID
CHUNK_ELEMENTS = 1 << 25  # elements of the largest temporary a chunk of half-samples makes
NEIGHBOURS = 64  # recall halves: each point's nearest neighbours searched for its radius within a half
HALF_SAMPLE_CAP = 5000  # recall / KID half-samples: at most this many samples (memory: a cap x cap matrix)
FID_INF_SIZES = 15  # Chong & Forsyth: 15 subset sizes ...
FID_INF_SMALLEST = 0.2  # ... from N / 5 to N
# the range each metric lives in (interval ends are clipped to it)
BOUNDS = {"fid": (0.0, None), "sfid": (0.0, None), "kid": (0.0, None), "is": (1.0, None)}
BOUNDS |= {"precision": (0.0, 1.0), "recall": (0.0, 1.0), "sample_accuracy": (0.0, 1.0)}


@dataclass(frozen=True)
class Uncertainty:
    """How a measurement's uncertainty is estimated (``fid_protocol.uncertainty``).

    resamples: bootstrap resamples (and half-samples for recall / KID); 0: no intervals.
    seed: the resamples' seed (the same samples give the same interval).
    level: the confidence level of the intervals.
    fid_inf: also Chong & Forsyth's extrapolated FID (``fid_inf``, ``fid_clf_inf``, ``sfid_inf``).
    """

    resamples: int = 100
    seed: int = 0
    level: float = 0.95
    fid_inf: bool = True

    def __post_init__(self):
        if self.resamples < 0 or self.resamples == 1:
            raise ValueError(f"uncertainty.resamples={self.resamples}; expected 0 (off) or >= 2")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"uncertainty.level={self.level}; expected a confidence level in (0, 1)")

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(0.5 + self.level / 2)

    def describe(self) -> dict:
        return {"resamples": self.resamples, "seed": self.seed, "level": self.level, "fid_inf": self.fid_inf}


@dataclass(frozen=True)
class Interval:
    """A metric's standard error and confidence interval [low, high]."""

    se: float
    low: float
    high: float

    def named(self, name: str) -> dict[str, float]:
        return {f"{name}_se": self.se, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}


def derived_name(name: str) -> bool:
    """Whether a metric name is another's se or interval end (``fid_clf_se``) rather than a value."""
    return name.endswith(tuple(f"_{tag}" for tag in DERIVED))


def measurement_intervals(
    samples: InceptionFeatures,
    reference: ReferenceSide,
    values: dict[str, float],
    settings: Uncertainty,
    in_reference_manifold: np.ndarray | None = None,
    correct: np.ndarray | None = None,
    split_size: int = IS_SPLIT_SIZE,
    k: int = PR_NEIGHBOURHOOD,
    device="cpu",
) -> dict[str, Interval]:
    """The interval of each of ``values`` (suite names: fid, sfid, is, precision, recall, kid,
    sample_accuracy) measured on ``samples`` against ``reference``; ``in_reference_manifold`` (N,) and
    ``correct`` (N,) are the per-sample indicators behind precision and sample_accuracy."""
    z, count = settings.z, len(samples.pool)
    indices = bootstrap_indices(count, settings.resamples, settings.seed)  # (B, N)
    counts = counts_of(indices, count)  # (B, N)
    out = {}
    fid_type = (("fid", samples.pool, reference.pool), ("sfid", samples.spatial, reference.spatial))
    for name, features, gaussian in fid_type:
        if name in values:
            replicates = fid_bootstrap(features, gaussian, counts, device)
            out[name] = bias_corrected_interval(name, values[name], replicates, z)
    if "is" in values:
        replicates = inception_score_bootstrap(samples.logits, indices, split_size)
        out["is"] = bias_corrected_interval("is", values["is"], replicates, z)
    for name, indicators in (("precision", in_reference_manifold), ("sample_accuracy", correct)):
        if name in values and indicators is not None:
            se = float(mean_bootstrap(indicators, counts).std())
            out[name] = normal_interval(name, values[name], se, z)
    if {"recall", "kid"} & set(values) and count // 2 >= 2:
        rows, scale = capped(count, settings.seed)
        halves = rows[half_samples(len(rows), settings.resamples, settings.seed)]  # (B, m) sample indices
        if "recall" in values and halves.shape[1] > k:  # a half needs k + 1 points for its k-NN radii
            se = half_sample_se(recall_halves(samples.pool, reference.pool_features, halves, k, device)) * scale
            out["recall"] = normal_interval("recall", values["recall"], se, z)
        if "kid" in values:
            se = half_sample_se(kid_halves(samples.pool, reference.pool_features, halves, device)) * scale
            out["kid"] = normal_interval("kid", values["kid"], se, z)
    return out


# --- resamples -----------------------------------------------------------------------------------


def bootstrap_indices(count: int, resamples: int, seed: int) -> torch.Tensor:
    """(B, N) long: B resamples of N indices drawn with replacement."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, count, (resamples, count), generator=generator)


def counts_of(indices: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) indices -> (B, N) float64: how often each row is drawn in each resample."""
    counts = torch.zeros(len(indices), count, dtype=torch.float64)
    return counts.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.float64))


def half_samples(count: int, resamples: int, seed: int) -> torch.Tensor:
    """(B, N // 2) long: B random halves of range(N), each without repetition."""
    generator = torch.Generator().manual_seed(seed + 1)  # not the bootstrap's stream
    return torch.stack([torch.randperm(count, generator=generator)[: count // 2] for _ in range(resamples)])


# --- intervals -----------------------------------------------------------------------------------


def bias_corrected_interval(name: str, estimate: float, replicates: torch.Tensor, z: float) -> Interval:
    """The bootstrap's se, and the interval (2 estimate - mean of the replicates) +- z se."""
    se = float(replicates.std())
    return clipped(name, se, 2 * estimate - float(replicates.mean()), z)


def normal_interval(name: str, estimate: float, se: float, z: float) -> Interval:
    return clipped(name, se, estimate, z)


def clipped(name: str, se: float, centre: float, z: float) -> Interval:
    low, high = BOUNDS.get(base_metric(name), (None, None))
    lo, hi = centre - z * se, centre + z * se
    return Interval(se, lo if low is None else max(lo, low), hi if high is None else min(hi, high))


def base_metric(name: str) -> str:
    """fid_clf -> fid, sample_accuracy_clf -> sample_accuracy."""
    return next((b for b in sorted(BOUNDS, key=len, reverse=True) if name == b or name.startswith(b + "_")), name)


# --- the metrics' resampled values -----------------------------------------------------------------


def fid_bootstrap(features: np.ndarray, reference: Gaussian, counts: torch.Tensor, device="cpu") -> torch.Tensor:
    """(B,) FID of each resample (``counts`` (B, N)) of the (N, D) features against ``reference``."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
    distances = frechet_distances_to_reference(x, counts.to(device), reference.mu, reference.sigma, root=reference.root)
    return distances.cpu()


def inception_score_bootstrap(logits: np.ndarray, indices: torch.Tensor, split_size: int) -> torch.Tensor:
    """(B,) IS of each resample (``indices`` (B, N)) of the (N, K) logits, split as the resample is ordered."""
    log_p = torch.as_tensor(np.asarray(logits), dtype=torch.float64).log_softmax(dim=1)  # (N, K)
    chunks = indices.split(max(1, CHUNK_ELEMENTS // log_p.numel()))
    return torch.cat([inception_score_of_log_probs(log_p[chunk], split_size) for chunk in chunks])  # (b, N, K) in


def mean_bootstrap(indicators: np.ndarray, counts: torch.Tensor) -> torch.Tensor:
    """(B,) the mean of (N,) per-sample values in each resample."""
    values = torch.as_tensor(np.asarray(indicators), dtype=torch.float64)
    return counts @ values / counts.sum(1)


def half_sample_se(values: torch.Tensor) -> float:
    """The delete-N/2 jackknife's se from the (B,) values of B random halves: their standard deviation
    (the factor (N - d) / d is 1 for d = N / 2)."""
    return float(values.std(correction=0))


def capped(count: int, seed: int) -> tuple[torch.Tensor, float]:
    """The rows the half-samples use (all, or a random ``HALF_SAMPLE_CAP``) and the se's scale for N."""
    if count <= HALF_SAMPLE_CAP:
        return torch.arange(count), 1.0
    rows = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 2))[:HALF_SAMPLE_CAP]
    return rows, (HALF_SAMPLE_CAP / count) ** 0.5


def recall_halves(samples: np.ndarray, reference: np.ndarray, halves: torch.Tensor, k: int, device="cpu"):
    """(B,) recall of each half-sample (``halves`` (B, m) rows of ``samples``): the fraction of the (R, D)
    reference points within the k-NN radius (within the half, itself included: ADM's) of a sample.

    A point's radius within a half is the distance to the (k+1)-th point of its nearest-neighbour list
    (over all N, itself first) that the half holds: found among its ``NEIGHBOURS`` nearest (a half holds
    fewer than k + 1 of them with probability ~1e-14), else computed exactly."""
    # float32 distances: an se needs no more, and a 5000 x 10000 matrix then takes 200 MB
    smp = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)  # (N, D)
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float32, device=device)  # (R, D)
    within = torch.cdist(smp, smp).square()  # (N, N)
    across = torch.cdist(ref, smp).square()  # (R, N)
    near_dist, near = within.topk(min(NEIGHBOURS, len(smp)), dim=1, largest=False)  # (N, L) ascending
    halves = halves.to(device)
    count, size = len(smp), halves.shape[1]
    values = []
    for chunk in halves.split(max(1, CHUNK_ELEMENTS // (count * near.shape[1] + size * len(ref)))):  # (b, m)
        member = torch.zeros(len(chunk), count, dtype=torch.bool, device=device).scatter_(1, chunk, True)
        held = member[:, near].cumsum(dim=2)  # (b, N, L): how many of each point's nearest the half holds
        position = (held >= k + 1).byte().argmax(dim=2)  # (b, N): where the (k+1)-th of them is
        radii = near_dist.expand(len(chunk), -1, -1).gather(2, position[:, :, None])[:, :, 0]  # (b, N)
        radii = radii.gather(1, chunk)  # (b, m): the half's points' radii
        short = held[:, :, -1].gather(1, chunk) < k + 1  # (b, m): more than L neighbours needed
        if bool(short.any()):
            exact = within[chunk[:, :, None], chunk[:, None, :]].kthvalue(k + 1, dim=2).values
            radii = torch.where(short, exact, radii)
        inside = (across[:, chunk] <= radii[None]).any(dim=2)  # (R, b)
        values.append(inside.double().mean(dim=0))
    return torch.cat(values).cpu()


def kid_halves(samples: np.ndarray, reference: np.ndarray, halves: torch.Tensor, device="cpu") -> torch.Tensor:
    """(B,) unbiased MMD^2 of each half-sample against all (R, D) reference features, with KID's kernel
    k(x, y) = (x . y / D + 1)^3, without the reference-reference term (the same for every half)."""
    smp = torch.as_tensor(np.asarray(samples), dtype=torch.float64, device=device)  # (N, D)
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float64, device=device)  # (R, D)
    dim, size = smp.shape[1], halves.shape[1]
    within = (smp @ smp.T / dim + 1) ** 3  # (N, N)
    rows = max(1, CHUNK_ELEMENTS // len(ref))
    to_reference = torch.cat([((block @ ref.T / dim + 1) ** 3).mean(dim=1) for block in smp.split(rows)])  # (N,)
    member = torch.zeros(len(smp), len(halves), dtype=torch.float64, device=device)  # (N, B): 0/1
    member.scatter_(0, halves.T.to(device), 1.0)
    pairs = (member * (within @ member)).sum(dim=0) - within.diagonal() @ member  # (B,) sum over i != j
    return (pairs / (size * (size - 1)) - 2 * (to_reference @ member) / size).cpu()


def fid_inf(features: np.ndarray, reference: Gaussian, seed: int, device="cpu") -> float:
    """Chong & Forsyth's FID_infinity: FID of nested random subsets (15 sizes from N / 5 to N) fitted
    linearly against 1 / n, the fit's value at 1 / n = 0."""
    count = len(features)
    sizes = np.unique(np.linspace(max(2, round(FID_INF_SMALLEST * count)), count, FID_INF_SIZES).round().astype(int))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 3))
    weights = torch.zeros(len(sizes), count, dtype=torch.float64)
    for row, size in enumerate(sizes):
        weights[row, order[:size]] = 1.0  # nested: each subset holds the smaller ones
    fids = fid_bootstrap(features, reference, weights, device).numpy()
    slope, intercept = np.polyfit(1.0 / sizes, fids, deg=1)
    return float(intercept)
