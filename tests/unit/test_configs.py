"""Every config group option composes and builds; the paper's sizes; what the experiments set."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from ditlab.models.dit import DIT_CONFIGS
from helpers import CONF_DIR, compose_cfg


def config_options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def config_variants(group):
    """The options of a group, without the base file they inherit from."""
    return [option for option in config_options(group) if option != "base"]


@pytest.mark.parametrize("model", config_variants("model"))
def test_every_model_config_matches_the_paper_table(model):
    """Each paper option (dit_xl2 ...) builds exactly DIT_CONFIGS' sizes; the others build too. An
    option is an architecture: the input size, channels and class count are left to the data."""
    bare = compose_cfg("train", [f"model={model}"]).model
    assert (bare.input_size, bare.in_channels, bare.num_classes) == (None, None, None)
    data = ["model.input_size=32", "model.in_channels=4", "model.num_classes=1000"]  # ImageNet-256 SD latents
    cfg = compose_cfg("train", [f"model={model}", *data])
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


def test_every_paper_config_has_a_model_option():
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
            _extractor_as_train_resolves(cfg)
            [instantiate(c) for c in cfg.callbacks.values()]
        elif group == "vae" and option == "small_kl":
            instantiate(cfg.vae.recipe)  # what prepare trains
        elif group == "vae" and option == "identity":
            instantiate(cfg.vae.codec)  # the pretrained ones need their weights (tested with a local VAE)


def test_slurm_launcher_signals_before_the_limit_and_experiments_resume():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm"], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher.signal_delay_s >= 120 and launcher.max_num_timeout > 0
        assert launcher.additional_parameters.requeue is True
        assert "SIGUSR2" in cfg.callbacks.preemption.signals  # submitit's signal: checkpoint first
        for experiment in ("smoke", "fmnist_cpu", "imagenet256_dit_b4", "imagenet256_dit_xl2"):
            assert compose("train", [f"experiment={experiment}"]).ckpt_path == "last", experiment


@pytest.mark.parametrize("experiment", ["smoke", "fmnist_cpu", "imagenet256_dit_b4", "imagenet256_dit_xl2"])
def test_experiment_values_win_over_the_groups_and_every_callback_builds(experiment, tmp_path):
    """What an experiment file sets is what the composed run gets (it is applied last), and every
    callback and the FID protocol build from it (a sampler option left over from a merge once broke
    `make train`)."""
    cfg = compose_cfg("train", [f"experiment={experiment}", f"paths.root_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    own = OmegaConf.load(Path(CONF_DIR) / "experiment" / f"{experiment}.yaml")
    own.pop("defaults", None)
    for key, value in _leaves(own):
        composed = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if not (isinstance(value, str) and "${" in value):  # interpolations resolve to other keys' values
            assert composed == value, f"{experiment}: {key} is {composed!r}, the experiment says {value!r}"
    _extractor_as_train_resolves(cfg)
    [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    instantiate(cfg.fid_protocol)


def _extractor_as_train_resolves(cfg):
    """``fid_protocol.extractor=auto`` is resolved by ``ditlab.train`` from the statistics the prepared
    dir holds (tests/integration cover that); a dir prepared with this data config holds its extractor's."""
    if cfg.fid_protocol.extractor == "auto":
        with open_dict(cfg):
            cfg.fid_protocol.extractor = OmegaConf.select(cfg, "data.reference.extractor")


def _leaves(node, prefix=""):
    for key, value in node.items_ex(resolve=False) if hasattr(node, "items_ex") else node.items():
        path = f"{prefix}{key}"
        if OmegaConf.is_dict(value):
            yield from _leaves(value, path + ".")
        else:
            yield path, OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
