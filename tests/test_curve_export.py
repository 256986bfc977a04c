"""A run's FID curve (evaluate run=), the diffusers export and the `ditlab` command."""

import csv
import math

import pytest

from ditlab.evaluate import evaluate
from ditlab.train import train
from helpers import compose_cfg, prepare_tiny_folder
from test_train import compose_run

FID = [
    "callbacks.fid.num_samples=12",
    "callbacks.fid.batch_size=6",
    "callbacks.fid.every_n_steps=0",
    "callbacks.fid.metrics=[fid]",
    "callbacks.fid.extractor=clf",
    "callbacks.fid.cfg_scale=2.0",
]


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A tiny run with a checkpoint at steps 1, 2 and 3 and the FID callback at the end."""
    prepared = prepare_tiny_folder(tmp_path_factory.mktemp("ref"), reference="clf")
    out = tmp_path_factory.mktemp("run") / "run"
    metrics = train(compose_run(prepared, out, steps=3, extra=[*FID, "callbacks.checkpoint.every_n_train_steps=1"]))
    return out, metrics


def test_evaluate_run_writes_the_curve_and_reuses_it(run3):
    out, metrics = run3
    cfg = compose_cfg("evaluate", [f"run={out}", "progress=false"])
    first = evaluate(cfg)
    assert first["scored"] == 3
    rows = list(csv.DictReader((out / "fid_curve.csv").open()))
    assert [(r["step"], r["images_seen"], r["weights"]) for r in rows] == [
        ("1", "8", "ema"),
        ("2", "16", "ema"),
        ("3", "24", "ema"),
    ]
    assert all(float(r["fid_clf"]) > 0 and r["num_samples"] == "12" for r in rows)
    # the run's own protocol: the last point is the FID the callback logged at the end of training
    assert math.isclose(float(rows[-1]["fid_clf"]), metrics["val/fid_clf"], rel_tol=1e-6)
    png = out / "fid_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (out / "fid_curve.csv").stat().st_mtime_ns, png.stat().st_mtime_ns
    again = evaluate(cfg)
    assert again["scored"] == 0 and again["rows"] == rows
    assert ((out / "fid_curve.csv").stat().st_mtime_ns, png.stat().st_mtime_ns) == stamp  # nothing rewritten
