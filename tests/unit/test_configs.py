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


# The paper's table (Peebles & Xie 2023, Table 1: depth / hidden size / heads at patch 2, 4 and 8),
# stated here on its own: the model options, which DIT_CONFIGS is read from, must say the same.
PAPER = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PAPER_OPTIONS = {f"dit_{size.lower()}{patch}": (size, patch) for size in PAPER for patch in (2, 4, 8)}


def test_the_paper_table_is_read_from_the_model_options():
    expected = {
        f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
        for size, (depth, hidden, heads) in PAPER.items()
        for patch in (2, 4, 8)
    }
    assert DIT_CONFIGS == expected
    assert set(PAPER_OPTIONS) <= set(config_variants("model"))


@pytest.mark.parametrize("model", config_variants("model"))
def test_every_model_option_builds_the_architecture_it_states(model):
    """Each option builds a net of the sizes it composes to (a paper option: the paper's). An option
    is an architecture: the input size, channels and class count are left to the data."""
    cfg = compose_cfg("train", [f"model={model}"])
    assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.num_classes) == (None, None, None)
    cfg.model.merge_with({"input_size": 32, "in_channels": 4, "num_classes": 1000})  # ImageNet-256 SD latents
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert net.learn_sigma is True  # follows diffusion=ddpm
    built = dict(
        depth=len(net.blocks),
        hidden_size=net.pos_embed.shape[-1],
        num_heads=net.num_heads,
        patch_size=net.patch_size,
    )
    assert built == {key: cfg.model[key] for key in built}
    if model in PAPER_OPTIONS:
        size, patch = PAPER_OPTIONS[model]
        assert built == dict(zip(("depth", "hidden_size", "num_heads"), PAPER[size]), patch_size=patch)


def test_model_base_alone_is_incomplete():
    cfg = compose_cfg("train", ["model=base"])
    with pytest.raises(Exception, match="patch_size"):
        instantiate(cfg.model)


@pytest.mark.parametrize(
    "group", ["diffusion", "sampler", "optim", "trainer", "callbacks", "logger", "data", "vae", "experiment"]
)
def test_every_other_config_composes_and_builds_what_it_states(group, tmp_path):
    for option in config_variants(group):
        cfg = compose_cfg("train", [f"{group}={option}", f"paths.root_dir={tmp_path}"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        assert OmegaConf.to_container(cfg, resolve=True), f"{group}={option}"  # every interpolation resolves
        if group == "diffusion":
            objective = instantiate(cfg.diffusion.objective)
            assert objective.learn_sigma == cfg.diffusion.learn_sigma, option
            instantiate(cfg.sampler).check(objective) if option == "ddpm" else None
        elif group == "sampler":
            sampler = instantiate(cfg.sampler)
            assert (sampler.name, sampler.steps) == (cfg.sampler.name, cfg.sampler.steps), option
        elif group == "optim":
            opt = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
            assert opt.defaults["lr"] == cfg.optim.optimizer.lr, option
            instantiate(cfg.optim.scheduler)(opt)
        elif group == "trainer":
            # Built for real on the CPU (the GPU options with the accelerator switched): strategy,
            # precision and every other argument are checked by Lightning.
            with open_dict(cfg):
                cfg.trainer.accelerator = "cpu"
                cfg.trainer.devices = 1
            trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
            assert trainer.max_steps == cfg.trainer.max_steps, option
        elif group == "logger":
            built = [instantiate(c) for name, c in cfg.logger.items() if name != "wandb"]
            # wandb starts a service process: covered by the run tests
            assert len(built) == len([name for name in cfg.logger if name != "wandb"]), option
        elif group == "callbacks":
            _extractor_as_train_resolves(cfg)
            built = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
            assert len(built) == len(cfg.callbacks) > 0, option
        elif group == "vae":
            assert cfg.vae.name == option, option
            if option == "small_kl":
                assert instantiate(cfg.vae.recipe).kind == "small_kl"  # what prepare trains
            elif option == "identity":  # the pretrained ones need their weights (tested with a local VAE)
                assert instantiate(cfg.vae.codec).kind == "identity"
        elif group in ("data", "experiment"):
            assert cfg.data.name and cfg.data.prepared_dir, f"{group}={option}"


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
