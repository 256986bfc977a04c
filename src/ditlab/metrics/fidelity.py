"""FID, IS, KID and precision/recall on top of torch-fidelity.

Images are uint8 (N, C, H, W). Features come from a torch-fidelity extractor:
``inception-v3-compat`` (the standard; weights downloaded by torch-fidelity, or read from
``weights_path`` offline) or ``ditlab-clf`` (the dataset's own classifier, see classifier.py).
Reference statistics (``ditlab.metrics.reference``) are the other side of every comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor
from tqdm.auto import tqdm

import ditlab.metrics.classifier_features  # noqa: F401 - registers the ditlab-clf extractor
from ditlab.metrics.reference import ReferenceStats

EXTRACTORS = {"inception": "inception-v3-compat", "clf": "ditlab-clf"}
METRICS = ("fid", "isc", "kid", "prc")


def metric_suffix(extractor: str) -> str:
    """Metric names carry the feature space unless it is Inception: fid vs fid_clf."""
    return "" if extractor == "inception" else f"_{extractor}"


@dataclass
class Extractor:
    """A torch-fidelity feature extractor with the channel handling our datasets need."""

    kind: str = "inception"
    weights_path: str | None = None
    device: str = "cpu"
    batch_size: int = 256
    progress: bool = False  # a progress bar over the batches (ditlab.evaluate)

    def __post_init__(self):
        if self.kind not in EXTRACTORS:
            raise ValueError(f"unknown feature extractor {self.kind!r}; expected one of {tuple(EXTRACTORS)}")
        name = EXTRACTORS[self.kind]
        features = ["2048", "logits_unbiased"] if self.kind == "inception" else ["features", "logits_unbiased"]
        self.feature_layer = features[0]
        kwargs = {"feature_extractor_weights_path": self.weights_path, "verbose": False}
        try:
            self.model = create_feature_extractor(name, features, cuda=False, **kwargs).to(self.device)
        except OSError as err:  # urllib's errors are OSErrors: no network for the download
            raise RuntimeError(
                f"cannot get the {name} weights ({type(err).__name__}); without network set weights_path to a "
                "local weights file, or use the offline extractor (extractor=clf / data.reference.extractor=clf)"
            ) from err

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (N, C, H, W) -> {'features': (N, D), 'logits': (N, K)} on the CPU in float64."""
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype}")
        if self.kind == "inception" and images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # Inception takes RGB
        feats, logits = [], []
        chunks = images.split(self.batch_size)
        for chunk in tqdm(chunks, desc=f"{self.kind} features", unit="batch", disable=not self.progress):
            f, lg = self.model(chunk.to(self.device))
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        return {"features": torch.cat(feats), "logits": torch.cat(logits)}


def compute_metrics(
    generated: dict[str, torch.Tensor],
    reference: ReferenceStats,
    metrics=METRICS,
    kid_subset_size: int = 1000,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics of generated features against a reference; names carry the extractor (fid_clf)."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; expected a subset of {METRICS}")
    suffix = metric_suffix(reference.extractor)
    feats = generated["features"]
    out: dict[str, float] = {}
    if "fid" in metrics:
        f = feats.numpy()
        stats = {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}
        ref = {"mu": reference.mu, "sigma": reference.sigma}
        out[f"fid{suffix}"] = fid_statistics_to_metric(stats, ref, verbose=False)["frechet_inception_distance"]
    if "isc" in metrics:
        isc = isc_features_to_metric(generated["logits"].float(), splits=10, shuffle=True, rng_seed=2020)
        out[f"is{suffix}"] = isc["inception_score_mean"]
    ref_feats = None if reference.features is None else torch.from_numpy(reference.features).double()
    if "kid" in metrics and ref_feats is not None:
        size = min(kid_subset_size, len(feats), len(ref_feats))
        kid = kid_features_to_metric(
            feats,
            ref_feats,
            kid_subsets=100,
            kid_subset_size=size,
            kid_degree=3,
            kid_gamma=None,
            kid_coef0=1,
            rng_seed=2020,
            verbose=False,
        )
        out[f"kid{suffix}"] = kid["kernel_inception_distance_mean"]
    if "prc" in metrics and ref_feats is not None:
        prc = prc_features_to_metric(
            feats.float(),
            ref_feats.float(),
            prc_neighborhood=3,
            prc_batch_size=10000,
            save_cpu_ram=False,
            verbose=False,
        )
        out[f"precision{suffix}"] = prc["precision"]
        out[f"recall{suffix}"] = prc["recall"]
    if labels is not None:
        # Does a sample conditioned on class k look like class k (to the dataset's classifier)?
        out[f"sample_accuracy{suffix}"] = (generated["logits"].argmax(1) == labels.cpu()).double().mean().item()
    return out
