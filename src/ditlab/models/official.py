"""Load official DiT checkpoints (facebookresearch/DiT) into ``ditlab.models.dit.DiT``.

Accepted files: a plain state_dict (the released ``DiT-XL-2-256x256.pt``), a training checkpoint
dict of the official ``train.py`` (``{"model", "ema", "opt", "args"}``; its EMA weights are used),
or a ``.safetensors`` file. Everything is read on the CPU with ``weights_only=True``: nothing in the
file is executed (DiT issue #35: loading straight onto the GPU OOMs on resume).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ditlab.models.dit import DIT_SIZES, DiT

# The heads are not visible in any tensor shape; the paper fixes them per hidden size.
_HEADS_BY_HIDDEN = {hidden: heads for (_, hidden, heads) in DIT_SIZES.values()}
_REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in an official checkpoint file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiT checkpoint {str(path)!r} does not exist; expected a .pt or .safetensors file")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        # Official training checkpoints pickle their argparse Namespace; allow exactly that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{str(path)!r} is not a readable DiT checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{str(path)!r} holds no DiT state_dict; expected a dict of tensors or one with an 'ema' entry"
        )
    return obj


def infer_dit_kwargs(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """DiT constructor arguments read off the tensor shapes of an official-layout state_dict."""
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"not an official DiT state_dict: missing keys {missing}")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    num_patches = state_dict["pos_embed"].shape[1]
    grid = round(num_patches**0.5)
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    if num_heads is None:
        if hidden not in _HEADS_BY_HIDDEN:
            raise ValueError(f"hidden_size={hidden} is not a paper config; pass num_heads explicitly")
        num_heads = _HEADS_BY_HIDDEN[hidden]
    return dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_hidden / hidden,
        # The table has a null-class row whenever the model was trained with label dropout.
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )


def load_official_checkpoint(path: str | Path, num_heads: int | None = None) -> DiT:
    """An official DiT checkpoint as a ``DiT`` in eval mode on the CPU (strict key match)."""
    state_dict = read_state_dict(path)
    model = DiT(**infer_dit_kwargs(state_dict, num_heads))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
