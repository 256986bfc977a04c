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

from ditlab.models.dit import DiT, sincos_pos_embed_2d


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

    if not model.official_layout:  # diffusers' DiT has LayerNorm, GELU, sin-cos positions and no QK-norm
        raise ValueError(
            f"a DiT with {model.switches} has no diffusers counterpart; expected the official layout "
            "(model.norm=layer, mlp=gelu, pos=sincos, qk_norm=false)"
        )
    target = DiTTransformer2DModel(**diffusers_config(model))
    target.load_state_dict(to_diffusers_state_dict(model.state_dict(), len(model.blocks)), strict=True)
    return target.eval()


def dit_kwargs(config) -> dict:
    """``DiT`` constructor arguments of a diffusers ``DiTTransformer2DModel`` config."""
    return dict(
        input_size=config.sample_size,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        hidden_size=config.num_attention_heads * config.attention_head_dim,
        depth=config.num_layers,
        num_heads=config.num_attention_heads,
        num_classes=config.num_embeds_ada_norm,
        learn_sigma=config.out_channels == 2 * config.in_channels,
    )


def from_diffusers_state_dict(sd: dict[str, torch.Tensor], kwargs: dict) -> dict[str, torch.Tensor]:
    """A diffusers DiT state_dict in the official layout (block 0's copy of the shared embedders)."""
    hidden, grid = kwargs["hidden_size"], kwargs["input_size"] // kwargs["patch_size"]
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "pos_embed": sincos_pos_embed_2d(hidden, grid).float().unsqueeze(0),  # fixed, identical by construction
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
    }
    for j, name in ((0, "linear_1"), (2, "linear_2")):
        out[f"t_embedder.mlp.{j}.weight"] = sd[f"{emb}timestep_embedder.{name}.weight"]
        out[f"t_embedder.mlp.{j}.bias"] = sd[f"{emb}timestep_embedder.{name}.bias"]
    for i in range(kwargs["depth"]):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[b + "adaLN_modulation.1.weight"] = sd[d + "norm1.linear.weight"]
        out[b + "adaLN_modulation.1.bias"] = sd[d + "norm1.linear.bias"]
        out[b + "attn.qkv.weight"] = torch.cat([sd[f"{d}attn1.to_{p}.weight"] for p in "qkv"])
        out[b + "attn.qkv.bias"] = torch.cat([sd[f"{d}attn1.to_{p}.bias"] for p in "qkv"])
        for src, dst in (("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2")):
            out[f"{b}{src}.weight"], out[f"{b}{src}.bias"] = sd[f"{d}{dst}.weight"], sd[f"{d}{dst}.bias"]
    for dst, src in (("final_layer.adaLN_modulation.1", "proj_out_1"), ("final_layer.linear", "proj_out_2")):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
    return out


def read_diffusers_dit(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(official-layout state_dict, DiT kwargs) of a diffusers ``DiTTransformer2DModel`` folder or a
    DiTPipeline folder (its ``transformer/``), read offline on the CPU."""
    from diffusers import DiTTransformer2DModel

    path = Path(path)
    sub = "transformer" if (path / "transformer" / "config.json").is_file() else None
    if sub is None and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a diffusers DiT folder; expected config.json (or transformer/config.json) in it"
        )
    transformer = DiTTransformer2DModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    kwargs = dit_kwargs(transformer.config)
    return from_diffusers_state_dict(transformer.state_dict(), kwargs), kwargs
