"""A job of several ranks, seen from the trainer: which launcher started them, that they write one run
dir, and which rank is gone when a collective fails."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ditlab.runtime.processes import LostRank, lost_rank_message, lost_ranks, peer_gone


class RunDirsDiffer(ValueError):
    """The ranks of one job composed different run dirs."""


class OneRunDir(L.Callback):
    """Every rank of a job must write to one run dir: rank 0 writes the checkpoints there and every
    rank resumes from them (``ckpt_path=last``). Ranks started apart (torchrun or srun on several
    nodes) each compose their own config, and a default ``run_name`` (a timestamp) can differ between
    them: checked once, at set-up, with one collective."""

    def __init__(self, run_dir: Path):
        self.run_dir = str(Path(run_dir).resolve())

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size < 2 or not torch.distributed.is_initialized():
            return
        dirs = [None] * trainer.world_size
        torch.distributed.all_gather_object(dirs, self.run_dir)
        if len(set(dirs)) > 1:
            other = next(r for r, d in enumerate(dirs) if d != dirs[0])
            raise RunDirsDiffer(
                f"rank 0 writes to {dirs[0]} but rank {other} to {dirs[other]}; expected one run dir: give "
                "every node the same run_name=<name> (paths.root_dir on a filesystem they share)"
            )


def launch_line(trainer) -> str:
    """Which launcher started the ranks (Lightning's cluster environment) and where this one stands."""
    environment = trainer.strategy.cluster_environment
    nodes, per_node = trainer.num_nodes, trainer.world_size // max(trainer.num_nodes, 1)
    return (
        f"{trainer.world_size} processes ({nodes} node{'s' if nodes > 1 else ''} x {per_node}) started by "
        f"{type(environment).__name__}; this is rank {environment.global_rank()} on node {environment.node_rank()}"
    )


def raise_if_a_rank_was_lost(err: RuntimeError, trainer) -> None:
    """A collective that failed because another rank's process or node is gone becomes LostRank,
    naming that rank (asked through the job's store: the ranks that no longer answer)."""
    reason = peer_gone(err)
    if reason is None or trainer.world_size < 2:
        return
    store = torch.distributed.distributed_c10d._get_default_store() if torch.distributed.is_initialized() else None
    lost = lost_ranks(store, trainer.global_rank, trainer.world_size) if store is not None else None
    raise LostRank(
        lost_rank_message(trainer.global_rank, trainer.world_size, lost, trainer.global_step, reason)
    ) from err
