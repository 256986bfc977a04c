"""A run's infrastructure without training: checkpoint files (which one ``ckpt_path=last`` takes,
retention, temp cleanup), the one atomic writer, the W&B run id a resumed run reuses, the random
streams, fault injection and the hardware check."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ditlab.runtime import faults, hardware
from ditlab.runtime.checkpoints import find_resume_checkpoint, retained, save_checkpoint_file
from ditlab.runtime.files import atomic_path, remove_stale_temps, write_json
from ditlab.runtime.loggers import persistent_run_id, wandb_logger
from ditlab.seeding import TRAIN_STREAMS, stream_generator, stream_seed


def _ckpt(path, step):
    save_checkpoint_file({"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step}, path)


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
    first = persistent_run_id(tmp_path / "run")
    assert persistent_run_id(tmp_path / "run") == first != persistent_run_id(tmp_path / "other")
    logger = wandb_logger(save_dir=str(tmp_path / "run"), mode="disabled")
    assert logger._wandb_init["id"] == first and logger._wandb_init["resume"] == "allow"


def test_streams_never_share_a_seed():
    """Every (stream, rank, step, micro-batch) of a small grid gets its own seed: no two streams
    coincide, neither at the same point (the old scheme seeded data and noise alike at micro-batch
    0) nor shifted by one step or rank."""
    names = (*TRAIN_STREAMS, "val_timesteps", "val_diffusion_noise", "val_fixed_noise", "sample_init", "sampler")
    points = list(itertools.product(range(3), range(50), range(2)))  # rank, step, micro-batch
    seeds = [stream_seed(0, name, *p) for name in names for p in points]
    assert len(set(seeds)) == len(seeds)


def test_streams_draw_unrelated_numbers():
    at = (0, 7, 0)
    draws = {name: torch.randn(4096, generator=stream_generator("cpu", 0, name, *at)) for name in TRAIN_STREAMS}
    for a, b in itertools.combinations(TRAIN_STREAMS, 2):
        corr = torch.corrcoef(torch.stack([draws[a], draws[b]]))[0, 1]
        assert abs(float(corr)) < 0.1, (a, b, float(corr))
    again = torch.randn(4096, generator=stream_generator("cpu", 0, "diffusion_noise", *at))
    assert torch.equal(again, draws["diffusion_noise"])  # and each stream is reproducible


def test_atomic_path_publishes_whole_files_and_folders_or_nothing(tmp_path):
    target = tmp_path / "a" / "file.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("one")
        assert not target.exists() and tmp.name.startswith(".file.txt.tmp-")  # hidden until complete
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
    folder = tmp_path / "folder"
    for content in ("first", "second"):  # a folder replaces the folder before it
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text(content)
    assert (folder / "x").read_text() == "second" and not remove_stale_temps(tmp_path)
    write_json(tmp_path / "m.json", {"loss": float("nan"), "ok": [1.0, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"loss": None, "ok": [1.0, None]}


def test_fault_plan_is_checked_and_counts_passes(monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "batch@2:nan")
    faults.reset()
    batch = torch.zeros(3)
    assert faults.fault_point("batch", batch) is batch and not batch.isnan().any()  # first pass: nothing
    faults.fault_point("batch", batch)
    assert batch.isnan().all()  # the second pass: poisoned
    monkeypatch.setenv(faults.FAULT_ENV, "batch@x:explode")
    with pytest.raises(ValueError, match="expected <point>@<n>:<kill|enospc|nan|sigterm|sigusr1>"):
        faults.fault_point("batch", batch)
    monkeypatch.delenv(faults.FAULT_ENV)
    faults.reset()


def test_hardware_select_picks_the_cpu_here_and_refuses_more_devices_than_exist():
    trainer = OmegaConf.create({"accelerator": "auto", "devices": 2, "precision": None, "strategy": "auto"})
    picked = hardware.select(trainer)
    assert (picked.accelerator, picked.precision) == ("cpu", "32-true")
    assert picked.strategy["_target_"].endswith("DDPStrategy")  # two processes: DDP
    assert hardware.describe(picked).startswith("hardware: CPU (2 processes")
    too_many = os.cpu_count() + 1
    with pytest.raises(ValueError, match=f"trainer.devices={too_many} but this machine has"):
        hardware.select(OmegaConf.create({"accelerator": "cpu", "devices": too_many}))
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        hardware.check_hardware("gpu", 1)
    assert [hardware.device_count(d) for d in (4, "4", "0,1", [0, 1])] == [4, 4, 2, 2]


def test_the_hydra_task_goes_to_a_launcher_by_reference():
    """submitit cloudpickles the task for every SLURM job: a reference to ditlab.train.main's task (a few
    bytes), never the function by value with what it holds (this process's stderr made it fail)."""
    import pickle

    import cloudpickle

    from ditlab import train

    data = cloudpickle.dumps(train.main.hydra_task)
    assert pickle.loads(data) is train.main.hydra_task and len(data) < 200
