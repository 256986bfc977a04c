"""ADM's evaluator suite (FID, sFID, IS, precision, recall) on torch-fidelity's TF-ported Inception.

Papers report the numbers of openai/guided-diffusion's ``evaluations/evaluator.py``: 50K samples
against a reference batch such as ``VIRTUAL_imagenet256_labeled.npz`` (``arr_0``: 10K uint8 reference
images (N, H, W, 3); ``mu``/``sigma``: their pool statistics; ``mu_s``/``sigma_s``: their spatial
statistics). This module computes the same quantities, definition by definition:

- FID: Fréchet distance of pool_3 features (2048) = torch-fidelity's ``"2048"``. Sample statistics
  are the mean and ``np.cov`` (ddof 1); the reference's come from the file when it has them (as ADM
  reads them), else from its images. The distance is ``ditlab.metrics.frechet`` (ADM: scipy sqrtm).
- sFID: the same on ADM's spatial features, the TF graph's ``mixed_6/conv:0`` sliced ``[..., :7]`` and
  reshaped to (N, -1). ``mixed_6`` is the 7th mixed block (mixed, mixed_1, mixed_2 = Mixed_5b/c/d,
  mixed_3 = Mixed_6a, mixed_4/5/6 = Mixed_6b/c/d) and its ``conv`` the 1x1 branch; torch-fidelity's
  converter maps ``mixed_6/conv/{conv2d_params,batchnorm}`` to ``Mixed_6d.branch1x1.{conv,bn}``. The
  tensor ``mixed_6/conv:0`` is the unit's output after batch norm and ReLU, which is the output of
  torch-fidelity's ``BasicConv2d`` module ``Mixed_6d.branch1x1``: 192 x 17 x 17 for 299 x 299 input.
  TF is NHWC, so ADM's flattening runs the channel fastest: (N, 17, 17, 7) -> (N, 2023). A CHW
  flattening permutes the covariance against the stored ``mu_s``/``sigma_s``; ``flatten_spatial_nhwc``
  does it TF's way.
- IS: ADM feeds pool_3 through ``softmax(pool @ W)`` where W is the matrix of the graph's
  ``softmax/logits/MatMul``: the 1008-way logits *without* the bias. That is torch-fidelity's
  ``"logits_unbiased"`` (``pool @ fc.weight.T``), which this module uses. Scores of consecutive splits
  of 5000 samples (10 for 50K, the last one shorter when N is not a multiple), unshuffled, averaged.
- Precision and recall: ADM's ``ManifoldEstimator`` with k = 3 over pool features. The radius of a
  point is its squared distance to the 4th nearest point of its own set, itself included (the k-th
  neighbour besides itself); a point is in a manifold when it lies within the radius of any point of
  that set. Precision = fraction of samples in the reference manifold; recall = fraction of reference
  points in the sample manifold. The reference side is the pool features of the reference *images*
  (``arr_0``), so an ADM file without images cannot give them. Distances in blocks of 10000 rows and
  columns, as ADM.

Where this differs, on purpose: statistics, softmax and distances are computed in float64 (ADM:
float32 features, float32 means, a float32 softmax whose zero probabilities make ``0 * log 0`` NaN,
and pairwise distances in float16 when those are finite), and the Fréchet distance never goes
through a non-symmetric matrix square root.

Offline machines: the extractor needs torch-fidelity's Inception weights
(``weights-inception-2015-12-05-6726825d.pth``), which torch-fidelity downloads when
``weights_path`` is None. Without network, copy that file over and pass ``weights_path=<file>``
(``ADMInceptionExtractor(weights_path=...)``; torch-fidelity's ``feature_extractor_weights_path``).
``ditlab.metrics.inception_weights.write_random_inception_weights`` writes a random file in the same
format, for tests of the plumbing (its numbers mean nothing).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from tqdm.auto import tqdm

from ditlab.metrics.frechet import frechet_distance

METRIC_NAMES = ("fid", "sfid", "is", "precision", "recall")
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF's mixed_6/conv (see the module docstring)
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, SPATIAL_CHANNELS * 17 * 17, 1008
IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000): 10 splits for 50K samples
PR_NEIGHBOURHOOD = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
PR_BATCH_SIZE = 10000  # ADM's row_batch_size = col_batch_size


# --- features ----------------------------------------------------------------------------------


@dataclass
class InceptionFeatures:
    """One forward's features of N images, float32 as the network gives them. The suite's metrics
    apply to another extractor's features too (``ditlab.metrics.fidelity``: the dataset classifier's
    features as ``pool``, its logits as ``logits``); such an extractor has no ``spatial``."""

    pool: np.ndarray  # (N, 2048) pool_3
    spatial: np.ndarray | None  # (N, 2023) mixed_6/conv[..., :7], NHWC-flattened
    logits: np.ndarray  # (N, 1008) unbiased logits, pool @ fc.weight.T


def flatten_spatial_nhwc(feature_map: torch.Tensor, channels: int = SPATIAL_CHANNELS) -> torch.Tensor:
    """(N, C, H, W) -> (N, H * W * channels) in TF's order: the first ``channels`` channels, channel fastest."""
    if feature_map.ndim != 4 or feature_map.shape[1] < channels:
        raise ValueError(f"feature map has shape {tuple(feature_map.shape)}; expected (N, C >= {channels}, H, W)")
    return feature_map[:, :channels].permute(0, 2, 3, 1).reshape(len(feature_map), -1)


@contextmanager
def spatial_capture(module: torch.nn.Module):
    """Collects the NHWC-flattened output of ``module`` at each forward while the context is open."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: outputs.append(flatten_spatial_nhwc(output)))
    try:
        yield outputs
    finally:
        handle.remove()


def load_inception(weights_path: str | None):
    """torch-fidelity's inception-v3-compat, giving pool_3 and the unbiased logits; downloads its
    weights when ``weights_path`` is None."""
    if weights_path is not None and not Path(weights_path).is_file():
        raise ValueError(f"weights_path={str(weights_path)!r} is not a file; expected inception-v3-compat weights")
    try:
        return FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        )
    except OSError as err:  # urllib's errors are OSErrors: no network for the download
        raise RuntimeError(
            f"cannot download the inception-v3-compat weights ({type(err).__name__}); without network pass "
            "weights_path=<local weights-inception-2015-12-05-6726825d.pth>, or use the offline extractor "
            "(extractor=clf / data.reference.extractor=clf)"
        ) from err


class ADMInceptionExtractor:
    """Pool (2048), spatial (2023) and logits (1008) of uint8 images in one Inception forward."""

    def __init__(self, weights_path: str | None = None, device: str = "cpu", batch_size: int = 64, progress=False):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive number of images per forward")
        self.weights_path = weights_path
        self.device = device
        self.batch_size = batch_size
        self.progress = progress
        self.model = load_inception(weights_path).to(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> InceptionFeatures:
        """uint8 (N, C, H, W), C = 3 (or 1, repeated to RGB) -> InceptionFeatures."""
        images = validated_images(images)
        pools, spatials, logits = [], [], []
        with spatial_capture(self.model.get_submodule(SPATIAL_MODULE)) as captured:
            chunks = images.split(self.batch_size)
            for chunk in tqdm(chunks, desc="inception features", unit="batch", disable=not self.progress):
                pool, logit = self.model(chunk.to(self.device))  # (B, 2048), (B, 1008)
                pools.append(pool.float().cpu())
                logits.append(logit.float().cpu())
                spatials.append(captured.pop().float().cpu())  # (B, 2023)
        return InceptionFeatures(torch.cat(pools).numpy(), torch.cat(spatials).numpy(), torch.cat(logits).numpy())


def validated_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) for Inception; a single channel is repeated to RGB."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images are {got}; expected a uint8 tensor (N, C, H, W)")
    if images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images have shape {tuple(images.shape)}; expected (N >= 1, 1 or 3, H, W)")
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


# --- the metrics on features ---------------------------------------------------------------------


@dataclass
class Gaussian:
    """Mean (D,) and covariance (D, D) in float64: the statistics FID and sFID compare."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> Gaussian:
        """ADM's compute_statistics: mean and np.cov (ddof 1) of (N, D) features."""
        features = np.asarray(features)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"features have shape {features.shape}; expected (N >= 2, D) for a covariance")
        return cls(features.mean(axis=0, dtype=np.float64), np.cov(features, rowvar=False, dtype=np.float64))

    def distance(self, other: Gaussian) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's compute_inception_score from (N, K) logits: mean over consecutive splits of
    exp(mean_i KL(p_i || mean_j p_j)), p = softmax(logits), in float64."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; expected (N >= 1, K)")
    if split_size < 1:
        raise ValueError(f"split_size={split_size}; expected a positive number of samples per split")
    log_p = logits.log_softmax(dim=1)  # (N, K); finite where the softmax would round to 0
    return float(np.mean([split_inception_score(part) for part in log_p.split(split_size)]))


def split_inception_score(log_p: torch.Tensor) -> float:
    """exp(mean KL(p_i || q)) of one split of log-probabilities (n, K); q is the split's mean p."""
    log_q = torch.logsumexp(log_p, dim=0) - np.log(len(log_p))  # (K,) log mean_i p_i, finite
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)  # (n,)
    return float(kl.mean().exp())


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(A, D), (B, D) -> (A, B) squared Euclidean distances, ADM's |u|^2 - 2 u.v + |v|^2 clipped at 0."""
    return (u.square().sum(1)[:, None] - 2 * u @ v.T + v.square().sum(1)[None, :]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, batch_size: int = PR_BATCH_SIZE):
    """(N, D) -> (N,) squared distance of each point to its (k+1)-th nearest point of ``features``,
    itself included (ADM's manifold_radii)."""
    if len(features) <= k:
        raise ValueError(f"{len(features)} feature vectors; expected more than k={k} for k-NN radii")
    radii = []
    for rows in features.split(batch_size):
        # the k+1 smallest of every column block hold the k+1 smallest of the whole row
        candidates = [
            squared_distances(rows, cols).topk(min(k + 1, len(cols)), dim=1, largest=False).values
            for cols in features.split(batch_size)
        ]
        radii.append(torch.cat(candidates, dim=1).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def within_any_radius(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int):
    """(P, D) -> (P,) bool: does each point lie within the radius of some centre (C, D), radii (C,)."""
    inside = []
    for rows in points.split(batch_size):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for cols, col_radii in zip(centres.split(batch_size), radii.split(batch_size)):
            hit |= (squared_distances(rows, cols) <= col_radii[None, :]).any(dim=1)
        inside.append(hit)
    return torch.cat(inside)


def precision_recall(
    reference: np.ndarray,
    samples: np.ndarray,
    k: int = PR_NEIGHBOURHOOD,
    batch_size: int = PR_BATCH_SIZE,
    device: str = "cpu",
) -> tuple[float, float]:
    """ADM's compute_prec_recall on pool features: reference (R, D) and samples (S, D)."""
    if k < 1 or batch_size < 1:
        raise ValueError(f"k={k}, batch_size={batch_size}; expected positive integers")
    ref = validated_features(reference, "reference features", device)
    smp = validated_features(samples, "sample features", device)
    if ref.shape[1] != smp.shape[1]:
        raise ValueError(f"reference features have {ref.shape[1]} dims but samples {smp.shape[1]}; expected equal")
    precision = within_any_radius(smp, ref, manifold_radii(ref, k, batch_size), batch_size)
    recall = within_any_radius(ref, smp, manifold_radii(smp, k, batch_size), batch_size)
    return float(precision.double().mean()), float(recall.double().mean())


def validated_features(features: np.ndarray, what: str, device: str) -> torch.Tensor:
    """(N, D) finite features as a float64 tensor on ``device``."""
    tensor = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
    if tensor.ndim != 2:
        raise ValueError(f"{what} have shape {tuple(tensor.shape)}; expected (N, D)")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} hold NaN or inf; expected finite features")
    return tensor


# --- references ----------------------------------------------------------------------------------


@dataclass
class ADMReference:
    """An ADM reference batch (.npz): images and/or the statistics ADM stores beside them."""

    path: str
    images: np.ndarray | None  # (N, H, W, 3) uint8, arr_0
    pool: Gaussian | None  # mu, sigma
    spatial: Gaussian | None  # mu_s, sigma_s


def load_adm_reference(path: str | Path) -> ADMReference:
    """Read ``VIRTUAL_imagenet256_labeled.npz``-style files: arr_0, mu, sigma, mu_s, sigma_s (each optional,
    but there must be images or statistics)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ADM reference {str(path)!r} does not exist")
    with np.load(path) as data:
        images = data["arr_0"] if "arr_0" in data else None
        pool = stored_gaussian(data, "mu", "sigma", path)
        spatial = stored_gaussian(data, "mu_s", "sigma_s", path)
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
        raise ValueError(f"{str(path)!r}: arr_0 is {images.dtype} {images.shape}; expected uint8 (N, H, W, 3)")
    if images is None and pool is None and spatial is None:
        raise ValueError(f"{str(path)!r} has neither arr_0 nor mu/sigma; expected an ADM reference batch")
    return ADMReference(str(path), images, pool, spatial)


def stored_gaussian(data, mu_key: str, sigma_key: str, path: Path) -> Gaussian | None:
    """The (mu, sigma) pair of an .npz, None when absent; half a pair is an error."""
    if (mu_key in data) != (sigma_key in data):
        raise ValueError(f"{str(path)!r} has only one of {mu_key}/{sigma_key}; expected both or neither")
    if mu_key not in data:
        return None
    return Gaussian(data[mu_key].astype(np.float64), data[sigma_key].astype(np.float64))


REFERENCE_PARTS = ("pool", "spatial", "pool_features")
# the part of a reference each metric compares with (IS needs none)
METRIC_PARTS = {"fid": "pool", "sfid": "spatial", "precision": "pool_features", "recall": "pool_features"}


@dataclass
class ReferenceSide:
    """What a reference offers the suite; each part it lacks has its reason in ``missing``."""

    pool: Gaussian | None = None  # for FID
    spatial: Gaussian | None = None  # for sFID
    pool_features: np.ndarray | None = None  # (R, D), for precision/recall (and KID)
    missing: dict[str, str] = field(default_factory=dict)  # "pool" / "spatial" / "pool_features" -> why
    extractor: str = "inception"  # the feature space: metric names carry it unless it is Inception's
    image_size: int | None = None  # the real images' resolution (None: unknown)


def is_adm_reference(path: str | Path) -> bool:
    """An ADM reference batch (arr_0 and/or mu, sigma, mu_s, sigma_s) rather than ditlab's statistics
    file, which names its extractor."""
    with np.load(path) as data:
        return "extractor" not in data.files


def reference_image_size(path: str | Path) -> int | None:
    """The resolution of the real images behind a reference file: ditlab's ``image_size``, or the
    height of an ADM batch's ``arr_0`` (from the array's header, without reading the images); None
    when the file does not say."""
    with np.load(path) as data:
        if "image_size" in data.files:
            return int(data["image_size"])
        if "arr_0" not in data.files:
            return None
        with data.zip.open("arr_0.npy") as member:
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            reader = readers.get(np.lib.format.read_magic(member))
            shape = reader(member)[0] if reader else data["arr_0"].shape
    return int(shape[1]) if len(shape) == 4 else None


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


# --- the suite -----------------------------------------------------------------------------------


@dataclass
class SuiteResult:
    """Each metric asked for is either in ``metrics`` or in ``skipped`` with the reason."""

    metrics: dict[str, float]
    skipped: dict[str, str]


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
    if {"precision", "recall"} & set(metrics) and reference.pool_features is not None:
        pr = precision_recall(reference.pool_features, samples.pool, k, batch_size, device)
        out.update({name: value for name, value in zip(("precision", "recall"), pr) if name in metrics})
    return SuiteResult({name: out[name] for name in METRIC_NAMES if name in out}, skipped)


def unavailable(metrics, reference: ReferenceSide) -> dict[str, str]:
    """The ``metrics`` (of METRIC_NAMES) that ``reference`` cannot give, each with its reason."""
    return {
        name: reference.missing[METRIC_PARTS[name]]
        for name in metrics
        if name in METRIC_PARTS and getattr(reference, METRIC_PARTS[name]) is None
    }
