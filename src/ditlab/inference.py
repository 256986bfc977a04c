"""The one generation path, and loading what it needs from a checkpoint.

``generate`` is used by ``ditlab.sample``, the sample-grid callback and the FID callback alike:
guidance wraps the network, every sample's noise comes from its own stream (seed, sample index),
the sampler runs, the codec decodes. Because the noise of sample i depends on i only, the images
do not depend on the batch size or on how many ranks share the work.

``load_model`` reads a ditlab Lightning checkpoint (the resolved run config is inside it) or an
official DiT checkpoint (paired with the SD VAE it was trained with). Always on the CPU first,
weights only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ditlab.diffusion import CFGModel, Sampler, create_diffusion
from ditlab.diffusion.samplers import samplers_for
from ditlab.models.official import load_official_checkpoint
from ditlab.seeding import per_sample_normal, stream_seed


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings: ``scale`` 1.0 is none; ``channels`` None guides every latent
    channel (3: the official FID-2.27 protocol); ``interval`` (t_lo, t_hi) in model time units."""

    scale: float = 1.0
    channels: int | None = None
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        if self.scale < 0:
            raise ValueError(f"cfg_scale={self.scale}; expected a number >= 0 (1.0: no guidance)")
        if self.interval is not None:  # a config list -> a comparable, hashable pair
            if len(self.interval) != 2:
                raise ValueError(f"guidance interval {list(self.interval)}; expected [t_lo, t_hi]")
            object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))

    def describe(self) -> str:
        if self.scale == 1.0:
            return "no guidance"
        where = "" if self.interval is None else f" for t in [{self.interval[0]:g}, {self.interval[1]:g}]"
        channels = "" if self.channels is None else f" on the first {self.channels} channels"
        return f"guidance {self.scale:g}{channels}{where}"

    def wrap(self, net: Callable, null_label: int, in_channels: int) -> CFGModel:
        return CFGModel(net, self.scale, null_label, in_channels, self.channels, self.interval)


def sample_labels(num_classes: int, count: int, seed: int) -> torch.Tensor:
    """Uniform class labels for samples 0..count-1, the same on every rank (FID, ``ditlab.sample``)."""
    generator = torch.Generator().manual_seed(stream_seed(seed, "sample_labels"))
    return torch.randint(0, num_classes, (count,), generator=generator)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ValueError(f"label {int(bad[0])} is out of range; this model has classes 0..{num_classes - 1}")


class _PerSampleNoise:
    """The fresh noise of stochastic samplers: its k-th call draws row i from stream (seed, index_i, k)."""

    def __init__(self, seed: int, indices: torch.Tensor):
        self.seed, self.indices, self.calls = seed, indices, 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        noise = per_sample_normal(like.shape[1:], self.indices, self.seed, "sampler", self.calls, device=like.device)
        return noise.to(like.dtype)


@torch.no_grad()
def generate(
    net: Callable,
    objective,
    sampler: Sampler,
    labels: torch.Tensor,
    indices: torch.Tensor,
    *,
    latent_shape: tuple[int, int, int],
    null_label: int,
    codec: torch.nn.Module | None = None,
    guidance: Guidance = Guidance(),
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Samples for ``labels`` (N,), sample ``indices`` (N,) naming their noise streams.

    Returns decoded images (N, C, H, W) float in [-1, 1] on the CPU, or the latents when ``codec``
    is None. On CUDA the network runs under bf16 autocast (the weights stay as they are).
    """
    device = torch.device(device)
    if len(labels) != len(indices):
        raise ValueError(f"{len(labels)} labels for {len(indices)} sample indices")
    check_labels(labels, null_label)
    model = guidance.wrap(net, null_label, latent_shape[0])
    outputs = []
    for chunk_labels, chunk_indices in zip(labels.split(batch_size), indices.split(batch_size)):
        x = per_sample_normal(latent_shape, chunk_indices, seed, "sample_init", device=device)  # (n, C, H, W)
        y = chunk_labels.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            latents = sampler(
                model, objective, x, {"y": y}, noise=_PerSampleNoise(seed, chunk_indices), progress=progress
            )
            out = latents.float() if codec is None else codec.decode(latents.float()).float().clamp(-1, 1)
        outputs.append(out.cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, *latent_shape)


# ---------------------------------------------------------------------------------------- loading
@dataclass
class ModelBundle:
    """What generation needs from a checkpoint: network, objective, codec, class count, latent shape."""

    net: torch.nn.Module
    objective: object
    codec: torch.nn.Module
    num_classes: int
    latent_shape: tuple[int, int, int]
    source: str
    run_config: object | None = None  # the ditlab run's resolved config, when there is one

    def to(self, device):
        self.net.to(device)
        self.codec.to(device)
        return self

    def generate(
        self,
        labels,
        sampler: Sampler | int | None = None,
        guidance: Guidance | float = Guidance(),
        seed: int = 0,
        batch_size: int = 64,
        indices: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] for ``labels`` (a list or tensor of class indices).

        Notebook shorthands: ``sampler`` a number of steps (the objective's first deterministic
        sampler: DDIM, or Heun for flow matching), ``guidance`` a cfg scale:
        ``model.generate([0, 1], 50, 4.0, seed=0)``. Default: DDPM with 250 steps, no guidance."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if isinstance(sampler, int):
            name = "ddim" if "ddim" in samplers_for(self.objective) else "flow_heun"
            sampler = Sampler(name, sampler)
        if not isinstance(guidance, Guidance):
            guidance = Guidance(float(guidance))
        sampler = sampler or Sampler("ddpm", 250)
        sampler.check(self.objective)
        return generate(
            self.net,
            self.objective,
            sampler,
            labels,
            torch.arange(len(labels)) if indices is None else indices,
            latent_shape=self.latent_shape,
            null_label=self.num_classes,
            codec=self.codec,
            guidance=guidance,
            seed=seed,
            batch_size=batch_size,
            device=next(self.net.parameters()).device,
            progress=progress,
        )


def load_network(ckpt: str | Path, ema: bool = True):
    """(net, objective, run config or None) from a ditlab ``.ckpt``, an official DiT file or a
    diffusers DiT folder (``ditlab export``'s, or any DiTTransformer2DModel / DiTPipeline folder)."""
    from hydra.utils import instantiate

    path = Path(ckpt)
    if path.is_dir():
        from ditlab.interop.diffusers_dit import load_diffusers_dit

        net = load_diffusers_dit(path)
        run_config = path / "ditlab_config.yaml"  # written by ditlab export
        if run_config.is_file():
            cfg = OmegaConf.create(run_config.read_text())
            return net, instantiate(cfg.diffusion.objective), cfg
        return net, create_diffusion(learn_sigma=net.learn_sigma), None
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt={str(ckpt)!r} does not exist; expected a ditlab .ckpt, an official DiT .pt or a diffusers folder"
        )
    if path.suffix != ".ckpt":
        try:
            net = load_official_checkpoint(path)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as err:  # noqa: BLE001 - truncated / foreign file: one line for the command
            raise ValueError(
                f"{path} cannot be read as an official DiT checkpoint ({err}); expected a DiT .pt"
            ) from err
        return net, create_diffusion(learn_sigma=net.learn_sigma), None
    from ditlab.training.checkpointing import check_checkpoint_fits, read_checkpoint

    checkpoint = read_checkpoint(path)  # weights only; truncated / crafted files -> one line (ValueError)
    config_yaml = checkpoint.get("ditlab", {}).get("config_yaml")
    if not config_yaml:
        raise ValueError(f"{str(path)!r} is not a ditlab checkpoint (no stored run config)")
    cfg = OmegaConf.create(config_yaml)
    net = instantiate(cfg.model)
    prefix = "ema.net." if ema else "net."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    check_checkpoint_fits({"state_dict": state}, net, path)
    net.load_state_dict(state, strict=True)
    return net.eval(), instantiate(cfg.diffusion.objective), cfg


def _folder_codec(path: Path):
    """The codec of a diffusers folder: its vae/ (scaling_factor from its config), or what ditlab.json says."""
    import json

    from ditlab.models.vae import IdentityVAE, PretrainedVAE

    if (path / "vae" / "config.json").is_file():
        scale = json.loads((path / "vae" / "config.json").read_text()).get("scaling_factor", 0.18215)
        return PretrainedVAE(str(path), scale, subfolder="vae")
    meta = json.loads((path / "ditlab.json").read_text()) if (path / "ditlab.json").is_file() else {}
    codec = meta.get("codec", {})
    if codec.get("kind") == "identity":
        return IdentityVAE(codec.get("scale_factor", 1.0))
    raise ValueError(f"{str(path)!r} has no vae/ folder; expected one, or vae=<hub id or local VAE dir>")


def load_model(ckpt: str | Path, ema: bool = True, vae: str | None = None) -> ModelBundle:
    """A ditlab ``.ckpt`` (EMA weights unless ``ema=False``), an official DiT ``.pt``/``.safetensors`` or
    a diffusers folder (``ditlab export``'s), with the codec that decodes its latents (the run's or the
    folder's own, or ``vae``: a hub id or local dir).

        model = load_model("outputs/train/run/checkpoints/last.ckpt")
        images = model.generate([0, 1, 2], Sampler("ddim", 50), Guidance(scale=2.0), seed=0)
    """
    from ditlab.data.shards import read_meta
    from ditlab.models.vae import SD_SCALE_FACTOR, PretrainedVAE, codec_from_meta

    net, objective, cfg = load_network(ckpt, ema)
    if Path(ckpt).is_dir():
        codec = PretrainedVAE(vae, SD_SCALE_FACTOR) if vae else _folder_codec(Path(ckpt))
        source = "diffusers folder"
    elif cfg is None:
        codec = PretrainedVAE(vae or "stabilityai/sd-vae-ft-ema", SD_SCALE_FACTOR)
        source = "official DiT checkpoint"
    else:
        prepared = cfg.data.prepared_dir
        codec = PretrainedVAE(vae, SD_SCALE_FACTOR) if vae else codec_from_meta(read_meta(prepared), prepared)
        source = f"ditlab checkpoint, {'EMA' if ema else 'raw'} weights"
    shape = (net.in_channels, net.input_size, net.input_size)
    return ModelBundle(net, objective, codec.eval(), net.num_classes, shape, source, cfg)
