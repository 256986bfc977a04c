"""What reading a ditlab checkpoint needs, as one typed, versioned record: the checkpoint's
``ditlab`` section.

    format_version  FORMAT_VERSION when written
    model           the network to build: ``{"_target_": ..., arguments}``, its shape resolved
                    (input size, channels, class count as the run took them from its data)
    objective       the diffusion objective to build: ``{"_target_": ..., arguments}``
    codec           the codec that decodes its latents (``models.vae.portable_codec``: kind, scale,
                    hub id, the small VAE's weights); None where it travels elsewhere (an export
                    folder's ``vae/``, an older small-VAE checkpoint's prepared dir)
    sampler         ``ditlab.diffusion.Sampler``'s arguments: what the run's grids were drawn with
    guidance        ``ditlab.diffusion.Guidance``'s arguments: the grids' guidance
    fid_protocol    ``ditlab.metrics.protocol.FIDProtocol``'s arguments (sampler and guidance as
                    above); None: the run had none
    classes         the class names (None: not known)
    prepared_dir    the prepared dir the run trained on
    config_yaml     the resolved run config, for humans: nothing reads it by key

Every reader (``load_model``, the FID curve, ``export``, ``init_from``, ``ditlab.sample``) reads a
checkpoint through ``read_record``; a renamed or missing field is one line. The run config's layout
may change freely: it is read once, when the record is written (``record_of_run``). Checkpoints
from before the record (format 0: the run config alone, later with the codec and class names beside
it) are read through ``upgrade``, which knows each layout that format's config had.

A leaf like the rest of ``runtime/``: plain values only; the readers build the objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

FORMAT_VERSION = 1
# What DiTModule keeps beside the record in the same section to resume exactly (not read here).
RESUME_STATE = ("nonfinite", "rng")
# What checkpoints without a run config (official DiT, diffusers) sample with: DiT's protocol.
OFFICIAL_SAMPLER = {"name": "ddpm", "steps": 250}
OFFICIAL_GUIDANCE = {"scale": 1.5, "channels": None, "interval": None}


class RecordError(ValueError):
    """A checkpoint's record cannot be read (one line, naming the checkpoint and the field)."""


@dataclass(frozen=True)
class CheckpointRecord:
    model: dict
    objective: dict
    codec: dict | None
    sampler: dict
    guidance: dict
    fid_protocol: dict | None
    classes: list[str] | None
    prepared_dir: str | None
    config_yaml: str
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return int(self.model["num_classes"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents the model takes."""
        return (int(self.model["in_channels"]), int(self.model["input_size"]), int(self.model["input_size"]))

    def section(self) -> dict:
        """The record as the checkpoint's ``ditlab`` section stores it (plain data and tensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def without_codec_weights(self) -> dict:
        """The section as JSON can hold it (an export's ``ditlab.json``): the codec travels beside it."""
        return {**self.section(), "codec": None}


FIELDS = tuple(f.name for f in fields(CheckpointRecord))


# ------------------------------------------------------------------------------------------ reading
def read_record(section: Mapping, origin: str) -> CheckpointRecord:
    """The one reader: the record of a checkpoint's ``ditlab`` section (or an export's), whatever
    format wrote it. ``origin`` (the file) names it in the one-line ``RecordError``."""
    if not isinstance(section, Mapping):
        raise RecordError(f"{origin} has no ditlab section; expected a ditlab checkpoint")
    version = section.get("format_version")
    if version is None:
        return upgrade(section, origin)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RecordError(
            f"{origin} has checkpoint format_version {version!r}; this ditlab reads formats 0 to {FORMAT_VERSION} "
            "(a newer ditlab wrote it?)"
        )
    unknown = sorted(set(section) - set(FIELDS) - set(RESUME_STATE))
    missing = [name for name in FIELDS if name not in section]
    if missing:
        instead = f" (it has {', '.join(map(repr, unknown))}, which format {version} does not know)" if unknown else ""
        raise RecordError(
            f"{origin}: the checkpoint record has no field {missing[0]!r}{instead}; expected the fields "
            f"{', '.join(FIELDS)}"
        )
    record = CheckpointRecord(**{name: section[name] for name in FIELDS})
    _check_types(record, origin)
    return record


# The type of the fields the readers take apart, and the keys they take.
_SHAPES = {
    "model": (dict, ("_target_", "num_classes", "in_channels", "input_size")),
    "objective": (dict, ("_target_",)),
    "sampler": (dict, ("name", "steps")),
    "guidance": (dict, ("scale",)),
    "config_yaml": (str, ()),
}


def _check_types(record: CheckpointRecord, origin: str) -> None:
    for name, (kind, keys) in _SHAPES.items():
        value = getattr(record, name)
        if not isinstance(value, kind) or any(key not in value for key in keys):
            expected = f"a {kind.__name__}" + (f" with {', '.join(keys)}" if keys else "")
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise RecordError(f"{origin}: checkpoint record field {name!r} is {shown}; expected {expected}")


# ------------------------------------------------------------------------------------------ writing
def record_of_run(cfg: DictConfig, codec: dict | None, classes: list[str] | None) -> CheckpointRecord:
    """The record of a run about to train: its resolved config (shape and FID extractor taken from
    the data), the codec that decodes its latents and its class names. The one place that reads
    today's config layout; ``upgrade`` reads the older ones."""
    grid = OmegaConf.select(cfg, "callbacks.sample_grid")
    protocol = OmegaConf.select(cfg, "fid_protocol")
    return CheckpointRecord(
        model=_plain(cfg.model),
        objective=_plain(cfg.diffusion.objective),
        codec=codec,
        sampler=_arguments(grid.sampler if grid is not None and "sampler" in grid else cfg.sampler),
        guidance=_arguments(grid.guidance if grid is not None and "guidance" in grid else cfg.guidance),
        fid_protocol=None if protocol is None else _protocol_arguments(protocol),
        classes=None if classes is None else [str(name) for name in classes],
        prepared_dir=str(cfg.data.prepared_dir),
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _arguments(node) -> dict:
    """A ``_target_`` node's arguments (the reader knows the class)."""
    return {k: v for k, v in _plain(node).items() if k != "_target_"}


def _protocol_arguments(node) -> dict:
    protocol = _arguments(node)
    if protocol.get("sampler") is not None:
        protocol["sampler"] = _arguments(protocol["sampler"])
    protocol["guidance"] = _arguments(protocol["guidance"]) if protocol.get("guidance") else dict(OFFICIAL_GUIDANCE)
    if protocol.get("uncertainty") is not None:  # ditlab.metrics.uncertainty.Uncertainty's arguments
        protocol["uncertainty"] = _arguments(protocol["uncertainty"])
    return protocol


# ------------------------------------------------------------------------------------------ format 0
# Sampler names before the registry (commits up to aaaeb98, 2026-11-25): "euler" and "heun" meant
# the ODE solvers of whichever objective the run had; every sampler carried ``eta`` (DDIM's alone).
_OLD_SAMPLER_NAMES = {"dpmpp": "dpmpp_2m"}
_OLD_ODE_NAMES = {"euler": ("ode_euler", "flow_euler"), "heun": ("ode_heun", "flow_heun")}
_TAKES_ETA = ("ddim",)


def upgrade(section: Mapping, origin: str) -> CheckpointRecord:
    """The record of a format-0 section: the resolved run config as YAML (``config_yaml``), and
    since the travelling checkpoints (7624ce6, 2026-12-05) the codec and the class names beside it.
    The config's layout changed during format 0's life; each change this reads:

    - until aaaeb98 (2026-11-25): sampler names dpmpp / euler / heun, each with ``eta``;
    - until 8a50a62 (2026-12-05): the grid's guidance as ``callbacks.sample_grid.cfg_scale`` /
      ``guided_channels`` (``guidance_interval`` since f931c80), the FID's settings in
      ``callbacks.fid``; since then one ``guidance`` node and one ``fid_protocol`` node;
    - before 7624ce6 the codec is not beside the config. From 5ec4f39 (2026-11-26: the section's
      ``nonfinite`` state came with it) train refused a ``vae`` other than the data's, so the config's
      ``vae.codec`` is the codec when it describes one fully (identity, a pretrained VAE's id); a small
      VAE's weights, and any codec of an earlier run, are the prepared dir's (codec None).
    """
    text = section.get("config_yaml")
    if not text:
        raise RecordError(f"{origin} is not a ditlab checkpoint (no stored run config)")
    try:
        cfg = OmegaConf.create(text)
        objective = _plain(_need(cfg, "diffusion.objective", origin))
        flow = "flow" in str(objective.get("_target_", "")).lower()
        grid = OmegaConf.select(cfg, "callbacks.sample_grid")
        on_grid = grid is not None and "sampler" in grid
        sampler = _old_sampler(grid.sampler if on_grid else _need(cfg, "sampler", origin), flow)
        return CheckpointRecord(
            model=_plain(_need(cfg, "model", origin)),
            objective=objective,
            codec=section["codec"] if "codec" in section else _old_codec(cfg) if "nonfinite" in section else None,
            sampler=sampler,
            guidance=_old_guidance(cfg, grid),
            fid_protocol=_old_protocol(cfg, flow),
            classes=None if section.get("classes") is None else [str(c) for c in section["classes"]],
            prepared_dir=OmegaConf.select(cfg, "data.prepared_dir"),
            config_yaml=text,
            format_version=0,
        )
    except OmegaConfBaseException as err:
        raise RecordError(f"{origin}: its stored run config cannot be read ({str(err).splitlines()[0]})") from err


def _need(cfg: DictConfig, key: str, origin: str):
    node = OmegaConf.select(cfg, key)
    if node is None:
        raise RecordError(f"{origin}: its stored run config has no {key}; expected a ditlab training config")
    return node


def _old_sampler(node, flow: bool) -> dict:
    sampler = _arguments(node)
    name = sampler["name"]
    name = _OLD_SAMPLER_NAMES.get(name) or (_OLD_ODE_NAMES[name][flow] if name in _OLD_ODE_NAMES else name)
    if name not in _TAKES_ETA:
        sampler.pop("eta", None)
    return {**sampler, "name": name}


def _old_guidance(cfg: DictConfig, grid) -> dict:
    """The grid's guidance: its node, or its cfg_scale keys before the node; the run's node without
    a grid; DiT's 1.5 for a run before the node without a grid."""
    if grid is not None and "guidance" in grid:
        return _arguments(grid.guidance)
    if grid is not None and "cfg_scale" in grid:
        return _old_guidance_keys(grid)
    if "guidance" in cfg:
        return _arguments(cfg.guidance)
    return dict(OFFICIAL_GUIDANCE)


def _old_guidance_keys(node) -> dict:
    interval = node.get("guidance_interval")
    return {
        "scale": float(node.cfg_scale),
        "channels": node.get("guided_channels"),
        "interval": None if interval is None else list(interval),
    }


def _old_protocol(cfg: DictConfig, flow: bool) -> dict | None:
    """The ``fid_protocol`` node, or before it the FID callback's own settings."""
    if "fid_protocol" in cfg:
        protocol = _protocol_arguments(cfg.fid_protocol)
        if protocol.get("sampler") is not None:
            protocol["sampler"] = _old_sampler(protocol["sampler"], flow)
        return protocol
    fid = OmegaConf.select(cfg, "callbacks.fid")
    if fid is None:
        return None
    keys = ("extractor", "num_samples", "seed", "reference", "weights_path", "metrics", "batch_size")
    protocol = {k: _plain(fid)[k] for k in keys if k in fid}
    protocol["sampler"] = _old_sampler(fid.sampler, flow) if fid.get("sampler") is not None else None
    protocol["guidance"] = _old_guidance_keys(fid) if "cfg_scale" in fid else dict(OFFICIAL_GUIDANCE)
    return protocol


def _old_codec(cfg: DictConfig) -> dict | None:
    """The codec the config's ``vae.codec`` describes fully (identity, a pretrained VAE's hub id or
    path); None for the small VAE, whose weights only its prepared dir holds."""
    codec = OmegaConf.select(cfg, "vae.codec")
    target = str(codec.get("_target_", "")) if codec is not None else ""
    name = OmegaConf.select(cfg, "vae.name")
    if target.endswith(".IdentityVAE"):
        return {"record": {"kind": "identity", "scale_factor": float(codec.get("scale_factor", 1.0)), "name": name}}
    if target.endswith(".PretrainedVAE"):
        scale = float(codec.scale_factor)
        return {"record": {"kind": "pretrained", "path": str(codec.path), "scale_factor": scale, "name": name}}
    return None
