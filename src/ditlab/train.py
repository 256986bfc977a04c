"""``python -m ditlab.train``: compose the config, build everything with ``_target_``, fit.

The model config is an architecture: its input size, latent channels and class count come from the
prepared data (``meta.json``) unless set, and the FID measures against the reference statistics the
prepared dir holds (``fid_protocol.extractor=auto``); the resolved config stored in checkpoints
holds the values taken. Everything that can be wrong with a config is checked before anything is
written: a bad override exits with one line and leaves no run dir and no checkpoint behind. A run
that stops on its own says why in one line too: preempted (SIGTERM/SIGUSR1: checkpoint written,
exit 75), non-finite loss in K consecutive steps (exit 3), a checkpoint that could not be written
(exit 4), another rank of the job gone (its process or node died: exit 5, the rank named).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ditlab.data.datamodule import LatentDataModule
from ditlab.data.prepared import PreparedDir
from ditlab.data.storage import StorageError
from ditlab.metrics.fidelity import EXTRACTORS
from ditlab.metrics.reference import ReferenceStats
from ditlab.models.vae import portable_codec
from ditlab.pipelines.prepare import check_vae_matches
from ditlab.prepare import prepare_from_config
from ditlab.runtime import hardware
from ditlab.runtime.checkpoints import (
    CheckpointReadError,
    CheckpointWriteError,
    check_checkpoint_fits,
    find_resume_checkpoint,
    read_checkpoint,
)
from ditlab.runtime.errors import config_error_message, fail, hydra_command
from ditlab.runtime.job import OneRunDir, RunDirsDiffer, launch_line, raise_if_a_rank_was_lost
from ditlab.runtime.preemption import PREEMPTED_EXIT, Preempted
from ditlab.runtime.processes import LOST_RANK_EXIT, LostRank, WaitTimeout, die_with_parent
from ditlab.runtime.record import CheckpointRecord, record_of_run
from ditlab.runtime.sweeps import MetricNotLogged, ddp_children_run_this_job, log_config, optimized_metric_value
from ditlab.training.finetune import apply_finetune, check_source
from ditlab.training.nonfinite import NonFiniteTraining

log = logging.getLogger("ditlab.train")


class ConfigError(ValueError):
    """A problem with the configuration, reported as one line."""


def build(cfg: DictConfig, init_weights: bool = True):
    """Instantiate and cross-check everything a run needs. Raises ConfigError on a bad config.
    ``init_weights``: apply ``init_from`` (off when the run resumes from a checkpoint anyway)."""
    if init_weights and cfg.get("init_from"):
        try:
            check_source(cfg.init_from)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from err
    # s3://: the same local cache as the datamodule's (the VAE, classifier and statistics read below)
    prepared = PreparedDir(cfg.data.prepared_dir, OmegaConf.select(cfg, "data.module.cache_dir"))
    ensure_prepared(cfg, prepared)
    # Seeded after preparing: preparation draws random numbers (the small VAE, the classifier) on rank 0
    # alone, and a run that prepared its data must start from the weights of one that found it prepared.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        datamodule = instantiate(cfg.data.module)
        recipe = instantiate(cfg.vae.recipe) if cfg.vae.get("recipe") else None
        codec_path = OmegaConf.select(cfg, "vae.codec.path")
        check_vae_matches(cfg.vae.name, recipe, codec_path, datamodule.meta, prepared)
        take_shape_from_data(cfg.model, datamodule)
        m = cfg.model
        datamodule.check_model(m.input_size, m.in_channels, m.patch_size, m.num_classes)
        datamodule.check_data()
        choose_fid_extractor(cfg.fid_protocol, OmegaConf.select(cfg, "data.reference.extractor"), prepared)
        net = instantiate(cfg.model)
        init_from = cfg.get("init_from") if init_weights else None
        apply_finetune(net, init_from, cfg.get("finetune"), instantiate(cfg.diffusion.objective) if init_from else None)
        record = record_of_run(cfg, **sampling_kit(datamodule, prepared))  # with the shape and extractor taken above
        module = build_module(cfg, net, record)
        if module.repa is not None and not datamodule.with_images:
            raise ValueError("repa needs each latent's clean image; expected data.module.with_images=true")
        instantiate(cfg.sampler).check(module.objective)
        if getattr(module.objective, "learn_sigma", False) != net.learn_sigma:
            raise ValueError(
                f"model.learn_sigma={net.learn_sigma} does not fit the {cfg.diffusion.objective._target_}"
                " objective; leave it at ${diffusion.learn_sigma}"
            )
    except StorageError:
        raise  # the store, not the config: its own line and exit status
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, StorageError):
            raise cause from err
        raise ConfigError(str(cause).strip().splitlines()[0]) from err
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from err
    except OmegaConfBaseException as err:
        raise ConfigError(config_error_message(err)) from err
    return datamodule, module


def ensure_prepared(cfg: DictConfig, prepared: PreparedDir) -> None:
    """Prepare the data first when it is missing and ``prepare_if_missing`` is set (every rank of a
    multi-rank launch takes its share; ranks > 0 return once rank 0 has written meta.json)."""
    if prepared.is_prepared():
        return
    if not cfg.prepare_if_missing:
        raise ConfigError(
            f"no prepared data at {prepared.root}; run python -m ditlab.prepare data={cfg.data.name} "
            f"vae={cfg.vae.name} (or set prepare_if_missing=true)"
        )
    log.info(f"{prepared.root} is not prepared yet: preparing it first")
    try:
        prepare_from_config(cfg)
    except WaitTimeout as err:
        raise ConfigError(str(err)) from err


def take_shape_from_data(model: DictConfig, datamodule: LatentDataModule) -> None:
    """Fill the model's null ``input_size``, ``in_channels`` and ``num_classes`` from the prepared
    data's meta.json (in place: the stored config holds them); values set stay, to be checked."""
    channels, height, _ = datamodule.latent_shape
    from_data = {"input_size": height, "in_channels": channels, "num_classes": datamodule.num_classes}
    taken = {key: value for key, value in from_data.items() if model.get(key) is None}
    for key, value in taken.items():
        model[key] = value
    if taken:
        log.info(
            f"model shape from the data: {', '.join(f'{k}={v}' for k, v in taken.items())} "
            f"(latents {'x'.join(map(str, datamodule.latent_shape))}, {datamodule.num_classes} classes "
            f"in {datamodule.path})"
        )


def choose_fid_extractor(protocol: DictConfig, configured: str | None, prepared: PreparedDir) -> None:
    """``fid_protocol.extractor=auto``: the feature space of the reference statistics at hand (in
    place): a given ``fid_protocol.reference`` file's, else the prepared dir's (the data config's
    extractor when the dir holds several), else none (FID off)."""
    if protocol.extractor != "auto":
        return
    if protocol.get("reference"):
        protocol.extractor = ReferenceStats.load(protocol.reference).extractor
        return
    held = [kind for kind in EXTRACTORS if prepared.reference(kind).is_file()]
    protocol.extractor = configured if configured in held else (held[0] if held else None)
    where = f"{prepared.reference(protocol.extractor)}" if protocol.extractor else f"none in {prepared.root}"
    log.info(f"FID reference statistics: {where} (fid_protocol.extractor={protocol.extractor})")


def sampling_kit(datamodule: LatentDataModule, prepared: PreparedDir) -> dict:
    """What every checkpoint carries besides weights and config, so that it samples and exports
    without the prepared dir: the codec (the small VAE's weights, or a pretrained VAE's id and
    scale, or the identity's scale) and the class names."""
    return {
        "codec": portable_codec(datamodule.meta["vae"], prepared.vae),
        "classes": [str(name) for name in datamodule.meta.get("classes", [])],
    }


def build_module(cfg: DictConfig, net: torch.nn.Module, record: CheckpointRecord | None = None):
    """The LightningModule of ``cfg.module`` around ``net``, with the configured objective and
    optimizer, storing ``record`` in its checkpoints."""
    module = instantiate(
        cfg.module,
        _partial_=True,
        net=net,
        objective=instantiate(cfg.diffusion.objective),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
    )
    return module(record=record)  # given outside Hydra, which would turn the dataclass into a DictConfig


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """``last``: the newest complete checkpoint of this run dir (None: start from scratch); a path: checked."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        found = find_resume_checkpoint(checkpoint_dir)
        if found is None:
            log.info(f"ckpt_path=last: no complete checkpoint in {checkpoint_dir} yet, starting from scratch")
            return None
        log.info(f"ckpt_path=last: resuming from {found}")
        return str(found)
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist; expected 'last' or a .ckpt file")
    return ckpt_path


def _checkpoint_dir(cfg: DictConfig) -> Path:
    configured = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath")
    return Path(configured) if configured else Path(cfg.paths.output_dir) / "checkpoints"


def train(cfg: DictConfig) -> dict:
    """Fit a run from a composed config; returns the final callback metrics."""
    try:
        trainer_cfg = hardware.select(cfg.trainer)  # trainer=auto: GPUs in bf16-mixed or the CPU in fp32
    except ValueError as err:
        raise ConfigError(str(err)) from err
    log.info(hardware.describe(trainer_cfg))
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    die_with_parent()
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, _checkpoint_dir(cfg))
    if ckpt_path and cfg.get("init_from"):
        log.info(f"resuming from {ckpt_path}: init_from is not applied again")
    datamodule, module = build(cfg, init_weights=ckpt_path is None)
    try:
        if ckpt_path:  # a truncated file, a crafted pickle, another model size: one line, before anything runs
            check_checkpoint_fits(read_checkpoint(ckpt_path, mmap=True), module, ckpt_path)
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [OneRunDir(output_dir)]
        loggers = [instantiate(c) for c in cfg.logger.values() if c is not None] if cfg.get("logger") else False
        trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers)
    except InstantiationException as err:
        raise ConfigError(str(err.__cause__ or err).strip().splitlines()[0]) from err
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from err
    except OmegaConfBaseException as err:
        raise ConfigError(config_error_message(err)) from err
    log_config(loggers, cfg)
    if trainer.world_size > 1:
        log.info(launch_line(trainer))
    n_params = sum(p.numel() for p in module.net.parameters())
    log.info(f"DiT with {n_params / 1e6:.2f}M parameters; output in {output_dir}")
    with ddp_children_run_this_job():
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except RuntimeError as err:
            raise_if_a_rank_was_lost(err, trainer)
            raise
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


@hydra_command("ditlab.train", "train")
def main(cfg: DictConfig) -> float | None:
    """Returns the configured ``optimized_metric`` (e.g. the last ``val/fid_clf``) for Hydra sweepers."""
    try:
        metrics = train(cfg)
        # rank 0 answers the sweeper; the DDP children of a job just finish
        return optimized_metric_value(metrics, cfg.get("optimized_metric")) if rank_zero_only.rank == 0 else None
    except (ConfigError, RunDirsDiffer, CheckpointReadError, MetricNotLogged) as err:
        fail("ditlab.train", str(err))  # the fresh run dir goes too (kept when it holds anything else)
    except Preempted as stop:
        if rank_zero_only.rank == 0:  # one line, not one per rank
            print(f"ditlab.train: {stop}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except NonFiniteTraining as err:
        fail("ditlab.train", str(err), code=3, remove_run_dir=False)
    except CheckpointWriteError as err:
        fail("ditlab.train", err.strerror or str(err), code=4, remove_run_dir=False)
    except LostRank as err:
        fail("ditlab.train", str(err), code=LOST_RANK_EXIT, remove_run_dir=False)
    except StorageError as err:  # the object store refused or stopped answering (after its retries)
        fail("ditlab.train", str(err), code=err.exit_code)


if __name__ == "__main__":
    main()
