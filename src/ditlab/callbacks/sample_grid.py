"""A fixed grid of samples: one row per class, the same noise every time (sample i's own stream),
so the grids of one run show the model's progress. Saved as PNG in the run dir and sent to the
loggers. Thin: the sampling is ``ditlab.inference.generate``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning import Callback
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from ditlab.diffusion import Sampler
from ditlab.inference import Guidance, generate
from ditlab.training.steps import at_optimizer_step


class SampleGrid(Callback):
    def __init__(
        self,
        out_dir: str,
        sampler: Sampler,
        every_n_steps: int = 1000,
        per_class: int = 8,
        max_classes: int = 10,
        cfg_scale: float = 1.0,
        guided_channels: int | None = None,
        seed: int = 0,
        at_end: bool = True,
        use_ema: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.sampler = sampler
        self.every_n_steps = every_n_steps
        self.per_class = per_class
        self.max_classes = max_classes
        self.guidance = Guidance(cfg_scale, guided_channels)
        self.seed = seed
        self.at_end = at_end
        self.use_ema = use_ema  # sample with the EMA weights (default) or the raw ones
        self._codec = None
        self.last_path: Path | None = None

    def on_fit_start(self, trainer, pl_module):
        self.sampler.check(pl_module.objective)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if at_optimizer_step(trainer, self.every_n_steps):
            self.make_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.at_end:
            self.make_grid(trainer, pl_module)

    @rank_zero_only
    @torch.no_grad()
    def make_grid(self, trainer, pl_module) -> Path:
        from ditlab.models.vae import codec_from_meta

        dm = trainer.datamodule
        if self._codec is None:
            self._codec = codec_from_meta(dm.meta, dm.path).to(pl_module.device)
        labels = torch.arange(min(dm.num_classes, self.max_classes)).repeat_interleave(self.per_class)  # row per class
        images = generate(
            pl_module.ema.net if self.use_ema else pl_module.net,
            pl_module.objective,
            self.sampler,
            labels,
            torch.arange(len(labels)),
            latent_shape=dm.latent_shape,
            null_label=dm.num_classes,
            codec=self._codec,
            guidance=self.guidance,
            seed=self.seed,
            batch_size=len(labels),
            device=pl_module.device,
        )
        grid = make_grid((images + 1) / 2, nrow=self.per_class, padding=2, pad_value=1.0)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{trainer.global_step:07d}.png"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
        save_image(grid, tmp)
        tmp.replace(path)
        self.last_path = path
        caption = f"{'EMA' if self.use_ema else 'raw'} weights, one row per class"
        for logger in trainer.loggers:
            _log_image(logger, grid, trainer.global_step, caption)
        return path


def _log_image(logger, grid: torch.Tensor, step: int, caption: str) -> None:
    name = type(logger).__name__
    if name == "WandbLogger":
        logger.log_image(key="samples/grid", images=[grid], step=step, caption=[caption])
    elif name == "TensorBoardLogger":
        logger.experiment.add_image("samples/grid", grid, step)
