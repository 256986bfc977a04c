"""FID, sFID, IS, KID and precision/recall of extracted features against a reference.

Images are uint8 (N, C, H, W). Features come from ``Extractor``: ``inception`` (torch-fidelity's
``inception-v3-compat``, the TF-ported network of ADM's evaluator, through ``ADMInceptionExtractor``:
pool_3, the unbiased logits and ADM's spatial features; weights downloaded by torch-fidelity, or
read from ``weights_path`` offline) or ``clf`` (the dataset's own classifier, see
classifier_features.py). One definition of each metric, ADM's (``ditlab.metrics.suite``), whatever
the feature space: FID and sFID through the robust Fréchet distance (``ditlab.metrics.frechet``),
IS over splits of 5000 samples, precision/recall with k = 3. KID, which ADM does not report, is
torch-fidelity's. Metric names carry the feature space unless it is Inception's: ``fid`` vs ``fid_clf``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.utils import create_feature_extractor
from tqdm.auto import tqdm

import ditlab.metrics.classifier_features  # noqa: F401 - registers the ditlab-clf extractor
from ditlab.metrics.inception import ADMInceptionExtractor, InceptionFeatures
from ditlab.metrics.reference import ReferenceStats
from ditlab.metrics.reference_side import ReferenceSide, ditlab_reference_side
from ditlab.metrics.suite import suite_from_features
from ditlab.metrics.uncertainty import EXTRAPOLATED, Uncertainty, fid_inf, measurement_intervals

EXTRACTORS = {"inception": "inception-v3-compat", "clf": "ditlab-clf"}
METRICS = ("fid", "sfid", "isc", "kid", "prc")
# what each metric of the config writes (before the extractor's suffix)
METRIC_OUTPUTS = {"fid": ("fid",), "sfid": ("sfid",), "isc": ("is",), "kid": ("kid",), "prc": ("precision", "recall")}
# the part of a reference (``ReferenceSide``) each metric compares with (IS needs none)
METRIC_PARTS = {"fid": "pool", "sfid": "spatial", "kid": "pool_features", "prc": "pool_features"}
KID_SUBSETS = 100


def metric_suffix(extractor: str) -> str:
    """Metric names carry the feature space unless it is Inception: fid vs fid_clf."""
    return "" if extractor == "inception" else f"_{extractor}"


def check_metrics(metrics) -> None:
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; expected a subset of {METRICS}")


def reference_parts(metrics) -> tuple[str, ...]:
    """The parts of a reference (``ReferenceSide``) that ``metrics`` compare with."""
    return tuple(sorted({METRIC_PARTS[m] for m in metrics if m in METRIC_PARTS}))


@dataclass
class Extractor:
    """Features of uint8 images in the feature space ``kind``, as the metrics read them."""

    kind: str = "inception"
    weights_path: str | None = None
    device: str = "cpu"
    batch_size: int = 256
    progress: bool = False  # a progress bar over the batches (ditlab.evaluate)

    def __post_init__(self):
        if self.kind not in EXTRACTORS:
            raise ValueError(f"unknown feature extractor {self.kind!r}; expected one of {tuple(EXTRACTORS)}")
        if self.kind == "inception":
            self.inception = ADMInceptionExtractor(self.weights_path, self.device, self.batch_size, self.progress)
            return
        kwargs = {"feature_extractor_weights_path": self.weights_path, "verbose": False}
        self.model = create_feature_extractor(
            EXTRACTORS[self.kind], ["features", "logits_unbiased"], cuda=False, **kwargs
        ).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (N, C, H, W) -> {'features': (N, D), 'logits': (N, K)} on the CPU in float64, and for
        Inception 'spatial': (N, 2023) float32 (ADM's mixed_6/conv[..., :7], NHWC-flattened)."""
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype}")
        if self.kind == "inception":
            self.inception.progress = self.progress
            out = self.inception(images)
            return {
                "features": torch.from_numpy(out.pool).double(),
                "logits": torch.from_numpy(out.logits).double(),
                "spatial": torch.from_numpy(out.spatial),
            }
        feats, logits = [], []
        chunks = images.split(self.batch_size)
        for chunk in tqdm(chunks, desc=f"{self.kind} features", unit="batch", disable=not self.progress):
            f, lg = self.model(chunk.to(self.device))
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        return {"features": torch.cat(feats), "logits": torch.cat(logits)}


def as_reference_side(reference: ReferenceSide | ReferenceStats) -> ReferenceSide:
    return ditlab_reference_side(reference) if isinstance(reference, ReferenceStats) else reference


def unavailable_metrics(metrics, reference: ReferenceSide | ReferenceStats) -> dict[str, str]:
    """The metric names (with the extractor's suffix) that ``metrics`` ask for but ``reference``
    cannot give, each with the reason: what a result reports as skipped, never left out silently."""
    check_metrics(metrics)
    reference = as_reference_side(reference)
    suffix = metric_suffix(reference.extractor)
    return {
        f"{name}{suffix}": reference.missing[METRIC_PARTS[metric]]
        for metric in metrics
        if metric in METRIC_PARTS and getattr(reference, METRIC_PARTS[metric]) is None
        for name in METRIC_OUTPUTS[metric]
    }


def compute_metrics(
    generated: dict[str, torch.Tensor],
    reference: ReferenceSide | ReferenceStats,
    metrics=METRICS,
    kid_subset_size: int = 1000,
    labels: torch.Tensor | None = None,
    uncertainty: Uncertainty | None = None,
    variant: str = "",
    device: str = "cpu",
) -> dict[str, float]:
    """The ``metrics`` the reference can give (``unavailable_metrics`` names the others) of extracted
    features (``Extractor``'s output); with ``labels``, also the sample accuracy of the logits. Names
    carry the extractor's suffix, then ``variant`` (``fid_clf_unguided``); with ``uncertainty`` each
    value is followed by its se and interval (``fid_clf_se``, ``fid_clf_ci_low``, ``fid_clf_ci_high``)
    and each FID by its extrapolation (``fid_clf_inf``): ``ditlab.metrics.uncertainty``."""
    check_metrics(metrics)
    reference = as_reference_side(reference)
    spatial = generated.get("spatial")
    samples = InceptionFeatures(
        generated["features"].numpy(), None if spatial is None else spatial.numpy(), generated["logits"].numpy()
    )
    asked = [name for metric in metrics if metric != "kid" for name in METRIC_OUTPUTS[metric]]
    suite = suite_from_features(samples, reference, asked)
    out = dict(suite.metrics)
    if "kid" in metrics and reference.pool_features is not None:
        out["kid"] = kernel_inception_distance(generated["features"], reference.pool_features, kid_subset_size)
    correct = None
    if labels is not None:
        # Does a sample conditioned on class k look like class k (to the dataset's classifier)?
        correct = (generated["logits"].argmax(1) == labels.cpu()).numpy()
        out["sample_accuracy"] = float(correct.mean())
    intervals, extrapolated = {}, {}
    if uncertainty is not None and uncertainty.resamples:
        intervals = measurement_intervals(
            samples, reference, out, uncertainty, suite.in_reference_manifold, correct, device=device
        )
    if uncertainty is not None and uncertainty.fid_inf:
        fid_type = {"fid": (samples.pool, reference.pool), "sfid": (samples.spatial, reference.spatial)}
        extrapolated = {name: fid_inf(*fid_type[name], uncertainty.seed, device) for name in fid_type if name in out}
    suffix = metric_suffix(reference.extractor) + variant
    results = {}
    for name, value in out.items():
        results[f"{name}{suffix}"] = value
        if name in intervals:
            results.update(intervals[name].named(f"{name}{suffix}"))
        if name in extrapolated:
            results[f"{name}{suffix}_{EXTRAPOLATED}"] = extrapolated[name]
    return results


def kernel_inception_distance(features: torch.Tensor, reference: np.ndarray, subset_size: int) -> float:
    """torch-fidelity's KID (polynomial kernel of degree 3, 100 subsets, seed 2020) of (N, D) features
    against (R, D) reference features; the subset size is at most the smaller count."""
    ref = torch.from_numpy(np.asarray(reference)).double()
    size = min(subset_size, len(features), len(ref))
    kid = kid_features_to_metric(
        features.double(),
        ref,
        kid_subsets=KID_SUBSETS,
        kid_subset_size=size,
        kid_degree=3,
        kid_gamma=None,
        kid_coef0=1,
        rng_seed=2020,
        verbose=False,
    )
    return kid["kernel_inception_distance_mean"]
