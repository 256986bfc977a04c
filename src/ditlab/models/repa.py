"""REPA's released checkpoints (Yu et al. 2024, sihyun-yu/REPA) in ditlab.

REPA trains SiT (its ``models/sit.py``) with projectors on the tokens after block ``encoder_depth``:
``projectors.K.{0,2,4}.*``, MLPs that map them to the encoder's features during training. Sampling
does not use them: the reader leaves them out and says so. The rest is SiT's network in DiT's key
layout without the learned-sigma head (``out_channels = in_channels``), with timm's attention (its
``--qk-norm`` adds timm's LayerNorm on q and k: ``qk_norm_kind=layer``). REPA's time is ditlab's
(t = 1 the noise, velocity noise - data: ``loss.py``'s linear path) but unscaled: the network sees
t in [0, 1] (``FlowMatching(time_scale=1)``). Files: the released ``last.pt`` (a plain state_dict) or
its ``train.py``'s checkpoints (``{"model", "ema", "opt", "args", "steps"}``); the early layout with
``decoder_blocks.N`` (its ``--legacy``) is renumbered after the encoder's blocks, as REPA does.
"""

from __future__ import annotations

import re
from pathlib import Path

from ditlab.models.released import (
    REPA,
    ReleasedWeights,
    block_count,
    check_required,
    heads_for,
    shape_kwargs,
    training_weights,
)


def without_legacy_blocks(state_dict: dict) -> dict:
    """REPA's ``load_legacy_checkpoints``: ``decoder_blocks.i`` -> ``blocks.(i + encoder depth)``."""
    depth = block_count(state_dict)
    return {
        re.sub(r"^decoder_blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) + depth}.", k): v
        for k, v in state_dict.items()
    }


def projector_summary(state_dict: dict) -> str:
    count = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("projectors."))
    widths = [tuple(state_dict[f"projectors.{i}.4.weight"].shape[::-1]) for i in range(count)]
    return f"{count} REPA projector{'s' if count > 1 else ''} (width, feature dim) {widths}, used in training only"


def read_repa(
    obj: dict, path: str | Path, ema: bool = True, num_heads: int | None = None, evidence: str = ""
) -> ReleasedWeights:
    """REPA's reader: the file's object (``models.released.read_released_file``) in ditlab's layout."""
    state_dict, weights = training_weights(obj, path, ema)
    state_dict = without_legacy_blocks(state_dict)
    check_required(state_dict, path, REPA)
    if not any(k.startswith("projectors.") for k in state_dict):
        raise ValueError(f"{str(path)!r} has no projectors.*; expected a REPA checkpoint (or family=sit for SiT's)")
    dropped = [projector_summary(state_dict)]
    network = {k: v for k, v in state_dict.items() if not k.startswith("projectors.")}
    hidden = network["x_embedder.proj.weight"].shape[0]
    if network["final_layer.linear.weight"].shape[1] != hidden:  # REPA's SiT-S sets a decoder width of 768
        raise ValueError(
            f"{str(path)!r}: the final layer is {network['final_layer.linear.weight'].shape[1]} wide, the blocks "
            f"{hidden}; expected one width (REPA's SiT-S configs cannot run)"
        )
    kwargs = shape_kwargs(network, network["blocks.0.mlp.fc1.weight"].shape[0])
    q_norm = network.get("blocks.0.attn.q_norm.weight")
    kwargs["num_heads"] = heads_for(hidden, num_heads, path, None if q_norm is None else hidden // q_norm.shape[0])
    if q_norm is not None:
        kwargs.update(qk_norm=True, qk_norm_kind="layer")  # timm's Attention(qk_norm=True): LayerNorm(head_dim)
    return ReleasedWeights(REPA, network, kwargs, weights, dropped, evidence)
