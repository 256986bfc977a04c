"""DiTModule: network + training objective + optimizer + EMA bookkeeping, nothing else.

The diffusion math lives in ``ditlab.diffusion``; sampling, grids and metrics live in callbacks.
Randomness (timesteps, noise, label dropout) is reseeded every step from (seed, rank, step), so
that a resumed run continues the very same random stream (EDM2's practice).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning import LightningModule

from ditlab.lit.ema import EMA
from ditlab.runtime import at_optimizer_step, step_seed


class DiTModule(LightningModule):
    """Args:
    net: the DiT (a plain nn.Module).
    objective: ``GaussianDiffusion`` or ``FlowMatching`` (``sample_t``, ``training_losses``).
    optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_``).
    scheduler: optional factory ``optimizer -> LRScheduler``, stepped every optimizer step.
    ema_decay / ema_warmup: the EMA of the weights (kept in fp32, in the checkpoint).
    compile: apply ``torch.compile`` to the network from outside (``configure_model``).
    seed: base of the per-step seeds.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        objective,
        optimizer: Callable,
        scheduler: Callable | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        compile: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.net = net
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.ema = EMA(net, ema_decay, ema_warmup)
        self.compile = compile
        self.seed = seed
        self.config_yaml: str | None = None  # the resolved run config, stored in every checkpoint
        self._forward = net

    # ------------------------------------------------------------ set-up from outside the model
    def configure_model(self) -> None:
        if self.compile and self._forward is self.net:
            self._forward = torch.compile(self.net)

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int):
        latents, labels = batch  # (N, C, H, W) model-space latents, (N,) labels
        torch.manual_seed(step_seed(self.seed, self.global_rank, self.global_step, batch_idx))
        t = self.objective.sample_t(latents.shape[0], device=latents.device)
        terms = self.objective.training_losses(self._forward, latents, t, {"y": labels})
        loss = terms["loss"].mean()
        # sync_dist: the logged value is the mean over ranks, not rank 0's (fast-DiT logged rank 0's).
        for name, value in terms.items():
            self.log(
                f"train/{name}", value.mean(), on_step=True, on_epoch=False, sync_dist=True, prog_bar=name == "loss"
            )
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per optimizer step (gradient accumulation: only on the step boundary).
        if at_optimizer_step(self.trainer, every_n_steps=1):
            self.ema.update(self.net)

    def validation_step(self, batch, batch_idx: int):
        latents, labels = batch
        torch.manual_seed(step_seed(self.seed, self.global_rank, -1, batch_idx))  # -1: validation
        t = self.objective.sample_t(latents.shape[0], device=latents.device)
        terms = self.objective.training_losses(self.ema.net, latents, t, {"y": labels})
        self.log("val/loss_ema", terms["loss"].mean(), on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ditlab"] = {
            "config_yaml": self.config_yaml,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("ditlab", {}).get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
