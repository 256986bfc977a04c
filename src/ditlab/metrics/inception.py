"""The Inception network of ADM's evaluator: torch-fidelity's ``inception-v3-compat`` (the TF-ported
network), giving in one forward the three feature sets ADM's suite reads.

- pool: pool_3 (2048), what FID, precision and recall compare (torch-fidelity's ``"2048"``).
- spatial: ADM's sFID features, the TF graph's ``mixed_6/conv:0`` sliced ``[..., :7]`` and reshaped to
  (N, -1). ``mixed_6`` is the 7th mixed block (mixed, mixed_1, mixed_2 = Mixed_5b/c/d, mixed_3 =
  Mixed_6a, mixed_4/5/6 = Mixed_6b/c/d) and its ``conv`` the 1x1 branch; torch-fidelity's converter
  maps ``mixed_6/conv/{conv2d_params,batchnorm}`` to ``Mixed_6d.branch1x1.{conv,bn}``. The tensor
  ``mixed_6/conv:0`` is the unit's output after batch norm and ReLU, which is the output of
  torch-fidelity's ``BasicConv2d`` module ``Mixed_6d.branch1x1``: 192 x 17 x 17 for 299 x 299 input.
  TF is NHWC, so ADM's flattening runs the channel fastest: (N, 17, 17, 7) -> (N, 2023). A CHW
  flattening permutes the covariance against the stored ``mu_s``/``sigma_s``; ``flatten_spatial_nhwc``
  does it TF's way.
- logits: ADM's IS feeds pool_3 through ``softmax(pool @ W)`` where W is the matrix of the graph's
  ``softmax/logits/MatMul``: the 1008-way logits *without* the bias, torch-fidelity's
  ``"logits_unbiased"`` (``pool @ fc.weight.T``).

Offline machines: the network needs torch-fidelity's weights
(``weights-inception-2015-12-05-6726825d.pth``), which torch-fidelity downloads when ``weights_path``
is None. Without network, copy that file over and pass ``weights_path=<file>``
(``ADMInceptionExtractor(weights_path=...)``; torch-fidelity's ``feature_extractor_weights_path``).
``ditlab.metrics.inception_weights.write_random_inception_weights`` writes a random file in the same
format, for tests of the plumbing (its numbers mean nothing).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from tqdm.auto import tqdm

SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF's mixed_6/conv (see the module docstring)
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, SPATIAL_CHANNELS * 17 * 17, 1008


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
