"""The FID protocol: how a number such as ``val/fid_clf`` is made, in one object.

    labels (uniform, seeded) -> generate (sampler, guidance, per-sample noise) -> uint8 images
    -> feature extractor -> metrics against the reference

``FIDProtocol`` is built once from the ``fid_protocol`` config node and used by the FID callback
during training, by a run's FID curve (``ditlab.evaluate run_dir=``, from the run's stored config)
and, for its measuring half, by ``ditlab.evaluate samples=``. Changing a field changes every place
at once, and what a number was made with is printed from it (``describe``: with a prepared dir also
the reference's and the extractor weights' sha256 and the library versions).

The reference is a ditlab statistics file (``reference_<extractor>.npz`` of a prepared dir) or an ADM
reference batch (``VIRTUAL_imagenet256_labeled.npz``: statistics and reference images); either is read
into what the metrics compare with (``ditlab.metrics.reference_side.ReferenceSide``), each part it cannot give
with its reason (``unavailable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from ditlab.data.prepared import PreparedDir
from ditlab.data.transforms import model_range_to_uint8
from ditlab.diffusion import Guidance, Sampler
from ditlab.inference import CLASS_DRAWS, generate, sample_labels
from ditlab.metrics.adm_reference import is_adm_reference, load_adm_reference
from ditlab.metrics.fidelity import (
    EXTRACTORS,
    Extractor,
    check_metrics,
    compute_metrics,
    metric_suffix,
    reference_parts,
    unavailable_metrics,
)
from ditlab.metrics.floor import fid_floor
from ditlab.metrics.provenance import guidance_values, library_versions, sampler_values, sha256_of
from ditlab.metrics.reference import ReferenceStats
from ditlab.metrics.reference_side import ReferenceSide, adm_reference_side, ditlab_reference_side
from ditlab.metrics.uncertainty import Uncertainty

UNGUIDED_SUFFIX = "_unguided"  # val/fid_clf_unguided beside val/fid_clf


def downloaded_inception_weights() -> Path:
    """Where torch-fidelity keeps the Inception weights it downloads (torch hub's cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name


@dataclass(frozen=True)
class FIDProtocol:
    """Args:
    extractor: ``clf`` (the dataset classifier, offline: metrics named ``fid_clf``), ``inception``,
        or None (no FID).
    num_samples: how many samples.
    class_draw: how their classes are drawn: ``uniform`` (at random, ADM's and DiT's protocol) or
        ``balanced`` (every class equally often: less spread between draws).
    sampler: None: the objective's fast solver (``Sampler.fast``).
    guidance: classifier-free guidance of the samples.
    seed: labels and per-sample noise.
    reference: a ditlab statistics ``.npz`` or an ADM reference batch; None: the prepared dir's for
        the extractor.
    weights_path: the extractor's weights; None: the prepared dir's classifier (clf), torch-fidelity's
        download (inception).
    metrics: a subset of (fid, sfid, isc, kid, prc).
    batch_size: samples per generation batch (per rank).
    kid_subset_size: KID's subset size (at most the sample count).
    also_unguided: also measure the samples without guidance (metrics named ``*_unguided``); no
        effect when the guidance scale is 1.
    uncertainty: the se and confidence interval beside each number, and the extrapolated FID
        (``ditlab.metrics.uncertainty.Uncertainty``: resamples, seed, level, fid_inf).
    """

    extractor: str | None = "clf"
    num_samples: int = 1000
    class_draw: str = "uniform"
    sampler: Sampler | None = None
    guidance: Guidance = field(default_factory=Guidance)
    seed: int = 0
    reference: str | None = None
    weights_path: str | None = None
    metrics: Sequence[str] = ("fid",)
    batch_size: int = 250
    kid_subset_size: int = 1000
    also_unguided: bool = False
    uncertainty: Uncertainty = field(default_factory=Uncertainty)

    def __post_init__(self):
        if self.num_samples < 2:  # a covariance needs two samples
            raise ValueError(f"fid_protocol.num_samples={self.num_samples}; expected >= 2")
        if self.extractor is not None and self.extractor not in EXTRACTORS:
            raise ValueError(f"fid_protocol.extractor={self.extractor!r}; expected one of {tuple(EXTRACTORS)} or null")
        if self.class_draw not in CLASS_DRAWS:
            raise ValueError(f"fid_protocol.class_draw={self.class_draw!r}; expected one of {CLASS_DRAWS}")
        check_metrics(self.metrics)
        object.__setattr__(self, "metrics", tuple(self.metrics))

    # ------------------------------------------------------------ what it measures against
    def reference_path(self, prepared: PreparedDir) -> Path:
        return Path(self.reference) if self.reference else prepared.reference(self.extractor)

    def extractor_weights(self, prepared: PreparedDir) -> str | None:
        if self.weights_path is None and self.extractor == "clf":
            return str(prepared.classifier)
        return self.weights_path

    def weights_in_use(self, prepared: PreparedDir) -> str | None:
        """The weights file the extractor reads: ``extractor_weights``, or for Inception without one
        torch-fidelity's downloaded copy in the torch hub cache (None before its download)."""
        weights = self.extractor_weights(prepared)
        if weights is None and self.extractor == "inception":
            cached = downloaded_inception_weights()
            return str(cached) if cached.is_file() else None
        return weights

    def check_reference(self, prepared: PreparedDir) -> Path:
        """The reference's path, checked to exist and to hold this extractor's features (cheap: at the
        start of a run, not at its first FID)."""
        path = self.reference_path(prepared)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics {str(path)!r} do not exist")
        if not is_adm_reference(path):
            ReferenceStats.load(path, self.extractor)
        elif self.extractor != "inception":
            raise ValueError(
                f"{str(path)!r} is an ADM reference batch (Inception features); expected extractor=inception, "
                f"not {self.extractor}"
            )
        return path

    def load_reference(self, prepared: PreparedDir, extractor: Extractor | None = None) -> ReferenceSide:
        """What the metrics compare with: a ditlab statistics file or an ADM reference batch, whose
        images go through ``extractor`` when the metrics need more than its stored statistics."""
        path = self.check_reference(prepared)
        if not is_adm_reference(path):
            return ditlab_reference_side(ReferenceStats.load(path, self.extractor), path.name)
        inception = None if extractor is None else extractor.inception
        return adm_reference_side(load_adm_reference(path), inception, reference_parts(self.metrics))

    def make_extractor(self, prepared: PreparedDir, device, progress: bool = False) -> Extractor:
        return Extractor(self.extractor, self.extractor_weights(prepared), device=str(device), progress=progress)

    # ------------------------------------------------------------ the two halves
    def sampler_for(self, objective) -> Sampler:
        sampler = self.sampler or Sampler.fast(objective)
        sampler.check(objective)
        return sampler

    def labels(self, num_classes: int) -> torch.Tensor:
        """The class of every sample 0..num_samples-1 (the same on every rank)."""
        return sample_labels(num_classes, self.num_samples, self.seed, self.class_draw)

    def generate(
        self, net, objective, codec, num_classes: int, labels, indices, latent_shape, device, on_batch=None
    ) -> torch.Tensor:
        """uint8 (n, C, H, W) images of the samples ``indices`` (their ``labels``) of a model with
        ``num_classes`` classes (its null label); ``on_batch(done, total)`` after each batch."""
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
            on_batch=on_batch,
        )
        return model_range_to_uint8(images).permute(0, 3, 1, 2)

    def measure(
        self, features: dict, reference: ReferenceSide, labels: torch.Tensor | None = None, variant="", device="cpu"
    ) -> dict:
        """Metrics of extracted ``features`` (``Extractor``'s output) against ``reference``, each with its
        se and interval; with the classifier's features and ``labels``, also the sample accuracy. Names
        end in ``variant`` (``variants``' suffix) before the se / interval tags: ``fid_clf_unguided_se``."""
        labels = labels if self.extractor == "clf" else None
        return compute_metrics(
            features, reference, self.metrics, self.kid_subset_size, labels, self.uncertainty, variant, str(device)
        )

    def floor(self, prepared: PreparedDir) -> dict[str, float]:
        """The FID of held-out real images at this protocol's sample count and class draw
        (``ditlab.metrics.floor``): ``{"fid_clf_floor": mean, "fid_clf_floor_sd": sd}`` over draws;
        empty for a reference without held-out features (an ADM batch, or statistics prepared before
        ditlab stored them)."""
        path = self.reference_path(prepared)
        if "fid" not in self.metrics or is_adm_reference(path):
            return {}
        floor = fid_floor(ReferenceStats.load(path, self.extractor), self.num_samples, self.class_draw, seed=self.seed)
        if not floor:
            return {}
        name = "fid" + metric_suffix(self.extractor)
        return {f"{name}_floor": floor["mean"], f"{name}_floor_sd": floor["sd"]}

    def unavailable(self, reference: ReferenceSide) -> dict[str, str]:
        """The metric names this protocol asks for that ``reference`` cannot give, with the reasons."""
        return unavailable_metrics(self.metrics, reference)

    def variants(self) -> list[tuple[str, FIDProtocol]]:
        """(metric name suffix, protocol) of each measurement: this one, and the unguided one when
        ``also_unguided`` (and the guidance does something)."""
        if not self.also_unguided or self.guidance.scale == 1.0:
            return [("", self)]
        return [("", self), (UNGUIDED_SUFFIX, replace(self, guidance=Guidance(), also_unguided=False))]

    def describe(self, prepared: PreparedDir | None = None, objective=None) -> dict:
        """The protocol as plain values (logs, result files, the model card). With ``objective`` a None
        sampler is resolved to the objective's fast solver; with ``prepared`` the reference and the
        extractor's weights are resolved and hashed (sha256) and the library versions added."""
        sampler = self.sampler_for(objective) if objective is not None else self.sampler
        out = {
            "extractor": self.extractor,
            "extractor_model": EXTRACTORS.get(self.extractor),
            "num_samples": self.num_samples,
            "class_draw": self.class_draw,
            "seed": self.seed,
            "sampler": None if sampler is None else sampler_values(sampler),
            "sampler_text": "the objective's fast solver" if sampler is None else sampler.describe(),
            "guidance": guidance_values(self.guidance),
            "guidance_text": self.guidance.describe(),
            "batch_size": self.batch_size,
            "reference": self.reference,
            "weights_path": self.weights_path,
            "metrics": list(self.metrics),
            "kid_subset_size": self.kid_subset_size,
            "also_unguided": self.also_unguided,
            "uncertainty": self.uncertainty.describe(),
        }
        if prepared is not None and self.extractor is not None:
            reference, weights = self.reference_path(prepared), self.weights_in_use(prepared)
            out["reference"], out["reference_sha256"] = str(reference), sha256_of(reference)
            out["weights_path"], out["weights_sha256"] = weights, sha256_of(weights)
            out["versions"] = library_versions()
        return out
