"""Writes the run's final metrics to ``metrics.json`` in the run dir (atomically)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning import Callback
from lightning.pytorch.utilities import rank_zero_only

from ditlab.callbacks.sampling import SamplingCallback
from ditlab.training.sweeps import job_overrides


class RunSummary(Callback):
    def __init__(self, path: str, objective: str | None = None):
        self.path = Path(path)
        self.objective = objective
        self._start = time.time()

    def on_fit_start(self, trainer, pl_module):
        self._start = time.time()

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        summary = {
            "global_step": trainer.global_step,
            "fit_seconds": round(time.time() - self._start, 1),
            "metrics": metrics,
            # which weights each sampling callback used (grids, FID): "ema" or "raw"
            "weights_used": {
                type(cb).__name__: cb.weights for cb in trainer.callbacks if isinstance(cb, SamplingCallback)
            },
        }
        # the job's overrides (a sweep's values among them): what distinguishes this run from its siblings
        summary["overrides"] = job_overrides()
        if self.objective:
            summary["objective"] = {"name": self.objective, "value": metrics.get(self.objective)}
        for cb in trainer.callbacks:
            if type(cb).__name__ == "Throughput":
                summary["images_seen"] = cb.images_seen
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.path)
