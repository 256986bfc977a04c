"""Checkpoint files without training: which one ``ckpt_path=last`` takes, retention, temp cleanup,
and the W&B run id a resumed run reuses."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from ditlab.training.checkpointing import find_resume_checkpoint, retained, save_atomic
from ditlab.training.loggers import persistent_run_id


def _ckpt(path, step):
    save_atomic({"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step}, path)


def test_newest_complete_checkpoint_wins(tmp_path):
    assert find_resume_checkpoint(tmp_path / "none") is None
    _ckpt(tmp_path / "step_0000002.ckpt", 2)
    _ckpt(tmp_path / "last.ckpt", 2)
    assert find_resume_checkpoint(tmp_path).name == "last.ckpt"  # a tie goes to last.ckpt
    _ckpt(tmp_path / "step_0000004.ckpt", 4)  # killed before last.ckpt was rewritten
    assert find_resume_checkpoint(tmp_path).name == "step_0000004.ckpt"
    _ckpt(tmp_path / "step_0000006.ckpt", 6)
    data = (tmp_path / "step_0000006.ckpt").read_bytes()
    (tmp_path / "step_0000006.ckpt").write_bytes(data[: len(data) // 2])  # truncated (a non-atomic copy)
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert find_resume_checkpoint(tmp_path).name == "step_0000004.ckpt"


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.tmp-{int(dead.stdout)}"
    live = tmp_path / f".step_0000002.ckpt.tmp-{os.getppid()}"  # a running process (pytest's parent)
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    _ckpt(tmp_path / "last.ckpt", 1)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["last.ckpt"]


def test_retention_keeps_last_k_and_every_mth():
    steps = list(range(50_000, 700_001, 50_000))  # 14 periodic checkpoints
    assert retained(steps, keep_last=2, keep_every=200_000) == {200_000, 400_000, 600_000, 650_000, 700_000}
    assert retained(steps, keep_last=0, keep_every=0) == set(steps)  # 0: keep all
    assert retained([], 3, 0) == set()


def test_wandb_run_id_is_kept_in_the_run_dir(tmp_path):
    from ditlab.training.loggers import wandb_logger

    first = persistent_run_id(tmp_path / "run")
    assert persistent_run_id(tmp_path / "run") == first != persistent_run_id(tmp_path / "other")
    logger = wandb_logger(save_dir=str(tmp_path / "run"), mode="disabled")
    assert logger._wandb_init["id"] == first and logger._wandb_init["resume"] == "allow"
