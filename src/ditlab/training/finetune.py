"""Start a new run from existing weights (``init_from=<path>``): fine-tuning, not resuming.

The source may be a released DiT / SiT / REPA / LightningDiT ``.pt``/``.safetensors`` (its family
told from the file, or ``finetune.family``), a ditlab ``.ckpt`` of any format (EMA or raw weights;
its record read through ``runtime.record.read_record``, as every reader does) or a diffusers
``DiTTransformer2DModel`` folder (or a whole DiTPipeline folder). The run's own model config decides
the architecture (its ``num_heads`` too, which no tensor of an official-layout file shows); the
source's weights are copied into it, adapted where that has a well-defined meaning:

- a different ``num_classes``: the label table is rebuilt; the null row (classifier-free guidance's
  unconditional embedding) is kept, the class rows start as a fresh model's do (new classes);
- a different ``input_size``: the fixed sin-cos position table is the one computed for the new grid.

Anything else that differs (depth, hidden size, heads' MLP width, patch size, channels, learn_sigma,
a LightningDiT switch) cannot be adapted and is one clear error before training, and so is a run whose
objective reads time otherwise than the source's family (a SiT network fine-tuned in ditlab's t x 1000
would start from weights that mean something else: ``diffusion=flow_sit``). Optionally some
parameters are frozen by name pattern (``finetune.freeze`` / ``finetune.train_only``). ``ckpt_path``
stays the exact resume.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

import torch

from ditlab.diffusion.flow import FlowMatching
from ditlab.models.released import Family
from ditlab.models.weights import read_dit_weights

log = logging.getLogger("ditlab.finetune")

LABEL_TABLE = "y_embedder.embedding_table.weight"
POS_EMBED = "pos_embed"


def check_source(path: str | Path) -> Path:
    """Fail before anything else happens (data preparation included) when ``init_from`` is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"init_from={str(path)!r} does not exist; expected an official DiT .pt/.safetensors, "
            "a ditlab .ckpt or a diffusers DiT folder"
        )
    return path


def _mlp(sd: dict[str, torch.Tensor]) -> str:
    if "blocks.0.mlp.fc1.weight" in sd:
        return f"GELU of width {sd['blocks.0.mlp.fc1.weight'].shape[0]}"
    return f"SwiGLU of width {sd['blocks.0.mlp.w3.weight'].shape[1]}"


def _describe(sd: dict[str, torch.Tensor]) -> dict:
    """The architecture facts a state_dict fixes (everything but classes and grid size)."""
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return {
        "hidden size": hidden,
        "in_channels": in_channels,
        "patch size": patch,
        "depth": depth,
        "MLP": _mlp(sd) if depth else None,
        "adaLN width": sd["blocks.0.adaLN_modulation.1.weight"].shape[0] if depth else 0,
        "output channels": sd["final_layer.linear.weight"].shape[0] // (patch * patch),
    }


def without_sigma_head(source: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """A learned-sigma network's weights without the sigma half of its output (the final linear's rows
    of channels >= ``channels``; a row's channel is its index modulo 2 x channels, unpatchify's order)."""
    weight, bias = source["final_layer.linear.weight"], source["final_layer.linear.bias"]
    keep = torch.arange(weight.shape[0]) % (2 * channels) < channels
    return {**source, "final_layer.linear.weight": weight[keep], "final_layer.linear.bias": bias[keep]}


def adapt_state_dict(
    source: dict[str, torch.Tensor], net: torch.nn.Module, origin: str = "init_from", drop_sigma: bool = False
):
    """``source`` reshaped to ``net``'s classes and grid; raises ValueError (one line) on a misfit.
    ``drop_sigma``: a flow network with a learned-sigma head it never used (SiT's) may fine-tune into
    a network without one.

    Returns (state_dict for ``net``, list of human-readable notes on what was adapted)."""
    target = net.state_dict()
    notes = []
    if drop_sigma and "final_layer.linear.weight" in source:
        channels = target["x_embedder.proj.weight"].shape[1]
        rows = target["final_layer.linear.weight"].shape[0]
        if source["final_layer.linear.weight"].shape[0] == 2 * rows:
            source = without_sigma_head(source, channels)
            notes.append("the learned-sigma head left out (the source's flow network never used it)")
    missing = [
        k for k in ("x_embedder.proj.weight", POS_EMBED, LABEL_TABLE, "final_layer.linear.weight") if k not in source
    ]
    if missing:
        raise ValueError(f"{origin} is not a DiT state_dict (missing {missing[0]}); expected official DiT key names")
    have, want = _describe(source), _describe(target)
    for what in want:
        if have[what] != want[what]:
            hint = " (learn_sigma differs)" if what == "output channels" else ""
            raise ValueError(
                f"{origin} has {what} {have[what]}, the model config {want[what]}{hint}; expected the same "
                "depth, hidden size, MLP width, patch size, channels and learn_sigma (only num_classes and "
                "input_size may differ)"
            )
    state = dict(source)
    src_table, new_table = source[LABEL_TABLE], target[LABEL_TABLE]  # (K + 1, D): row K is the null class
    if src_table.shape != new_table.shape:
        table = new_table.clone()  # the rows a fresh model starts with (normal, std 0.02)
        table[-1] = src_table[-1]  # the null (unconditional) embedding carries over
        state[LABEL_TABLE] = table
        notes.append(
            f"label table rebuilt for {new_table.shape[0] - 1} classes (source has {src_table.shape[0] - 1}): "
            f"null row kept, {new_table.shape[0] - 1} class rows initialised as at start"
        )
    if source[POS_EMBED].shape != target[POS_EMBED].shape:
        state[POS_EMBED] = target[POS_EMBED].clone()  # the model computed the sin-cos table for its grid
        notes.append(
            f"position table recomputed for {target[POS_EMBED].shape[1]} tokens "
            f"(source has {source[POS_EMBED].shape[1]})"
        )
    unexpected = sorted(set(state) - set(target))
    if unexpected:
        raise ValueError(
            f"{origin} has parameters this model does not ({unexpected[0]}); expected the model config's blocks "
            "(model.norm, norm_gain, mlp, qk_norm, qk_norm_kind, wo_shift as the source's)"
        )
    missing = sorted(set(target) - set(state))
    if missing:
        raise ValueError(
            f"{origin} has no {missing[0]}, which the model config has; expected the source's blocks "
            "(model.norm, norm_gain, mlp, qk_norm, qk_norm_kind, wo_shift as the source's)"
        )
    return state, notes


def check_time_convention(family: Family, objective, origin: str) -> None:
    """A released flow network (SiT, REPA, LightningDiT) fine-tunes only under an objective that reads
    time as its family does; DiT's (an eps network) may start any objective."""
    want = family.flow_time
    if want is None or objective is None:
        return
    if isinstance(objective, FlowMatching) and (objective.time_scale, objective.data_at_one) == (
        want["time_scale"],
        want["data_at_one"],
    ):
        return
    ends = "t = 1 the data" if want["data_at_one"] else "t = 1 the noise"
    raise ValueError(
        f"{origin} is a {family.title} checkpoint, whose network takes t in [0, 1] ({ends}); expected "
        f"diffusion=flow_{family.name} (FlowMatching with time_scale={want['time_scale']:g}, "
        f"data_at_one={str(want['data_at_one']).lower()})"
    )


def freeze_by_name(net: torch.nn.Module, freeze=(), train_only=None) -> int:
    """Freeze parameters whose names match a glob in ``freeze``, or all but those matching
    ``train_only``; returns how many tensors were frozen. A pattern matching nothing is an error
    (a typo would otherwise silently train everything)."""
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    for key, patterns in (("freeze", freeze or ()), ("train_only", train_only or ())):
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                raise ValueError(
                    f"finetune.{key} pattern {pattern!r} matches no trainable parameter; expected a glob over "
                    "names such as 'blocks.*.adaLN_modulation.*' or 'y_embedder.*'"
                )
    frozen = 0
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        hit = any(fnmatch.fnmatchcase(name, pat) for pat in freeze or ())
        if train_only is not None:
            hit = hit or not any(fnmatch.fnmatchcase(name, pat) for pat in train_only)
        if hit:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def init_from_weights(
    net: torch.nn.Module, path: str | Path, ema: bool = True, family: str = "auto", objective=None
) -> list[str]:
    """Copy the weights at ``path`` into ``net`` (a freshly built DiT), adapted as described above.
    ``family``: a released file's (auto: told from the file); ``objective``: the run's, checked against
    a released flow network's time convention."""
    origin = f"init_from={str(path)!r}"
    weights = read_dit_weights(check_source(path), ema, family, num_heads=net.num_heads)
    if weights.family is not None:  # a released file: trained in its family's time
        check_time_convention(weights.family, objective, origin)
    flow_family = weights.family is not None and weights.family.flow_time is not None
    state, notes = adapt_state_dict(weights.state_dict, net, origin=origin, drop_sigma=flow_family)
    net.load_state_dict(state, strict=True)
    return notes


def apply_finetune(net: torch.nn.Module, init_from: str | None, finetune_cfg, objective=None) -> None:
    """The ``train.py`` hook: weights from ``init_from`` (if set), then the configured freezing.
    ``objective``: the run's (a released flow network must be read in its family's time)."""
    if init_from:
        ema = bool(finetune_cfg.get("ema", True)) if finetune_cfg is not None else True
        family = finetune_cfg.get("family", "auto") if finetune_cfg is not None else "auto"
        notes = init_from_weights(net, init_from, ema, family, objective)
        log.info(f"init_from {init_from}: weights loaded (fresh run: step 0, new optimizer)")
        for note in notes:
            log.info(f"init_from: {note}")
    if finetune_cfg is None:
        return
    freeze, train_only = finetune_cfg.get("freeze") or (), finetune_cfg.get("train_only")
    if freeze or train_only is not None:
        frozen = freeze_by_name(net, list(freeze), None if train_only is None else list(train_only))
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        total = sum(p.numel() for p in net.parameters())
        log.info(f"finetune: froze {frozen} parameter tensors; training {trainable / 1e6:.3f}M of {total / 1e6:.3f}M")
