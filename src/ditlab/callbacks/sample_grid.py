"""A fixed grid of samples: one row per class, the same noise every time (sample i's own stream),
so the grids of one run show the model's progress. Saved as PNG in the run dir and sent to the
loggers. Thin: the sampling is ``ditlab.inference.generate``."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from ditlab.callbacks.sampling import SamplingCallback
from ditlab.diffusion import Guidance, Sampler
from ditlab.inference import generate, grid_image, grid_labels, save_grid


class SampleGrid(SamplingCallback):
    """``per_class`` samples of each of the first ``max_classes`` classes, one row per class, written
    to ``out_dir/step_<N>.png`` with ``sampler`` and ``guidance`` (its noise from ``seed``); the other
    arguments are ``SamplingCallback``'s."""

    def __init__(
        self,
        out_dir: str,
        sampler: Sampler,
        guidance: Guidance = Guidance(),
        every_n_steps: int = 1000,
        per_class: int = 8,
        max_classes: int = 10,
        seed: int = 0,
        **when,
    ):
        super().__init__(every_n_steps, **when)
        self.out_dir = Path(out_dir)
        self.sampler = sampler
        self.guidance = guidance
        self.per_class = per_class
        self.max_classes = max_classes
        self.seed = seed
        self.last_path: Path | None = None

    def on_fit_start(self, trainer, pl_module):
        self.sampler.check(pl_module.objective)

    @torch.no_grad()
    def sample_now(self, trainer, pl_module) -> Path | None:
        net = self.sampling_net(pl_module)  # every rank: collective under sharding
        if not trainer.is_global_zero:
            return None
        dm = trainer.datamodule
        labels = grid_labels(dm.num_classes, self.per_class, self.max_classes)
        images = generate(
            net,
            pl_module.objective,
            self.sampler,
            labels,
            torch.arange(len(labels)),
            latent_shape=dm.latent_shape,
            null_label=dm.num_classes,
            codec=self.codec(trainer, pl_module),
            guidance=self.guidance,
            seed=self.seed,
            batch_size=len(labels),
            device=pl_module.device,
        )
        grid = grid_image(images, self.per_class)
        self.last_path = save_grid(grid, self.out_dir / f"step_{trainer.global_step:07d}.png")
        caption = f"{self.weights} weights, one row per class"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples/grid", images=[grid], step=trainer.global_step, caption=[caption])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", grid, trainer.global_step)
        return self.last_path
