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

import copy
import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ditlab.data.datamodule import check_model_fits
from ditlab.data.prepared import PreparedDir
from ditlab.data.storage import StorageError
from ditlab.metrics.fidelity import EXTRACTORS
from ditlab.metrics.reference import ReferenceStats
from ditlab.models.vae import portable_codec
from ditlab.pipelines.prepare import prepare_from_config
from ditlab.runtime import hardware
from ditlab.runtime.checkpoints import (
    CheckpointReadError,
    CheckpointWriteError,
    check_checkpoint_fits,
    find_resume_checkpoint,
    read_checkpoint,
)
from ditlab.runtime.errors import MOVED_OPTIONS, ConfigError, config_errors, fail, hydra_command, moved_option
from ditlab.runtime.job import OneRunDir, RunDirsDiffer, launch_line, raise_if_a_rank_was_lost
from ditlab.runtime.preemption import PREEMPTED_EXIT, Preempted
from ditlab.runtime.processes import LOST_RANK_EXIT, LostRank, WaitTimeout, die_with_parent
from ditlab.runtime.record import record_of_run
from ditlab.runtime.sweeps import MetricNotLogged, ddp_children_run_this_job, log_config, optimized_metric_value
from ditlab.training.finetune import apply_finetune, check_source
from ditlab.training.nonfinite import NonFiniteTraining

__all__ = ["ConfigError", "build", "build_module", "main", "resolve", "train"]

log = logging.getLogger("ditlab.train")
# What building a run may raise for a bad config (one line); an object the config could not build is
# judged by any cause.
BUILD_ERRORS = (ValueError, TypeError, FileNotFoundError)
# A GradScaler (fp16) unscales inside the optimizer step, after the step measured and clipped the gradients.
SCALED_PRECISIONS = ("16", "16-mixed")
# Lightning asks a manual-optimization module to keep its pre-step weights for periodic checkpoints;
# ditlab's checkpoint of step N holds the weights after N updates by design (what a resume continues
# from), so that warning and its code listing would only puzzle a user.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


def build(cfg: DictConfig, init_weights: bool = True):
    """The data module and the LightningModule of a composed config: prepares the data when it is
    missing, resolves the config against it (``resolve``), builds. Raises ConfigError on a bad
    config. ``init_weights``: apply ``init_from`` (off when the run resumes from a checkpoint anyway)."""
    prepared = prepared_data(cfg, init_weights)
    return build_resolved(resolve(cfg, prepared), prepared, init_weights)


def prepared_data(cfg: DictConfig, init_weights: bool = True) -> PreparedDir:
    """The run's prepared dir, prepared first when it is missing and ``prepare_if_missing`` is set
    (every rank of a multi-rank launch takes its share; ranks > 0 return once rank 0 has written
    meta.json); a bad ``init_from`` fails before that."""
    if init_weights and cfg.get("init_from"):
        try:
            check_source(cfg.init_from)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from err
    # s3://: the same local cache as the datamodule's (the VAE, classifier and statistics read below)
    prepared = PreparedDir(cfg.data.prepared_dir, OmegaConf.select(cfg, "data.module.cache_dir"))
    if prepared.is_prepared():
        return prepared
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
    return prepared


def resolve(cfg: DictConfig, prepared: PreparedDir) -> DictConfig:
    """``cfg`` with what the prepared data decides filled in, and checked: the model's input size,
    latent channels and class count from meta.json (a value set is checked against it instead), the
    FID's extractor (``fid_protocol.extractor=auto``: the reference statistics at hand), and the
    options that must agree with the data or moved. Nothing is built or written and ``cfg`` is left
    as it is (what is read: meta.json, the small VAE's recipe, which reference statistics exist).
    Resolving a resolved config changes nothing. Raises ConfigError."""
    resolved = copy.deepcopy(cfg)
    with config_errors(BUILD_ERRORS, causes=(Exception,)):
        check_trainer_options(resolved)
        meta = prepared.read_meta()
        recipe = instantiate(resolved.vae.recipe) if resolved.vae.get("recipe") else None
        codec_path = OmegaConf.select(resolved, "vae.codec.path")
        prepared.check_vae_matches(resolved.vae.name, recipe, codec_path, meta)
        take_shape_from_data(resolved.model, meta, resolved.data.module.path)
        m = resolved.model
        check_model_fits(meta, resolved.data.module.path, m.input_size, m.in_channels, m.patch_size, m.num_classes)
        if OmegaConf.select(resolved, "module.repa") is not None and not resolved.data.module.with_images:
            raise ValueError("repa needs each latent's clean image; expected data.module.with_images=true")
        configured = OmegaConf.select(resolved, "data.reference.extractor")
        choose_fid_extractor(resolved.fid_protocol, configured, prepared)
    return resolved


def check_trainer_options(cfg: DictConfig) -> None:
    """Clipping and accumulation are the module's (the training step does them: Lightning refuses its
    own under manual optimization); fp16's GradScaler is refused."""
    for key in MOVED_OPTIONS:
        if (value := OmegaConf.select(cfg, key)) is not None:
            raise ValueError(moved_option(key, value))
    if str(cfg.trainer.get("precision")) in SCALED_PRECISIONS:
        raise ValueError(
            f"trainer.precision={cfg.trainer.precision}: fp16's gradient scaler is not supported; "
            "expected bf16-mixed, 32-true or null (picked by the hardware)"
        )


def build_resolved(cfg: DictConfig, prepared: PreparedDir, init_weights: bool = True):
    """The data module and the LightningModule of a resolved config (``resolve``)."""
    # Seeded after preparing: preparation draws random numbers (the small VAE, the classifier) on rank 0
    # alone, and a run that prepared its data must start from the weights of one that found it prepared.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with config_errors(BUILD_ERRORS, causes=(Exception,)):
        datamodule = instantiate(cfg.data.module)
        datamodule.check_data()
        net = instantiate(cfg.model)
        init_from = cfg.get("init_from") if init_weights else None
        apply_finetune(net, init_from, cfg.get("finetune"), instantiate(cfg.diffusion.objective) if init_from else None)
        record = record_of_run(cfg, **sampling_kit(datamodule.meta, prepared))  # the shape and extractor resolved
        module = build_module(cfg, net, record=record)
        instantiate(cfg.sampler).check(module.objective)
        if getattr(module.objective, "learn_sigma", False) != net.learn_sigma:
            raise ValueError(
                f"model.learn_sigma={net.learn_sigma} does not fit the {cfg.diffusion.objective._target_}"
                " objective; leave it at ${diffusion.learn_sigma}"
            )
    return datamodule, module


def take_shape_from_data(model: DictConfig, meta: dict, path: str) -> None:
    """Fill the model's null ``input_size``, ``in_channels`` and ``num_classes`` from the prepared
    data's meta.json (in place); values set stay, to be checked."""
    channels, height, _ = meta["latent_shape"]
    from_data = {"input_size": height, "in_channels": channels, "num_classes": meta["num_classes"]}
    taken = {key: value for key, value in from_data.items() if model.get(key) is None}
    for key, value in taken.items():
        model[key] = value
    if taken:
        log.info(
            f"model shape from the data: {', '.join(f'{k}={v}' for k, v in taken.items())} "
            f"(latents {'x'.join(map(str, meta['latent_shape']))}, {meta['num_classes']} classes in {path})"
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


def sampling_kit(meta: dict, prepared: PreparedDir) -> dict:
    """What every checkpoint carries besides weights and config, so that it samples and exports
    without the prepared dir: the codec (the small VAE's weights, or a pretrained VAE's id and
    scale, or the identity's scale) and the class names."""
    return {
        "codec": portable_codec(meta["vae"], prepared.vae),
        "classes": [str(name) for name in meta.get("classes", [])],
    }


def build_module(cfg: DictConfig, net: torch.nn.Module, **extra):
    """The LightningModule of ``cfg.module`` around ``net``, with the configured objective and
    optimizer; ``extra``: more constructor arguments (``record``: a dataclass, given outside Hydra,
    which would turn it into a config node)."""
    make_module = instantiate(cfg.module, _partial_=True)  # called below: plain objects, not config nodes
    return make_module(
        net=net,
        objective=instantiate(cfg.diffusion.objective),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        **extra,
    )


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
    prepared = prepared_data(cfg, init_weights=ckpt_path is None)
    cfg = resolve(cfg, prepared)
    datamodule, module = build_resolved(cfg, prepared, init_weights=ckpt_path is None)
    with config_errors((ValueError, TypeError), causes=(Exception,)):
        if ckpt_path:  # a truncated file, a crafted pickle, another model size: one line, before anything runs
            check_checkpoint_fits(read_checkpoint(ckpt_path, mmap=True), module, ckpt_path)
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [OneRunDir(output_dir)]
        loggers = [instantiate(c) for c in cfg.logger.values() if c is not None] if cfg.get("logger") else False
        trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers)
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
    except ConfigError as err:  # bad input, or an object store that refused (its own exit status);
        fail("ditlab.train", str(err), code=err.exit_code)  # the fresh run dir goes too (kept when it holds more)
    except (RunDirsDiffer, CheckpointReadError, MetricNotLogged) as err:
        fail("ditlab.train", str(err))
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
