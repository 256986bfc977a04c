"""DiTModule: network + training objective + optimizer + EMA bookkeeping, nothing else.

The diffusion math lives in ``ditlab.diffusion``; sampling, grids and metrics live in callbacks.
Every random draw of a step comes from its own named stream (``ditlab.seeding``): timesteps,
diffusion noise and label dropout, each seeded from (seed, stream, rank, step, micro-batch), so a
resumed run continues the very same random streams (EDM2's practice) and no two streams coincide.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning import LightningModule

from ditlab.seeding import stream_generator, stream_seed
from ditlab.training.ema import EMA
from ditlab.training.nonfinite import NonFiniteSteps


class DiTModule(LightningModule):
    """Args:
    net: the DiT (a plain nn.Module).
    objective: ``GaussianDiffusion`` or ``FlowMatching`` (``sample_t``, ``training_losses``).
    optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_``).
    scheduler: optional factory ``optimizer -> LRScheduler``, stepped every optimizer step.
    ema_decay / ema_warmup: the EMA of the weights (kept in fp32, in the checkpoint).
    compile: apply ``torch.compile`` to the network from outside (``configure_model``).
    seed: base of the per-step seeds.
    max_nonfinite_steps: stop after this many non-finite steps in a row (each one is skipped).
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
        max_nonfinite_steps: int = 10,
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
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        self._loss: torch.Tensor | None = None

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
        at = (self.global_rank, self.global_step, batch_idx % self.trainer.accumulate_grad_batches)
        device = latents.device
        t = self.objective.sample_t(
            latents.shape[0], device=device, generator=stream_generator(device, self.seed, "timesteps", *at)
        )
        noise = torch.randn(
            latents.shape, device=device, generator=stream_generator(device, self.seed, "diffusion_noise", *at)
        )
        # Label dropout draws inside the model (torch.rand): give it its own stream through the global RNG.
        torch.manual_seed(stream_seed(self.seed, "label_dropout", *at))
        terms = self.objective.training_losses(self._forward, latents, t, {"y": labels}, noise=noise)
        loss = terms["loss"].mean()
        # sync_dist: the logged value is the mean over ranks, not rank 0's (fast-DiT logged rank 0's).
        for name, value in terms.items():
            self.log(
                f"train/{name}", value.mean(), on_step=True, on_epoch=False, sync_dist=True, prog_bar=name == "loss"
            )
        self._loss = loss.detach()
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)
        if self.nonfinite.check(self._loss, norm):  # skip: drop every gradient, the optimizer updates nothing
            optimizer.zero_grad(set_to_none=True)
        self.log("train/skipped_steps", float(self.nonfinite.skipped + self.nonfinite.skip_this_step), on_step=True)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Here, not in on_train_batch_end: Lightning runs the checkpoint callback's batch-end hook
        # before the module's, so a checkpoint at step N would hold the EMA after N - 1 updates.
        if self.nonfinite.end_step(self.global_step):  # a skipped (non-finite) step leaves the EMA alone
            self.ema.update(self.net)

    def validation_step(self, batch, batch_idx: int):
        latents, labels = batch
        at = (self.global_rank, self.global_step, batch_idx)
        device = latents.device
        t = self.objective.sample_t(
            latents.shape[0], device=device, generator=stream_generator(device, self.seed, "val_timesteps", *at)
        )
        noise = torch.randn(
            latents.shape, device=device, generator=stream_generator(device, self.seed, "val_diffusion_noise", *at)
        )
        terms = self.objective.training_losses(self.ema.net, latents, t, {"y": labels}, noise=noise)
        self.log("val/loss_ema", terms["loss"].mean(), on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ditlab"] = {
            "config_yaml": self.config_yaml,
            "nonfinite": self.nonfinite.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite.load_state_dict(checkpoint.get("ditlab", {}).get("nonfinite", {}))
        rng = checkpoint.get("ditlab", {}).get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
