"""A run's FID curve (evaluate run=), the diffusers export and the `ditlab` command."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.evaluate import evaluate
from ditlab.train import train
from helpers import compose_cfg, prepare_tiny_folder, randomised
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


def run_ditlab(args, cwd, timeout=300):
    """The `ditlab` console script's entry point (pyproject [project.scripts]) in a fresh process."""
    code = "import sys; from ditlab.command import main; sys.argv[0] = 'ditlab'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_export_of_a_run_loads_back_exactly(run3, tmp_path):
    from ditlab.diffusion import Sampler
    from ditlab.inference import Guidance, load_model

    out, metrics = run3
    ckpt = out / "checkpoints" / "last.ckpt"
    result = run_ditlab(["export", f"ckpt={ckpt}", f"out={tmp_path / 'export'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # pixel space (no VAE) and 3 classes: each limitation said in one line
    said = result.stdout + result.stderr
    assert "uses class 1000 as the null label, this model's is 3" in said
    assert "the folder has no vae/, so DiTPipeline cannot load it" in said
    folder = tmp_path / "export"
    for name in ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json", "ditlab.json"):
        assert (folder / name).is_file(), name
    index = json.loads((folder / "model_index.json").read_text())
    assert index["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}
    card = (folder / "README.md").read_text()
    assert f"`val/fid_clf`: {metrics['val/fid_clf']:.6g}" in card and "hidden_size: 64" in card

    source, exported = load_model(ckpt), load_model(folder)
    for key, value in source.net.state_dict().items():
        assert torch.equal(exported.net.state_dict()[key], value), key  # the EMA weights, bit for bit
    assert torch.equal(exported.objective.betas, source.objective.betas)
    sampler, guidance = Sampler("ddim", 3), Guidance(scale=2.0)
    # the notebook shorthand (steps, cfg scale) is DDIM with that guidance
    assert torch.equal(exported.generate([0, 2], 3, 2.0, seed=1), source.generate([0, 2], sampler, guidance, seed=1))
    again = run_ditlab(["export", f"ckpt={ckpt}", f"out={folder}"], cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("ditlab.export: error: out=")


def test_export_of_an_official_checkpoint_loads_in_dit_pipeline_offline(tmp_path):
    from diffusers import DiTPipeline

    from ditlab.interop.diffusers_dit import from_diffusers
    from ditlab.interop.pipeline_export import export_pipeline
    from ditlab.models.dit import build_dit
    from ditlab.models.vae import small_autoencoder

    torch.manual_seed(0)
    net = randomised(build_dit("DiT-S/2", input_size=4, depth=2))  # 1000 classes, learn_sigma, 4 latent channels
    torch.save(net.state_dict(), tmp_path / "dit.pt")
    small_autoencoder(image_channels=3, latent_channels=4, block_out_channels=(8, 8)).save_pretrained(tmp_path / "vae")
    folder = export_pipeline(tmp_path / "dit.pt", tmp_path / "export", vae=str(tmp_path / "vae"))
    pipe = DiTPipeline.from_pretrained(str(folder), local_files_only=True)
    assert from_diffusers(pipe.transformer).state_dict().keys() == net.state_dict().keys()
    for key, value in from_diffusers(pipe.transformer).state_dict().items():
        assert torch.equal(value, net.state_dict()[key]), key
    assert pipe.vae.config.scaling_factor == 0.18215
    images = pipe(class_labels=[1, 7], num_inference_steps=2, guidance_scale=1.5, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()


def test_ditlab_command_runs_help_for_every_subcommand(tmp_path, capsys):
    from ditlab.command import COMMANDS, main

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'ditlab = "ditlab.command:main"' in pyproject
    main(["--help"])
    listing = capsys.readouterr().out
    assert all(f"  {name}  " in listing for name in COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        main(["trian"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        "ditlab: error: unknown command 'trian'; expected one of prepare, train, sample, evaluate, bench, export"
    )
    # each subcommand in its own fresh process, all at once
    code = "import sys; from ditlab.command import main; sys.argv[0] = 'ditlab'; main()"
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", code, name, "--help"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name in COMMANDS
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err.decode()[-2000:])
        assert b"Powered by Hydra" in out or b"usage:" in out, name
