"""A complete diffusers folder from a ditlab run (or an official checkpoint): what ``DiTPipeline``
loads offline, plus what diffusers has no slot for.

    <out>/model_index.json            DiTPipeline, with id2label
    <out>/transformer/                DiTTransformer2DModel (ditlab.models.diffusers_dit.to_diffusers)
    <out>/vae/                        AutoencoderKL, scaling_factor = the run's latent scale (absent in pixel space)
    <out>/scheduler/                  DDIMScheduler with the run's exact betas (trained_betas)
    <out>/ditlab.json                 classes, latent shape, codec, weights used, source, the run's record
                                      (``runtime.record``: its sampler, guidance, FID protocol...; ditlab runs)
    <out>/ditlab_config.yaml          the run's resolved training config, for humans (ditlab runs)
    <out>/README.md                   model card: the record and measured metrics

``ditlab.inference.load_model(<out>)`` reads it back (exactly the exported weights).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import yaml
from diffusers import DDIMScheduler, DiTPipeline

from ditlab.inference import load_model, load_network
from ditlab.metrics.curve import recorded_protocol
from ditlab.models.diffusers_dit import to_diffusers
from ditlab.models.vae import PretrainedVAE
from ditlab.models.weights import EXPORT_CONFIG, EXPORT_META
from ditlab.runtime.files import atomic_path

log = logging.getLogger("ditlab.export")

DIFFUSERS_NULL_CLASS = 1000  # DiTPipeline.__call__ hard-codes the null label (ImageNet's 1000 classes)


def null_class_note(num_classes: int) -> str | None:
    if num_classes == DIFFUSERS_NULL_CLASS:
        return None
    return (
        f"diffusers' DiTPipeline uses class {DIFFUSERS_NULL_CLASS} as the null label, this model's is {num_classes}: "
        "with DiTPipeline use guidance_scale=1 (no guidance); for guided sampling load the folder with "
        "ditlab.inference.load_model"
    )


def _class_names(bundle) -> list[str]:
    """The names the checkpoint (or folder) carries; ``class_<i>`` where it has none."""
    if bundle.classes and len(bundle.classes) == bundle.num_classes:
        return [str(c) for c in bundle.classes]
    return [f"class_{i}" for i in range(bundle.num_classes)]


def _scheduler(objective):
    if not hasattr(objective, "betas"):
        raise ValueError(
            f"export needs a Gaussian (DDPM) objective for DiTPipeline's schedulers, not {type(objective).__name__}; "
            "expected diffusion=ddpm (or what=transformer: the network alone)"
        )
    betas = objective.betas.double().tolist()
    return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas, clip_sample=False, set_alpha_to_one=False)


def _run_metrics(ckpt: Path) -> dict:
    """Measured metrics of the run the checkpoint belongs to: metrics.json and the FID curve."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = {}
    if (run_dir / "metrics.json").is_file():
        summary = json.loads((run_dir / "metrics.json").read_text())
        out["final"] = {k: v for k, v in summary.get("metrics", {}).items() if k.startswith(("val/", "train/loss"))}
        out["global_step"] = summary.get("global_step")
    if (run_dir / "fid_curve.csv").is_file():
        with (run_dir / "fid_curve.csv").open(newline="") as f:
            out["fid_curve"] = list(csv.DictReader(f))
    return out


def _card_config(bundle) -> dict:
    """The record's main fields for the card: architecture, objective, sampler, guidance, the FID
    protocol behind the val/fid* numbers (fid_clf: the dataset's classifier, not Inception)."""
    record = bundle.record
    main = {"model": record.model, "objective": record.objective, "sampler": record.sampler}
    main["guidance"] = record.guidance
    protocol = recorded_protocol(record)
    if protocol is not None:
        main["fid_protocol"] = protocol.describe()
    main["prepared_dir"] = record.prepared_dir
    return main


def _model_card(bundle, ckpt: Path, ema: bool, metrics: dict, note: str | None, names: list[str]) -> str:
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [dit, class-conditional, ditlab]",
        "---",
        f"# DiT exported by ditlab from `{ckpt.name}` ({'EMA' if ema else 'raw'} weights)",
        "",
        f"{bundle.num_classes} classes ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); "
        f"latents {tuple(bundle.latent_shape)}; {sum(p.numel() for p in bundle.net.parameters()) / 1e6:.2f}M params.",
        "",
    ]
    if note:
        lines += [f"**Note:** {note}.", ""]
    lines += ["## Measured metrics", ""]
    if metrics.get("final"):
        lines += [f"At the end of training (step {metrics.get('global_step')}):", ""]
        lines += [f"- `{k}`: {v:.6g}" for k, v in sorted(metrics["final"].items())]
    else:
        lines += ["None recorded with this checkpoint."]
    if metrics.get("fid_curve"):
        rows = metrics["fid_curve"]
        cols = [c for c in rows[0] if c not in ("checkpoint",)]
        lines += ["", "FID curve (`python -m ditlab.evaluate run=...`):", "", "| " + " | ".join(cols) + " |"]
        lines += ["|" + "---|" * len(cols)] + ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += ["", "## Training config", ""]
    if bundle.record is not None:
        lines += ["```yaml", yaml.safe_dump(_card_config(bundle), sort_keys=False).rstrip(), "```", ""]
        lines += [f"Full config: `{EXPORT_CONFIG}`."]
    else:
        lines += ["An official DiT checkpoint (no ditlab training config)."]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from ditlab.diffusion import Guidance, Sampler",
        "from ditlab.inference import load_model",
        "",
        "model = load_model('<this folder>')",
        "images = model.generate([0, 1], Sampler('ddim', 50), Guidance(scale=2.0), seed=0)  # (2, C, H, W) in [-1, 1]",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_pipeline(ckpt: str | Path, out: str | Path, ema: bool = True, vae: str | None = None, **reading) -> Path:
    """Write the folder described above (atomically: built beside ``out``, then renamed). ``reading``:
    a released checkpoint's ``family``, ``num_heads``, ``latent_stats`` (``load_model``)."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={str(out)!r} exists and is not empty; expected a new directory")
    bundle = load_model(ckpt, ema, vae, **reading)
    names = _class_names(bundle)
    note = null_class_note(bundle.num_classes)
    transformer = to_diffusers(bundle.net)
    scheduler = _scheduler(bundle.objective)
    autoencoder = None
    if isinstance(bundle.codec, PretrainedVAE):
        autoencoder = bundle.codec.vae
        autoencoder.register_to_config(scaling_factor=bundle.codec.scale_factor)  # DiTPipeline divides by it
    else:
        log.warning(
            f"the run's codec is {bundle.codec.describe()['kind']} (pixel space): the folder has no vae/, so "
            "DiTPipeline cannot load it; ditlab.inference.load_model can"
        )
    if note:
        log.warning(note)
    pipe = DiTPipeline(transformer=transformer, vae=autoencoder, scheduler=scheduler)
    pipe.register_to_config(id2label={str(i): n for i, n in enumerate(names)})
    meta = {
        "format": "ditlab-diffusers-export/1",
        "source": str(ckpt),
        "weights": "ema" if ema else "raw",
        "num_classes": bundle.num_classes,
        "null_label": bundle.num_classes,
        "latent_shape": list(bundle.latent_shape),
        "codec": bundle.codec.describe(),
        "classes": names,
    }
    if bundle.record is not None:  # the codec is the folder's own (vae/, or the identity above)
        meta["record"] = bundle.record.without_codec_weights()
    with atomic_path(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2))
        if bundle.record is not None:
            (tmp / EXPORT_CONFIG).write_text(bundle.record.config_yaml)
        (tmp / "README.md").write_text(_model_card(bundle, ckpt, ema, _run_metrics(ckpt), note, names))
    log.info(f"exported {ckpt} to {out}")
    return out


def export_transformer(
    ckpt: str | Path, out: str | Path, ema: bool = True, family: str = "auto", num_heads: int | None = None
) -> Path:
    """The transformer alone (a diffusers ``DiTTransformer2DModel`` folder) of a ditlab .ckpt, a released
    DiT / SiT / REPA .pt or a diffusers folder; the checkpoint is read before ``out`` is created. The
    folder holds the weights only: a SiT or REPA network still takes its family's time (t in [0, 1])."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={str(out)!r} exists and is not empty; expected a new directory")
    transformer = to_diffusers(load_network(ckpt, ema, family, num_heads)[0])
    with atomic_path(out) as tmp:
        transformer.save_pretrained(str(tmp), safe_serialization=True)
    return out
