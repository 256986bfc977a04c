"""Non-finite steps are skipped (no optimizer, no EMA update) and counted; K in a row stop the run
with one line and exit 3; a full disk while writing a checkpoint keeps the previous one."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from ditlab.runtime.checkpoints import CheckpointWriteError
from helpers import STEPS, compose_fault_run, fault_overrides, full_state, temps, train_in_process


def strict_json(path):
    def no_constants(name):
        raise ValueError(f"bare {name} in {path}")

    return json.loads(path.read_text(), parse_constant=no_constants)


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-on-device"])
def test_a_nan_batch_is_skipped_without_any_update(prepared, tmp_path, monkeypatch, fused):
    """Both paths: the host decision (zero_grad) and the fused optimizer's on-device found_inf skip."""
    out = tmp_path / "run"
    monkeypatch.setenv("DITLAB_FAULT", "batch@3:nan")  # the batch of step 3 (1-based) becomes NaN
    extra = ["callbacks.checkpoint.every_n_train_steps=1", f"+optim.optimizer.fused={str(fused).lower()}"]
    train_in_process(compose_fault_run(prepared, out, steps=STEPS, extra=extra))
    ckpts = out / "checkpoints"
    before, skipped, after = (full_state(ckpts / f"step_{s:07d}.ckpt") for s in (2, 3, 4))
    for key in before:  # weights, EMA, optimizer moments and step counts: all untouched by the NaN step
        if key.startswith(("state_dict/", "optimizer/")):
            assert torch.equal(before[key], skipped[key]), key
    assert not torch.equal(
        skipped["state_dict/net.x_embedder.proj.weight"], after["state_dict/net.x_embedder.proj.weight"]
    )
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    summary = strict_json(out / "metrics.json")
    assert summary["skipped_nonfinite_steps"] == 1 and summary["global_step"] == STEPS


def test_a_non_fused_checkpoint_resumes_under_the_fused_default(prepared, tmp_path):
    """A resumed optimizer takes its param groups (and their ``fused``) from the checkpoint: the
    non-finite guard must then take the host path, not hand ``found_inf`` to a non-fused step."""
    out = tmp_path / "run"
    train_in_process(compose_fault_run(prepared, out, steps=4, extra=["+optim.optimizer.fused=false"]))
    train_in_process(compose_fault_run(prepared, out, steps=6))  # ckpt_path=last, fused by default on the CPU
    summary = strict_json(out / "metrics.json")
    assert summary["global_step"] == 6 and summary["skipped_nonfinite_steps"] == 0


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-on-device"])
def test_k_nonfinite_steps_in_a_row_stop_with_one_line(prepared, tmp_path, monkeypatch, capsys, fused):
    """lr 1e30: step 1 blows the weights up, every later loss is NaN/Inf: stop after 3 skipped steps
    (the fused path reads its on-device streak on logging steps: here every step)."""
    from ditlab.train import main

    out = tmp_path / "run"
    extra = ["optim.optimizer.lr=1e30", "module.max_nonfinite_steps=3", f"hydra.run.dir={out}"]
    extra += [f"+optim.optimizer.fused={str(fused).lower()}"]
    monkeypatch.setattr(sys, "argv", ["ditlab.train", *fault_overrides(prepared, tmp_path, STEPS, extra)])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 3
    line = capsys.readouterr().err.strip().splitlines()[-1]
    # "by step": the on-device streak, read on a logging step; "at step": the per-step host decision
    expected = "ditlab.train: error: non-finite loss or gradients in 3 consecutive steps (the last by step"
    assert line.startswith(expected)
    assert "expected finite values" in line
    summary = strict_json(out / "metrics.json")  # valid JSON: the NaN loss is null
    assert summary["status"] == "stopped: NonFiniteTraining" and summary["metrics"]["train/loss"] is None
    last = full_state(out / "checkpoints" / "last.ckpt")  # the last checkpoint is kept, and finite
    assert all(torch.isfinite(v.float()).all() for k, v in last.items() if k.startswith("state_dict/"))


def test_full_disk_keeps_the_previous_checkpoint(prepared, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # writes: step_2, last (step 2), step_4 <- "No space left on device" half-way through
    monkeypatch.setenv("DITLAB_FAULT", "ckpt_write@3:enospc")
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        train_in_process(compose_fault_run(prepared, out, steps=STEPS))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step_0000002.ckpt"]  # no temp, no partial
    assert not temps(ckpts)
    assert int(full_state(ckpts / "last.ckpt")["global_step"]) == 2
    monkeypatch.delenv("DITLAB_FAULT")  # space again: the rerun continues from step 2
    train_in_process(compose_fault_run(prepared, out, steps=STEPS))
    assert int(full_state(ckpts / "last.ckpt")["global_step"]) == STEPS
