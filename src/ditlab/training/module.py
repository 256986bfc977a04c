"""DiTModule: network + training objective + optimizer + EMA bookkeeping, nothing else.

The diffusion math lives in ``ditlab.diffusion``; sampling, grids and metrics live in callbacks.
Every random draw of a step comes from its own named stream (``ditlab.seeding``): timesteps,
diffusion noise and label dropout, each seeded from (seed, stream, rank, step, micro-batch), so a
resumed run continues the very same random streams (EDM2's practice) and no two streams coincide.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from lightning import LightningModule
from torchmetrics.aggregation import MeanMetric

from ditlab.runtime.record import CheckpointRecord
from ditlab.seeding import stream_generator, stream_seed
from ditlab.training.cadence import logs_this_step, on_progress_bar
from ditlab.training.ema import EMA
from ditlab.training.nonfinite import NonFiniteSteps
from ditlab.training.parallel import checkpointed_blocks, is_sharded, parallelize, shard
from ditlab.training.repa import REPA
from ditlab.training.validation import FIXED_GRID, check_grid, fixed_loss_values, fixed_timestep_losses


class DiTModule(LightningModule):
    """Args:
    net: the DiT (a plain nn.Module).
    objective: ``GaussianDiffusion`` or ``FlowMatching`` (``sample_t``, ``training_losses``).
    optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_``).
    scheduler: optional factory ``optimizer -> LRScheduler``, stepped every optimizer step.
    ema_decay / ema_warmup: the EMA of the weights (kept in fp32, in the checkpoint).
    compile: ``torch.compile`` each DiT block (``configure_model``); None: on when training on a GPU.
    activation_checkpointing: recompute activations in backward: 0 off, 1 every block, k every k-th.
    seed: base of the per-step seeds.
    max_nonfinite_steps: stop after this many non-finite steps in a row (each one is skipped).
    repa: representation alignment (``training.repa.REPA``), or None; its loss is added to the
        objective's, its projector trains with the network (not in the EMA); batches then carry the
        clean images, (latents, labels, images).
    val_grid / val_seed: the fixed-timestep validation loss (``training.validation``): its times and its
        noise seed (not the run's: runs of other seeds measure alike).
    record: what reading a checkpoint needs (``runtime.record``: the architecture, the codec, the
        class names, the sampler, the resolved run config...), stored in every checkpoint.

    Parallelism is applied from outside in ``configure_model`` (``training.parallel.parallelize``):
    with ``trainer=fsdp`` the blocks and the root are sharded (FSDP2) and the EMA is sharded like
    them; everything that samples asks ``sampling_net()`` on every rank for a full plain copy.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        objective,
        optimizer: Callable,
        scheduler: Callable | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        compile: bool | None = None,
        activation_checkpointing: int = 0,
        seed: int = 0,
        max_nonfinite_steps: int = 10,
        repa: REPA | None = None,
        val_grid: Sequence[float] = FIXED_GRID,
        val_seed: int = 0,
        record: CheckpointRecord | None = None,
    ):
        super().__init__()
        self.net = net
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.ema = EMA(net, ema_decay, ema_warmup)
        self.compile = compile
        checkpointed_blocks(len(net.blocks), activation_checkpointing)  # a bad value fails here, before training
        self.activation_checkpointing = activation_checkpointing
        self.seed = seed
        self.record = record
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        self.train_means = torch.nn.ModuleDict()  # logged training values: running means between logs
        self._parallelized = False
        # Whether the network draws its label dropout from a generator it is handed (ditlab's DiT);
        # another backbone (forward(x, t, y)) gets its stream through the global RNG instead.
        self._takes_dropout_generator = "dropout_generator" in inspect.signature(net.forward).parameters
        self.val_grid, self.val_seed = check_grid(val_grid), val_seed
        self.repa = repa
        if repa is not None:  # after the EMA's copy: the average has no hook and no projector
            repa.attach(net)

    # ------------------------------------------------------------ set-up from outside the model
    def configure_model(self) -> None:
        if self._parallelized:  # Lightning calls this hook again on every fit/validate
            return
        self._parallelized = True
        trainer = self._trainer
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        bf16 = trainer is not None and str(trainer.precision).startswith("bf16")
        parallelize(
            self.net,
            mesh,
            activation_checkpointing=self.activation_checkpointing,
            compile=on_gpu if self.compile is None else self.compile,
            param_dtype=torch.bfloat16 if bf16 and mesh is not None else None,
        )
        if mesh is not None:
            self.ema.shard_like(self.net)
            if self.repa is not None:  # its gradients are reduced over the ranks like the network's
                shard(self.repa.projector, mesh)

    def sampling_net(self, use_ema: bool = True) -> torch.nn.Module:
        """The network to sample from, plain and full on this rank. Collective under sharding:
        every rank calls it (a rank-zero-only forward through sharded modules would hang)."""
        return self.ema.full_net() if use_ema else self.ema.materialize(self.net)

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        if self.repa is not None:
            params += list(self.repa.projector.parameters())
        extra = {}
        # Fused AdamW (one kernel over all parameters) unless optim.optimizer.fused=false: on CUDA, and
        # on the CPU too, where it is faster as well (experiments/benchmarks/README.md).
        if self.device.type in ("cuda", "cpu") and "fused" in inspect.signature(self.optimizer_factory).parameters:
            extra = {"fused": getattr(self.optimizer_factory, "keywords", {}).get("fused") is not False}
        optimizer = self.optimizer_factory(params, **extra)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int):
        latents, labels, *images = batch  # (N, C, H, W) model-space latents, (N,) labels[, (N, C', H', W') uint8]
        at = (self.global_rank, self.global_step, batch_idx % self.trainer.accumulate_grad_batches)
        device = latents.device
        t = self.objective.sample_t(
            latents.shape[0], device=device, generator=stream_generator(device, self.seed, "timesteps", *at)
        )
        noise = torch.randn(
            latents.shape, device=device, generator=stream_generator(device, self.seed, "diffusion_noise", *at)
        )
        # Label dropout draws inside the model from its own stream. Handed as a generator, not by
        # reseeding the global RNG: torch.manual_seed also queues a seed for every lazy accelerator
        # backend (CUDA, XPU, MTIA), formatting a stack trace for each, host time that a small
        # model's step cannot spare (measured in experiments/benchmarks/README.md).
        model_kwargs = {"y": labels}
        if self._takes_dropout_generator:
            model_kwargs["dropout_generator"] = stream_generator(device, self.seed, "label_dropout", *at)
        else:  # the same numbers, the slow way
            torch.manual_seed(stream_seed(self.seed, "label_dropout", *at))
        terms = self.objective.training_losses(self.net, latents, t, model_kwargs, noise=noise)
        if self.repa is not None:  # the tokens of the forward just run, against the clean images' features
            terms["repa"] = self.repa.loss(images[0])
            terms["loss"] = terms["loss"] + self.repa.coef * terms["repa"]
        loss = terms["loss"].mean()
        # Every step adds to a running mean on the device (no sync); only on the steps the loggers
        # write (every trainer.log_every_n_steps, last micro-batch) is it reduced over ranks and read:
        # the logged value is the mean over all ranks and all steps since the last log, not rank 0's
        # last batch (fast-DiT logged rank 0's).
        for name, value in terms.items():
            self._window_mean(name, device).update(value.detach().mean())
        if logs_this_step(self.trainer) and not self.trainer.fit_loop._should_accumulate():
            bar = on_progress_bar(self)
            for name, mean in self.train_means.items():
                self.log(f"train/{name}", mean.compute(), on_step=True, on_epoch=False, prog_bar=bar and name == "loss")
                mean.reset()
        return loss

    def _window_mean(self, name: str, device) -> MeanMetric:
        if name not in self.train_means:  # the objective decides the terms (loss, mse, vb)
            # nan_strategy="disable": checking for NaNs would sync with the host every step.
            self.train_means[name] = MeanMetric(nan_strategy="disable").to(device)
        return self.train_means[name]

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradient norm only when it is logged, or when the non-finite guard needs it (that
        # guard syncs with the host every step unless the optimizer is fused; module.max_nonfinite_steps=0
        # turns it off).
        logging = logs_this_step(self.trainer)
        norm = self._grad_norm() if logging or self.nonfinite.enabled else None
        torch_optimizer = getattr(optimizer, "_optimizer", optimizer)  # Lightning may hand its wrapper
        self.nonfinite.before_optimizer_step(torch_optimizer, norm, logging)
        if logging:
            if norm is not None:
                self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)
            self.log("train/skipped_steps", self.nonfinite.skipped_so_far(), on_step=True, on_epoch=False)

    def _grad_norm(self) -> torch.Tensor | None:
        """The global 2-norm of the trainable parameters' gradients (None when there are none)."""
        grads = [p.grad for p in self.ema.trainable(self.net) if p.grad is not None]
        if not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if is_sharded(norm) else norm  # sharded: the shards' norms make the full norm

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Here, not in on_train_batch_end: Lightning runs the checkpoint callback's batch-end hook
        # before the module's, so a checkpoint at step N would hold the EMA after N - 1 updates.
        ema_step = self.nonfinite.after_optimizer_step(self.global_step)
        if ema_step.update:  # a skipped (non-finite) step leaves the EMA alone; the device path masks it
            self.ema.update(self.net, keep=ema_step.keep)

    def validation_step(self, batch, batch_idx: int):
        latents, labels, *_ = batch  # held-out posterior means, unflipped[, images]
        at = (self.global_rank, self.global_step, batch_idx)
        device = latents.device
        t = self.objective.sample_t(
            latents.shape[0], device=device, generator=stream_generator(device, self.seed, "val_timesteps", *at)
        )
        noise = torch.randn(
            latents.shape, device=device, generator=stream_generator(device, self.seed, "val_diffusion_noise", *at)
        )
        terms = self.objective.training_losses(self._val_net[0], latents, t, {"y": labels}, noise=noise)
        self.log("val/loss_ema", terms["loss"].mean(), on_epoch=True, sync_dist=True)
        batch_key = (self.global_rank, batch_idx)  # the fixed loss's noise: the same at every step
        fixed = fixed_timestep_losses(
            self._val_net[0], self.objective, latents, labels, self.val_grid, self.val_seed, batch_key
        )
        for name, value in fixed_loss_values(fixed, self.val_grid).items():
            self.log(name, value, on_epoch=True, sync_dist=True, batch_size=len(latents))

    def on_validation_start(self) -> None:
        # Gathered once per validation, on every rank; in a list so that it is not a submodule.
        self._val_net = [self.sampling_net(use_ema=True)]

    def on_validation_end(self) -> None:
        self._val_net = []

    # ------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ditlab"] = {
            **(self.record.section() if self.record is not None else {}),
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
