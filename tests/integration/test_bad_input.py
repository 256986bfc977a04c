"""Every command turns bad input into one line ``ditlab.<command>: error: <bad value>; expected ...``,
a non-zero exit, and writes nothing (no run dir, no output file).

Most cases call the command's entry point in this process (a subprocess costs seconds each); one
runs as a real subprocess to show the terminal gets exactly one line and that more devices than
exist fail fast instead of spawning processes (and, in `make test-slow`, an unknown model option).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import invoke_main, run_command, tiny_overrides


def _copy_prepared(prepared, root: Path, name: str) -> Path:
    copy = root / name
    shutil.copytree(prepared, copy)
    return copy


def _edit_meta(prepared_dir: Path, **changes) -> Path:
    meta = json.loads((prepared_dir / "meta.json").read_text())
    meta.update(changes)
    (prepared_dir / "meta.json").write_text(json.dumps(meta))
    return prepared_dir


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


@pytest.fixture(scope="module")
def inputs(prepared, reference, tmp_path_factory):
    """The bad files, made once: each case below names the ones it uses."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good_ckpt = reference / "checkpoints" / "last.ckpt"
    made = {"root": root}
    shard_dir = _copy_prepared(prepared, root, "truncated_shard")
    chunk = next((shard_dir / "train").glob("chunk-*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:100])
    made["truncated_shard"] = shard_dir
    bad_meta = _copy_prepared(prepared, root, "corrupt_meta")
    (bad_meta / "meta.json").write_text('{"dataset": "folder", "num_classes": ')
    made["corrupt_meta"] = bad_meta
    made["wrong_dtype"] = _edit_meta(_copy_prepared(prepared, root, "wrong_dtype"), latent_dtype="float32")
    made["wrong_shape"] = _edit_meta(_copy_prepared(prepared, root, "wrong_shape"), latent_shape=[4, 8, 8])
    made["truncated_ckpt"] = _truncated(good_ckpt, root / "truncated.ckpt")
    other = torch.load(good_ckpt, map_location="cpu", weights_only=True)
    other["state_dict"]["net.x_embedder.proj.weight"] = torch.zeros(32, 3, 2, 2)  # another hidden size
    torch.save(other, root / "other_size.ckpt")
    made["other_size_ckpt"] = root / "other_size.ckpt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, root / "pickled.ckpt")  # code objects
    made["pickled_ckpt"] = root / "pickled.ckpt"
    (root / "empty_images").mkdir()
    made["empty_images"] = root / "empty_images"
    np.savez(root / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    made["samples"] = root / "samples.npz"
    from ditlab.metrics.reference import ReferenceStats

    eye = np.eye(4)
    ReferenceStats(np.zeros(4), eye, None, "clf", image_size=8).save(root / "ref_clf_8.npz")
    ReferenceStats(np.zeros(4), eye, None, "clf", image_size=16).save(root / "ref_clf_16.npz")
    made["ref_clf_8"], made["ref_clf_16"] = root / "ref_clf_8.npz", root / "ref_clf_16.npz"
    made["existing"] = {p for p in root.rglob("*")}
    return made


# (case id, command, argv builder (inputs, run_dir) -> args, expected text in the one line)
def _cases(prepared_key="prepared"):
    return [
        (
            "gpu_without_gpu",
            "train",
            lambda i: ["trainer.accelerator=gpu"],
            "trainer.accelerator=gpu but no CUDA GPU is visible; expected",
        ),
        (
            "more_devices_than_cores",
            "train",
            lambda i: ["trainer.devices=64"],
            "trainer.devices=64 but this machine has",
        ),
        ("truncated_shard", "train", lambda i: [f"data.prepared_dir={i['truncated_shard']}"], "is 100 bytes; expected"),
        (
            "corrupt_meta_json",
            "train",
            lambda i: [f"data.prepared_dir={i['corrupt_meta']}"],
            "corrupt_meta/meta.json is not valid JSON",
        ),
        (
            "latents_wrong_dtype",
            "train",
            lambda i: [f"data.prepared_dir={i['wrong_dtype']}"],
            "are float16 (2, 1, 3, 8, 8); expected float32",
        ),
        (
            "latents_wrong_shape",
            "train",
            lambda i: [f"data.prepared_dir={i['wrong_shape']}", "model.in_channels=4"],
            "expected float16 (2, M, 4, 8, 8)",
        ),
        ("other_vae", "train", lambda i: ["vae=sd_ema"], "vae=sd_ema but"),
        (
            "truncated_ckpt",
            "train",
            lambda i: [f"ckpt_path={i['truncated_ckpt']}"],
            "truncated.ckpt is not a complete checkpoint",
        ),
        (
            "other_model_size",
            "train",
            lambda i: [f"ckpt_path={i['other_size_ckpt']}"],
            "net.x_embedder.proj.weight is (32, 3, 2, 2) in the checkpoint",
        ),
        ("crafted_pickle", "train", lambda i: [f"ckpt_path={i['pickled_ckpt']}"], "holds objects other than tensors"),
        (
            "negative_guidance_train",
            "train",
            lambda i: ["guidance.scale=-1"],
            "guidance.scale=-1; expected a number >= 0",
        ),
        ("unparsable_override", "train", lambda i: ["model.hidden_size=["], "model.hidden_size=[: no viable"),
        (
            "patch_size_misfit",
            "train",
            lambda i: ["model.patch_size=3"],
            "model.patch_size=3 does not divide the latent size 8",
        ),
        ("unknown_key", "train", lambda i: ["model.hidden=3"], "Could not override 'model.hidden'"),
        (
            "unknown_model_in_process",
            "train",
            lambda i: ["model=dit_q2"],
            "model=dit_q2: Could not find 'model/dit_q2'; expected one of dit_b2",
        ),
    ]


TRAIN_CASES = _cases()


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input_one_line_nothing_written(case, prepared, inputs, tmp_path, monkeypatch, capsys):
    from ditlab.train import main

    _, _, extra, expected = case
    run_dir = tmp_path / "outputs" / "train" / "bad"
    args = tiny_overrides(prepared, tmp_path, 4, [*extra(inputs), f"hydra.run.dir={run_dir}"])
    code, line = _invoke(main, "ditlab.train", args, monkeypatch, capsys)
    assert code == 2 and line.startswith("ditlab.train: error: ") and expected in line, line
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()


def _invoke(entry, prog, args, monkeypatch, capsys):
    code, _, err = invoke_main(entry, prog, args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    return code, (lines[-1] if lines else "")


def test_sample_bad_checkpoint_and_negative_guidance(inputs, tmp_path, monkeypatch, capsys):
    from ditlab.sample import main

    out = tmp_path / "samples"
    for args, expected in [
        ([f"ckpt={inputs['truncated_ckpt']}"], "truncated.ckpt is not a complete checkpoint (truncated"),
        ([f"ckpt={inputs['pickled_ckpt']}"], "holds objects other than tensors"),
        ([f"ckpt={inputs['truncated_ckpt']}", "guidance.scale=-1"], "guidance.scale=-1; expected a number >= 0"),
        ([], "ckpt=??? is not set; expected ckpt=<value>"),
    ]:
        code, line = _invoke(main, "ditlab.sample", [*args, f"out={out}", "num_samples=2"], monkeypatch, capsys)
        assert code == 2 and line.startswith("ditlab.sample: error: ") and expected in line, line
        assert not out.exists()


def test_prepare_of_an_empty_folder(inputs, tmp_path, monkeypatch, capsys):
    from ditlab.prepare import main

    prepared = tmp_path / "prepared"
    args = [
        "data=folder",
        f"data.source.root={inputs['empty_images']}",
        f"data.prepared_dir={prepared}",
        "vae=identity",
        "data.reference.extractor=null",
        f"paths.root_dir={tmp_path}",
    ]
    code, line = _invoke(main, "ditlab.prepare", args, monkeypatch, capsys)
    assert code == 2 and line.startswith("ditlab.prepare: error: image folder") and "expected <root>/<class>" in line
    assert not prepared.exists() and not (tmp_path / "outputs").exists()


def test_evaluate_reference_of_another_extractor_or_size(inputs, tmp_path, monkeypatch, capsys):
    from ditlab.evaluate import main

    out = tmp_path / "metrics.json"
    for args, expected in [
        ([f"reference={inputs['ref_clf_8']}", "extractor=inception"], "holds clf statistics; expected inception"),
        ([f"reference={inputs['ref_clf_16']}", "extractor=clf"], "are 8x8 images but"),
    ]:
        full = [f"samples={inputs['samples']}", *args, f"out={out}"]
        code, line = _invoke(main, "ditlab.evaluate", full, monkeypatch, capsys)
        assert code == 2 and line.startswith("ditlab.evaluate: error: ") and expected in line, line
        assert not out.exists() and not (Path.cwd() / "evaluate.log").exists()


@pytest.mark.parametrize("what", ["pipeline", "transformer"])
def test_ditlab_export_of_a_truncated_or_pickled_checkpoint(what, inputs, tmp_path, monkeypatch, capsys):
    from ditlab.export import main

    out = tmp_path / "exported"
    for ckpt, expected in [("truncated_ckpt", "not a complete checkpoint"), ("pickled_ckpt", "holds objects other")]:
        args = [f"ckpt={inputs[ckpt]}", f"out={out}", f"what={what}"]
        code, line = _invoke(main, "ditlab.export", args, monkeypatch, capsys)
        assert code == 2 and line.startswith("ditlab.export: error: ") and expected in line, line
        assert not out.exists() and not (Path.cwd() / "export.log").exists()


def test_inputs_were_not_modified(inputs):
    assert {p for p in inputs["root"].rglob("*")} == inputs["existing"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        pytest.param(  # in `make test` in this process (unknown_model_in_process): the fresh one, slow
            ["model=dit_q2"],
            "ditlab.train: error: model=dit_q2: Could not find 'model/dit_q2'; expected one of",
            marks=pytest.mark.slow,
        ),
        (
            ["trainer.devices=64", "trainer.strategy=ddp"],
            "ditlab.train: error: trainer.devices=64 but this machine has",
        ),
    ],
    ids=["unknown_model", "devices_64"],
)
def test_cli_prints_exactly_one_line(extra, expected, prepared, tmp_path):
    start = time.time()
    # Generous bounds for a loaded machine (one interpreter start-up took > 60 s there); the hang
    # this guards against never ended (> 240 s, 63 orphaned processes).
    result = run_command("ditlab.train", tiny_overrides(prepared, tmp_path, 4, extra), tmp_path, timeout=180)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(expected)
    assert time.time() - start < 150  # fails fast: no 64 processes spawned
    assert not (tmp_path / "outputs").exists()
