"""SIGTERM / SIGUSR1 mid-run: a checkpoint at the step boundary, a non-zero "preempted" exit, and a
resume that continues exactly."""

from __future__ import annotations

import json

import pytest
import torch

from ditlab.runtime import faults
from ditlab.runtime.preemption import PREEMPTED_EXIT, Preempted
from ditlab.train import main as train_main
from helpers import STEPS, assert_same_state, compose_fault_run, fault_overrides, invoke_main, train_in_process


def test_sigterm_checkpoints_exits_preempted_and_resumes_exactly(prepared, reference, tmp_path, monkeypatch, capsys):
    """``python -m ditlab.train`` (its main in this process: a fresh one costs seconds of imports, and
    test_multinode's preempted srun tasks exit 75 as processes)."""
    out = tmp_path / "run"
    # The process sends itself SIGTERM at the end of step 2 (as a scheduler would, between two step
    # boundaries): the run stops at the next boundary, step 3, which is not a checkpoint step.
    monkeypatch.setenv("DITLAB_FAULT", "step@2:sigterm")
    faults.reset()
    args = [*fault_overrides(prepared, tmp_path), f"hydra.run.dir={out}"]
    code, _, err = invoke_main(train_main, "ditlab.train", args, monkeypatch, capsys)
    monkeypatch.delenv("DITLAB_FAULT")
    assert code == PREEMPTED_EXIT, err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("ditlab.train: preempted by SIGTERM at step 3; checkpoint ")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert json.loads((out / "metrics.json").read_text())["status"] == "stopped: Preempted"
    train_in_process(compose_fault_run(prepared, out, steps=STEPS))
    assert_same_state(out / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")
    # the resumed run appended to the same CSV log, and its rows reach the last step
    rows = (out / "csv" / "run" / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:]]
    assert min(steps) == 0 and max(steps) == STEPS - 1


def test_sigusr1_in_process_stops_at_the_step_boundary(prepared, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("DITLAB_FAULT", "step@4:sigusr1")  # seen at the next boundary
    with pytest.raises(Preempted, match="preempted by SIGUSR1 at step 5"):
        train_in_process(compose_fault_run(prepared, out, steps=STEPS))
    monkeypatch.delenv("DITLAB_FAULT")
    train_in_process(compose_fault_run(prepared, out, steps=STEPS))
    assert_same_state(out / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")
