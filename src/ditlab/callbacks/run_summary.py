"""Writes the run's final metrics to ``metrics.json`` in the run dir (``runtime.files.write_json``:
atomically, and always valid JSON: a non-finite value such as a NaN loss is written as null)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lightning import Callback
from lightning.pytorch.utilities import rank_zero_only

from ditlab.callbacks.sampling import SamplingCallback
from ditlab.callbacks.throughput import Throughput
from ditlab.runtime.files import write_json
from ditlab.runtime.sweeps import job_overrides

log = logging.getLogger("ditlab.train")



class RunSummary(Callback):
    def __init__(self, path: str, optimized_metric: str | None = None):
        self.path = Path(path)
        self.optimized_metric = optimized_metric
        self._start = time.time()

    def on_fit_start(self, trainer, pl_module):
        self._start = time.time()

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A stopped run (non-finite streak, preemption, full disk) still leaves a valid metrics.json."""
        try:
            self._write(trainer, pl_module, status=f"stopped: {type(exception).__name__}")
        except OSError:
            pass  # e.g. the disk is full: the exception being handled is the one to report

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        status = "finished"
        if 0 < trainer.global_step < trainer.max_steps:
            # Lightning stopped before max_steps (trainer.max_time, max_epochs): the run computed less
            # than its config says, which metrics.json and the log's last line must not hide.
            status = (
                f"stopped early at step {trainer.global_step} of trainer.max_steps={trainer.max_steps} "
                f"(trainer.max_time or trainer.max_epochs={trainer.max_epochs} came first)"
            )
        summary = self._write(trainer, pl_module, status=status)
        for line in headline(summary["metrics"]):
            log.info(line)
        if status != "finished":
            log.warning(f"ditlab.train: {status}; the results above are those of a shorter run")

    def _write(self, trainer, pl_module, status: str) -> dict:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        summary = {
            "global_step": trainer.global_step,
            "status": status,
            "fit_seconds": round(time.time() - self._start, 1),
            "metrics": metrics,
            # which weights each sampling callback used (grids, FID): "ema" or "raw"
            "weights_used": {
                type(cb).__name__: cb.weights for cb in trainer.callbacks if isinstance(cb, SamplingCallback)
            },
        }
        for cb in trainer.callbacks:
            if isinstance(cb, SamplingCallback):
                summary.update(cb.summary_entries())  # e.g. the FID's protocol as measured
        # the job's overrides (a sweep's values among them): what distinguishes this run from its siblings
        summary["overrides"] = job_overrides()
        if self.optimized_metric:
            summary["optimized_metric"] = {"name": self.optimized_metric, "value": metrics.get(self.optimized_metric)}
        nonfinite = getattr(pl_module, "nonfinite", None)
        if nonfinite is not None:
            summary["skipped_nonfinite_steps"] = nonfinite.skipped
        for cb in trainer.callbacks:
            if isinstance(cb, Throughput):
                summary["images_seen"] = cb.images_seen
        summary["headline"] = headline(metrics)
        write_json(self.path, summary)
        return summary


def headline(metrics: dict[str, float]) -> list[str]:
    """The final FID-type numbers in words, with their intervals and the metric's floor: the run's
    last log lines and metrics.json's ``headline``."""
    lines = []
    for name in ("fid", "fid_clf"):
        value = metrics.get(f"val/{name}")
        if value is None:
            continue
        text = f"final {name} {value:.3f}"
        if f"val/{name}_se" in metrics:
            low, high = metrics[f"val/{name}_ci_low"], metrics[f"val/{name}_ci_high"]
            text += f" (se {metrics[f'val/{name}_se']:.3f}; interval [{low:.3f}, {high:.3f}])"
        if f"val/{name}_floor" in metrics:
            floor, spread = metrics[f"val/{name}_floor"], metrics[f"val/{name}_floor_sd"]
            text += f"; floor at the same N: {floor:.3f} (sd {spread:.3f}), real held-out images"
        lines.append(text)
    suffix = "_clf"
    if f"val/sample_accuracy{suffix}" in metrics:
        text = f"sample accuracy {metrics[f'val/sample_accuracy{suffix}']:.3f}"
        if f"val/classifier_accuracy{suffix}" in metrics:
            text += f" (the classifier on real images: {metrics[f'val/classifier_accuracy{suffix}']:.3f})"
        lines.append(text)
    return lines
