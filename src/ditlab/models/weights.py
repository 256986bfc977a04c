"""The one reader of DiT weights, whatever file holds them. It tells the formats apart:

    a folder                      a diffusers DiT (``DiTTransformer2DModel`` or a whole DiTPipeline,
                                  ``ditlab export``'s with the run's record in ``ditlab.json``)
    ``*.ckpt``                    a ditlab training checkpoint (EMA or raw weights, its record)
    anything else                 a released checkpoint of the DiT family (``.pt`` / ``.safetensors``):
                                  DiT, SiT, REPA or LightningDiT, each read by its family's reader

and gives back the weights in ditlab's layout, the architecture they fit (the record's, or read off
the weights where the file has none) and the run's record (``runtime.record.read_record``) where
there is one. Everything is read on the CPU, weights only (``runtime.checkpoints.read_checkpoint``,
``models.released.read_released_file``): sampling, export and fine-tuning (``init_from``) all read
through here.

A released file's family is ``family`` (auto: told from the file, ``models.released.detect_family``);
its reader says in one log line what it found (family, size, EMA or raw weights, what it left out)
and refuses a misfit with one line. The head count, which no tensor shows, is ``num_heads`` when
given (``init_from`` gives the run's), else read where a tensor records it, else the papers'.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ditlab.models.diffusers_dit import read_diffusers_dit
from ditlab.models.lightningdit import read_lightningdit
from ditlab.models.official import read_dit
from ditlab.models.released import (
    FAMILIES,
    FAMILY_CHOICES,
    Family,
    ReleasedWeights,
    check_family_fits,
    detect_family,
    read_released_file,
    training_weights,
)
from ditlab.models.repa import read_repa
from ditlab.models.sit import read_sit
from ditlab.runtime.checkpoints import read_checkpoint
from ditlab.runtime.record import CheckpointRecord, read_record

log = logging.getLogger("ditlab.weights")

EXPORT_CONFIG = "ditlab_config.yaml"  # the training config ``ditlab export`` writes beside the diffusers files
EXPORT_META = "ditlab.json"  # what ``ditlab export`` writes beside them: classes, codec, the run's record
DIT_TARGET = "ditlab.models.dit.DiT"

# One reader per family format: (file object, path, ema, num_heads, evidence) -> ReleasedWeights
READERS: dict[str, Callable[..., ReleasedWeights]] = {
    "dit": read_dit,
    "sit": read_sit,
    "repa": read_repa,
    "lightningdit": read_lightningdit,
}


@dataclass
class DiTWeights:
    state_dict: dict[str, torch.Tensor]  # ditlab's layout, on the CPU
    architecture: dict  # the network they fit, to instantiate: {"_target_": ..., its arguments}
    record: CheckpointRecord | None  # the run's record (a ditlab checkpoint or export)
    # a released file's family (its time convention, its published protocol); None: ditlab's own
    # (a .ckpt or an exported folder), whose record or config says how to read it
    family: Family | None = None


def check_family_choice(family: str) -> None:
    if family not in FAMILY_CHOICES:
        raise ValueError(f"unknown family={family!r}; expected one of {FAMILY_CHOICES}")


def read_released(path: str | Path, ema: bool = True, family: str = "auto", num_heads: int | None = None):
    """A released checkpoint of the DiT family through its family's reader (``ReleasedWeights``)."""
    check_family_choice(family)
    obj = read_released_file(path)
    state_dict, _ = training_weights(obj, path, ema)
    if family == "auto":
        found, evidence = detect_family(obj, state_dict, path)
    else:
        found, evidence = FAMILIES[family], "family=" + family
        check_family_fits(found, obj, state_dict, path)
    released = READERS[found.name](obj, path, ema, num_heads, evidence)
    log.info(released.describe(path))
    return released


def read_dit_weights(
    path: str | Path, ema: bool = True, family: str = "auto", num_heads: int | None = None
) -> DiTWeights:
    """The DiT weights at ``path`` (see the module docstring); ``ema``: a ditlab or training
    checkpoint's EMA weights (false: the raw ones). ``family``, ``num_heads``: for released files.
    Raises FileNotFoundError / ValueError with one line."""
    path = Path(path)
    check_family_choice(family)
    if path.is_dir():
        state_dict, kwargs = read_diffusers_dit(path)
        return DiTWeights(state_dict, {"_target_": DIT_TARGET, **kwargs}, _export_record(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; expected a ditlab .ckpt, a DiT / SiT / REPA / LightningDiT "
            ".pt/.safetensors or a diffusers DiT folder"
        )
    if path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path)  # truncated / crafted files: one line (ValueError)
        record = read_record(checkpoint.get("ditlab", {}), repr(str(path)))  # one line (ValueError)
        prefix = "ema.net." if ema else "net."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        return DiTWeights(state, record.model, record)
    try:
        released = read_released(path, ema, family, num_heads)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 - truncated / foreign file: one line for the command
        raise ValueError(f"{path} cannot be read as a DiT checkpoint ({err}); expected a DiT .pt") from err
    architecture = {"_target_": DIT_TARGET, **released.dit_kwargs}
    return DiTWeights(released.state_dict, architecture, None, family=released.family)


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
