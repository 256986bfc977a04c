"""results.json: every evaluation records its metrics, the metrics it skipped (with the reason) and the
protocol behind them; running the two commands it prints (sample, then evaluate) makes the same
numbers again, exactly."""

import json
import shlex

import numpy as np
import pytest

from ditlab.evaluate import main as evaluate_main
from ditlab.metrics.provenance import sha256_of
from ditlab.metrics.uncertainty import DERIVED
from ditlab.sample import main as sample_main
from helpers import STEPS, invoke_main

MAINS = {"ditlab.sample": sample_main, "ditlab.evaluate": evaluate_main}
PROTOCOL_FIELDS = {
    "checkpoint",  # path, step, weights (ema/raw)
    "sampler",
    "sampler_text",
    "guidance",
    "guidance_text",
    "num_samples",
    "seed",
    "labels",
    "batch_size",
    "world_size",
    "device",
    "reference",
    "reference_sha256",
    "extractor",
    "extractor_model",
    "weights_path",
    "weights_sha256",
    "metrics",
    "kid_subset_size",
    "uncertainty",  # resamples, seed, level, fid_inf
    "versions",
    "sampling_versions",
}


def run_printed(command: str, monkeypatch, capsys) -> tuple[int, str, str]:
    """A printed ``python -m ditlab.<command> ...`` line, run in this process."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"] and words[2] in MAINS, command
    return invoke_main(MAINS[words[2]], words[2], words[3:], monkeypatch, capsys)


def test_results_json_holds_the_protocol_and_its_commands_reproduce_the_numbers(
    reference, prepared_clf, tmp_path, monkeypatch, capsys
):
    ckpt = reference / "checkpoints" / "last.ckpt"
    first = tmp_path / "first"
    sample_args = [f"ckpt={ckpt}", "num_samples=10", "batch_size=4", "sampler=ddim50", "steps=3"]
    sample_args += ["guidance.scale=2.5", "guidance.interval=[0,700]", "seed=4", "labels=balanced", f"out={first}"]
    code, _, err = invoke_main(sample_main, "ditlab.sample", sample_args, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    npz = first / "samples_10x8x8x3.npz"
    evaluate_args = [f"samples={npz}", f"reference={prepared_clf}", "extractor=clf", "progress=false"]
    code, stdout, err = invoke_main(evaluate_main, "ditlab.evaluate", evaluate_args, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    entry = json.loads((first / "results.json").read_text())["evaluations"][-1]

    metrics, protocol = entry["metrics"], entry["protocol"]
    values = {"fid_clf", "is_clf", "kid_clf", "precision_clf", "recall_clf", "sample_accuracy_clf"}
    assert set(metrics) == {*values, "fid_clf_inf", *(f"{v}_{tag}" for v in values for tag in DERIVED)}
    assert all(metrics[f"{v}_ci_low"] <= metrics[f"{v}_ci_high"] and metrics[f"{v}_se"] >= 0 for v in values)
    assert metrics["fid_clf_se"] > 0  # (a proportion of 10 samples may be 0 or 1 in every resample)
    assert set(entry["skipped"]) == {"sfid_clf"} and "Inception" in entry["skipped"]["sfid_clf"]
    assert PROTOCOL_FIELDS <= set(protocol), PROTOCOL_FIELDS - set(protocol)
    assert protocol["checkpoint"]["path"] == str(ckpt.resolve())
    assert protocol["checkpoint"]["step"] == STEPS and protocol["checkpoint"]["weights"] == "ema"
    assert protocol["sampler"] == {"name": "ddim", "steps": 3, "eta": 0.0}
    assert protocol["guidance"] == {"scale": 2.5, "channels": None, "interval": [0.0, 700.0]}
    assert (protocol["num_samples"], protocol["seed"], protocol["batch_size"], protocol["world_size"]) == (10, 4, 4, 1)
    assert protocol["class_draw"] == "balanced"  # how ditlab.sample drew them, from its record
    assert protocol["reference"] == str(prepared_clf / "reference_clf.npz")
    assert protocol["reference_sha256"] == sha256_of(prepared_clf / "reference_clf.npz")
    assert protocol["weights_path"] == str(prepared_clf / "classifier")
    assert protocol["weights_sha256"] == sha256_of(prepared_clf / "classifier")
    for versions in (protocol["versions"], protocol["sampling_versions"]):
        assert {"ditlab", "torch", "torch-fidelity"} <= set(versions)
    assert entry["samples"]["sha256"] == sha256_of(npz)
    row = entry["markdown"]["row"]
    assert f"last.ckpt (step {STEPS})" in row and "ddim x 3 steps" in row and "guidance 2.5 for t in [0, 700]" in row
    assert f"{metrics['fid_clf']:.4g} ± {metrics['fid_clf_se']:.2g}" in row and protocol["reference_sha256"][:12] in row
    assert protocol["uncertainty"] == {"resamples": 100, "seed": 0, "level": 0.95, "fid_inf": True}
    assert row in stdout and entry["reproduce"]["sample"] in stdout and entry["reproduce"]["evaluate"] in stdout

    # the printed protocol, run again into another folder, gives the same numbers exactly
    second = tmp_path / "second"
    commands = [entry["reproduce"][k].replace(str(first), str(second)) for k in ("sample", "evaluate")]
    for command in commands:
        code, _, err = run_printed(command, monkeypatch, capsys)
        assert code == 0, err[-2000:]
    again = json.loads((second / "results.json").read_text())["evaluations"][-1]
    assert again["metrics"] == metrics and again["samples"]["sha256"] == entry["samples"]["sha256"]

    # evaluating the same samples again replaces their entry; a record of other samples is refused
    code, _, _ = invoke_main(evaluate_main, "ditlab.evaluate", evaluate_args, monkeypatch, capsys)
    assert code == 0 and len(json.loads((first / "results.json").read_text())["evaluations"]) == 1
    record = json.loads(npz.with_suffix(".json").read_text())
    npz.with_suffix(".json").write_text(json.dumps({**record, "num_samples": 12}))
    code, _, err = invoke_main(evaluate_main, "ditlab.evaluate", evaluate_args, monkeypatch, capsys)
    assert code == 2 and "records 12 samples but samples_10x8x8x3.npz holds 10" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("bad", ["not json", '{"other": 1}'])
def test_a_foreign_results_file_is_not_overwritten(bad, prepared_clf, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "results.json").write_text(bad)
    args = [f"samples={tmp_path / 's.npz'}", f"reference={prepared_clf}", "extractor=clf", "metrics=[fid]"]
    code, _, err = invoke_main(evaluate_main, "ditlab.evaluate", args, monkeypatch, capsys)
    assert code == 2 and "is not a ditlab results.json" in err.strip().splitlines()[-1]
    assert (tmp_path / "results.json").read_text() == bad
