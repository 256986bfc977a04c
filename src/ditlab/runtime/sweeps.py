"""What a run tells a sweep: its overrides, its hyperparameters, its optimized metric, its config
without the seed (the W&B group, the row of ``ditlab report``); and one sweep dir when the jobs of a
sweep run on several devices.

Lightning's DDP launcher starts ranks 1..N-1 by re-running ``sys.argv``; in a Hydra multirun that
is the whole sweep command (``-m`` and every sweep value), so each child ran a sweep of its own in
a second, newly timestamped sweep dir. ``ddp_children_run_this_job`` makes the children re-run
exactly this job, in this job's dir: one sweep, one dir, every rank's log in its job; afterwards
the process group and the launcher's environment variables go, so the next job launches afresh.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
from contextlib import contextmanager

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

log = logging.getLogger("ditlab.train")


def _hydra_config():
    return HydraConfig.get() if HydraConfig.initialized() else None


def job_overrides() -> list[str]:
    """The command-line (and sweep) overrides of this job, [] outside a Hydra app."""
    hc = _hydra_config()
    return list(hc.overrides.task) if hc is not None else []


# Overrides that do not change what a run computes, besides its seed: where it writes, how it resumes.
NOT_CONFIG = ("seed", "run_name", "ckpt_path", "hydra.", "paths.")
DEFAULTS_GROUP = "defaults"  # the group of a run without overrides
WANDB_GROUP_CHARS = 128  # W&B's limit on a group's name


def config_overrides(overrides: list[str]) -> list[str]:
    """A run's overrides that make its config, less its seed (``NOT_CONFIG``), sorted."""
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if not any(key == name or (name.endswith(".") and key.startswith(name)) for name in NOT_CONFIG):
            kept.append(item)
    return sorted(kept)


def config_group(overrides: list[str]) -> str:
    """The config of a run without its seed, from its overrides: ``"model=dit_s2 optim.optimizer.lr=1e-4"``
    for ``["seed=1", "optim.optimizer.lr=1e-4", "model=dit_s2"]``; runs that differ only in their seed
    share it (their W&B ``group``, their row of ``ditlab report``)."""
    return " ".join(config_overrides(overrides)) or DEFAULTS_GROUP


def wandb_group(overrides: list[str]) -> str:
    """``config_group`` within W&B's 128 characters: a longer one is cut and ends in a hash of the whole."""
    group = config_group(overrides)
    if len(group) <= WANDB_GROUP_CHARS:
        return group
    digest = hashlib.blake2b(group.encode(), digest_size=4).hexdigest()
    return f"{group[: WANDB_GROUP_CHARS - len(digest) - 1]}-{digest}"


@contextmanager
def ddp_children_run_this_job():
    """Within a multirun job: the DDP children see this job's overrides (not the sweep's) and its dir."""
    hc = _hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        yield
        return
    argv, env, run_dir = sys.argv[:], dict(os.environ), hc.run.dir
    # Lightning appends hydra.run.dir=<hc.run.dir>, the job name and output_subdir=null to this argv.
    sys.argv = [argv[0], *hc.overrides.task, "hydra.mode=RUN"]
    with read_write(hc):
        hc.run.dir = hc.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hc):
            hc.run.dir = run_dir
        # The next job starts its own ranks: no process group, no LOCAL_RANK / MASTER_PORT left behind
        # (with LOCAL_RANK set, Lightning would take the processes as launched from outside).
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


def log_config(loggers, cfg: DictConfig) -> None:
    """The resolved run config as hyperparameters in every logger (W&B config, TensorBoard hparams,
    CSV hparams.yaml), so the runs of a sweep can be compared side by side."""
    if not loggers:
        return
    params = OmegaConf.to_container(cfg, resolve=True)
    params["overrides"] = job_overrides()
    for logger in loggers:
        logger.log_hyperparams(params)


class MetricNotLogged(ValueError):
    """The configured ``optimized_metric`` is not among the run's metrics."""


def optimized_metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a Hydra sweeper optimises: the run's last logged ``name`` (e.g. ``val/fid_clf``)."""
    if not name:
        return None
    if name not in metrics or not math.isfinite(metrics[name]):
        logged = sorted(k for k, v in metrics.items() if math.isfinite(v))
        raise MetricNotLogged(f"optimized_metric={name!r} was not logged (or not finite) in this run; logged: {logged}")
    log.info(f"optimized metric {name} = {metrics[name]:.6g}")
    return metrics[name]
