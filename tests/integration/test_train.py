"""ditlab.train end to end on tiny configs: a short run, sweeps, bad input (resume: test_resume.py; several
processes and nodes: test_multinode.py)."""

import copy

import pytest
import torch
from hydra.utils import instantiate
from lightning import Callback, Trainer

from ditlab.models.dit import DiT
from ditlab.train import ConfigError, build, build_module, train
from ditlab.train import main as train_main
from helpers import compose_cfg, compose_run, invoke_main, tiny_overrides


def test_few_step_run_writes_checkpoint_grid_logs_and_metrics(prepared, tmp_path):
    out = tmp_path / "run"
    metrics = train(compose_run(prepared, out, steps=4))
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "samples" / "step_0000004.png").is_file()
    assert "train/loss" in (out / "csv" / "run" / "metrics.csv").read_text().splitlines()[0]
    assert (out / "metrics.json").is_file() and "train/loss" in metrics
    # the checkpoint is plain state: loadable without unpickling code
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert any(k.startswith("ema.net.") for k in ckpt["state_dict"])
    assert "model:" in ckpt["ditlab"]["config_yaml"]


def test_bad_configs_fail_before_training(prepared, tmp_path):
    with pytest.raises(ConfigError, match="model.patch_size=3 does not divide the latent size 8"):
        build(compose_run(prepared, tmp_path / "r", extra=["model.patch_size=3"]))
    with pytest.raises(ConfigError, match="model.num_classes=1000 but .* has 3 classes"):
        build(compose_run(prepared, tmp_path / "r", extra=["model.num_classes=1000"]))
    with pytest.raises(ConfigError, match="unknown sampler 'fast'"):
        build(compose_run(prepared, tmp_path / "r", extra=["sampler.name=fast"]))
    with pytest.raises(ConfigError, match="FlowMatching supports"):
        build(compose_run(prepared, tmp_path / "r", extra=["diffusion=flow", "sampler=dpmpp20"]))


def test_multirun_sweep_gives_one_dir_per_job(prepared, tmp_path, monkeypatch, capsys):
    """``python -m ditlab.train -m ...`` (its Hydra main in this process: a fresh one costs seconds of imports)."""
    monkeypatch.chdir(tmp_path)  # multirun/ lands in the working directory
    args = ["-m", *tiny_overrides(prepared, tmp_path, steps=2), "optim.optimizer.lr=1e-4,2e-4"]
    code, _, err = invoke_main(train_main, "ditlab.train", args, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    jobs = sorted(p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir())
    assert len(jobs) == 2
    for job, lr in zip(jobs, ["0.0001", "0.0002"]):
        assert (job / "metrics.json").is_file() and (job / "checkpoints" / "last.ckpt").is_file()
        assert f"lr: {lr}" in (job / ".hydra" / "config.yaml").read_text()


def _fit_tiny(net, tmp_path, callbacks=(), steps=3):
    """``steps`` DiTModule steps of ``net`` (8x4x4x4 latents, 10 classes) on fixed batches; the module."""
    cfg = compose_cfg("train", [f"paths.output_dir={tmp_path}", "~optim.scheduler"])
    module = build_module(cfg, net)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, 4, 4, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(steps)]
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module


def test_another_backbone_gets_the_same_label_dropout_stream(tmp_path):
    """A network whose forward is (x, t, y) (no dropout_generator) draws its label dropout from the
    global RNG: the module seeds it with the same stream, so it trains exactly as the DiT does."""

    class Backbone(torch.nn.Module):  # e.g. a researcher's own model; here the DiT behind a plain forward
        def __init__(self, dit):
            super().__init__()
            self.dit, self.blocks = dit, dit.blocks

        def forward(self, x, t, y):
            return self.dit(x, t, y)

    torch.manual_seed(0)
    dit = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    wrapped = Backbone(copy.deepcopy(dit))
    plain = _fit_tiny(dit, tmp_path / "a").net
    other = _fit_tiny(wrapped, tmp_path / "b").net.dit
    for (name, a), b in zip(plain.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_training_step_leaves_the_global_rng_alone(tmp_path):
    """Every draw of a step comes from its own stream: label dropout too (a generator handed to the
    model, not a torch.manual_seed per step, which also costs host time)."""

    class Watch(Callback):
        steps = 0

        def on_train_batch_start(self, *args):
            self.state = torch.get_rng_state()

        def on_before_optimizer_step(self, *args):  # after the forward (label dropout) and backward
            assert torch.equal(torch.get_rng_state(), self.state)
            Watch.steps += 1

    shape = ["model.input_size=4", "model.in_channels=4", "model.num_classes=10"]  # _fit_tiny's batches
    cfg = compose_cfg("train", ["model=dit_tiny", *shape, f"paths.output_dir={tmp_path}"])
    _fit_tiny(instantiate(cfg.model), tmp_path, callbacks=[Watch()])
    assert Watch.steps == 3
