"""Load official DiT checkpoints (facebookresearch/DiT) into ``ditlab.models.dit.DiT``.

Accepted files: a plain state_dict (the released ``DiT-XL-2-256x256.pt``), a training checkpoint
dict of the official ``train.py`` (``{"model", "ema", "opt", "args"}``; its EMA weights are used,
its raw ones with ``ema=False``), or a ``.safetensors`` file. Everything is read on the CPU with
``weights_only=True``: nothing in the file is executed (DiT issue #35: loading straight onto the GPU
OOMs on resume). ``read_dit`` is the DiT family's reader (``models.weights`` dispatches to it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditlab.models.dit import DiT
from ditlab.models.released import (
    DIT,
    PAPER_HEADS,
    REQUIRED_KEYS,
    Family,
    ReleasedWeights,
    check_required,
    heads_for,
    read_released_file,
    shape_kwargs,
    training_weights,
)


def read_state_dict(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The model weights in an official checkpoint file, on the CPU."""
    return training_weights(read_released_file(path), path, ema)[0]


def infer_dit_kwargs(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """DiT constructor arguments read off the tensor shapes of an official-layout state_dict."""
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"not an official DiT state_dict: missing keys {missing}")
    kwargs = shape_kwargs(state_dict, state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    if num_heads is None:
        if kwargs["hidden_size"] not in PAPER_HEADS:
            raise ValueError(f"hidden_size={kwargs['hidden_size']} is not a paper config; pass num_heads explicitly")
        num_heads = PAPER_HEADS[kwargs["hidden_size"]]
    kwargs["num_heads"] = num_heads
    order = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio")
    return {k: kwargs[k] for k in (*order, "num_classes", "learn_sigma")}


def official_layout_weights(
    state_dict: dict, path: str | Path, family: Family, num_heads: int | None, weights: str, evidence: str
) -> ReleasedWeights:
    """A state_dict in the official DiT layout (DiT's and SiT's files) as ``family``'s weights."""
    check_required(state_dict, path, family)
    if "blocks.0.mlp.fc1.weight" not in state_dict:
        raise ValueError(f"{str(path)!r} has no blocks.0.mlp.fc1.weight; expected the official {family.title} blocks")
    kwargs = shape_kwargs(state_dict, state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    kwargs["num_heads"] = heads_for(kwargs["hidden_size"], num_heads, path)
    return ReleasedWeights(family, dict(state_dict), kwargs, weights, evidence=evidence)


def read_dit(obj: dict, path: str | Path, ema: bool = True, num_heads: int | None = None, evidence: str = ""):
    """The DiT family's reader: an official DiT file's object (``read_released_file``) in ditlab's layout."""
    state_dict, weights = training_weights(obj, path, ema)
    return official_layout_weights(state_dict, path, DIT, num_heads, weights, evidence)


def load_official_checkpoint(path: str | Path, num_heads: int | None = None) -> DiT:
    """An official DiT checkpoint as a ``DiT`` in eval mode on the CPU (strict key match)."""
    state_dict = read_state_dict(path)
    model = DiT(**infer_dit_kwargs(state_dict, num_heads))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
