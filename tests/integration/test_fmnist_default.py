"""The `make train` default's metrics.json says how good the judge behind fid_clf is."""

import json
from pathlib import Path

import pytest

from ditlab.diffusion import Guidance
from ditlab.inference import load_model
from ditlab.metrics.curve import run_protocol
from ditlab.train import train
from helpers import compose_run


def test_metrics_json_records_the_classifier_accuracy_beside_the_sample_accuracy(prepared_clf, tmp_path):
    prepared = prepared_clf
    out = tmp_path / "run"
    cfg = compose_run(
        prepared,
        out,
        steps=2,
        extra=[
            "fid_protocol.num_samples=6",
            "fid_protocol.batch_size=6",
            "fid_protocol.metrics=[fid]",
            "fid_protocol.extractor=clf",
            "guidance.scale=4.0",
            "guidance.interval=[0,500]",  # as the default run: guidance on half the path
            "callbacks.fid.every_n_steps=0",
        ],
    )
    train(cfg)
    record = load_model(out / "checkpoints" / "last.ckpt").record
    assert run_protocol(record).guidance == Guidance(4.0, None, (0, 500))  # what re-scoring a checkpoint uses
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    judge = json.loads((Path(prepared) / "classifier" / "classifier.json").read_text())["val_accuracy"]
    assert metrics["val/classifier_accuracy_clf"] == pytest.approx(judge, abs=1e-6)  # via a float32 tensor
    assert 0.0 <= metrics["val/sample_accuracy_clf"] <= 1.0
    assert "val/fid_clf" in metrics
