"""A run's FID curve (evaluate run_dir=), the diffusers export and the `ditlab` command."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from ditlab.cli import COMMANDS, main
from ditlab.diffusion import Guidance, Sampler
from ditlab.evaluate import evaluate
from ditlab.export import main as export_main
from ditlab.inference import load_model, load_network
from ditlab.train import train
from helpers import compose_cfg, compose_run, invoke_main, randomised

FID = [
    "fid_protocol.num_samples=12",
    "fid_protocol.batch_size=6",
    "fid_protocol.metrics=[fid]",
    "fid_protocol.extractor=clf",
    "guidance.scale=2.0",
    "callbacks.fid.every_n_steps=0",
]


@pytest.fixture(scope="module")
def run3(prepared_clf, tmp_path_factory):
    """A tiny run with a checkpoint at steps 1, 2 and 3 and the FID callback at the end."""
    prepared = prepared_clf
    out = tmp_path_factory.mktemp("run") / "run"
    metrics = train(compose_run(prepared, out, steps=3, extra=[*FID, "callbacks.checkpoint.every_n_train_steps=1"]))
    return out, metrics


def test_evaluate_run_writes_the_curve_and_reuses_it(run3):
    out, metrics = run3
    cfg = compose_cfg("evaluate", [f"run_dir={out}", "progress=false"])
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
    code = "import sys; from ditlab.cli import main; sys.argv[0] = 'ditlab'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_export_of_a_run_loads_back_exactly(run3, tmp_path, monkeypatch, capsys):
    out, metrics = run3
    ckpt = out / "checkpoints" / "last.ckpt"
    # `ditlab export ...` (the console script's entry point in this process: the help test below
    # starts it in a fresh one)
    monkeypatch.chdir(tmp_path)
    args = ["export", f"ckpt={ckpt}", f"out={tmp_path / 'export'}"]
    code, stdout, stderr = invoke_main(main, "ditlab", args, monkeypatch, capsys)
    assert code == 0, stderr[-3000:]
    # pixel space (no VAE) and 3 classes: each limitation said in one line
    said = stdout + stderr
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


def test_export_refuses_a_used_folder_and_writes_the_transformer_alone(run3, tmp_path, monkeypatch, capsys):
    ckpt = run3[0] / "checkpoints" / "last.ckpt"
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    code, _, err = invoke_main(
        export_main, "ditlab.export", [f"ckpt={ckpt}", f"out={tmp_path / 'used'}"], monkeypatch, capsys
    )
    assert code == 2 and err.strip().splitlines()[-1].startswith("ditlab.export: error: out=")
    args = [f"ckpt={ckpt}", f"out={tmp_path / 'transformer'}", "what=transformer"]
    assert invoke_main(export_main, "ditlab.export", args, monkeypatch, capsys)[0] == 0
    source = load_model(ckpt)
    for key, value in load_network(tmp_path / "transformer")[0].state_dict().items():
        assert torch.equal(value, source.net.state_dict()[key]), key


def test_export_of_an_official_checkpoint_loads_in_dit_pipeline_offline(tmp_path):
    from diffusers import DiTPipeline

    from ditlab.models.diffusers_dit import dit_kwargs, from_diffusers_state_dict
    from ditlab.models.dit import build_dit
    from ditlab.models.vae import small_autoencoder
    from ditlab.pipelines.export import export_pipeline

    torch.manual_seed(0)
    net = randomised(build_dit("DiT-S/2", input_size=4, depth=2))  # 1000 classes, learn_sigma, 4 latent channels
    torch.save(net.state_dict(), tmp_path / "dit.pt")
    small_autoencoder(image_channels=3, latent_channels=4, block_out_channels=(8, 8)).save_pretrained(tmp_path / "vae")
    folder = export_pipeline(tmp_path / "dit.pt", tmp_path / "export", vae=str(tmp_path / "vae"))
    pipe = DiTPipeline.from_pretrained(str(folder), local_files_only=True)
    back = from_diffusers_state_dict(pipe.transformer.state_dict(), dit_kwargs(pipe.transformer.config))
    assert back.keys() == net.state_dict().keys()
    for key, value in back.items():
        assert torch.equal(value, net.state_dict()[key]), key
    assert pipe.vae.config.scaling_factor == 0.18215
    images = pipe(class_labels=[1, 7], num_inference_steps=2, guidance_scale=1.5, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()


def test_ditlab_command_runs_help_for_every_subcommand(tmp_path, capsys):
    """`ditlab <command> --help` for every command (in this process: a fresh one costs seconds of
    imports each); the console script itself in a fresh process, once (its listing: Hydra's help of
    a command reads every config group, ~10 s on 2 cores)."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'ditlab = "ditlab.cli:main"' in pyproject
    main(["--help"])
    listing = capsys.readouterr().out
    assert all(f"  {name}  " in listing for name in COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        main(["trian"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        "ditlab: error: unknown command 'trian'; expected one of "
        "prepare, train, sample, evaluate, bench, export, report"
    )
    for name in COMMANDS:
        GlobalHydra.instance().clear()
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code in (0, None) and ("Powered by Hydra" in out or "usage:" in out), name
    result = run_ditlab(["--help"], cwd=tmp_path)  # the console script's entry point (the commands: above)
    assert result.returncode == 0 and result.stdout.startswith("usage: ditlab <command>"), result.stderr[-2000:]
