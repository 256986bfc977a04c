"""The one generation path, and loading what it needs from a checkpoint.

``generate`` is used by ``ditlab.sample``, the sample-grid callback and the FID protocol alike:
guidance wraps the network, every sample's noise comes from its own stream (seed, sample index),
the sampler runs, the codec decodes. Because the noise of sample i depends on i only, the images
do not depend on the batch size or on how many ranks share the work.

``load_model`` reads a ditlab training checkpoint (its record holds the architecture, the codec, the
class names, the run's sampler and guidance: it samples without the prepared dir), a released
checkpoint of the DiT family (DiT, SiT, REPA, LightningDiT: paired with the VAE its family decodes
with, sampled by its family's published protocol, its network's time read as its family does) or a
diffusers folder, through the one weights reader (``ditlab.models.weights``, which reads a record
through ``runtime.record.read_record``, older formats included): on the CPU first, weights only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from torchvision.utils import make_grid, save_image

from ditlab.data.prepared import PreparedDir
from ditlab.diffusion import FlowMatching, Guidance, Sampler, create_diffusion
from ditlab.diffusion.protocols import Protocol, published_protocol
from ditlab.diffusion.samplers import samplers_for
from ditlab.models.released import Family
from ditlab.models.vae import SD_SCALE_FACTOR, IdentityVAE, PretrainedVAE, codec_from_portable, codec_from_record
from ditlab.models.weights import EXPORT_META, DiTWeights, read_dit_weights
from ditlab.runtime.checkpoints import check_checkpoint_fits
from ditlab.runtime.files import atomic_path
from ditlab.runtime.record import OFFICIAL_GUIDANCE, OFFICIAL_SAMPLER, CheckpointRecord
from ditlab.seeding import per_sample_normal, stream_seed

log = logging.getLogger("ditlab.inference")


CLASS_DRAWS = ("uniform", "balanced")


def sample_labels(num_classes: int, count: int, seed: int, draw: str = "uniform") -> torch.Tensor:
    """Class labels for samples 0..count-1, the same on every rank (FID, ``ditlab.sample``).
    ``uniform``: each drawn at random (ADM's and DiT's protocol); ``balanced``: every class count//K
    or count//K + 1 times, in a random order. Balanced draws take out the spread that random class
    proportions add to a class-conditional FID, so fewer samples give the same precision
    (experiments/fmnist_cpu/README.md)."""
    if draw not in CLASS_DRAWS:
        raise ValueError(f"class draw {draw!r}; expected one of {CLASS_DRAWS}")
    generator = torch.Generator().manual_seed(stream_seed(seed, "sample_labels"))
    if draw == "uniform":
        return torch.randint(0, num_classes, (count,), generator=generator)
    return (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]


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
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Samples for ``labels`` (N,), sample ``indices`` (N,) naming their noise streams.
    ``on_batch(done, total)`` is called after each batch (progress lines of a long measurement).

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
        if on_batch is not None:
            on_batch(sum(len(o) for o in outputs), len(labels))
    return torch.cat(outputs) if outputs else torch.empty(0, *latent_shape)


# ---------------------------------------------------------------------------------------- grids
def grid_labels(num_classes: int, per_class: int, max_classes: int) -> torch.Tensor:
    """``per_class`` samples of each of the first ``max_classes`` classes, class by class (a row each)."""
    return torch.arange(min(num_classes, max_classes)).repeat_interleave(per_class)


def grid_image(images: torch.Tensor, per_class: int) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1], ``per_class`` a row -> one (3, H', W') picture in [0, 1]."""
    return make_grid((images + 1) / 2, nrow=per_class, padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")
    return Path(path)


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
    record: CheckpointRecord | None = None  # the ditlab run's record (runtime.record), when there is one
    classes: list[str] | None = None  # the class names, where the checkpoint or folder knows them
    protocol: Protocol | None = None  # a released checkpoint's: its family's published sampler and guidance

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
        ``model.generate([0, 1], 50, 4.0, seed=0)``. Default: the checkpoint's own sampler
        (``own_sampler``), no guidance."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if isinstance(sampler, int):
            name = "ddim" if "ddim" in samplers_for(self.objective) else "flow_heun"
            sampler = Sampler(name, sampler)
        if not isinstance(guidance, Guidance):
            guidance = Guidance(float(guidance))
        sampler = sampler or self.own_sampler()
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

    def own_sampler(self) -> Sampler:
        """The sampler this checkpoint's run drew its grids with (without a record: its family's
        published protocol, DDPM-250 for DiT)."""
        if self.record is not None:
            return Sampler(**self.record.sampler)
        return self.protocol.sampler if self.protocol else Sampler(**OFFICIAL_SAMPLER)

    def own_guidance(self) -> Guidance:
        """The guidance this checkpoint's run drew its grids with (without a record: its family's, DiT's 1.5)."""
        if self.record is not None:
            return Guidance(**self.record.guidance)
        return self.protocol.guidance if self.protocol else Guidance(**OFFICIAL_GUIDANCE)


def load_network(
    path: str | Path, ema: bool = True, family: str = "auto", num_heads: int | None = None
) -> tuple[torch.nn.Module, object, CheckpointRecord | None]:
    """(net in eval mode, objective, the run's record or None) of a ditlab ``.ckpt``, a released DiT /
    SiT / REPA / LightningDiT file or a diffusers DiT folder (``models.weights.read_dit_weights`` tells
    them apart)."""
    return _network(read_dit_weights(path, ema, family, num_heads), path)


def _network(weights: DiTWeights, path: str | Path) -> tuple[torch.nn.Module, object, CheckpointRecord | None]:
    net = instantiate(weights.architecture)
    check_checkpoint_fits({"state_dict": weights.state_dict}, net, path)
    net.load_state_dict(weights.state_dict, strict=True)
    if weights.record is not None:
        objective = instantiate(weights.record.objective)
    elif weights.family is not None and weights.family.flow_time is not None:
        # SiT, REPA, LightningDiT: flow in their network's time
        objective = FlowMatching(**weights.family.flow_time)
    else:
        objective = create_diffusion(learn_sigma=net.learn_sigma)
    return net.eval(), objective, weights.record


def _record_kit(record: CheckpointRecord, path, need_codec: bool) -> tuple[torch.nn.Module | None, list[str] | None]:
    """(codec, class names) of a ditlab checkpoint's record. An older checkpoint without them (a small
    VAE's weights, the names) takes them from its run's prepared dir and says so; without that dir it
    fails when the codec is needed (no ``vae=`` given), else goes on without class names."""
    codec = codec_from_portable(record.codec) if need_codec and record.codec is not None else None
    if record.classes is not None and (codec is not None or not need_codec):
        return codec, record.classes
    prepared = PreparedDir(record.prepared_dir or "")
    missing = "class names" if record.codec is not None else "codec or class names"
    log.info(f"{path} carries no {missing} (an older checkpoint): taken from {prepared.root}")
    try:
        meta = prepared.read_meta()
    except FileNotFoundError:
        if need_codec and codec is None:
            raise
        return codec, record.classes
    if need_codec and codec is None:
        codec = codec_from_record(meta["vae"], prepared.vae)
    return codec, record.classes or meta.get("classes")


def _folder_classes(path: Path) -> list[str] | None:
    meta = json.loads((path / EXPORT_META).read_text()) if (path / EXPORT_META).is_file() else {}
    return meta.get("classes")


def _folder_codec(path: Path):
    """The codec of a diffusers folder: its vae/ (scaling_factor from its config), or what ditlab.json says."""
    if (path / "vae" / "config.json").is_file():
        scale = json.loads((path / "vae" / "config.json").read_text()).get("scaling_factor", SD_SCALE_FACTOR)
        return PretrainedVAE(str(path), scale, subfolder="vae")
    meta = json.loads((path / EXPORT_META).read_text()) if (path / EXPORT_META).is_file() else {}
    codec = meta.get("codec", {})
    if codec.get("kind") == "identity":
        return IdentityVAE(codec.get("scale_factor", 1.0))
    raise ValueError(f"{str(path)!r} has no vae/ folder; expected one, or vae=<hub id or local VAE dir>")


def _family_codec(family: Family, vae: str | None, latent_stats: str | None) -> PretrainedVAE:
    """The codec a released checkpoint decodes with: its family's VAE and latent scale (or ``vae``),
    with the per-channel statistics its family normalises by (``latent_stats``: LightningDiT's
    ``latents_stats.pt``)."""
    if family.latent_stats and not latent_stats:
        raise ValueError(
            f"a {family.title} checkpoint's latents are normalised per channel; expected latent_stats=<its "
            "latents_stats.pt> (and vae_path=<its VAE as a diffusers folder>)"
        )
    if not (vae or family.vae):
        raise ValueError(f"a {family.title} checkpoint decodes with its own VAE; expected vae_path=<diffusers folder>")
    return PretrainedVAE(vae or family.vae, family.scale_factor, latent_stats=latent_stats or None)


def load_model(
    ckpt: str | Path,
    ema: bool = True,
    vae: str | None = None,
    family: str = "auto",
    num_heads: int | None = None,
    latent_stats: str | None = None,
) -> ModelBundle:
    """A ditlab ``.ckpt`` (EMA weights unless ``ema=False``), a released DiT / SiT / REPA / LightningDiT
    ``.pt``/``.safetensors`` or a diffusers folder (``ditlab export``'s), with the codec that decodes its
    latents (the run's or the folder's own, or ``vae``: a hub id or local dir). A released file:
    ``family`` (auto: told from the file), ``num_heads`` (where no tensor shows it), ``latent_stats``
    (LightningDiT's ``latents_stats.pt``); it samples by its family's published protocol by default.

        model = load_model("outputs/train/run/checkpoints/last.ckpt")
        images = model.generate([0, 1, 2], Sampler("ddim", 50), Guidance(scale=2.0), seed=0)
    """
    weights = read_dit_weights(ckpt, ema, family, num_heads)
    net, objective, record = _network(weights, ckpt)
    classes, protocol = None, None
    codec = PretrainedVAE(vae, SD_SCALE_FACTOR) if vae and weights.family is None else None
    if Path(ckpt).is_dir():
        codec = codec or _folder_codec(Path(ckpt))
        classes = _folder_classes(Path(ckpt))
        source = "diffusers folder"
    elif record is None:
        codec = _family_codec(weights.family, vae, latent_stats)
        if weights.family.flow_time is None:  # DiT's released files keep ditlab's defaults for them
            source = "official DiT checkpoint"
        else:
            source, protocol = f"{weights.family.title} checkpoint", published_protocol(weights.family.protocol)
    else:
        carried, classes = _record_kit(record, ckpt, need_codec=codec is None)
        codec = codec or carried
        source = f"ditlab checkpoint, {'EMA' if ema else 'raw'} weights"
    shape = (net.in_channels, net.input_size, net.input_size)
    return ModelBundle(net, objective, codec.eval(), net.num_classes, shape, source, record, classes, protocol)
