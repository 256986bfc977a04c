"""DiTModule: network + training objective + optimizer + EMA, and the training step.

The step is one method, ``training_step`` (Lightning's manual optimization; torchtitan's
``train_step`` and EDM2's loop read the same way): per micro-batch, draw the step's streams -> loss
(+ REPA) -> backward; then the gradient norm -> the non-finite decision -> clip -> optimizer step
(or skip) -> LR schedule -> EMA -> log. Nothing is handed from one hook to another. The diffusion
math lives in ``ditlab.diffusion``; sampling, grids and metrics live in callbacks.

Every random draw of a step comes from its own named stream (``ditlab.seeding``): timesteps,
diffusion noise and label dropout, each seeded from (seed, stream, rank, step, micro-batch), so a
resumed run continues the very same random streams (EDM2's practice) and no two streams coincide.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from lightning import LightningModule
from lightning.pytorch.strategies import ParallelStrategy
from torchmetrics.aggregation import MeanMetric

from ditlab.models.dit import DiT
from ditlab.runtime.record import CheckpointRecord
from ditlab.seeding import stream_generator, stream_seed
from ditlab.training.cadence import logs_at, on_progress_bar
from ditlab.training.ema import EMA
from ditlab.training.nonfinite import NonFiniteSteps
from ditlab.training.parallel import checkpointed_blocks, is_sharded, parallelize, shard
from ditlab.training.repa import REPA
from ditlab.training.validation import FIXED_GRID, check_grid, fixed_loss_values, fixed_timestep_losses

# The torch optimizers with a fused kernel (one kernel over all parameters): made fused unless the
# config says ``optim.optimizer.fused=false``.
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


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
    gradient_clip_val: clip the global gradient norm to this (None or 0: no clipping).
    accumulate_grad_batches: micro-batches per optimizer step. A training batch holds them one after
        another (the data module groups them: ``data.module.micro_batches``); their gradients add
        up, and under DDP they are all-reduced once, after the last.
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
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
        record: CheckpointRecord | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False  # the step is training_step, read top to bottom
        if accumulate_grad_batches < 1:
            raise ValueError(f"module.accumulate_grad_batches={accumulate_grad_batches}; expected an integer >= 1")
        if gradient_clip_val is not None and gradient_clip_val < 0:
            raise ValueError(f"module.gradient_clip_val={gradient_clip_val}; expected a number > 0 (or null: off)")
        self.net = net
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.ema = EMA(net, ema_decay, ema_warmup)
        self.compile = compile
        checkpointed_blocks(len(net.blocks), activation_checkpointing)  # a bad value fails here, before training
        self.activation_checkpointing = activation_checkpointing
        self.seed = seed
        self.gradient_clip_val = gradient_clip_val
        self.accumulate_grad_batches = accumulate_grad_batches
        self.record = record
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        self.train_means = torch.nn.ModuleDict()  # logged training values: running means between logs
        self.net_trainable: list[torch.nn.Parameter] = []  # what the gradient norm measures (configure_optimizers)
        self._parallelized = False
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
        # Listed here, after configure_model sharded them: the tensors the optimizer holds.
        self.net_trainable = [p for p in self.net.parameters() if p.requires_grad]
        params = list(self.net_trainable)
        if self.repa is not None:
            params += list(self.repa.projector.parameters())
        extra = {}
        # Fused (one kernel over all parameters) unless optim.optimizer.fused=false: on CUDA, and on
        # the CPU too, where it is faster as well (experiments/benchmarks/README.md).
        factory = self.optimizer_factory
        kind = getattr(factory, "func", factory)  # the class behind a functools.partial
        if self.device.type in ("cuda", "cpu") and isinstance(kind, type) and issubclass(kind, FUSED_OPTIMIZERS):
            extra = {"fused": getattr(factory, "keywords", {}).get("fused") is not False}
        optimizer = factory(params, **extra)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> dict:
        """One optimizer step. ``batch``: (latents (K*N, C, H, W) model-space, labels (K*N,)[, images
        (K*N, C', H', W') uint8]), K = ``accumulate_grad_batches`` micro-batches of N one after another."""
        stepper, scheduler = self.optimizers(), self.lr_schedulers()  # Lightning's wrapper counts the steps
        optimizer = stepper.optimizer
        logging = logs_at(self.trainer, self.global_step + 1)  # about the step this batch makes
        micro_batches = list(zip(*(part.chunk(self.accumulate_grad_batches) for part in batch)))
        step_loss = 0.0
        for micro, (latents, labels, *images) in enumerate(micro_batches):
            at, device = (self.global_rank, self.global_step, micro), latents.device
            t = self.objective.sample_t(
                latents.shape[0], device=device, generator=stream_generator(device, self.seed, "timesteps", *at)
            )
            noise = torch.randn(
                latents.shape, device=device, generator=stream_generator(device, self.seed, "diffusion_noise", *at)
            )
            model_kwargs = {"y": labels, **self._label_dropout(device, at)}
            with self._gradient_sync(micro == len(micro_batches) - 1):
                terms = self.objective.training_losses(self.net, latents, t, model_kwargs, noise=noise)
                if self.repa is not None:  # the tokens of the forward just run, against the clean images' features
                    terms["repa"] = self.repa.loss(self.repa.take_tokens(), images[0])
                    terms["loss"] = terms["loss"] + self.repa.coef * terms["repa"]
                loss = terms["loss"].mean() / self.accumulate_grad_batches
                self.manual_backward(loss)
            step_loss = step_loss + loss.detach()
            # Every step adds to a running mean on the device (no sync); only on the steps the
            # loggers write is it reduced over ranks and read: the logged value is the mean over all
            # ranks and all steps since the last log, not rank 0's last batch (fast-DiT logged rank 0's).
            for name, value in terms.items():
                self._window_mean(name, device).update(value.detach().mean())

        # The gradient norm only when it is logged or the non-finite guard needs it (that guard syncs
        # with the host every step unless the optimizer is fused; module.max_nonfinite_steps=0: off).
        norm = self._grad_norm() if logging or self.nonfinite.enabled else None
        keep = self.nonfinite.decide(optimizer, norm)  # drops the gradients, or arms the fused found_inf
        if logging:  # before the step: a run stopped below still logged the step that stopped it
            self._log_step(norm, optimizer.param_groups[0]["lr"])
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        stepper.step()  # advances global_step, also when the update is skipped
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite.stop_on_streak(self.global_step, read=logging)
        if scheduler is not None:
            scheduler.step()
        # Before the checkpoint callbacks (on_train_batch_end): a checkpoint of step N holds N EMA updates.
        self.ema.update(self.net, keep)  # a skipped step leaves the EMA alone; a device mask masks it
        return {"loss": step_loss}

    def _label_dropout(self, device, at: tuple[int, int, int]) -> dict:
        """The model's label dropout draws from its own stream. ditlab's DiT takes it as a generator,
        not by reseeding the global RNG: torch.manual_seed also queues a seed for every lazy
        accelerator backend (CUDA, XPU, MTIA), formatting a stack trace for each, host time that a
        small model's step cannot spare (measured in experiments/benchmarks/README.md). Another
        backbone (forward(x, t, y)) gets the same numbers the slow way, through the global RNG."""
        if isinstance(self.net, DiT):
            return {"dropout_generator": stream_generator(device, self.seed, "label_dropout", *at)}
        torch.manual_seed(stream_seed(self.seed, "label_dropout", *at))
        return {}

    def _gradient_sync(self, last_micro_batch: bool):
        """DDP all-reduces the gradients in the backward of the step's last micro-batch only; the
        others accumulate on each rank (Lightning's public ``block_backward_sync``)."""
        strategy = self.trainer.strategy
        if last_micro_batch or not isinstance(strategy, ParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def _window_mean(self, name: str, device) -> MeanMetric:
        if name not in self.train_means:  # the objective decides the terms (loss, mse, vb)
            # nan_strategy="disable": checking for NaNs would sync with the host every step.
            self.train_means[name] = MeanMetric(nan_strategy="disable").to(device)
        return self.train_means[name]

    def _log_step(self, grad_norm: torch.Tensor | None, lr: float) -> None:
        """The running means since the last log (reduced over ranks), the gradient norm before
        clipping, the step's learning rate and the skipped steps so far."""
        bar = on_progress_bar(self)
        for name, mean in self.train_means.items():
            self.log(f"train/{name}", mean.compute(), on_step=True, on_epoch=False, prog_bar=bar and name == "loss")
            mean.reset()
        if grad_norm is not None:
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        self.log("train/lr", lr, on_step=True, on_epoch=False)
        self.log("train/skipped_steps", self.nonfinite.skipped_so_far(), on_step=True, on_epoch=False)

    def _grad_norm(self) -> torch.Tensor | None:
        """The global 2-norm of the network's trainable parameters' gradients (None when there are none)."""
        grads = [p.grad for p in self.net_trainable if p.grad is not None]
        if not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if is_sharded(norm) else norm  # sharded: the shards' norms make the full norm

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
        net = self.sampling_net(use_ema=True)  # every rank: collective under sharding
        terms = self.objective.training_losses(net, latents, t, {"y": labels}, noise=noise)
        self.log("val/loss_ema", terms["loss"].mean(), on_epoch=True, sync_dist=True)
        batch_key = (self.global_rank, batch_idx)  # the fixed loss's noise: the same at every step
        fixed = fixed_timestep_losses(
            net, self.objective, latents, labels, self.val_grid, self.val_seed, batch_key
        )
        for name, value in fixed_loss_values(fixed, self.val_grid).items():
            self.log(name, value, on_epoch=True, sync_dist=True, batch_size=len(latents))

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
        count_steps_as_manual_optimization(checkpoint)
        self.nonfinite.load_state_dict(checkpoint.get("ditlab", {}).get("nonfinite", {}))
        rng = checkpoint.get("ditlab", {}).get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


MANUAL_STEPS = "epoch_loop.manual_optimization.optim_step_progress"
AUTOMATIC_PROGRESS = "epoch_loop.automatic_optimization.optim_progress"


def count_steps_as_manual_optimization(checkpoint: dict) -> None:
    """A checkpoint written before the module optimized by hand (Lightning counted its steps in the
    automatic loop's progress): the same count for the manual loop, which ``trainer.global_step``
    reads when it resumes (else a resumed run would start again at step 0). In place."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    automatic = loop.get(AUTOMATIC_PROGRESS, {}).get("optimizer", {}).get("step")
    manual = loop.get(MANUAL_STEPS)
    if automatic and manual and automatic["total"]["completed"] > manual["total"]["completed"]:
        loop[MANUAL_STEPS] = copy.deepcopy(automatic)
