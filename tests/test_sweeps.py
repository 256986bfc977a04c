"""Sweeps: hyperparameters in the loggers, the objective returned per job, one sweep dir with DDP."""

import json

import pytest
import yaml

from ditlab.train import train
from helpers import prepare_tiny_folder
from test_train import compose_run, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny_folder(tmp_path_factory.mktemp("prepared"))


def test_loggers_receive_the_resolved_config(prepared, tmp_path):
    out = tmp_path / "run"
    train(compose_run(prepared, out, steps=1, extra=["logger=tensorboard", "optim.optimizer.lr=3e-4"]))
    for logger in ("tensorboard",):
        hparams = yaml.safe_load((out / logger / "version_0" / "hparams.yaml").read_text())
        assert hparams["optim"]["optimizer"]["lr"] == 3e-4
        assert hparams["model"]["hidden_size"] == 64 and hparams["seed"] == 0
    events = list((out / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    assert events and any(b"hparams" in e.read_bytes() for e in events)  # TensorBoard's HPARAMS plugin


def test_optuna_sweep_over_two_ddp_ranks_is_one_sweep_that_returns_the_objective(prepared, tmp_path):
    args = [
        *tiny_overrides(prepared, tmp_path, steps=2),
        "hparams_search=optuna_lr_cfg",
        "hydra.sweeper.n_trials=2",
        "objective=train/loss",
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
        assert summary["objective"]["name"] == "train/loss"
        assert summary["objective"]["value"] == summary["metrics"]["train/loss"]
        values.append(summary["objective"]["value"])
        hparams = yaml.safe_load((job / "csv" / "run" / "hparams.yaml").read_text())
        assert hparams["optim"]["optimizer"]["lr"] == float(lr.split("=")[1])
        assert (job / "train.log").is_file() and (job / "train_ddp_process_1.log").is_file()  # every rank's log
    best = yaml.safe_load((sweeps[0] / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(values)  # what each job returned is what Optuna saw
