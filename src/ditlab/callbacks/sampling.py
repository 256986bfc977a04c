"""What the sampling callbacks (grid, FID) share: when to sample, with which weights, and the codec
that decodes the run's latents. The sampling itself is ``ditlab.inference.generate``."""

from __future__ import annotations

from lightning import Callback

from ditlab.models.vae import codec_from_record
from ditlab.training.cadence import at_optimizer_step


class SamplingCallback(Callback):
    """Args:
    every_n_steps: sample every N optimizer steps (0: only at the end); at_end: also after training.
    use_ema: sample with the EMA weights (default) or the raw ones.
    """

    def __init__(self, every_n_steps: int, at_end: bool = True, use_ema: bool = True):
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.use_ema = use_ema
        self._codec = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if at_optimizer_step(trainer, self.every_n_steps):
            self.sample_now(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        # Not twice for the same weights: the last periodic run may have been at this very step.
        if self.at_end and (self.every_n_steps <= 0 or trainer.global_step % self.every_n_steps != 0):
            self.sample_now(trainer, pl_module)

    def sample_now(self, trainer, pl_module):
        raise NotImplementedError

    def summary_entries(self) -> dict:
        """What this callback adds to the run's metrics.json (``RunSummary``); nothing by default."""
        return {}

    @property
    def weights(self) -> str:
        return "ema" if self.use_ema else "raw"

    def sampling_net(self, pl_module):
        """Full plain weights on this rank; collective under sharding, so every rank asks."""
        return pl_module.sampling_net(self.use_ema)

    def codec(self, trainer, pl_module):
        """The codec that decodes the run's latents (built once)."""
        if self._codec is None:
            dm = trainer.datamodule
            self._codec = codec_from_record(dm.meta["vae"], dm.prepared.vae).to(pl_module.device)
        return self._codec
