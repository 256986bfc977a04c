"""A real SLURM: Debian's slurm-wlm and munge as a private one-node cluster (``tests/slurm_cluster.py``,
started by the module's ``slurm`` fixture, stopped with nothing left running), through which the
commands run as a user runs them: the README's sbatch script under ``sbatch``, ``srun -n 2``,
``scancel --signal``, a real time limit with ``--signal=USR2@N``, and the README's
``python -m ditlab.train -m hydra/launcher=slurm`` sweep through submitit.

Every job has 2 tasks on the one node (Lightning's SLURMEnvironment, gloo on the CPU) and trains
the tiny model of the other tests on data prepared under ``srun -n 2``. Skipped, with one line,
where SLURM is not installed (``make install`` installs it when root).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import assert_same_state, cli_env, folder_overrides, invoke_main, make_image_folder, tiny_overrides
from slurm_cluster import PENDING_OR_RUNNING, SlurmCluster, missing_binaries

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
STEPS = 48  # the preempted job's second run sleeps ~40 of them (a fast machine's), the others run at full speed
# The README's sizes (2 nodes x 8 GPUs) -> this machine's: 1 node x 2 CPU tasks
SIZES = {"nodes": "1", "ntasks-per-node": "2", "gpus-per-node": None, "cpus-per-task": "1"}
TRAIN_SIZES = ["trainer.devices=2", "trainer.num_nodes=1"]
LAUNCHER_SIZES = {
    "hydra.launcher.partition": None,
    "hydra.launcher.nodes": "1",
    "hydra.launcher.tasks_per_node": "2",
    "hydra.launcher.gpus_per_node": "null",
    "hydra.launcher.cpus_per_task": "1",
    "trainer.devices": "2",
    "trainer.num_nodes": "1",
    "model": None,  # the tests' tiny model (experiment=smoke)
}


# ------------------------------------------------------------------------------------------ the cluster
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} missing): make install brings slurm-wlm and munge as root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    left = cluster.stop()
    assert not left, f"processes of the cluster or its jobs were still running after it stopped: {left}"


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("on_slurm")
    images = make_image_folder(root / "images", per_class=16, size=(8, 8), corrupt=False)  # prepare_tiny_folder's
    return root, images


def job_env(cluster: SlurmCluster) -> dict:
    """What the jobs run with: this interpreter first on PATH (the scripts say ``python``), tests/ on
    PYTHONPATH (probes), one thread a task (2 tasks on 2 cores), no launcher variables of our own."""
    env = cli_env(OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK"):
        env.pop(name, None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return cluster.env(env)


@pytest.fixture(scope="module")
def srun_prepared(slurm, space):
    """``srun -n 2 python -m ditlab.prepare`` of the tiny folder: each task encodes its share."""
    root, images = space
    out = root / "latents"
    args = folder_overrides(images, out, 8, 0.25, "identity", [f"paths.root_dir={root}"])
    result = slurm.run(
        "srun", "-n", "2", "python", "-m", "ditlab.prepare", *args, cwd=root, env=job_env(slurm), timeout=300
    )
    return out, result


# ------------------------------------------------------------------------------------------ the README
SECTION = "### Several nodes"


def readme_lines(starts_with: str) -> list[str]:
    """The README's indented lines (dedented) from the one that starts with ``starts_with`` in the
    section on several nodes: the whole code block, its continued lines joined."""
    text = (ROOT / "README.md").read_text()
    lines = text[text.index(SECTION) :].replace("\\\n", " ").splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("    " + starts_with))
    block = []
    for line in lines[first:]:
        if not line.startswith("    "):
            break
        block.append(line[4:])
    return block


def readme_sbatch(run_args: list[str], **directives: str | None) -> str:
    """The README's sbatch script with this machine's sizes and ``directives`` (None: left out), its
    srun line's overrides kept but the sizes, the test's ``run_args`` added."""
    changes = {**SIZES, **{k.replace("_", "-"): v for k, v in directives.items()}}
    lines = []
    for line in readme_lines("#!/bin/bash"):
        directive = re.match(r"#SBATCH --([\w-]+)=(\S+)(.*)", line)
        if directive and directive[1] in changes:
            if changes[directive[1]] is not None:
                lines.append(f"#SBATCH --{directive[1]}={changes[directive[1]]}{directive[3]}")
            continue
        if line.startswith("srun python -m ditlab.train "):
            sizes = ("model", "trainer.devices", "trainer.num_nodes")
            kept = [t for t in line.split()[4:] if t.split("=")[0] not in sizes]
            line = " ".join(["srun python -m ditlab.train", *kept, *TRAIN_SIZES, *map(shlex.quote, run_args)])
        lines.append(line)
    return "\n".join(lines) + "\n"


def readme_sweep() -> list[str]:
    """The README's ``python -m ditlab.train -m hydra/launcher=slurm ...`` (its arguments), sized here."""
    (command,) = readme_lines("python -m ditlab.train -m hydra/launcher=slurm")
    args = []
    for token in command.split()[3:]:
        key = token.split("=")[0]
        if key not in LAUNCHER_SIZES:
            args.append(token)
        elif LAUNCHER_SIZES[key] is not None:
            args.append(f"{key}={LAUNCHER_SIZES[key]}")
    return [*args, *(f"{k}={v}" for k, v in LAUNCHER_SIZES.items() if v is not None and f"{k}={v}" not in args)]


def swept_lrs() -> list[str]:
    """The learning rates the README's sweep runs (the first is the jobs' reference here)."""
    (values,) = [a.split("=")[1] for a in readme_sweep() if a.startswith("optim.optimizer.lr=")]
    return values.split(",")


def train_args(prepared: Path, root: Path, slow_steps: float = 0.0, restart: int | None = None) -> list[str]:
    """The tiny run: STEPS steps of batch 8 a task, checkpoints every 2, a fast EMA (every update shows
    in the weights); ``slow_steps`` seconds of sleep after each step (in run ``restart`` of a requeued
    job only, when given): a run that a signal reaches mid-way."""
    extra = [
        "module.ema_decay=0.5",
        "callbacks.sample_grid=null",
        "callbacks.fid=null",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.checkpoint.keep_last=0",
    ]
    if slow_steps:
        extra += ["+callbacks.slow._target_=probes.SlowSteps", f"+callbacks.slow.seconds={slow_steps}"]
        extra += [f"+callbacks.slow.restart={restart}"] if restart is not None else []
    return tiny_overrides(prepared, root, STEPS, extra)


def submit(slurm: SlurmCluster, root: Path, name: str, script: str, *options: str) -> str:
    path = root / f"{name}.sbatch"
    path.write_text(script)
    return slurm.sbatch(path, *options, cwd=root, env=job_env(slurm))


def job_output(root: Path, job: str) -> str:
    """The job's log (``--output=%x-%j.out`` of the README's script, appended to across requeues)."""
    return "\n".join(p.read_text(errors="replace") for p in root.glob(f"*-{job}.out"))


def run_dir(root: Path, job: str) -> Path:
    return root / "outputs" / "train" / f"dit_b4_{job}"  # the README's run_name=dit_b4_$SLURM_JOB_ID


def wait_for(ready, slurm: SlurmCluster, job: str, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        state = slurm.job(job).get("JobState")
        assert state in PENDING_OR_RUNNING, f"job {job} is {state}, not yet {what}"
        assert time.monotonic() < deadline, f"job {job}: not {what} after {timeout} s"
        time.sleep(0.1)


def finished(slurm: SlurmCluster, root: Path, job: str, timeout: float = 300) -> dict:
    info = slurm.wait(job, timeout)
    assert info["JobState"] == "COMPLETED", f"job {job}: {info.get('JobState')}\n{job_output(root, job)[-4000:]}"
    return info


@pytest.fixture(scope="module")
def readme_sweep_run(slurm, space, srun_prepared):
    """The README's SLURM sweep, as a user types it (``python -m ditlab.train -m hydra/launcher=slurm``):
    one 2-task job per learning rate. Its first job is the uninterrupted run the sbatch jobs below
    must end equal to."""
    root, _ = space
    sweep = root / "sweep"
    args = [*readme_sweep(), *train_args(srun_prepared[0], root), f"hydra.sweep.dir={sweep}"]
    result = slurm.run(sys.executable, "-m", "ditlab.train", *args, cwd=root, env=job_env(slurm), timeout=400)
    return sweep, result


def reference_weights(readme_sweep_run) -> Path:
    sweep, result = readme_sweep_run
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep / "job0" / "checkpoints" / "last.ckpt"  # optim.optimizer.lr=swept_lrs()[0]


# ------------------------------------------------------------------------------------------ the tests
@pytest.mark.slow
def test_prepare_under_srun_n2_writes_one_prepared_dir(srun_prepared, prepared):
    """Both tasks of ``srun -n 2`` encode their share; the dir holds what one process prepares."""
    from test_multinode import _items

    out, result = srun_prepared
    assert result.returncode == 0, result.stderr[-3000:]
    ours, single = json.loads((out / "meta.json").read_text()), json.loads((prepared / "meta.json").read_text())
    assert ours["splits"] == single["splits"] and ours["latent_shape"] == [3, 8, 8]
    for split in ("train", "val"):
        assert _items(out, split) == _items(prepared, split)


@pytest.mark.slow
def test_readme_slurm_sweep_runs_each_point_as_a_2_task_job(readme_sweep_run):
    sweep, result = readme_sweep_run
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.name.startswith("job"))
    lrs = []
    for job in jobs:
        summary = json.loads((job / "metrics.json").read_text())
        assert summary["global_step"] == STEPS
        assert {"last.ckpt", f"step_{STEPS:07d}.ckpt"} <= {p.name for p in (job / "checkpoints").iterdir()}
        assert "2 processes (1 node x 2) started by SLURMEnvironment" in (job / "train.log").read_text()
        lrs += [o.split("=")[1] for o in summary["overrides"] if o.startswith("optim.optimizer.lr=")]
    assert [float(lr) for lr in lrs] == [float(lr) for lr in swept_lrs()]  # one SLURM job per point, in order


@pytest.mark.slow
def test_readme_sbatch_job_preempted_by_scancel_then_by_its_time_limit_ends_as_the_uninterrupted_job(
    slurm, space, srun_prepared, readme_sweep_run
):
    """The README's sbatch job: ``scancel --signal=USR2`` mid-run -> checkpoint, ``scontrol requeue``,
    resumed; then a real time limit (``--time=1 --signal=USR2@5``) -> USR2 before the limit,
    checkpoint, requeued, resumed to the end: the weights of the uninterrupted 2-task job.

    slurmctld sends ``--signal=SIG@N`` and ends jobs past their limit on its 30 s pass over the
    limits; it sends the signal at the first pass that finds N + 30 s or less left (so that it comes
    no later than N s before the limit): with N = 25 it came 20 s after the start, before the tasks
    had their handlers (they died of SIGUSR2, measured). So N = 5: the requeued job is held and
    released 9 s after a pass, starts ~10 s after it, and the second pass after its start (~50 s in:
    10 s left, <= 35) sends USR2, long after its start-up; only that run sleeps after its steps (a
    run still going at 50 s on a fast machine), and the last one gets back an hour to finish."""
    root, _ = space
    args = [*train_args(srun_prepared[0], root, slow_steps=1.0, restart=1), f"optim.optimizer.lr={swept_lrs()[0]}"]
    job = submit(slurm, root, "preempted", readme_sbatch(args, signal="USR2@5"))
    checkpoints = run_dir(root, job) / "checkpoints"
    wait_for((checkpoints / "step_0000002.ckpt").exists, slurm, job, "at step 2")
    slurm.run("scancel", "--signal=USR2", job)

    def requeued(count: int) -> bool:
        info = slurm.job(job)
        return info.get("Restarts") == str(count) and info.get("JobState") == "PENDING"

    wait_for(lambda: requeued(1), slurm, job, "requeued after scancel")
    slurm.run("scontrol", "hold", job)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=1")
    time.sleep(max(0.0, slurm.next_time_limit_check() + 9 - time.time()))
    slurm.run("scontrol", "release", job)
    wait_for(lambda: requeued(2), slurm, job, "requeued before its time limit", timeout=150)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=60")
    info = finished(slurm, root, job)

    log = job_output(root, job)
    assert info["Restarts"] == "2" and "DUE TO TIME LIMIT" not in log, log[-3000:]
    preempted = [int(step) for step in re.findall(r"ditlab\.train: preempted by SIGUSR2 at step (\d+);", log)]
    assert len(preempted) == 2 and 2 <= preempted[0] < preempted[1] < STEPS, log[-3000:]  # one line a run, rank 0's
    assert (run_dir(root, job) / "train.log").read_text().count(f"scontrol requeue {job}: ok") == 2
    assert_same_state(checkpoints / "last.ckpt", reference_weights(readme_sweep_run))


@pytest.mark.slow
def test_a_task_killed_the_other_exits_within_60_s_naming_it_and_nothing_is_left(slurm, space, srun_prepared):
    root, _ = space
    job = submit(slurm, root, "lost", readme_sbatch(train_args(srun_prepared[0], root, slow_steps=0.5)))
    wait_for((run_dir(root, job) / "checkpoints" / "step_0000002.ckpt").exists, slurm, job, "at step 2")
    rank1 = [
        pid
        for pid in slurm.processes(job)
        if b"ditlab.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
        and b"SLURM_PROCID=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ]
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], 9)
    killed = time.monotonic()
    info = slurm.wait(job, timeout=120)
    assert time.monotonic() - killed < 60
    log = job_output(root, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-3000:]  # --requeue: not for a failure
    lost = [line for line in log.splitlines() if line.startswith("ditlab.train: error:")]
    assert len(lost) == 1 and "lost rank 1 of 2" in lost[0], log[-3000:]
    assert not slurm.processes(job)


@pytest.mark.slow
def test_sample_under_srun_n2_writes_one_npz(slurm, space, readme_sweep_run, monkeypatch, capsys):
    from ditlab.sample import main as sample_main

    root, _ = space
    ckpt = reference_weights(readme_sweep_run)
    args = ["num_samples=6", "batch_size=2", "sampler=ddim50", "steps=2", f"ckpt={ckpt}", f"paths.root_dir={root}"]
    two = [f"out={root / 'sampled2'}", f"hydra.run.dir={root / 'sample_run'}"]
    result = slurm.run(
        "srun", "-n", "2", "python", "-m", "ditlab.sample", *args, *two, cwd=root, env=job_env(slurm), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    code, _, err = invoke_main(sample_main, "ditlab.sample", [*args, f"out={root / 'sampled1'}"], monkeypatch, capsys)
    assert code == 0, err
    two, one = (sorted(p.name for p in (root / d).iterdir()) for d in ("sampled2", "sampled1"))
    assert two == one and [n for n in two if n.endswith(".npz")] == ["samples_6x8x8x3.npz"]  # one file, no parts
    npz = "samples_6x8x8x3.npz"  # not two[0]: the sampling record's .json sorts first
    with np.load(root / "sampled2" / npz) as a, np.load(root / "sampled1" / npz) as b:
        assert np.array_equal(a["labels"], b["labels"])
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # per-sample noise: batch-free


@pytest.mark.slow
def test_optuna_sweep_through_slurm_returns_the_optimized_metric(slurm, space, srun_prepared, monkeypatch, capsys):
    """Two trials at once, each a 2-task SLURM job whose rank 0 returns train/loss to the sweeper (the
    sweep submitted from this process: the README's runs from a fresh one above)."""
    from ditlab.train import main

    root, _ = space
    for key, value in job_env(slurm).items():
        monkeypatch.setenv(key, value)
    sweep = root / "optuna"
    extra = ["hparams_search=optuna_lr_cfg", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"]
    extra += ["optimized_metric=train/loss", f"hydra.sweep.dir={sweep}"]
    readme = [a for a in readme_sweep() if not a.startswith("optim.optimizer.lr=")]  # Optuna's to choose
    code, _, err = invoke_main(
        main, "ditlab.train", [*readme, *train_args(srun_prepared[0], root), *extra], monkeypatch, capsys
    )
    assert code == 0, err[-3000:]
    values = [json.loads((job / "metrics.json").read_text())["optimized_metric"]["value"] for job in sweep.glob("job*")]
    assert len(values) == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(values)  # what each SLURM job's rank 0 returned is what Optuna saw


def test_a_launcher_error_is_one_line(slurm, space, prepared, monkeypatch, capsys):
    """sbatch refuses the job (no such partition): submitit's error, in one line naming it, last."""
    from ditlab.train import main

    root, _ = space
    for key, value in job_env(slurm).items():
        monkeypatch.setenv(key, value)
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=nowhere", "hydra.launcher.gpus_per_node=null"]
    args += ["hydra.launcher.cpus_per_task=1", *tiny_overrides(prepared, root, 2), f"hydra.sweep.dir={root / 'no'}"]
    code, _, err = invoke_main(main, "ditlab.train", args, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert last == "ditlab.train: error: FailedJobError: sbatch: error: invalid partition specified: nowhere", err
