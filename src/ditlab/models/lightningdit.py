"""LightningDiT's released checkpoints (Yao et al. 2025, hustvl/LightningDiT) in ditlab.

LightningDiT's network (``models/lightningdit.py``) is DiT's with switches, each a ditlab switch of
the same key names (``models.dit``): ``use_rmsnorm`` (RMSNorm with a learned gain in the blocks and
the final layer: norm=rms, norm_gain=true; with ``use_qknorm`` its RMSNorm normalises q and k, else
timm's LayerNorm: qk_norm_kind), ``use_swiglu`` (``mlp.w12``/``mlp.w3``: mlp=swiglu), ``use_rope``
(EVA's 2-D RoPE on top of the sin-cos table: pos=sincos_rope2d; its table is a buffer in the file,
``feat_rope.freqs_{cos,sin}``, checked against ditlab's and left out) and ``wo_shift``. The file
cannot hide any of them: each changes a key or a shape. Its time is SiT's (``transport/``: t = 1 the
data, velocity data - noise, t in [0, 1]). Files: the released ``lightningdit-xl-imagenet256-*.pt``
and its ``train.py``'s checkpoints (``{"model", "ema", "opt", "config"}``; the config's ``model``
switches are checked against the keys). Its tokenizer's latents are normalised per channel with the
dataset's statistics (``latents_stats.pt``: ``ditlab.models.vae.read_latent_stats``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ditlab.models.dit import rope_2d_table
from ditlab.models.released import (
    LIGHTNINGDIT,
    ReleasedWeights,
    check_required,
    heads_for,
    run_arguments,
    shape_kwargs,
    training_weights,
)

ROPE_KEYS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
CONFIG_SWITCHES = {  # LightningDiT's config key -> the ditlab switches it sets, as (switch, value when on)
    "use_rmsnorm": ("norm", "rms"),
    "use_swiglu": ("mlp", "swiglu"),
    "use_rope": ("pos", "sincos_rope2d"),
    "use_qknorm": ("qk_norm", True),
    "wo_shift": ("wo_shift", True),
}


def swiglu_ratio(width: int, hidden: int) -> float:
    """The mlp_ratio r with int(2/3 * int(hidden * r)) = width (LightningDiT's SwiGLU width rule)."""
    for ratio in [4.0] + [m / hidden for m in range(math.ceil(1.5 * width), math.ceil(1.5 * (width + 1)) + 1)]:
        if int(2 / 3 * int(hidden * ratio)) == width:
            return ratio
    raise ValueError(f"a SwiGLU of width {width} fits no mlp_ratio at hidden size {hidden}")


def read_switches(state_dict: dict) -> dict:
    """The ditlab switches the keys and shapes show."""
    gain = "blocks.0.norm1.weight" in state_dict
    q_norm = "blocks.0.attn.q_norm.weight" in state_dict
    ada = state_dict["blocks.0.adaLN_modulation.1.weight"]
    return dict(
        norm="rms" if gain else "layer",
        norm_gain=gain,
        mlp="swiglu" if "blocks.0.mlp.w12.weight" in state_dict else "gelu",
        pos="sincos_rope2d" if ROPE_KEYS[0] in state_dict else "sincos",
        qk_norm=q_norm,
        # LightningDiT's q/k norm is its RMSNorm (a gain only) with use_rmsnorm, else LayerNorm (gain, bias)
        qk_norm_kind="layer" if "blocks.0.attn.q_norm.bias" in state_dict else "rms",
        wo_shift=ada.shape[0] == 4 * ada.shape[1],
    )


def check_config(config: dict, switches: dict, path: str | Path) -> None:
    """A training checkpoint's ``config['model']`` flags against what the keys show."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    for flag, (switch, on) in CONFIG_SWITCHES.items():
        if flag in model and bool(model[flag]) != (switches[switch] == on):
            raise ValueError(
                f"{str(path)!r}: its config says {flag}={model[flag]} but its weights have "
                f"{switch}={switches[switch]}; expected a checkpoint whose weights match its config"
            )


def read_lightningdit(
    obj: dict, path: str | Path, ema: bool = True, num_heads: int | None = None, evidence: str = ""
) -> ReleasedWeights:
    """LightningDiT's reader: the file's object (``models.released.read_released_file``) in ditlab's layout."""
    state_dict, weights = training_weights(obj, path, ema)
    check_required(state_dict, path, LIGHTNINGDIT)
    switches = read_switches(state_dict)
    check_config(run_arguments(obj), switches, path)
    hidden = state_dict["x_embedder.proj.weight"].shape[0]
    if switches["mlp"] == "swiglu":
        width = state_dict["blocks.0.mlp.w3.weight"].shape[1]
        kwargs = shape_kwargs(state_dict, width, swiglu_ratio)
    else:
        kwargs = shape_kwargs(state_dict, state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    # The head count shows in the RoPE table's or the q/k norm's width (a head's channels).
    head_dim = state_dict[ROPE_KEYS[0]].shape[-1] if ROPE_KEYS[0] in state_dict else None
    if head_dim is None and switches["qk_norm"]:
        head_dim = state_dict["blocks.0.attn.q_norm.weight"].shape[0]
    kwargs["num_heads"] = heads_for(hidden, num_heads, path, None if head_dim is None else hidden // head_dim)
    kwargs.update(switches)
    dropped = []
    if switches["pos"] == "sincos_rope2d":
        grid = kwargs["input_size"] // kwargs["patch_size"]
        ours = rope_2d_table(grid, hidden // kwargs["num_heads"])
        for key, table in zip(ROPE_KEYS, ours):
            if state_dict[key].shape != table.shape or not torch.allclose(state_dict[key].float(), table, atol=1e-4):
                raise ValueError(
                    f"{str(path)!r}: {key} {tuple(state_dict[key].shape)} is not the 2-D RoPE of a {grid}x{grid} grid "
                    f"with {kwargs['num_heads']} heads; expected LightningDiT's VisionRotaryEmbeddingFast table"
                )
        dropped.append("the RoPE table feat_rope.freqs_{cos,sin} (ditlab computes the same, checked)")
    network = {k: v for k, v in state_dict.items() if k not in ROPE_KEYS}
    return ReleasedWeights(LIGHTNINGDIT, network, kwargs, weights, dropped, evidence)
