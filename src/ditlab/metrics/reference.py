"""FID reference statistics: the feature mean, covariance and a feature subset (for KID and
precision/recall) of real images, stored in an .npz; computed by ``prepare`` for each prepared dataset."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger("ditlab.metrics")


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None  # a subset, for KID and precision/recall
    extractor: str
    image_size: int | None = None  # the real images' resolution (None: unknown, e.g. ADM's files)

    @classmethod
    def from_features(
        cls, features: torch.Tensor, extractor: str, keep: int = 10000, seed: int = 0, image_size: int | None = None
    ):
        f = features.double().numpy()
        rng = np.random.default_rng(seed)
        subset = f[rng.choice(len(f), size=min(keep, len(f)), replace=False)] if keep else None
        return cls(f.mean(0), np.cov(f, rowvar=False), subset, extractor, image_size)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
        arrays = {"mu": self.mu, "sigma": self.sigma, "extractor": np.array(self.extractor)}
        if self.features is not None:
            arrays["features"] = self.features
        if self.image_size is not None:
            arrays["image_size"] = np.array(self.image_size)
        np.savez(tmp, **arrays)
        tmp.replace(path)

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
        if extractor is not None and extractor != stats.extractor:
            raise ValueError(
                f"{str(path)!r} holds {stats.extractor} statistics; expected {extractor} (extractor={extractor})"
            )
        return stats


def compute_reference(ref_cfg, sources: dict, out_dir: Path, device) -> Path:
    """FID reference statistics of a split (and, for ``clf``, the classifier that defines them)."""
    from ditlab.data.sources import collate_skipping_failures
    from ditlab.data.transforms import model_range_to_uint8
    from ditlab.metrics.fidelity import Extractor
    from ditlab.training.fit_classifier import train_classifier

    kind = ref_cfg.extractor
    path = out_dir / f"reference_{kind}.npz"
    if path.is_file():
        log.info(f"{path.name}: already computed, skipped")
        return path
    weights = ref_cfg.weights_path
    if kind == "clf":
        weights = str(out_dir / "classifier")
        if not (Path(weights) / "classifier.json").is_file():
            num_classes = len(sources["train"].classes)
            train_classifier(
                sources["train"],
                sources.get("val", sources["train"]),
                num_classes,
                weights,
                seconds=ref_cfg.classifier_seconds,
                max_steps=ref_cfg.get("classifier_steps") or 1_000_000,
                width=ref_cfg.get("classifier_width") or 16,
                log=log.info,
                device=device,
            )
    extractor = Extractor(kind, weights, device=str(device))
    source = sources[ref_cfg.split]
    count = len(source) if ref_cfg.max_images is None else min(len(source), ref_cfg.max_images)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(source, range(count)), batch_size=500, collate_fn=collate_skipping_failures
    )
    features = []
    for images, _labels, _keys, _failed in tqdm(loader, desc=f"reference_{kind} ({ref_cfg.split})", unit="batch"):
        if images is not None:
            features.append(extractor(model_range_to_uint8(images).permute(0, 3, 1, 2))["features"])
    image_size = getattr(source, "image_size", None)
    ReferenceStats.from_features(torch.cat(features), kind, image_size=image_size).save(path)
    log.info(f"{path.name}: statistics of {count} {ref_cfg.split} images")
    return path
