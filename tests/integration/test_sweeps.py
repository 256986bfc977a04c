"""Sweeps: hyperparameters in the loggers, the optimized metric returned per job, one sweep dir with DDP."""

import json

import pytest
import yaml

from ditlab.train import train
from helpers import compose_run, invoke_main, run_cli, tiny_overrides


def test_loggers_receive_the_resolved_config(prepared, tmp_path):
    out = tmp_path / "run"
    train(compose_run(prepared, out, steps=1, extra=["logger=tensorboard", "optim.optimizer.lr=3e-4"]))
    for logger in ("tensorboard",):
        hparams = yaml.safe_load((out / logger / "version_0" / "hparams.yaml").read_text())
        assert hparams["optim"]["optimizer"]["lr"] == 3e-4
        assert hparams["model"]["hidden_size"] == 64 and hparams["seed"] == 0
    events = list((out / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    assert events and any(b"hparams" in e.read_bytes() for e in events)  # TensorBoard's HPARAMS plugin


@pytest.mark.slow  # an Optuna sweep of two 2-process jobs
def test_optuna_sweep_over_two_ddp_ranks_is_one_sweep_that_returns_the_optimized_metric(prepared, tmp_path):
    args = [
        *tiny_overrides(prepared, tmp_path, steps=2),
        "hparams_search=optuna_lr_cfg",
        "hydra.sweeper.n_trials=2",
        "optimized_metric=train/loss",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    result = run_cli(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps  # the rank-1 children did not start a sweep of their own
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["job0", "job1"]
    values = []
    for job in jobs:
        summary = json.loads((job / "metrics.json").read_text())
        lr = next(o for o in summary["overrides"] if o.startswith("optim.optimizer.lr="))
        assert summary["optimized_metric"]["name"] == "train/loss"
        assert summary["optimized_metric"]["value"] == summary["metrics"]["train/loss"]
        values.append(summary["optimized_metric"]["value"])
        hparams = yaml.safe_load((job / "csv" / "run" / "hparams.yaml").read_text())
        assert hparams["optim"]["optimizer"]["lr"] == float(lr.split("=")[1])
        assert (job / "train.log").is_file() and (job / "train_ddp_process_1.log").is_file()  # every rank's log
    best = yaml.safe_load((sweeps[0] / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(values)  # what each job returned is what Optuna saw


def test_a_launcher_or_a_sweeper_error_is_one_line_naming_it(prepared, tmp_path, monkeypatch, capsys):
    """Errors from outside the task reach the user as one line naming the exception, not a traceback line."""
    from ditlab.train import main

    def one_line(*args) -> str:
        sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
        code, _, err = invoke_main(main, "ditlab.train", [*args, sweep], monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err.strip()

    tiny = tiny_overrides(prepared, tmp_path, steps=2)
    # submitit pickles each job's task (by reference: it once took this process's stderr along and
    # failed), then finds no sbatch on a PATH that has srun (what submitit takes for a SLURM cluster)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    line = one_line("-m", "hydra/launcher=slurm", *tiny)
    assert line == "ditlab.train: error: FileNotFoundError: [Errno 2] No such file or directory: 'sbatch'"
    # Optuna refuses a search space
    line = one_line(*tiny, "hparams_search=optuna_lr_cfg", "optim.optimizer.lr=tag(log, interval(0, 1))")
    assert line.startswith("ditlab.train: error: ValueError: The `low` value must be larger than 0"), line
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").glob("job*/checkpoints"))
