"""What a reference offers ADM's suite (``ReferenceSide``), from an ADM reference batch or a ditlab
statistics file; each part it cannot give carries the reason, which a result reports beside the
metrics it skips.

The parts: ``pool`` (the pool statistics, for FID), ``spatial`` (the spatial statistics, for sFID) and
``pool_features`` (reference feature vectors, for precision/recall and KID). ADM's read_statistics
takes stored statistics where the file has them, else those of its images; precision/recall always
come from the images' pool features, so an ADM file without images cannot give them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditlab.metrics.adm_reference import ADMReference
from ditlab.metrics.definitions import Gaussian

REFERENCE_PARTS = ("pool", "spatial", "pool_features")


@dataclass
class ReferenceSide:
    """What a reference offers the suite; each part it lacks has its reason in ``missing``."""

    pool: Gaussian | None = None  # for FID
    spatial: Gaussian | None = None  # for sFID
    pool_features: np.ndarray | None = None  # (R, D), for precision/recall (and KID)
    missing: dict[str, str] = field(default_factory=dict)  # "pool" / "spatial" / "pool_features" -> why
    extractor: str = "inception"  # the feature space: metric names carry it unless it is Inception's
    image_size: int | None = None  # the real images' resolution (None: unknown)


def adm_reference_side(reference: ADMReference, extractor, needs=REFERENCE_PARTS) -> ReferenceSide:
    """ADM's read_statistics: stored statistics where the file has them, else those of its images;
    precision/recall always from the images' pool features. The images go through ``extractor``
    (an ``ADMInceptionExtractor``) only when a part in ``needs`` is not stored."""
    name = Path(reference.path).name
    size = None if reference.images is None else int(reference.images.shape[1])
    side = ReferenceSide(reference.pool, reference.spatial, None, image_size=size)
    if reference.images is None:
        side.missing["pool_features"] = f"{name} has no arr_0 reference images, which precision/recall need"
        if reference.pool is None:
            side.missing["pool"] = f"{name} has neither mu/sigma nor reference images"
        if reference.spatial is None:
            side.missing["spatial"] = f"{name} has neither mu_s/sigma_s nor reference images"
        return side
    if all(getattr(side, part) is not None for part in needs):
        for part in REFERENCE_PARTS:  # nothing asked for what the images would give
            if getattr(side, part) is None:
                side.missing[part] = f"not extracted from {name}'s images (no metric asked for it)"
        return side
    if extractor is None:
        raise ValueError(f"{name}: its reference images need an Inception extractor; expected one")
    features = extractor(torch.from_numpy(reference.images).permute(0, 3, 1, 2))  # NHWC -> NCHW
    side.pool = reference.pool if reference.pool is not None else Gaussian.of(features.pool)
    side.spatial = reference.spatial if reference.spatial is not None else Gaussian.of(features.spatial)
    side.pool_features = features.pool
    return side


def ditlab_reference_side(stats, name: str = "the reference statistics") -> ReferenceSide:
    """A ditlab ``ReferenceStats`` (mu, sigma, features, extractor, mu_s/sigma_s): pool statistics, the
    stored feature subset and, for Inception references written with them, the spatial statistics."""
    side = ReferenceSide(Gaussian(stats.mu, stats.sigma), None, stats.features, {}, stats.extractor, stats.image_size)
    if stats.extractor != "inception":
        side.missing["spatial"] = (
            f"sFID is defined on Inception's mixed_6/conv features; {name} holds {stats.extractor} features"
        )
    elif getattr(stats, "mu_s", None) is None:
        side.missing["spatial"] = (
            f"{name} holds no mu_s/sigma_s (written before prepare stored them: delete it and rerun "
            "ditlab.prepare, or use an ADM reference batch)"
        )
    else:
        side.spatial = Gaussian(stats.mu_s, stats.sigma_s)
    if stats.features is None:
        side.missing["pool_features"] = f"{name} keeps no feature subset, which precision/recall and KID need"
    return side
