"""Training the small KL autoencoder on the dataset itself (``vae=small_kl``, run by ``prepare``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ditlab.metrics.reconstruction import reconstruction_psnr
from ditlab.models.vae import PretrainedVAE, small_autoencoder
from ditlab.runtime.errors import check_time_guard
from ditlab.runtime.files import atomic_path
from ditlab.seeding import stream_seed
from ditlab.training.schedules import warmup_cosine_factor, warmup_factor

WARMUP_STEPS = 100


INFO_FILE = "ditlab_vae.json"  # beside the weights: scale factor, PSNR, the recipe (PreparedDir.vae_info)


class SmallVAERecipe:
    """How ``prepare`` trains the small KL autoencoder on the dataset (L1 + kl_weight * KL, AdamW),
    for ``max_steps``, optionally with a cosine lr decay to 0 at ``max_steps``; ``fit_or_load`` reuses
    an earlier result. Everything random (initial weights, data order, posterior draws) comes from
    ``seed``, so the VAE does not depend on what ran before it in the process.

    ``train_seconds`` (None: none) is a guard, never a budget: a fit that reaches it before
    ``max_steps`` stops with ``TimeGuardExceeded`` instead of handing on a VAE cut short, whose
    weights would depend on the machine's speed."""

    kind = "small_kl"

    def __init__(
        self,
        latent_channels: int = 4,
        block_out_channels=(16, 32, 32),
        norm_num_groups: int = 8,
        train_seconds: float | None = None,
        max_steps: int = 100_000,
        batch_size: int = 128,
        lr: float = 2e-3,
        kl_weight: float = 1e-4,
        seed: int = 0,
        scale_samples: int = 5000,
        lr_decay: bool = False,
    ):
        self.latent_channels = latent_channels
        self.block_out_channels = tuple(block_out_channels)
        self.norm_num_groups = norm_num_groups
        self.train_seconds = train_seconds
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = lr
        self.kl_weight = kl_weight
        self.seed = seed
        self.scale_samples = scale_samples
        self.lr_decay = lr_decay

    def recipe(self) -> dict:
        """What decides the trained VAE (``train_seconds`` is a guard, not part of it)."""
        return {
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "norm_num_groups": self.norm_num_groups,
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "kl_weight": self.kl_weight,
            "seed": self.seed,
            "scale_samples": self.scale_samples,
            "lr_decay": self.lr_decay,
        }

    def fit_or_load(self, dataset, out_dir: str | Path, device: str | torch.device = "cpu", log=print) -> PretrainedVAE:
        out_dir = Path(out_dir)
        if not (out_dir / INFO_FILE).exists():
            self._fit(dataset, out_dir, torch.device(device), log)
        self.check_cached(out_dir)  # a cached VAE of another recipe is not reused silently
        info = json.loads((out_dir / INFO_FILE).read_text())
        vae = PretrainedVAE(str(out_dir), scale_factor=info["scale_factor"]).to(device)
        vae.kind = self.kind
        return vae

    def _fit(self, dataset, out_dir: Path, device: torch.device, log) -> None:
        first = dataset[0][0]
        with torch.random.fork_rng(devices=[]):  # the initial weights from the recipe's seed alone
            torch.manual_seed(self.seed)
            model = small_autoencoder(
                first.shape[0], self.latent_channels, self.block_out_channels, self.norm_num_groups, first.shape[-1]
            ).to(device)
        generator = torch.Generator().manual_seed(self.seed)  # the data order
        draws = torch.Generator(device=device).manual_seed(stream_seed(self.seed, "vae_posterior"))
        # drop_last with a batch no larger than the data, so that every pass yields batches
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=min(self.batch_size, len(dataset)),
            shuffle=True,
            drop_last=True,
            generator=generator,
            num_workers=0,
            collate_fn=_images_only,
        )
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.0)
        # Warm-up, then (lr_decay) a cosine to 0 at max_steps: the run is sized in steps.
        if self.lr_decay:
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: warmup_cosine_factor(s, self.max_steps, WARMUP_STEPS)
            )
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, WARMUP_STEPS))
        start, step, done = time.time(), 0, False
        guard = f" (guard: {self.train_seconds:.0f} s)" if self.train_seconds is not None else ""
        log(f"training the small VAE for {self.max_steps} steps of {self.batch_size}{guard}")
        while not done:
            for images in loader:
                images = images.to(device)
                posterior = model.encode(images).latent_dist
                recon = model.decode(posterior.sample(generator=draws)).sample
                loss = F.l1_loss(recon, images) + self.kl_weight * posterior.kl().mean() / images[0].numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step % 200 == 0:
                    log(f"  vae step {step}/{self.max_steps}  l1+kl {loss.item():.4f}  {time.time() - start:.0f} s")
                if step >= self.max_steps:
                    done = True
                    break
                check_time_guard("vae.recipe.train_seconds", self.train_seconds, start, step, self.max_steps)
        model.eval()
        scale = self._scale_factor(model, dataset, device)
        psnr = reconstruction_psnr(model, dataset, device)
        info = {
            "scale_factor": scale,
            "steps": step,
            "seconds": round(time.time() - start, 1),
            "val_psnr_db": psnr,
            "recipe": self.recipe(),
        }
        with atomic_path(out_dir) as tmp:  # an interrupted run never leaves half a VAE behind
            model.save_pretrained(tmp, safe_serialization=True)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        log(f"small VAE: {step} steps, scale factor {scale:.4f}, PSNR {psnr:.2f} dB (first 1000 images)")

    def check_cached(self, vae_dir: str | Path) -> None:
        """Raise when the VAE cached in ``vae_dir`` was trained with another recipe than this one
        (VAEs cached before the recipe was recorded pass; no cached VAE passes)."""
        vae_dir = Path(vae_dir)
        if not (vae_dir / INFO_FILE).is_file():
            return
        stored = json.loads((vae_dir / INFO_FILE).read_text()).get("recipe")
        for key, value in self.recipe().items():
            if stored is not None and key in stored and stored[key] != value:
                raise ValueError(
                    f"vae.recipe.{key}={value} but {vae_dir} holds a VAE trained with {key}={stored[key]}; expected "
                    f"the same recipe, or another data.prepared_dir (or delete {vae_dir.parent} to prepare it again)"
                )

    @torch.no_grad()
    def _scale_factor(self, model, dataset, device) -> float:
        """1 / std of posterior samples over the first ``scale_samples`` images, as SD chose 0.18215."""
        n = min(self.scale_samples, len(dataset))
        images = torch.stack([dataset[i][0] for i in range(n)])
        zs = []
        generator = torch.Generator(device=device).manual_seed(self.seed)
        for chunk in images.split(500):
            zs.append(model.encode(chunk.to(device)).latent_dist.sample(generator=generator).cpu())
        return float(1.0 / torch.cat(zs).std())


def _images_only(batch):
    return torch.stack([b[0] for b in batch if b[0] is not None])
