"""Convert between ditlab's DiT (official layout) and diffusers' ``DiTTransformer2DModel``.

diffusers keeps a copy of the timestep and label embedders in every block (its AdaLayerNormZero
owns them) and splits the fused qkv projection; export copies the shared embedders into each
block, import takes block 0's. Export then import gives back the same state_dict, bit for bit.

Numerical note, measured: diffusers' DiT computes timestep frequencies as exp(-ln(10^4) i / 127)
(``downscale_freq_shift=1``), the official code as exp(-ln(10^4) i / 128). The two models agree
exactly at t = 0 and differ slightly at t > 0, the same for any converted DiT checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditlab.models.dit import DiT


def diffusers_config(model: DiT) -> dict:
    hidden = model.pos_embed.shape[-1]
    return dict(
        num_attention_heads=model.num_heads,
        attention_head_dim=hidden // model.num_heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=len(model.blocks),
        sample_size=model.input_size,
        patch_size=model.patch_size,
        num_embeds_ada_norm=model.num_classes,
        norm_eps=1e-6,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        attention_bias=True,
    )


def to_diffusers_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"]}
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = d + "norm1.emb."
        for j, name in ((0, "linear_1"), (2, "linear_2")):
            out[f"{emb}timestep_embedder.{name}.weight"] = sd[f"t_embedder.mlp.{j}.weight"]
            out[f"{emb}timestep_embedder.{name}.bias"] = sd[f"t_embedder.mlp.{j}.bias"]
        out[f"{emb}class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        out[d + "norm1.linear.weight"] = sd[b + "adaLN_modulation.1.weight"]
        out[d + "norm1.linear.bias"] = sd[b + "adaLN_modulation.1.bias"]
        for part, w, bias in zip("qkv", sd[b + "attn.qkv.weight"].chunk(3), sd[b + "attn.qkv.bias"].chunk(3)):
            out[f"{d}attn1.to_{part}.weight"], out[f"{d}attn1.to_{part}.bias"] = w, bias
        for src, dst in (("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2")):
            out[f"{d}{dst}.weight"], out[f"{d}{dst}.bias"] = sd[f"{b}{src}.weight"], sd[f"{b}{src}.bias"]
    for src, dst in (("final_layer.adaLN_modulation.1", "proj_out_1"), ("final_layer.linear", "proj_out_2")):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
    return {k: v.clone() for k, v in out.items()}


def to_diffusers(model: DiT):
    from diffusers import DiTTransformer2DModel

    target = DiTTransformer2DModel(**diffusers_config(model))
    target.load_state_dict(to_diffusers_state_dict(model.state_dict(), len(model.blocks)), strict=True)
    return target.eval()


def from_diffusers(transformer) -> DiT:
    c = transformer.config
    hidden = c.num_attention_heads * c.attention_head_dim
    model = DiT(
        input_size=c.sample_size,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        hidden_size=hidden,
        depth=c.num_layers,
        num_heads=c.num_attention_heads,
        num_classes=c.num_embeds_ada_norm,
        learn_sigma=c.out_channels == 2 * c.in_channels,
    )
    sd = transformer.state_dict()
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "pos_embed": model.pos_embed.detach().clone(),  # fixed sin-cos table, identical by construction
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
    }
    for j, name in ((0, "linear_1"), (2, "linear_2")):
        out[f"t_embedder.mlp.{j}.weight"] = sd[f"{emb}timestep_embedder.{name}.weight"]
        out[f"t_embedder.mlp.{j}.bias"] = sd[f"{emb}timestep_embedder.{name}.bias"]
    for i in range(c.num_layers):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[b + "adaLN_modulation.1.weight"] = sd[d + "norm1.linear.weight"]
        out[b + "adaLN_modulation.1.bias"] = sd[d + "norm1.linear.bias"]
        out[b + "attn.qkv.weight"] = torch.cat([sd[f"{d}attn1.to_{p}.weight"] for p in "qkv"])
        out[b + "attn.qkv.bias"] = torch.cat([sd[f"{d}attn1.to_{p}.bias"] for p in "qkv"])
        for src, dst in (("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2")):
            out[f"{b}{src}.weight"], out[f"{b}{src}.bias"] = sd[f"{d}{dst}.weight"], sd[f"{d}{dst}.bias"]
    for dst, src in (("final_layer.adaLN_modulation.1", "proj_out_1"), ("final_layer.linear", "proj_out_2")):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
    model.load_state_dict(out, strict=True)
    return model.eval()


def load_diffusers_dit(path: str | Path) -> DiT:
    """A diffusers ``DiTTransformer2DModel`` folder, or a DiTPipeline folder (its ``transformer/``),
    as a ditlab ``DiT`` on the CPU, read offline."""
    from diffusers import DiTTransformer2DModel

    path = Path(path)
    sub = "transformer" if (path / "transformer" / "config.json").is_file() else None
    if sub is None and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a diffusers DiT folder; expected config.json (or transformer/config.json) in it"
        )
    transformer = DiTTransformer2DModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    return from_diffusers(transformer)


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, ema: bool = True) -> Path:
    """A ditlab .ckpt or an official DiT .pt -> a diffusers transformer directory (save_pretrained)."""
    from ditlab.inference import load_network

    net, _, _ = load_network(ckpt, ema)
    to_diffusers(net).save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ditlab.interop.diffusers_dit",
        description="export a ditlab or official DiT checkpoint to diffusers",
    )
    parser.add_argument("ckpt")
    parser.add_argument("out_dir")
    parser.add_argument("--raw", action="store_true", help="export the raw weights, not the EMA")
    args = parser.parse_args(argv)
    from ditlab.cli import exit_on_error

    # the checkpoint is read (and checked) before out_dir is created: a bad one writes nothing
    print(exit_on_error("ditlab.export", export_checkpoint, args.ckpt, args.out_dir, not args.raw))


if __name__ == "__main__":
    main()
