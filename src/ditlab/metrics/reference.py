"""FID reference statistics: the feature mean, covariance and a feature subset (for KID and
precision/recall) of real images, and for Inception the spatial statistics of sFID (``mu_s``,
``sigma_s``, ADM's names), stored in an .npz; computed by ``prepare`` for each prepared dataset
(``ditlab.pipelines.reference``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditlab.runtime.files import atomic_path


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None  # a subset, for KID and precision/recall
    extractor: str
    image_size: int | None = None  # the real images' resolution (None: unknown, e.g. ADM's files)
    mu_s: np.ndarray | None = None  # Inception's spatial features (sFID): mean (2023,) ...
    sigma_s: np.ndarray | None = None  # ... and covariance (2023, 2023); None: not stored
    # Held-out real images (the val split): (M, D) features and (M,) labels, from which the metric's
    # floor at any sample count is measured (ditlab.metrics.floor); None: not stored
    floor_features: np.ndarray | None = None
    floor_labels: np.ndarray | None = None

    @classmethod
    def from_features(
        cls,
        features: torch.Tensor,
        extractor: str,
        keep: int = 10000,
        seed: int = 0,
        image_size: int | None = None,
        spatial: torch.Tensor | None = None,
    ):
        """Statistics of (N, D) features (and of (N, D_s) spatial features when given)."""
        f = features.double().numpy()
        rng = np.random.default_rng(seed)
        subset = f[rng.choice(len(f), size=min(keep, len(f)), replace=False)] if keep else None
        stats = cls(f.mean(0), np.cov(f, rowvar=False), subset, extractor, image_size)
        if spatial is not None:
            s = spatial.numpy()
            stats.mu_s, stats.sigma_s = s.mean(0, dtype=np.float64), np.cov(s, rowvar=False, dtype=np.float64)
        return stats

    def save(self, path: str | Path) -> None:
        arrays = {"mu": self.mu, "sigma": self.sigma, "extractor": np.array(self.extractor)}
        if self.features is not None:
            arrays["features"] = self.features
        if self.image_size is not None:
            arrays["image_size"] = np.array(self.image_size)
        if self.mu_s is not None:
            arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
        if self.floor_features is not None:
            arrays.update(floor_features=self.floor_features, floor_labels=self.floor_labels)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path, extractor: str | None = None) -> ReferenceStats:
        """A ditlab stats file, or ADM's reference batch (``VIRTUAL_imagenet256_labeled.npz``: mu,
        sigma of TF-Inception pool features, which inception-v3-compat reproduces)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics {str(path)!r} do not exist")
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{str(path)!r} has no 'mu'/'sigma' arrays; expected ditlab or ADM reference stats")
            kind = str(data["extractor"]) if "extractor" in data else "inception"  # ADM files are Inception
            features = data["features"] if "features" in data else None
            size = int(data["image_size"]) if "image_size" in data else None
            stats = cls(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), features, kind, size)
            if "mu_s" in data and "sigma_s" in data:
                stats.mu_s, stats.sigma_s = data["mu_s"].astype(np.float64), data["sigma_s"].astype(np.float64)
            if "floor_features" in data and "floor_labels" in data:
                stats.floor_features, stats.floor_labels = data["floor_features"], data["floor_labels"]
        if extractor is not None and extractor != stats.extractor:
            raise ValueError(
                f"{str(path)!r} holds {stats.extractor} statistics; expected {extractor} (extractor={extractor})"
            )
        return stats
