"""What the sampling callbacks (grid, FID) share: when to sample, with which weights, sampler,
guidance and seed, and the codec that decodes the run's latents. The sampling itself is
``ditlab.inference.generate``, called with ``sample_kwargs``."""

from __future__ import annotations

from lightning import Callback

from ditlab.diffusion import Sampler
from ditlab.inference import Guidance
from ditlab.training.steps import at_optimizer_step


class SamplingCallback(Callback):
    """Args:
    sampler: the validated sampler (checked against the objective when fitting starts).
    every_n_steps: sample every N optimizer steps (0: only at the end); at_end: also after training.
    cfg_scale, guided_channels, guidance_interval: classifier-free guidance (``ditlab.inference.Guidance``).
    seed: base of the per-sample noise streams (the same images every time for the same weights).
    use_ema: sample with the EMA weights (default) or the raw ones.
    """

    def __init__(
        self,
        sampler: Sampler,
        every_n_steps: int,
        cfg_scale: float = 1.0,
        guided_channels: int | None = None,
        guidance_interval: tuple[float, float] | None = None,
        seed: int = 0,
        at_end: bool = True,
        use_ema: bool = True,
    ):
        self.sampler = sampler
        self.every_n_steps = every_n_steps
        self.guidance = Guidance(cfg_scale, guided_channels, guidance_interval)
        self.seed = seed
        self.at_end = at_end
        self.use_ema = use_ema
        self._codec = None

    def on_fit_start(self, trainer, pl_module):
        self.sampler.check(pl_module.objective)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if at_optimizer_step(trainer, self.every_n_steps):
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        # Not twice for the same weights: the last periodic run may have been at this very step.
        if self.at_end and (self.every_n_steps <= 0 or trainer.global_step % self.every_n_steps != 0):
            self.run(trainer, pl_module)

    def run(self, trainer, pl_module):
        raise NotImplementedError

    @property
    def weights(self) -> str:
        return "ema" if self.use_ema else "raw"

    def sample_kwargs(self, trainer, pl_module) -> dict:
        """Everything ``generate`` needs besides labels and sample indices. Call it on every rank."""
        from ditlab.models.vae import codec_from_meta

        dm = trainer.datamodule
        if self._codec is None:
            self._codec = codec_from_meta(dm.meta, dm.path).to(pl_module.device)
        return dict(
            # Full plain weights on this rank; collective under sharding, so every rank asks.
            net=pl_module.sampling_net(self.use_ema),
            objective=pl_module.objective,
            sampler=self.sampler,
            latent_shape=dm.latent_shape,
            null_label=dm.num_classes,
            codec=self._codec,
            guidance=self.guidance,
            seed=self.seed,
            device=pl_module.device,
        )
