"""ditlab.train end to end on tiny configs: composition, a short run, resume, DDP, bad input."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from ditlab.train import ConfigError, build, train
from helpers import CONF_DIR, compose_cfg, prepare_tiny_folder, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny_folder(tmp_path_factory.mktemp("prepared"))


def compose_run(prepared, out_dir, steps=4, extra=()):
    cfg = compose_cfg("train", tiny_overrides(prepared, out_dir.parent, steps, extra))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def config_options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def config_variants(group):
    """The options of a group, without the base file they inherit from."""
    return [option for option in config_options(group) if option != "base"]


@pytest.mark.parametrize("model", config_variants("model"))
def test_every_model_config_matches_the_paper_table(model):
    """Each paper option (dit_xl2 ...) builds exactly DIT_CONFIGS' sizes; the others build too."""
    from ditlab.models.dit import DIT_CONFIGS

    cfg = compose_cfg("train", [f"model={model}"])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert net.learn_sigma is True  # follows diffusion=ddpm
    built = dict(
        depth=len(net.blocks),
        hidden_size=net.pos_embed.shape[-1],
        num_heads=net.num_heads,
        patch_size=net.patch_size,
    )
    size, patch = model.removeprefix("dit_")[:-1].upper(), model[-1]
    if f"DiT-{size}/{patch}" in DIT_CONFIGS:
        assert built == DIT_CONFIGS[f"DiT-{size}/{patch}"]
        assert (net.input_size, net.in_channels, net.num_classes) == (32, 4, 1000)  # ImageNet-256 SD latents


def test_every_paper_config_has_a_model_option():
    from ditlab.models.dit import DIT_CONFIGS

    names = {f"dit_{name[4:].replace('/', '').lower()}" for name in DIT_CONFIGS}
    assert names <= set(config_variants("model"))


def test_model_base_alone_is_incomplete():
    cfg = compose_cfg("train", ["model=base"])
    with pytest.raises(Exception, match="patch_size"):
        instantiate(cfg.model)


@pytest.mark.parametrize(
    "group", ["diffusion", "sampler", "optim", "trainer", "callbacks", "logger", "data", "vae", "experiment"]
)
def test_every_other_config_composes(group, tmp_path):
    for option in config_variants(group):
        cfg = compose_cfg("train", [f"{group}={option}", f"paths.root_dir={tmp_path}"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        if group == "diffusion":
            objective = instantiate(cfg.diffusion.objective)
            instantiate(cfg.sampler).check(objective) if option == "ddpm" else None
        elif group == "sampler" and option == "run":  # ditlab.sample's default: a run refuses it
            with pytest.raises(Exception, match="is for ditlab.sample"):
                instantiate(cfg.sampler)
        elif group == "sampler":
            instantiate(cfg.sampler)
        elif group == "optim":
            opt = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
            instantiate(cfg.optim.scheduler)(opt)
        elif group == "trainer":
            # Built for real on the CPU (the GPU options with the accelerator switched): strategy,
            # precision and every other argument are checked by Lightning.
            with open_dict(cfg):
                cfg.trainer.accelerator = "cpu"
                cfg.trainer.devices = 1
            trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
            assert trainer.max_steps == cfg.trainer.max_steps
        elif group == "logger":
            for name, logger_cfg in cfg.logger.items():
                if name != "wandb":  # wandb starts a service process: covered by the run test below
                    instantiate(logger_cfg)
        elif group == "callbacks":
            [instantiate(c) for c in cfg.callbacks.values()]
        elif group == "vae" and option in ("identity", "small_kl"):
            instantiate(cfg.vae.codec)  # the pretrained ones need their weights (tested with a local VAE)


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


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_continues_exactly(prepared, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose_run(prepared, straight, steps=10))
    train(compose_run(prepared, resumed, steps=5))
    train(compose_run(prepared, resumed, steps=10, extra=["ckpt_path=last"]))
    a, b = _weights(straight / "checkpoints" / "last.ckpt"), _weights(resumed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_bad_configs_fail_before_training(prepared, tmp_path):
    with pytest.raises(ConfigError, match="model.patch_size=3 does not divide the latent size 8"):
        build(compose_run(prepared, tmp_path / "r", extra=["model.patch_size=3"]))
    with pytest.raises(ConfigError, match="model.num_classes=1000 but .* has 3 classes"):
        build(compose_run(prepared, tmp_path / "r", extra=["model.num_classes=1000"]))
    with pytest.raises(ConfigError, match="unknown sampler 'fast'"):
        build(compose_run(prepared, tmp_path / "r", extra=["sampler.name=fast"]))
    with pytest.raises(ConfigError, match=r"sampler=run \(a checkpoint's own sampler\) is for ditlab.sample"):
        build(compose_run(prepared, tmp_path / "r", extra=["sampler=run"]))
    with pytest.raises(ConfigError, match="FlowMatching supports"):
        build(compose_run(prepared, tmp_path / "r", extra=["diffusion=flow", "sampler=dpmpp20"]))


def run_cli(args, cwd, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ditlab.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_bad_override_exits_with_one_line_and_writes_nothing(prepared, tmp_path):
    result = run_cli(tiny_overrides(prepared, tmp_path, extra=["model.patch_size=3"]), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "ditlab.train: error: model.patch_size=3 does not divide the latent size 8"
    )
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs" / "train").iterdir())
    unknown = run_cli(tiny_overrides(prepared, tmp_path, extra=["model=dit_q2"]), cwd=tmp_path)
    assert unknown.returncode != 0 and "Could not find 'model/dit_q2'" in unknown.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs" / "train").iterdir())


def test_cpu_ddp_two_processes_one_run_dir(prepared, tmp_path):
    result = run_cli(
        tiny_overrides(
            prepared, tmp_path, steps=3, extra=["trainer.devices=2", "trainer.strategy=ddp", "run_name=ddp"]
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert [r.name for r in runs] == ["ddp"]
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["callbacks"]["Throughput"]["images_seen"] == 3 * 8 * 2  # both ranks' images counted


def test_multirun_sweep_gives_one_dir_per_job(prepared, tmp_path):
    result = run_cli(["-m", *tiny_overrides(prepared, tmp_path, steps=2), "optim.optimizer.lr=1e-4,2e-4"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir())
    assert len(jobs) == 2
    for job, lr in zip(jobs, ["0.0001", "0.0002"]):
        assert (job / "metrics.json").is_file() and (job / "checkpoints" / "last.ckpt").is_file()
        assert f"lr: {lr}" in (job / ".hydra" / "config.yaml").read_text()


def test_ema_warmup_decay_survives_a_state_dict_round_trip():
    from ditlab.training.ema import EMA

    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.999, warmup=True)
    for _ in range(5):
        ema.update(net)
    restored = EMA(net, decay=0.999, warmup=True)
    restored.load_state_dict(ema.state_dict())
    assert restored.current_decay() == ema.current_decay() == 6 / 15
    frozen = torch.nn.Linear(2, 2)
    frozen.bias.requires_grad_(False)
    ema2 = EMA(frozen, decay=0.5)
    with torch.no_grad():
        frozen.weight.add_(2.0)
        frozen.bias.add_(2.0)
    ema2.update(frozen)
    # trainable parameters are averaged, frozen ones copied
    assert torch.allclose(ema2.net.weight, frozen.weight - 1.0) and torch.equal(ema2.net.bias, frozen.bias)


def test_ema_follows_a_network_whose_tensors_were_replaced():
    """update() lists the tensors once; a load with assign=True puts new ones in the modules, and the
    average must follow those, not the old ones it listed."""
    from ditlab.training.ema import EMA

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    ema = EMA(net, decay=0.5)
    ema.update(net)  # lists the pairs
    replacement = {k: torch.full_like(v, 3.0) for k, v in net.state_dict().items()}
    net.load_state_dict(replacement, assign=True)
    before = {k: v.clone() for k, v in ema.net.state_dict().items()}
    ema.update(net)
    for k, v in ema.net.state_dict().items():
        assert torch.allclose(v, 0.5 * before[k] + 0.5 * 3.0), k
    assert torch.equal(ema.trainable(net)[0], net[0].weight) and ema.trainable(net)[0] is net[0].weight
    with pytest.raises(ValueError, match="EMA of a different network"):
        ema.update(torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)}))
    with pytest.raises(ValueError, match="EMA of a different network"):  # one more layer than averaged
        ema.update(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))


def _fit_tiny(net, tmp_path, callbacks=(), steps=3):
    """``steps`` DiTModule steps of ``net`` (8x4x4x4 latents, 10 classes) on fixed batches; the module."""
    from lightning import Trainer

    cfg = compose_cfg("train", [f"paths.output_dir={tmp_path}"])
    module = instantiate(
        cfg.module,
        net=net,
        objective=instantiate(cfg.diffusion.objective),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=None,
    )
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
    from ditlab.models.dit import DiT

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
    model, not a torch.manual_seed per step, which also cost 0.3-1 ms of host time a step)."""
    from lightning import Callback

    class Watch(Callback):
        steps = 0

        def on_train_batch_start(self, *args):
            self.state = torch.get_rng_state()

        def on_before_optimizer_step(self, *args):  # after the forward (label dropout) and backward
            assert torch.equal(torch.get_rng_state(), self.state)
            Watch.steps += 1

    cfg = compose_cfg("train", ["model=dit_tiny", "model.input_size=4", f"paths.output_dir={tmp_path}"])
    _fit_tiny(instantiate(cfg.model), tmp_path, callbacks=[Watch()])
    assert Watch.steps == 3
