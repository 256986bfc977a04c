"""Checkpoint files: written atomically, found again after a crash, pruned by a retention rule,
and checked before anything loads them.

- ``AtomicCheckpointIO`` (a Lightning CheckpointIO plugin, wired in ``conf/trainer/cpu.yaml``):
  ``torch.save`` through ``runtime.files.atomic_path`` (a temp file *beside* the target, fsynced,
  renamed over it; Lightning's own default stages the bytes in ``$TMPDIR`` and moves them, a copy
  across filesystems). A reader never sees a half-written ``.ckpt``; temps left by a killed writer
  are removed at the next save. A failed write (full disk) removes its temp, leaves the previous
  checkpoint as it was and raises ``CheckpointWriteError``.
- ``RetainingCheckpoint``: Lightning's ModelCheckpoint that keeps the last ``keep_last`` periodic
  checkpoints and every ``keep_every``-th step (0: none), instead of all of them.
- ``find_resume_checkpoint``: what ``ckpt_path=last`` means: the newest *complete* checkpoint in
  the run's checkpoint dir (a valid ``step_N.ckpt`` wins when ``last.ckpt`` is missing, older or
  truncated).
- ``read_checkpoint`` / ``check_checkpoint_fits``: load with ``weights_only=True`` and turn every
  way a file can be wrong (missing, truncated, a crafted pickle, another model) into one line.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from ditlab.runtime.faults import fault_point
from ditlab.runtime.files import atomic_path, remove_stale_temps

log = logging.getLogger("ditlab.checkpoint")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is untouched."""


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be used (one line, for the command's error message)."""


# ------------------------------------------------------------------------------------------ writing
def save_checkpoint_file(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically and durably (``runtime.files.atomic_path``); a failed
    write raises ``CheckpointWriteError`` and leaves the previous file as it was."""
    path = Path(path)
    if path.parent.is_dir():
        remove_stale_temps(path.parent)  # a killed writer's truncated temporary
    try:
        with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
            torch.save(obj, fault_point("ckpt_write", f))
    except (OSError, RuntimeError) as err:  # torch's zip writer re-raises a failed write as RuntimeError
        cause = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        raise CheckpointWriteError(
            cause.errno or errno.EIO, f"could not write checkpoint {path} ({reason}); the previous checkpoint is intact"
        ) from err
    fault_point("ckpt_saved")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic, fsynced local writes (``save_checkpoint_file``); loads are ``weights_only``."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if "://" in str(path):  # remote filesystems: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path)
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_checkpoint(path)


# ------------------------------------------------------------------------------------------ retention
_STEP_IN_NAME = re.compile(r"(\d+)(?=\.ckpt$)")


def retained(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Which checkpoint steps survive: the ``keep_last`` newest (<= 0: all) and every multiple of ``keep_every``."""
    steps = sorted(steps)
    keep = set(steps if keep_last <= 0 else steps[-keep_last:])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


class RetainingCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (every ``every_n_train_steps``, plus ``last.ckpt``) that prunes the periodic
    files to the last ``keep_last`` and every ``keep_every``-th step after each save."""

    def __init__(self, *args, keep_last: int = 3, keep_every: int = 0, **kwargs):
        if keep_last < 0 or keep_every < 0:
            raise ValueError(f"keep_last={keep_last}, keep_every={keep_every}; expected integers >= 0")
        kwargs.setdefault("save_top_k", -1)
        super().__init__(*args, **kwargs)
        self.keep_last, self.keep_every = keep_last, keep_every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            self.prune(trainer)

    def prune(self, trainer=None) -> None:
        files = {}
        for f in Path(self.dirpath).glob("*.ckpt"):
            match = _STEP_IN_NAME.search(f.name)
            if match and not f.name.startswith(self.CHECKPOINT_NAME_LAST):
                files[int(match.group(1))] = f
        keep = retained(list(files), self.keep_last, self.keep_every)
        for step, f in files.items():
            if step not in keep:
                f.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)`` on the CPU; any unusable file -> CheckpointReadError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path} does not exist; expected a .ckpt file written by ditlab.train")
    if not zipfile.is_zipfile(path):
        raise CheckpointReadError(
            f"{path} is not a complete checkpoint (truncated or not a torch zip file); "
            "expected a .ckpt file written by ditlab.train"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - every failure of a load is "this file is unusable"
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err).lower():
            raise CheckpointReadError(
                f"{path} holds objects other than tensors and plain data (refused: weights_only=True); "
                "expected a checkpoint written by ditlab.train"
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointReadError(f"{path} cannot be read ({first}); expected a complete .ckpt file") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointReadError(f"{path} has no state_dict; expected a checkpoint written by ditlab.train")
    return checkpoint


def checkpoint_step(path: str | Path) -> int | None:
    """The global step of a complete, readable checkpoint; None for a truncated or foreign file."""
    try:
        return int(read_checkpoint(path, mmap=True).get("global_step", -1))
    except CheckpointReadError:
        return None


def find_resume_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (highest global step; ``last.ckpt`` on a tie)."""
    directory = Path(directory)
    best, best_key = None, None
    for f in sorted(directory.glob("*.ckpt")) if directory.is_dir() else []:
        step = checkpoint_step(f)
        if step is None:
            log.warning(f"{f} is incomplete or unreadable: skipped")
            continue
        key = (step, f.name.startswith("last"))
        if best_key is None or key > best_key:
            best, best_key = f, key
    return best


def check_checkpoint_fits(checkpoint: dict, module: torch.nn.Module, path: str | Path) -> None:
    """Same keys and shapes as ``module``'s state_dict, else one line naming the first difference."""
    theirs = checkpoint["state_dict"]
    ours = module.state_dict()
    for key, value in ours.items():
        if key not in theirs:
            raise CheckpointReadError(f"{path} has no {key}; expected a checkpoint of the configured model")
        if tuple(theirs[key].shape) != tuple(value.shape):
            raise CheckpointReadError(
                f"{path}: {key} is {tuple(theirs[key].shape)} in the checkpoint but {tuple(value.shape)} in "
                "the configured model; expected a checkpoint of the same model size"
            )
    extra = sorted(set(theirs) - set(ours))
    if extra:
        raise CheckpointReadError(f"{path} has {extra[0]}, unknown to the configured model; expected the same model")
