"""Callbacks the tests add to a run from the command line (``+callbacks.probe._target_=probes.LossProbe``)."""

from __future__ import annotations

import json
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
