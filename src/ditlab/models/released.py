"""What the readers of released checkpoints share: the families, the file, the shapes.

The DiT family's released checkpoints (DiT, SiT, REPA, LightningDiT) are torch ``.pt`` files (a
plain state_dict, or a training checkpoint ``{"model", "ema", "opt", "args" | "config", ...}``) or
``.safetensors``, all in the official DiT key layout with each family's additions. Each family's
reader (``models.official``, ``models.sit``, ``models.repa``, ``models.lightningdit``) turns its
file into ditlab's layout and the DiT arguments that rebuild the network; what they have in common
is here:

- ``Family``: the facts of a family that its weights do not hold: how its network reads time
  (``flow_time``, the ``FlowMatching`` arguments; None: DiT's Gaussian diffusion) and the name of
  its published sampling protocol (``conf/protocol/<name>.yaml``);
- ``read_released_file``: the file's object, read on the CPU with ``weights_only=True`` (the official
  training checkpoints pickle an argparse Namespace: exactly that class is allowed);
- ``training_weights``: the EMA or the raw weights of a training checkpoint, or the plain state_dict;
- ``shape_kwargs``: the DiT arguments the tensor shapes fix, and the head count, which no shape shows.

A misfit (a file of another family, a shape no family has) is one ``ValueError`` line.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ditlab.models.dit import DIT_SIZES

# The heads are not visible in any tensor shape; the papers fix them per hidden size (S, B, L, XL,
# and LightningDiT's 1.0B and 1.6B).
PAPER_HEADS = {hidden: heads for (_, hidden, heads) in DIT_SIZES.values()} | {1536: 24, 1792: 28}
PAPER_SIZES = {(depth, hidden): name for name, (depth, hidden, _) in DIT_SIZES.items()} | {
    (24, 1536): "1p0B",
    (28, 1792): "1p6B",
}
REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
)


@dataclass(frozen=True)
class Family:
    """A model family whose released checkpoints ditlab reads.

    name: the ``family=`` value (dit, sit, repa, lightningdit); title: as its paper writes it.
    flow_time: ``FlowMatching`` arguments of the network's time convention (None: Gaussian diffusion).
    protocol: its published sampling protocol, ``conf/protocol/<protocol>.yaml``.
    vae, scale_factor: the autoencoder its sampling decodes with (hub id; None: none on the hub in
        diffusers' format, to be given) and the latents' scale (SD-VAE's 0.18215; LightningDiT's
        latent_multiplier 1.0).
    latent_stats: its latents are normalised per channel by the dataset's statistics (VA-VAE's
        ``latents_stats.pt``), to be given with the checkpoint.
    """

    name: str
    title: str
    flow_time: dict | None
    protocol: str
    vae: str | None = "stabilityai/sd-vae-ft-ema"  # DiT's, SiT's and REPA's sample_ddp / generate default
    scale_factor: float = 0.18215
    latent_stats: bool = False


DIT = Family("dit", "DiT", None, "dit")
SIT = Family("sit", "SiT", {"time_scale": 1.0, "data_at_one": True}, "sit")
REPA = Family("repa", "REPA", {"time_scale": 1.0, "data_at_one": False}, "repa")
LIGHTNINGDIT = Family(
    "lightningdit", "LightningDiT", {"time_scale": 1.0, "data_at_one": True}, "lightningdit", None, 1.0, True
)
FAMILIES = {f.name: f for f in (DIT, SIT, REPA, LIGHTNINGDIT)}
FAMILY_CHOICES = ("auto", *FAMILIES)


@dataclass
class ReleasedWeights:
    """A released checkpoint read into ditlab's layout.

    state_dict: the network's weights (official DiT key names, ditlab's switches' names).
    dit_kwargs: ``DiT`` arguments that rebuild the network (switches included).
    weights: "ema" | "raw" | "released" (a plain state_dict: the released files hold EMA weights).
    dropped: what the file holds that the network does not use (REPA's projectors, ...), described.
    evidence: why this family (auto-detection), for the log line.
    """

    family: Family
    state_dict: dict[str, torch.Tensor]
    dit_kwargs: dict
    weights: str
    dropped: list[str] = field(default_factory=list)
    evidence: str = ""

    def describe(self, path: str | Path) -> str:
        """One line: family, size, EMA or raw, and what was left out."""
        k = self.dit_kwargs
        size = PAPER_SIZES.get((k["depth"], k["hidden_size"]))
        name = (
            f"{self.family.title}-{size}/{k['patch_size']}"
            if size and k["num_heads"] == PAPER_HEADS.get(k["hidden_size"])
            else f"{self.family.title} of depth {k['depth']}, hidden {k['hidden_size']}, {k['num_heads']} heads, "
            f"patch {k['patch_size']}"
        )
        params = sum(v.numel() for key, v in self.state_dict.items() if key != "pos_embed") / 1e6
        weights = {"ema": "EMA weights", "raw": "raw weights", "released": "a plain state_dict (released: EMA)"}
        parts = [
            f"{Path(path).name}: {self.family.title} format{f' ({self.evidence})' if self.evidence else ''}",
            f"{name} on {k['in_channels']}x{k['input_size']}x{k['input_size']} latents, {k['num_classes']} classes, "
            f"{params:.1f}M parameters",
            weights[self.weights],
        ]
        return "; ".join(parts + [f"not used: {d}" for d in self.dropped])


def read_released_file(path: str | Path) -> dict:
    """The object a ``.pt`` holds (or a ``.safetensors`` file's tensors), on the CPU, weights only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; expected a .pt or .safetensors file")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        # Official training checkpoints pickle their argparse Namespace; allow exactly that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{str(path)!r} is not a readable DiT checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}; expected a state_dict or a training checkpoint")
    return obj


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def training_weights(obj: dict, path: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, "ema" | "raw" | "released"): a training checkpoint's ``ema`` weights (``model``
    with ``ema=False``, or when it has no EMA), else the file's plain state_dict. Prefixes that
    DDP or torch.compile put on keys (``module.``, ``_orig_mod.``) are taken off."""
    if is_state_dict(obj.get("ema")) and ema:
        state, which = obj["ema"], "ema"
    elif is_state_dict(obj.get("model")):
        state, which = obj["model"], "raw"
    elif is_state_dict(obj):
        state, which = obj, "released"
    else:
        raise ValueError(
            f"{str(path)!r} holds no DiT state_dict; expected a dict of tensors or one with an 'ema' entry"
        )
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}, which


def run_arguments(obj: dict) -> dict:
    """The training run's own record, as a plain dict: official ``args`` (an argparse Namespace) or
    LightningDiT's ``config`` (a dict); {} for a plain state_dict."""
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(obj.get("config"), dict):
        return obj["config"]
    return args if isinstance(args, dict) else {}


def block_count(state_dict: dict, prefix: str = "blocks") -> int:
    found = [int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
    return 1 + max(found) if found else 0


def check_required(state_dict: dict, path: str | Path, family: Family) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise ValueError(
            f"{str(path)!r} is not a {family.title} state_dict (no {missing[0]}); expected official DiT key names"
        )


def heads_for(hidden: int, num_heads: int | None, path: str | Path, recorded: int | None = None) -> int:
    """The head count: given (``num_heads``), recorded in the file (``recorded``, e.g. a RoPE table's
    or a q-norm's width), or the papers' for a paper width; else one line naming the option."""
    heads = num_heads or recorded or PAPER_HEADS.get(hidden)
    if heads is None:
        raise ValueError(
            f"{str(path)!r} has hidden size {hidden}, not a paper config, and no tensor tells its head count; "
            "expected num_heads=<heads> (an option of ditlab.sample and ditlab.export; init_from takes the run's "
            "model.num_heads)"
        )
    if hidden % heads:
        raise ValueError(f"{str(path)!r} has hidden size {hidden}, not divisible by num_heads={heads}")
    return heads


def shape_kwargs(state_dict: dict, mlp_hidden: int, mlp_ratio_of=None) -> dict:
    """The DiT arguments the shapes fix: size, patch, channels, depth, classes, learn_sigma, MLP ratio.
    ``mlp_ratio_of(mlp_hidden, hidden)`` inverts the MLP's width rule (GELU: hidden x ratio)."""
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    grid = round(state_dict["pos_embed"].shape[1] ** 0.5)
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    ratio = mlp_ratio_of(mlp_hidden, hidden) if mlp_ratio_of else mlp_hidden / hidden
    return dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=block_count(state_dict),
        mlp_ratio=ratio,
        # The table has a null-class row whenever the model was trained with label dropout.
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )


# ------------------------------------------------------------------------------------------ telling apart
LIGHTNINGDIT_MARKS = (
    (re.compile(r"^blocks\.\d+\.mlp\.w12\."), "SwiGLU (mlp.w12)"),
    (re.compile(r"^blocks\.\d+\.norm1\.weight$"), "RMSNorm gains (norm1.weight)"),
    (re.compile(r"^feat_rope\.freqs_cos$"), "a RoPE table (feat_rope)"),
)


def lightningdit_marks(state_dict: dict) -> list[str]:
    """What in a state_dict only LightningDiT's blocks have (SwiGLU, RMSNorm gains, RoPE, adaLN
    without shift); [] for the official layout."""
    marks = [what for pattern, what in LIGHTNINGDIT_MARKS if any(pattern.match(k) for k in state_dict)]
    ada = state_dict.get("blocks.0.adaLN_modulation.1.weight")
    if ada is not None and ada.shape[0] == 4 * ada.shape[1]:
        marks.append("adaLN without shift (4 x hidden)")
    return marks


def has_projectors(state_dict: dict) -> bool:
    return any(k.startswith("projectors.") for k in state_dict)


BY_NAME = "its file name"
BY_DEFAULT = "DiT and SiT files have the same keys; family=sit reads a SiT file"


def detect_family(obj: dict, state_dict: dict, path: str | Path) -> tuple[Family, str]:
    """(family, the evidence) of a released file: its run record, then its keys, then its file name
    (SiT's download is ``SiT-XL-2-256x256.pt``); else DiT, whose keys SiT's files share."""
    record = run_arguments(obj)
    model = record.get("model")
    model_type = model.get("model_type", "") if isinstance(model, dict) else str(model or "")
    if model_type.startswith("LightningDiT"):
        return LIGHTNINGDIT, f"its config's model_type {model_type}"
    if model_type.startswith("SiT"):
        return (REPA, "its args.model and projectors") if has_projectors(state_dict) else (SIT, "its args.model")
    if model_type.startswith("DiT"):
        return DIT, "its args.model"
    if has_projectors(state_dict):
        return REPA, "projectors.*"
    marks = lightningdit_marks(state_dict)
    if marks:
        return LIGHTNINGDIT, marks[0]
    name = Path(path).name.lower()
    if name.startswith("sit"):
        return SIT, BY_NAME
    if name.startswith("lightningdit"):
        return LIGHTNINGDIT, BY_NAME
    return DIT, BY_DEFAULT


def check_family_fits(family: Family, obj: dict, state_dict: dict, path: str | Path) -> None:
    """A family named by the user (``family=``) against what the file shows (its run record or its
    keys; a file name or the shared DiT/SiT keys prove nothing): one line on a contradiction."""
    found, evidence = detect_family(obj, state_dict, path)
    if found is family or evidence in (BY_NAME, BY_DEFAULT):
        return
    raise ValueError(
        f"{str(path)!r} is a {found.title} checkpoint ({evidence}), not {family.title}; "
        f"expected family={found.name} (or family=auto)"
    )
