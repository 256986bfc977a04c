"""A randomly initialised weights file for torch-fidelity's ``inception-v3-compat``, built without network.

torch-fidelity's ``FeatureExtractorInceptionV3`` downloads its (TF-ported) weights unless it gets
``feature_extractor_weights_path``: a ``torch.save``-d state_dict that its constructor reads with
``torch.load`` and loads strictly. ``write_random_inception_weights`` writes such a file with random
weights, so the whole Inception path (extractor, hooks, shapes, metrics) runs in tests offline. Its
features mean nothing: it proves plumbing, never values. Real numbers need the real weights file
(torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``), copied to machines without network
and passed as ``weights_path``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from ditlab.runtime.files import atomic_path


class _InceptionSkeleton(FeatureExtractorInceptionV3):
    """The extractor's own module tree with PyTorch's default initialisation: its constructor loads
    a state_dict, which this class declines, so the key set and shapes are exactly the real ones."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def inception_skeleton() -> FeatureExtractorInceptionV3:
    """The inception-v3-compat network without its weights (nothing is downloaded or read)."""
    with tempfile.TemporaryDirectory() as tmp:
        placeholder = Path(tmp) / "empty.pth"
        torch.save({}, placeholder)  # the constructor torch.load-s a file before load_state_dict
        return _InceptionSkeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(placeholder))


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict of inception-v3-compat with random weights drawn from ``seed``.

    Convolutions get He-normal weights and batch norms the identity, so activations stay O(1)
    through the ~50 layers: features are neither all zero nor overflowing (the logits give a usable
    softmax), which keeps the downstream statistics finite.
    """
    generator = torch.Generator().manual_seed(seed)
    state = inception_skeleton().state_dict()
    for name, tensor in state.items():
        state[name] = random_parameter(name, tensor, generator)
    return state


def random_parameter(name: str, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One entry of the random state_dict, shaped and typed like the skeleton's ``tensor``."""
    if name.endswith("conv.weight") or name == "fc.weight":
        fan_in = tensor[0].numel()  # in_channels * kh * kw, or 2048 for fc
        gain = 2.0 if name.endswith("conv.weight") else 1.0  # ReLU follows every convolution
        return torch.randn(tensor.shape, generator=generator) * (gain / fan_in) ** 0.5
    if name.endswith(("bn.weight", "bn.running_var")):
        return torch.ones_like(tensor)
    if name.endswith(("bn.bias", "bn.running_mean", "fc.bias")):
        return torch.zeros_like(tensor)
    if name.endswith("num_batches_tracked"):
        return torch.zeros_like(tensor)
    raise ValueError(f"unexpected inception-v3-compat state_dict entry {name!r}; expected conv/bn/fc tensors")


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a random inception-v3-compat weights file to ``path`` (atomically); returns the path.

    Pass it as ``weights_path`` (torch-fidelity's ``feature_extractor_weights_path``)."""
    with atomic_path(path) as tmp:
        torch.save(random_inception_state_dict(seed), tmp)
    return Path(path)
