"""ADM's reference batch format (``VIRTUAL_imagenet256_labeled.npz``): ``arr_0``, up to 10K uint8
reference images (N, H, W, 3); ``mu``/``sigma``, their pool statistics; ``mu_s``/``sigma_s``, their
spatial statistics. Every array is optional, but a file holds images or statistics. ditlab's own
statistics files (``ditlab.metrics.reference``) name their extractor; ADM's do not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditlab.metrics.definitions import Gaussian


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
