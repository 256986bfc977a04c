"""The one reader of DiT weights, whatever file holds them. It tells the formats apart:

    a folder                      a diffusers DiT (``DiTTransformer2DModel`` or a whole DiTPipeline,
                                  ``ditlab export``'s with the run's ``ditlab_config.yaml`` beside it)
    ``*.ckpt``                    a ditlab training checkpoint (EMA or raw weights, the run's config)
    anything else                 an official DiT checkpoint (``.pt`` / ``.safetensors``)

and gives back the weights in the official layout, the architecture read off them where the file
has no config, and the training config where there is one. Everything is read on the CPU, weights
only (``runtime.checkpoints.read_checkpoint``, ``models.official.read_state_dict``): sampling,
export and fine-tuning (``init_from``) all read through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ditlab.models.diffusers_dit import read_diffusers_dit
from ditlab.models.official import infer_dit_kwargs, read_state_dict
from ditlab.runtime.checkpoints import read_checkpoint

EXPORT_CONFIG = "ditlab_config.yaml"  # the training config ``ditlab export`` writes beside the diffusers files


@dataclass
class DiTWeights:
    format: str  # "ditlab" | "official" | "diffusers"
    state_dict: dict[str, torch.Tensor]  # official layout, on the CPU
    dit_kwargs: dict | None  # the architecture read off the weights (official, diffusers)
    train_config: str | None  # the run's resolved config (YAML) of a ditlab checkpoint or export
    checkpoint: dict | None = None  # the whole ditlab checkpoint (step, callbacks' state, ...)


def read_dit_weights(path: str | Path, ema: bool = True) -> DiTWeights:
    """The DiT weights at ``path`` (see the module docstring); ``ema``: a ditlab checkpoint's EMA
    weights (false: the raw ones). Raises FileNotFoundError / ValueError with one line."""
    path = Path(path)
    if path.is_dir():
        state_dict, kwargs = read_diffusers_dit(path)
        config = path / EXPORT_CONFIG
        return DiTWeights("diffusers", state_dict, kwargs, config.read_text() if config.is_file() else None)
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; expected a ditlab .ckpt, an official DiT .pt/.safetensors "
            "or a diffusers DiT folder"
        )
    if path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path)  # truncated / crafted files: one line (ValueError)
        config = checkpoint.get("ditlab", {}).get("config_yaml")
        if not config:
            raise ValueError(f"{str(path)!r} is not a ditlab checkpoint (no stored run config)")
        prefix = "ema.net." if ema else "net."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        return DiTWeights("ditlab", state, None, config, checkpoint)
    try:
        state_dict = read_state_dict(path)
        return DiTWeights("official", state_dict, infer_dit_kwargs(state_dict), None)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 - truncated / foreign file: one line for the command
        raise ValueError(f"{path} cannot be read as an official DiT checkpoint ({err}); expected a DiT .pt") from err
