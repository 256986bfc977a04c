"""Images/s and images seen (progress counted in images, as EDM2 does)."""

from __future__ import annotations

import time

from lightning import Callback

from ditlab.training.cadence import logs_at, on_progress_bar


class Throughput(Callback):
    def __init__(self, window_steps: int = 20):
        self.window_steps = window_steps
        self.images_seen = 0
        self._window_start: float | None = None
        self._window_images = 0
        self._rate: float | None = None  # img/s of the last complete window

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = batch[0].shape[0] * trainer.world_size  # global images in this step (all its micro-batches)
        self.images_seen += n
        self._window_images += n
        if (batch_idx + 1) % self.window_steps == 0:
            elapsed = time.perf_counter() - self._window_start
            self._rate = self._window_images / elapsed
            self._window_start, self._window_images = time.perf_counter(), 0
        # Logged only on the steps the loggers write: a logged number is copied to the device, and
        # that copy waits for the queued GPU work (a host sync the other steps must not pay).
        if logs_at(trainer, trainer.global_step):
            pl_module.log("train/images_seen", float(self.images_seen), on_step=True, on_epoch=False)
            if self._rate is not None:
                bar = on_progress_bar(pl_module)
                pl_module.log("train/img_per_s", self._rate, on_step=True, on_epoch=False, prog_bar=bar)

    def state_dict(self):
        return {"images_seen": self.images_seen}

    def load_state_dict(self, state_dict):
        self.images_seen = int(state_dict["images_seen"])
