"""The one reader of DiT weights, whatever file holds them. It tells the formats apart:

    a folder                      a diffusers DiT (``DiTTransformer2DModel`` or a whole DiTPipeline,
                                  ``ditlab export``'s with the run's record in ``ditlab.json``)
    ``*.ckpt``                    a ditlab training checkpoint (EMA or raw weights, its record)
    anything else                 an official DiT checkpoint (``.pt`` / ``.safetensors``)

and gives back the weights in the official layout, the architecture they fit (the record's, or
read off the weights where the file has none) and the run's record (``runtime.record.read_record``)
where there is one. Everything is read on the CPU, weights only (``runtime.checkpoints.read_checkpoint``,
``models.official.read_state_dict``): sampling, export and fine-tuning (``init_from``) all read
through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ditlab.models.diffusers_dit import read_diffusers_dit
from ditlab.models.official import infer_dit_kwargs, read_state_dict
from ditlab.runtime.checkpoints import read_checkpoint
from ditlab.runtime.record import CheckpointRecord, read_record

EXPORT_CONFIG = "ditlab_config.yaml"  # the training config ``ditlab export`` writes beside the diffusers files
EXPORT_META = "ditlab.json"  # what ``ditlab export`` writes beside them: classes, codec, the run's record
DIT = "ditlab.models.dit.DiT"


@dataclass
class DiTWeights:
    format: str  # "ditlab" | "official" | "diffusers": where they came from, for messages
    state_dict: dict[str, torch.Tensor]  # official layout, on the CPU
    architecture: dict  # the network they fit, to instantiate: {"_target_": ..., its arguments}
    record: CheckpointRecord | None  # the run's record (a ditlab checkpoint or export)


def read_dit_weights(path: str | Path, ema: bool = True) -> DiTWeights:
    """The DiT weights at ``path`` (see the module docstring); ``ema``: a ditlab checkpoint's EMA
    weights (false: the raw ones). Raises FileNotFoundError / ValueError with one line."""
    path = Path(path)
    if path.is_dir():
        state_dict, kwargs = read_diffusers_dit(path)
        return DiTWeights("diffusers", state_dict, {"_target_": DIT, **kwargs}, _export_record(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; expected a ditlab .ckpt, an official DiT .pt/.safetensors "
            "or a diffusers DiT folder"
        )
    if path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path)  # truncated / crafted files: one line (ValueError)
        record = read_record(checkpoint.get("ditlab", {}), repr(str(path)))  # one line (ValueError)
        prefix = "ema.net." if ema else "net."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        return DiTWeights("ditlab", state, record.model, record)
    try:
        state_dict = read_state_dict(path)
        return DiTWeights("official", state_dict, {"_target_": DIT, **infer_dit_kwargs(state_dict)}, None)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 - truncated / foreign file: one line for the command
        raise ValueError(f"{path} cannot be read as an official DiT checkpoint ({err}); expected a DiT .pt") from err


def _export_record(folder: Path) -> CheckpointRecord | None:
    """The record ``ditlab export`` wrote in ``ditlab.json``; an export from before the record has the
    run config beside it (read as a format-0 checkpoint); a folder from elsewhere has none."""
    meta = json.loads((folder / EXPORT_META).read_text()) if (folder / EXPORT_META).is_file() else {}
    if "record" in meta:
        return read_record(meta["record"], repr(str(folder)))
    if (folder / EXPORT_CONFIG).is_file():
        section = {"config_yaml": (folder / EXPORT_CONFIG).read_text(), "classes": meta.get("classes")}
        return read_record(section, repr(str(folder)))
    return None
