"""Seeds as a sweep axis, a sweep as a table: a multirun of 2 seeds x 2 learning rates (4 tiny runs
with the fixed validation loss and a final fid_clf with its interval), then ``ditlab report`` of the
sweep dir: one row per learning rate, the mean and sd over its two seeds equal to the runs' own
numbers, the difference of the two with its interval, and the curves."""

import csv
import json
import math
import sys

import pytest

from ditlab.cli import main as cli_main
from ditlab.report import main as report_main
from ditlab.runtime.loggers import wandb_logger
from ditlab.runtime.sweeps import config_group, wandb_group
from helpers import run_cli, tiny_overrides

LRS = ("0.001", "0.002")
SWEEP = [
    "seed=0,1",
    f"optim.optimizer.lr={','.join(LRS)}",
    "fid_protocol.extractor=clf",
    "fid_protocol.num_samples=12",
    "fid_protocol.batch_size=12",
    "+fid_protocol.sampler._target_=ditlab.diffusion.Sampler",
    "+fid_protocol.sampler.name=ddim",
    "+fid_protocol.sampler.steps=2",
    "fid_protocol.uncertainty.resamples=20",
    "callbacks.fid.every_n_steps=0",
    "callbacks.sample_grid=null",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=2",
]


@pytest.fixture(scope="module")
def sweep(prepared_clf, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    args = ["-m", *tiny_overrides(prepared_clf, root, steps=4, extra=SWEEP), f"hydra.sweep.dir={root / 'multirun'}"]
    result = run_cli(args, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "multirun"


def job_summaries(sweep_dir):
    return [json.loads((job / "metrics.json").read_text()) for job in sorted(sweep_dir.glob("job*"))]


def test_a_sweep_over_seeds_runs_every_point(sweep):
    summaries = job_summaries(sweep)
    points = {
        (o["seed"], o["optim.optimizer.lr"]) for o in (dict(x.split("=", 1) for x in s["overrides"]) for s in summaries)
    }
    assert points == {(seed, lr) for seed in "01" for lr in LRS}
    for summary in summaries:
        metrics = summary["metrics"]
        assert metrics["val/fid_clf_ci_low"] <= metrics["val/fid_clf_ci_high"] and metrics["val/fid_clf_se"] > 0
        assert "val/loss_fixed" in metrics and "val/loss_fixed_t500" in metrics
        assert summary["fid_protocol"]["uncertainty"]["resamples"] == 20
    # one config, two seeds: one group (the W&B runs' group and the report's row)
    groups = {config_group(s["overrides"]) for s in summaries}
    assert len(groups) == 2 and all("seed=" not in g and "paths.root_dir" not in g for g in groups)
    assert {g for g in groups if "optim.optimizer.lr=0.001" in g} != {g for g in groups if "lr=0.002" in g}


def test_report_tabulates_the_configs_over_their_seeds(sweep, capsys):
    result = report_main([str(sweep)])
    printed = capsys.readouterr().out
    assert [p.name for p in result["written"]] == ["report.md", "report.csv", "report.png"]
    assert all(p.is_file() and p.parent == sweep for p in result["written"])
    with (sweep / "report.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == [f"optim.optimizer.lr={lr}" for lr in LRS]
    summaries = job_summaries(sweep)
    for row, lr in zip(rows, LRS):
        runs = [s["metrics"] for s in summaries if f"optim.optimizer.lr={lr}" in s["overrides"]]
        fids = [m["val/fid_clf"] for m in runs]
        assert (row["n"], row["seeds"], row["val/fid_clf_n"]) == ("2", "0 1", "2")
        assert float(row["val/fid_clf_mean"]) == pytest.approx(sum(fids) / 2, rel=1e-12)
        assert float(row["val/fid_clf_sd"]) == pytest.approx(abs(fids[0] - fids[1]) / math.sqrt(2), rel=1e-12)
        rms = math.sqrt(sum(m["val/fid_clf_se"] ** 2 for m in runs) / 2)
        assert float(row["val/fid_clf_within_se"]) == pytest.approx(rms, rel=1e-12)
        assert row["val/fid_clf_runs"].count("[") == 2  # each run's value with its interval
        assert float(row["val/loss_fixed_mean"]) == pytest.approx(sum(m["val/loss_fixed"] for m in runs) / 2)
    table = (sweep / "report.md").read_text()
    assert table.startswith("All runs: ") and "experiment=smoke" in table.splitlines()[0]  # what they share
    assert table.count("\n| ") == 3 and "| 1 | optim.optimizer.lr=0.001 | 0, 1 |" in table and table in printed
    found = result["differences"][((0, 1), "val/fid_clf")]
    assert found.method.startswith("Welch, 2+2 seeds") and found.low < found.estimate < found.high
    assert "val/fid_clf: [2] optim.optimizer.lr=0.002 - [1] optim.optimizer.lr=0.001 = " in printed


def test_report_through_the_ditlab_command_and_its_errors(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ditlab"])
    out = tmp_path / "out"
    cli_main(["report", str(sweep / "job0"), str(sweep / "job1"), "--metrics", "train/loss", "--out", str(out)])
    assert (out / "report.md").is_file() and (out / "report.png").is_file()  # train/loss over 4 steps
    assert "no interval (one run each, without an se)" in capsys.readouterr().out
    for args, message in [
        ([str(tmp_path / "nothing")], "is not a directory; expected a run dir or a sweep dir"),
        ([str(out)], "holds no run (metrics.json); expected a run dir or a sweep dir"),
        ([str(sweep), "--metrics", "val/lpips"], "--metrics ['val/lpips']: in no run"),
        ([str(sweep), "--compare", "1", "7"], "--compare '7' names no config; expected a row number or a label"),
    ]:
        with pytest.raises(SystemExit) as stop:
            report_main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("ditlab.report: error: "), err
        assert message in err[0], err


def test_wandb_runs_of_one_config_share_a_group(tmp_path):
    assert config_group(["seed=3", "optim.optimizer.lr=1e-4", "model=dit_s2", "hydra.job.num=2"]) == (
        "model=dit_s2 optim.optimizer.lr=1e-4"
    )
    assert config_group(["+seed=1", "run_name=x", "paths.root_dir=/r", "ckpt_path=last"]) == "defaults"
    assert wandb_logger(mode="disabled", save_dir=str(tmp_path))._wandb_init["group"] == "defaults"  # no overrides here
    long = [f"model.option_{i}={'x' * 20}" for i in range(10)]
    group = wandb_group(long)
    assert len(group) == 128 and group.startswith(config_group(long)[:100]) and group != wandb_group(long[:-1])
    assert wandb_logger(mode="disabled", save_dir=str(tmp_path), group="mine")._wandb_init["group"] == "mine"
