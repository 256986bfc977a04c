"""The FID reference statistics of a prepared dataset: the feature mean, covariance and a feature
subset of real images (``ditlab.metrics.reference.ReferenceStats``), and for Inception also the
statistics of ADM's spatial features (``mu_s``, ``sigma_s``), so that sFID is measured against our own
data as against ADM's reference batches. For the offline extractor (``clf``) the dataset classifier
that defines the feature space is trained first."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ditlab.data.prepared import PreparedDir
from ditlab.data.sources import collate_skipping_failures
from ditlab.data.transforms import model_range_to_uint8
from ditlab.metrics.fidelity import Extractor
from ditlab.metrics.reference import ReferenceStats
from ditlab.pipelines.fit_classifier import train_classifier

log = logging.getLogger("ditlab.prepare")


@dataclass
class ReferenceSettings:
    """``data.reference``: which statistics prepare computes.

    extractor: inception (torch-fidelity's Inception), clf (a classifier trained here, offline) or None.
    weights_path: inception only: a local weights file where there is no network.
    split / max_images: the real images (None: the whole split).
    classifier_steps / classifier_seconds / classifier_width: clf only: its training length in steps
        (cosine lr to 0), a guard in seconds (None: none; reached first: an error, not a shorter fit),
        its first stage's width.
    floor_split / floor_images: the held-out real images whose features are stored beside the
        statistics (0: none), from which the metric's floor at any sample count is measured.
    """

    extractor: str | None = "inception"
    weights_path: str | None = None
    split: str = "train"
    max_images: int | None = 50000
    classifier_steps: int = 1200
    classifier_seconds: float | None = None
    classifier_width: int = 16
    floor_split: str = "val"
    floor_images: int = 10000

    def extractor_weights(self, prepared: PreparedDir) -> str | None:
        """Where the extractor's weights are: the prepared dir's classifier for clf."""
        return str(prepared.classifier) if self.extractor == "clf" else self.weights_path


def write_reference(settings: ReferenceSettings, sources: dict, prepared: PreparedDir, device) -> Path:
    """Compute and save ``prepared.reference(extractor)`` (skipped when it exists); returns its path.
    A remote prepared dir receives what is written here at once: a dir prepared before its statistics
    were configured gets them without a new meta.json."""
    kind = settings.extractor
    path = prepared.reference(kind)
    if path.is_file():
        log.info(f"{path.name}: already computed, skipped")
        return path
    if kind == "clf" and not (prepared.classifier / "classifier.json").is_file():
        train_classifier(
            sources["train"],
            sources.get("val", sources["train"]),
            len(sources["train"].classes),
            prepared.classifier,
            max_steps=settings.classifier_steps,
            seconds=settings.classifier_seconds,
            width=settings.classifier_width,
            log=log.info,
            device=device,
        )
        prepared.upload(PreparedDir.CLASSIFIER)
    extractor = Extractor(kind, settings.extractor_weights(prepared), device=str(device))
    source = sources[settings.split]
    features, spatial, _ = extract_features(extractor, source, settings.max_images, f"{path.stem} ({settings.split})")
    image_size = getattr(source, "image_size", None)
    stats = ReferenceStats.from_features(features, kind, image_size=image_size, spatial=spatial)
    held_out = sources.get(settings.floor_split) if settings.floor_images else None
    if held_out is not None and held_out is not source:
        desc = f"floor ({settings.floor_split})"
        floor, _, labels = extract_features(extractor, held_out, settings.floor_images, desc)
        stats.floor_features, stats.floor_labels = floor.numpy(), labels.numpy()
    stats.save(path)
    prepared.upload(path.name)
    floor_text = "" if stats.floor_features is None else f", features of {len(stats.floor_features)} held-out images"
    log.info(f"{path.name}: statistics of {len(features)} {settings.split} images{floor_text}")
    return path


def extract_features(extractor: Extractor, source, max_images: int | None, desc: str):
    """(n, D) features, (n, D_s) spatial features or None, and (n,) labels of the first ``max_images``
    images of ``source`` (None: all; unreadable images are skipped)."""
    count = len(source) if max_images is None else min(len(source), max_images)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(source, range(count)), batch_size=500, collate_fn=collate_skipping_failures
    )
    features, spatial, labels = [], [], []  # (n, D) each batch; Inception: (n, 2023) spatial features too
    for images, batch_labels, _keys, _failed in tqdm(loader, desc=desc, unit="batch"):
        if images is not None:
            out = extractor(model_range_to_uint8(images).permute(0, 3, 1, 2))
            features.append(out["features"])
            labels.append(batch_labels)
            if "spatial" in out:
                spatial.append(out["spatial"])
    return torch.cat(features), torch.cat(spatial) if spatial else None, torch.cat(labels)
