"""A fixed grid of samples: one row per class, the same noise every time (sample i's own stream),
so the grids of one run show the model's progress. Saved as PNG in the run dir and sent to the
loggers. Thin: the sampling is ``ditlab.inference.generate``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from ditlab.callbacks.sampling import SamplingCallback
from ditlab.diffusion import Sampler
from ditlab.inference import generate


class SampleGrid(SamplingCallback):
    """``per_class`` samples of each of the first ``max_classes`` classes, one row per class, written
    to ``out_dir/step_<N>.png``; the other arguments are ``SamplingCallback``'s."""

    def __init__(
        self,
        out_dir: str,
        sampler: Sampler,
        every_n_steps: int = 1000,
        per_class: int = 8,
        max_classes: int = 10,
        **sampling,
    ):
        super().__init__(sampler, every_n_steps, **sampling)
        self.out_dir = Path(out_dir)
        self.per_class = per_class
        self.max_classes = max_classes
        self.last_path: Path | None = None

    @torch.no_grad()
    def run(self, trainer, pl_module) -> Path | None:
        # Every rank gathers the weights (collective under sharding); rank 0 samples and writes.
        kwargs = self.sample_kwargs(trainer, pl_module)
        if not trainer.is_global_zero:
            return None
        dm = trainer.datamodule
        labels = torch.arange(min(dm.num_classes, self.max_classes)).repeat_interleave(self.per_class)  # row per class
        images = generate(labels=labels, indices=torch.arange(len(labels)), batch_size=len(labels), **kwargs)
        grid = make_grid((images + 1) / 2, nrow=self.per_class, padding=2, pad_value=1.0)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{trainer.global_step:07d}.png"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
        save_image(grid, tmp)
        tmp.replace(path)
        self.last_path = path
        caption = f"{self.weights} weights, one row per class"
        for logger in trainer.loggers:
            _log_image(logger, grid, trainer.global_step, caption)
        return path


def _log_image(logger, grid: torch.Tensor, step: int, caption: str) -> None:
    name = type(logger).__name__
    if name == "WandbLogger":
        logger.log_image(key="samples/grid", images=[grid], step=step, caption=[caption])
    elif name == "TensorBoardLogger":
        logger.experiment.add_image("samples/grid", grid, step)
