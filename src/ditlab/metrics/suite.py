"""ADM's evaluator suite (FID, sFID, IS, precision, recall) of sample features against a reference.

Papers report the numbers of openai/guided-diffusion's ``evaluations/evaluator.py``: 50K samples
against a reference batch such as ``VIRTUAL_imagenet256_labeled.npz``. ``suite_from_features`` computes
the same quantities from features (``ditlab.metrics.inception``: pool_3, ADM's spatial features, the
unbiased logits; or another extractor's features as ``pool``), by ADM's definitions
(``ditlab.metrics.definitions``), against what a reference offers (``ditlab.metrics.reference_side``).
A metric the reference cannot give is skipped with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ditlab.metrics.definitions import (
    IS_SPLIT_SIZE,
    PR_BATCH_SIZE,
    PR_NEIGHBOURHOOD,
    Gaussian,
    inception_score,
    manifold_membership,
)
from ditlab.metrics.inception import InceptionFeatures
from ditlab.metrics.reference_side import ReferenceSide

METRIC_NAMES = ("fid", "sfid", "is", "precision", "recall")
# the part of a reference each metric compares with (IS needs none)
METRIC_PARTS = {"fid": "pool", "sfid": "spatial", "precision": "pool_features", "recall": "pool_features"}


@dataclass
class SuiteResult:
    """Each metric asked for is either in ``metrics`` or in ``skipped`` with the reason.
    ``in_reference_manifold``: (S,) bool, which samples lie in the reference manifold (precision is
    its mean; the uncertainty resamples it), when precision was measured."""

    metrics: dict[str, float]
    skipped: dict[str, str]
    in_reference_manifold: np.ndarray | None = None


def suite_from_features(
    samples: InceptionFeatures,
    reference: ReferenceSide,
    metrics=METRIC_NAMES,
    split_size: int = IS_SPLIT_SIZE,
    k: int = PR_NEIGHBOURHOOD,
    batch_size: int = PR_BATCH_SIZE,
    device: str = "cpu",
) -> SuiteResult:
    """The ``metrics`` (of METRIC_NAMES) of sample features against what the reference offers; a metric
    the reference cannot give is in ``skipped`` with the reason, one that was not asked for in neither."""
    unknown = set(metrics) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"unknown suite metrics {sorted(unknown)}; expected a subset of {METRIC_NAMES}")
    out: dict[str, float] = {}
    skipped = unavailable(metrics, reference)
    if "sfid" in metrics and "sfid" not in skipped and samples.spatial is None:
        skipped["sfid"] = "the extractor gives no spatial features (sFID is Inception's mixed_6/conv)"
    if "fid" in metrics and "fid" not in skipped:
        out["fid"] = Gaussian.of(samples.pool).distance(reference.pool)
    if "sfid" in metrics and "sfid" not in skipped:
        out["sfid"] = Gaussian.of(samples.spatial).distance(reference.spatial)
    if "is" in metrics:
        out["is"] = inception_score(samples.logits, split_size)
    in_reference = None
    if {"precision", "recall"} & set(metrics) and reference.pool_features is not None:
        in_reference, in_samples = manifold_membership(reference.pool_features, samples.pool, k, batch_size, device)
        pr = {"precision": float(in_reference.mean()), "recall": float(in_samples.mean())}
        out.update({name: value for name, value in pr.items() if name in metrics})
    return SuiteResult({name: out[name] for name in METRIC_NAMES if name in out}, skipped, in_reference)


def unavailable(metrics, reference: ReferenceSide) -> dict[str, str]:
    """The ``metrics`` (of METRIC_NAMES) that ``reference`` cannot give, each with its reason."""
    return {
        name: reference.missing[METRIC_PARTS[name]]
        for name in metrics
        if name in METRIC_PARTS and getattr(reference, METRIC_PARTS[name]) is None
    }
