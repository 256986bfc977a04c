"""Callbacks the tests add to a run from the command line (``+callbacks.probe._target_=probes.LossProbe``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning import Callback


class LossProbe(Callback):
    """Appends every rank's own training loss of every step to ``<dir>/loss_rank<r>.jsonl``."""

    def __init__(self, dir: str):
        self.dir = Path(dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"loss_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step - 1, "loss": float(outputs["loss"])}) + "\n")


# The Python-level collectives of torch.distributed (DDP's buffer broadcast included); DDP's gradient
# all-reduce runs in its C++ reducer and is not among them: what is counted is everything but the gradients.
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "scatter",
    "reduce",
    "reduce_scatter_tensor",
    "all_to_all",
    "barrier",
    "_broadcast_coalesced",
)


class CollectiveProbe(Callback):
    """Counts every rank's torch.distributed collectives per training batch (from the batch's start to
    the next batch's, its after-step hooks included) and whether Lightning logs that step; written at
    the end of training to ``<dir>/collectives_rank<r>.json`` as a list of {batch, logs, calls}."""

    def __init__(self, dir: str):
        self.dir = Path(dir)
        self.batches: list[dict] = []
        self._originals: dict = {}

    def _counting(self, name, original):
        def call(*args, **kwargs):
            if self.batches:
                calls = self.batches[-1]["calls"]
                calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        return call

    def on_train_start(self, trainer, pl_module):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for module in (dist, c10d):
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is not None:
                    self._originals[(module, name)] = original
                    setattr(module, name, self._counting(name, original))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        logs = trainer._logger_connector.should_update_logs  # Lightning's own rule, as the module asks it
        self.batches.append({"batch": len(self.batches), "logs": bool(logs), "calls": {}})

    def on_train_end(self, trainer, pl_module):
        for (module, name), original in self._originals.items():
            setattr(module, name, original)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"collectives_rank{trainer.global_rank}.json").write_text(json.dumps(self.batches, indent=1))


class SlowSteps(Callback):
    """Sleeps ``seconds`` after every training step: a run that lasts long enough for a scheduler's
    signal or time limit to reach it mid-run, at no CPU cost (the weights do not change). ``restart``:
    only in that run of a requeued SLURM job (``SLURM_RESTART_COUNT``; 0: the first), the others at
    full speed."""

    def __init__(self, seconds: float, restart: int | None = None):
        self.seconds, self.restart = seconds, restart

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.restart is None or int(os.environ.get("SLURM_RESTART_COUNT") or 0) == self.restart:
            time.sleep(self.seconds)
