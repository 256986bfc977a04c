"""kill -9 at random moments, then resume: the run ends exactly where the uninterrupted one does.

Checkpoints every 2 steps (step_N.ckpt, then last.ckpt) of an 8-step run. The faults: during a
checkpoint write (a truncated temp file is left behind), right after step_N.ckpt is renamed and
before last.ckpt is (last.ckpt is then older than step_N), after an optimizer step, and at a random
wall-clock moment. Each seed draws which write / step / moment.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from ditlab.runtime.checkpoints import find_resume_checkpoint
from helpers import STEPS, assert_same_state, cli_env, compose_fault_run, fault_overrides, temps, train_in_process

# 4 checkpoints x 2 files = 8 writes in the run; an odd ckpt_saved pass is a step_N.ckpt.
KINDS = ("ckpt_write", "ckpt_saved", "step", "timer")
SEEDS = range(6)
INJECTED: list[str] = []  # for the report: what was injected, and that each run survived it


def plan(seed: int) -> tuple[str, str | None]:
    rng = random.Random(seed)
    kind = KINDS[seed % len(KINDS)]
    if kind == "ckpt_write":
        return kind, f"ckpt_write@{rng.randint(1, 8)}:kill"
    if kind == "ckpt_saved":
        return kind, f"ckpt_saved@{rng.choice([1, 3, 5, 7])}:kill"  # between step_N.ckpt and last.ckpt
    if kind == "step":
        return kind, f"step@{rng.randint(1, STEPS - 1)}:kill"
    return kind, None


def _steps(csv_path) -> list[int]:
    import csv

    with open(csv_path, newline="") as f:
        return [int(float(row["step"])) for row in csv.DictReader(f)]


# Two seeds (a kill mid-write, a kill between step_N.ckpt and last.ckpt) in `make test`, all in `make test-slow`.
@pytest.mark.parametrize("seed", [s if s < 2 else pytest.param(s, marks=pytest.mark.slow) for s in SEEDS])
def test_kill9_then_resume_equals_uninterrupted(seed, prepared, reference, tmp_path):
    out = tmp_path / "run"
    kind, fault = plan(seed)
    args = [*fault_overrides(prepared, tmp_path, STEPS), f"hydra.run.dir={out}"]
    env = cli_env(**({"DITLAB_FAULT": fault} if fault else {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditlab.train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kind == "timer":  # a random moment once training runs (the first checkpoint exists)
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob("*.ckpt")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(random.Random(seed).uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    if kind != "timer" or proc.returncode != 0:
        assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    ckpts = out / "checkpoints"
    if kind == "ckpt_write":  # killed mid-write: a truncated temp beside the target, never a truncated .ckpt
        assert temps(ckpts)
    found = find_resume_checkpoint(ckpts)
    INJECTED.append(
        f"{kind} {fault or 'SIGKILL at a random moment'}: resumed from {found.name if found else 'scratch'}"
    )

    train_in_process(compose_fault_run(prepared, out, steps=STEPS))  # ckpt_path=last
    assert_same_state(ckpts / "last.ckpt", reference / "checkpoints" / "last.ckpt")
    assert not temps(ckpts), "a killed write's temp file was not cleaned up"
    # the CSV log continues the same file: no step twice (rows logged after the checkpoint that the
    # killed process never flushed are missing; the resumed run logs from the checkpoint's step on)
    steps, expected = _steps(out / "csv" / "run" / "metrics.csv"), _steps(reference / "csv" / "run" / "metrics.csv")
    assert steps == sorted(set(steps)) and set(steps) <= set(expected) and steps[-1] == expected[-1]
    if kind == "ckpt_saved":  # the kill left last.ckpt older than step_N (or missing): step_N was used
        assert found is not None and found.name.startswith("step_")
