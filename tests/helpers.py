"""Shared test helpers: tiny image folders, composed configs (the real conf/, tiny overrides), tiny
runs in-process or as commands, and exact comparisons of their checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning import Callback
from omegaconf import open_dict
from PIL import Image

from ditlab.data.prepared import PreparedDir
from ditlab.data.shards import ShardWriter
from ditlab.prepare import prepare_from_config
from ditlab.runtime import faults
from ditlab.train import train

CONF_DIR = str(Path(__file__).resolve().parents[1] / "src" / "ditlab" / "conf")


def make_image_folder(
    root: Path, classes=("cat", "dog", "fox"), per_class: int = 10, size=(20, 24), corrupt: bool = True, seed: int = 0
) -> Path:
    """Small RGB PNGs, one sub-folder per class; each class has its own mean colour."""
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([60 * k, 255 - 60 * k, 128], dtype=np.float64)
            arr = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG this is not an image")
    return root


def compose_cfg(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=False)


def folder_overrides(
    folder, prepared, size: int = 8, val_fraction: float = 0.25, vae: str | None = "identity", extra=()
):
    """``ditlab.prepare``'s overrides for an image folder at ``size`` x ``size`` into ``prepared``
    (one encode worker, no progress bars, no reference unless ``extra`` asks); ``vae`` None: ``extra``
    names it."""
    return [
        "data=folder",
        f"data.source.root={folder}",
        f"data.source.image_size={size}",
        f"data.source.val_fraction={val_fraction}",
        *([f"vae={vae}"] if vae else []),
        f"data.prepared_dir={prepared}",
        "encode.num_workers=0",
        "encode.progress=false",
        "data.reference.extractor=null",
        *extra,
    ]


def prepare_tiny_folder(tmp: Path, reference: str | None = None, store_images: bool = False) -> Path:
    """Identity-VAE 'latents' (3, 8, 8) of a tiny 3-class image folder (16 images a class, 25% val);
    ``reference="clf"`` also trains a 2-second classifier and writes its FID reference statistics;
    ``store_images`` keeps the uint8 images in the shards (and with them, each image's flip: views 2)."""
    folder = make_image_folder(tmp / "images", per_class=16, size=(8, 8), corrupt=False)
    overrides = folder_overrides(
        folder,
        tmp / "latents",
        extra=[
            f"data.reference.extractor={reference or 'null'}",
            "data.reference.classifier_steps=20",
            f"data.store_images={store_images}",
        ],
    )
    cfg = compose_cfg("prepare", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp)
    return prepare_from_config(cfg)


def randomised(model):
    """Non-zero weights everywhere (DiT starts with a zero output), pos_embed untouched, eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.05)
    return model.eval()


def tiny_overrides(prepared, root, steps=4, extra=()):
    """experiment=smoke pointed at the tiny prepared folder (3 classes, 8x8x3 identity latents): the
    model takes its input size, channels and class count from the data, as a user's run does."""
    return [
        "experiment=smoke",
        "data=folder",
        f"data.prepared_dir={prepared}",
        "data.module.batch_size=8",
        "model.patch_size=2",
        "sampler.steps=4",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        f"paths.root_dir={root}",
        "prepare_if_missing=false",
        "callbacks.throughput.window_steps=2",
        "fid_protocol.num_samples=12",  # where the data holds reference statistics: not the default 1000
        *extra,
    ]


def compose_run(prepared, out_dir: Path, steps: int = 4, extra=()):
    """The tiny run's config with its run dir at ``out_dir``."""
    cfg = compose_cfg("train", tiny_overrides(prepared, out_dir.parent, steps, extra))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def prepare_cfg(tmp_path: Path, folder: Path, vae: str = "identity", extra=()):
    """``ditlab.prepare`` of an image folder at 16x16 (20% val), into ``tmp_path/prepared``."""
    cfg = compose_cfg(
        "prepare",
        folder_overrides(folder, tmp_path / "prepared", 16, 0.2, vae, ["encode.batch_size=8", *extra]),
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def read_meta(prepared) -> dict:
    return PreparedDir(prepared).read_meta()


# ------------------------------------------------------------------ runs for the fault tests
# A fast EMA (decay 0.5) and lr 1e-2 make every update visible: an EMA one update behind, or a
# resumed run that redraws a different random stream, changes the compared tensors.
STEPS = 8
FAST = [
    "module.ema_decay=0.5",
    "optim.optimizer.lr=1e-2",
    "callbacks.sample_grid=null",
    "callbacks.fid=null",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.checkpoint.keep_last=0",
    "ckpt_path=last",
    "+callbacks.faults._target_=ditlab.runtime.faults.FaultInjection",  # DITLAB_FAULT's batch and step points
]


def fault_overrides(prepared, root: Path, steps: int = STEPS, extra=()) -> list[str]:
    return tiny_overrides(prepared, root, steps, [*FAST, *extra])


def compose_fault_run(prepared, out_dir: Path, steps: int = STEPS, extra=()):
    cfg = compose_cfg("train", fault_overrides(prepared, out_dir.parent, steps, extra))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def train_in_process(cfg):
    faults.reset()
    return train(cfg)


def cli_env(**extra) -> dict:
    # The same thread count as this process: CPU float reductions then match bit for bit.
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def run_command(module: str, args: list[str], cwd: Path, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_cli(prepared, out_dir: Path, steps: int = STEPS, extra=(), timeout: float = 120, **env):
    args = [*fault_overrides(prepared, out_dir.parent, steps, extra), f"hydra.run.dir={out_dir}"]
    return run_command("ditlab.train", args, out_dir.parent, timeout, **env)


def full_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights, EMA, optimizer and LR-scheduler state of a checkpoint, flattened to named tensors."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    flat = {f"state_dict/{k}": v for k, v in ckpt["state_dict"].items()}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)
        elif isinstance(obj, (int, float)):
            flat[prefix] = torch.tensor(obj)

    walk("optimizer", ckpt["optimizer_states"])
    walk("lr_schedulers", ckpt.get("lr_schedulers", []))
    flat["global_step"] = torch.tensor(ckpt["global_step"])
    return flat


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = full_state(a), full_state(b)
    assert sa.keys() == sb.keys()
    assert any(k.startswith("state_dict/ema.net.") for k in sa) and any(k.startswith("optimizer/") for k in sa)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def temps(directory: Path) -> list[Path]:
    return list(directory.glob(".*.tmp-*")) if directory.is_dir() else []


def run_cli(args, cwd, timeout=300, module="ditlab.train"):
    """``python -m <module> args`` in ``cwd``, W&B offline; the CompletedProcess."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def invoke_main(main, prog: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """A command's Hydra main run in this process, as ``prog args`` would run it (a fresh process
    costs seconds of imports): (exit code, stdout, stderr)."""
    GlobalHydra.instance().clear()
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [prog, *args])
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def seed_reference_dit(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10):
    """The official DiT as the seed's model code writes it (timm's PatchEmbed / Attention / Mlp, the
    numpy float64 sin-cos table, learn_sigma, label dropout 0.1), independent of ditlab's model: the
    reference that ditlab's official layout must load strictly and match to 0.0. Eval mode."""
    import math

    import numpy as np
    import torch
    import torch.nn as nn
    from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

    def modulate(x, shift, scale):
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def sincos_1d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    def sincos_2d(dim, grid_size):
        grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
        return np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)

    class TimestepEmbedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

        def forward(self, t):
            freqs = torch.exp(-math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128)
            args = t[:, None].float() * freqs[None]
            return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

    class LabelEmbedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

        def forward(self, y):
            return self.embedding_table(y)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            gelu = lambda: nn.GELU(approximate="tanh")  # noqa: E731
            self.mlp = Mlp(in_features=hidden_size, hidden_features=4 * hidden_size, act_layer=gelu, drop=0)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

        def forward(self, x, c):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    class FinalLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.linear = nn.Linear(hidden_size, patch_size * patch_size * 2 * in_channels)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

        def forward(self, x, c):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm_final(x), shift, scale))

    class SeedDiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
            self.t_embedder = TimestepEmbedder()
            self.y_embedder = LabelEmbedder()
            grid = input_size // patch_size
            table = torch.from_numpy(sincos_2d(hidden_size, grid)).float().unsqueeze(0)
            self.pos_embed = nn.Parameter(table, requires_grad=False)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.final_layer = FinalLayer()

        def forward(self, x, t, y):
            x = self.x_embedder(x) + self.pos_embed
            c = self.t_embedder(t) + self.y_embedder(y)
            for block in self.blocks:
                x = block(x, c)
            x = self.final_layer(x, c)
            p, c_out, h = patch_size, 2 * in_channels, int(x.shape[1] ** 0.5)
            x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, h, p, p, c_out))
            return x.reshape(x.shape[0], c_out, h * p, h * p)

    return SeedDiT().eval()


# ------------------------------------------------------------------ the object store (s3://)
# Servers the tests started, by port: the outage callback below stops one from inside a training run.
S3_SERVERS: dict = {}


class StoreOutage(Callback):
    """Stops the S3 server on ``port`` at the end of training step ``at_step`` (the store goes away
    mid-epoch); added as ``+callbacks.outage._target_=helpers.StoreOutage``."""

    def __init__(self, port: int, at_step: int):
        self.port, self.at_step = port, at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            S3_SERVERS[self.port].stop()


def rechunked(prepared: Path, dest: Path, copies: int = 1) -> Path:
    """A copy of a prepared dir whose train split holds its items ``copies`` times over, one item a
    chunk: a tiny split is otherwise one chunk, fetched whole before the first step."""
    from litdata import StreamingDataset

    shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("train", PreparedDir.META))
    items = list(StreamingDataset(str(prepared / "train")))
    writer = ShardWriter(dest / "train", chunk_bytes="1B")  # litdata closes a chunk once it is this full
    for item in items * copies:
        writer.add(np.asarray(item["latent"]), int(item["label"]))
    writer.finish()
    meta = PreparedDir(prepared).read_meta()
    meta["splits"]["train"]["count"] = len(items) * copies
    PreparedDir(dest).write_meta(meta)
    return dest


def store_files(server, bucket: str, prefix: str) -> dict[str, bytes]:
    """{name under prefix: content} of every object under ``s3://bucket/prefix``."""
    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    return {k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
