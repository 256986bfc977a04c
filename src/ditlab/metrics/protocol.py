"""The FID protocol: how a number such as ``val/fid_clf`` is made, in one object.

    labels (uniform, seeded) -> generate (sampler, guidance, per-sample noise) -> uint8 images
    -> feature extractor -> metrics against the reference statistics

``FIDProtocol`` is built once from the ``fid_protocol`` config node and used by the FID callback
during training, by a run's FID curve (``ditlab.evaluate run_dir=``, from the run's stored config)
and, for its measuring half, by ``ditlab.evaluate samples=``. Changing a field changes every place
at once, and what a number was made with can be printed from it (``describe``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ditlab.data.prepared import PreparedDir
from ditlab.data.transforms import model_range_to_uint8
from ditlab.diffusion import Guidance, Sampler
from ditlab.inference import generate, sample_labels
from ditlab.metrics.fidelity import Extractor, compute_metrics
from ditlab.metrics.reference import ReferenceStats


@dataclass(frozen=True)
class FIDProtocol:
    """Args:
    extractor: ``clf`` (the dataset classifier, offline: metrics named ``fid_clf``), ``inception``,
        or None (no FID).
    num_samples: how many samples (uniform random classes).
    sampler: None: the objective's fast solver (``Sampler.fast``).
    guidance: classifier-free guidance of the samples.
    seed: labels and per-sample noise.
    reference: a statistics ``.npz``; None: the prepared dir's for the extractor.
    weights_path: the extractor's weights; None: the prepared dir's classifier (clf), torch-fidelity's
        download (inception).
    metrics: a subset of (fid, isc, kid, prc).
    batch_size: samples per generation batch (per rank).
    kid_subset_size: KID's subset size (at most the sample count).
    """

    extractor: str | None = "clf"
    num_samples: int = 1000
    sampler: Sampler | None = None
    guidance: Guidance = field(default_factory=Guidance)
    seed: int = 0
    reference: str | None = None
    weights_path: str | None = None
    metrics: Sequence[str] = ("fid",)
    batch_size: int = 250
    kid_subset_size: int = 1000

    def __post_init__(self):
        if self.num_samples < 2:  # a covariance needs two samples
            raise ValueError(f"fid_protocol.num_samples={self.num_samples}; expected >= 2")
        object.__setattr__(self, "metrics", tuple(self.metrics))

    # ------------------------------------------------------------ what it measures against
    def reference_path(self, prepared: PreparedDir) -> Path:
        return Path(self.reference) if self.reference else prepared.reference(self.extractor)

    def extractor_weights(self, prepared: PreparedDir) -> str | None:
        if self.weights_path is None and self.extractor == "clf":
            return str(prepared.classifier)
        return self.weights_path

    def load_reference(self, prepared: PreparedDir) -> ReferenceStats:
        return ReferenceStats.load(self.reference_path(prepared), self.extractor)

    def make_extractor(self, prepared: PreparedDir, device) -> Extractor:
        return Extractor(self.extractor, self.extractor_weights(prepared), device=str(device))

    # ------------------------------------------------------------ the two halves
    def sampler_for(self, objective) -> Sampler:
        sampler = self.sampler or Sampler.fast(objective)
        sampler.check(objective)
        return sampler

    def labels(self, num_classes: int) -> torch.Tensor:
        """The class of every sample 0..num_samples-1 (the same on every rank)."""
        return sample_labels(num_classes, self.num_samples, self.seed)

    def generate(self, net, objective, codec, num_classes: int, labels, indices, latent_shape, device) -> torch.Tensor:
        """uint8 (n, C, H, W) images of the samples ``indices`` (their ``labels``) of a model with
        ``num_classes`` classes (its null label)."""
        images = generate(
            net,
            objective,
            self.sampler_for(objective),
            labels,
            indices,
            latent_shape=latent_shape,
            null_label=num_classes,
            codec=codec,
            guidance=self.guidance,
            seed=self.seed,
            batch_size=self.batch_size,
            device=device,
        )
        return model_range_to_uint8(images).permute(0, 3, 1, 2)

    def measure(self, features: dict, reference: ReferenceStats, labels: torch.Tensor | None = None) -> dict:
        """Metrics of extracted ``features`` (``Extractor``'s output) against ``reference``; with the
        classifier's features and ``labels``, also the sample accuracy."""
        labels = labels if self.extractor == "clf" else None
        return compute_metrics(features, reference, self.metrics, self.kid_subset_size, labels=labels)

    def describe(self) -> dict:
        """The protocol as plain values (for logs and result files)."""
        out = asdict(self)
        out["sampler"] = None if self.sampler is None else self.sampler.describe()
        out["guidance"] = self.guidance.describe()
        out["metrics"] = list(self.metrics)
        return out
