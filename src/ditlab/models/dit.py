"""The DiT backbone (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

A plain nn.Module: it maps (noisy latent, timestep, label) to the model output and knows nothing
about the noise schedule. Parameter names and shapes follow the official implementation exactly,
so an official checkpoint loads with ``load_state_dict(sd, strict=True)``:

    x_embedder.proj.{weight,bias}      patchify conv
    pos_embed                          frozen 2-D sin-cos table (a Parameter, so it is in the state_dict)
    t_embedder.mlp.{0,2}.*             sinusoidal timestep features -> MLP
    y_embedder.embedding_table.weight  num_classes + 1 rows; row num_classes is the null class
    blocks.N.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2,adaLN_modulation.1}.*
    final_layer.{adaLN_modulation.1,linear}.*

LayerNorms have no affine parameters (eps 1e-6): adaLN supplies shift and scale. Like the reference
model, the patch embedding, attention and MLP are timm's layers (PatchEmbed, Attention, Mlp).

LightningDiT's blocks (Yao et al. 2025, "Reconstruction vs. Generation") are switches whose defaults
are the official layout: with all four at their defaults the module tree and the state_dict are the
official ones. A switch changes only the modules it names:

    norm: layer | rms          block and final norms: LayerNorm or RMSNorm (no parameters by default)
    norm_gain: false | true    with norm=rms, RMSNorm with a learned gain, as LightningDiT's
                               (blocks.N.norm{1,2}.weight, final_layer.norm_final.weight)
    mlp: gelu | swiglu         blocks.N.mlp.{fc1,fc2} (GELU) or blocks.N.mlp.{w12,w3} (SwiGLU)
    pos: sincos | rope2d | sincos_rope2d
                               the absolute sin-cos table added to the tokens, or a 2-D rotary embedding
                               of q and k in every attention, or both (LightningDiT's released code)
    qk_norm: false | true      a norm per head on q and k: blocks.N.attn.{q_norm,k_norm}.*
    qk_norm_kind: rms | layer  which norm: RMSNorm with a gain (eps 1e-6: LightningDiT with its RMSNorm)
                               or LayerNorm with gain and bias (eps 1e-5: timm's, as REPA's SiT and
                               LightningDiT without RMSNorm have it)
    wo_shift: false | true     adaLN without the shifts (LightningDiT's ``wo_shift``): the blocks'
                               adaLN_modulation gives 4 vectors (scale, gate for attention and MLP)
"""

from __future__ import annotations

import math
from importlib import resources

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from timm.layers import Attention, Mlp, PatchEmbed

NORMS = ("layer", "rms")
MLPS = ("gelu", "swiglu")
POSITIONS = ("sincos", "rope2d", "sincos_rope2d")
QK_NORM_KINDS = ("rms", "layer")
# The official DiT layout: every switch at this value (what official and diffusers formats hold).
OFFICIAL_SWITCHES = dict(
    norm="layer", mlp="gelu", pos="sincos", qk_norm=False, qk_norm_kind="rms", norm_gain=False, wo_shift=False
)


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; expected one of {choices}")


def check_switches(
    norm: str,
    mlp: str,
    pos: str,
    qk_norm: bool,
    qk_norm_kind: str = "rms",
    norm_gain: bool = False,
    wo_shift: bool = False,
) -> None:
    """LightningDiT's switches, all checked before anything is built."""
    check_choice("norm", norm, NORMS)
    check_choice("mlp", mlp, MLPS)
    check_choice("pos", pos, POSITIONS)
    check_choice("qk_norm_kind", qk_norm_kind, QK_NORM_KINDS)
    for name, value in (("qk_norm", qk_norm), ("norm_gain", norm_gain), ("wo_shift", wo_shift)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}; expected true or false")
    if norm_gain and norm != "rms":
        raise ValueError(f"norm_gain=true with norm={norm!r}; expected norm=rms (the gain is RMSNorm's)")


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    # x (N, T, D); shift, scale (N, D) broadcast over tokens; shift None: adaLN without shift (wo_shift)
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------


def patch_embed(input_size: int, patch_size: int, in_channels: int, hidden_size: int) -> PatchEmbed:
    """timm's PatchEmbed, as the official model uses it: (N, C, H, W) -> (N, T, D) with a stride-p conv
    named ``proj``; T = (H / p) * (W / p)."""
    if input_size % patch_size != 0:
        raise ValueError(
            f"input_size={input_size} is not divisible by patch_size={patch_size}; "
            "expected a latent size that is a multiple of the patch size"
        )
    return PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, [cos, sin] order as in DiT/ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256) float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. The extra row ``num_classes`` is the null label that classifier-free
    guidance uses; in training a label is replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_null_class, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(
        self,
        labels: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(
        self,
        labels: torch.Tensor,
        train: bool,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)  # (N, D)


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


def attention(
    dim: int, num_heads: int, qk_norm: bool = False, rope: bool = False, qk_norm_kind: str = "rms"
) -> nn.Module:
    """Multi-head self-attention with a fused qkv projection (official key names ``qkv``, ``proj``),
    always through ``F.scaled_dot_product_attention`` so CUDA picks the flash / memory-efficient
    kernels; numerically it is softmax(q k^T / sqrt(d)) v. The official layout is timm's Attention;
    with QK-norm or RoPE on it is ``SelfAttention`` (the same math plus those two steps)."""
    if dim % num_heads != 0:
        raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
    if qk_norm or rope:
        return SelfAttention(dim, num_heads, qk_norm=qk_norm, qk_norm_kind=qk_norm_kind)
    attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
    attn.fused_attn = True  # timm's default too, unless the environment sets TIMM_FUSED_ATTN=0
    return attn


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm with a learned gain, cast to the input's dtype: under autocast q and k (or the tokens)
    arrive in bf16 while the gain is an fp32 parameter, and mixed dtypes miss the fused kernel. Over a
    head's channels (QK-norm) or over the width (``norm_gain``: LightningDiT's block norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class SelfAttention(nn.Module):
    """timm's attention plus LightningDiT's two options. QK-norm: an RMSNorm over each head's channels
    of q and of k, with a learned gain: nothing modulates q and k afterwards, and unit-RMS q and k alone
    would cap the logits near sqrt(head_dim), so the gain is what sets the attention's sharpness.
    RoPE: ``rope`` = the (cos, sin) tables of ``rope_2d_table``, rotating q and k after their norm.
    ``qk_norm_kind``: "rms" (RMSNorm, eps 1e-6, gain) or "layer" (LayerNorm, eps 1e-5, gain and bias:
    timm's default, which REPA's SiT and LightningDiT without its RMSNorm use)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, qk_norm_kind: str = "rms"):
        super().__init__()
        check_choice("qk_norm_kind", qk_norm_kind, QK_NORM_KINDS)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = head_norm(qk_norm_kind, self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = head_norm(qk_norm_kind, self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, h, T, d_h)
        q, k, v = qkv.unbind(0)  # (N, h, T, d_h) each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, h, T, d_h)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


def head_norm(kind: str, head_dim: int) -> nn.Module:
    if kind == "rms":
        return HeadRMSNorm(head_dim, eps=1e-6)
    return nn.LayerNorm(head_dim)  # timm's norm_layer default: eps 1e-5, gain and bias


def rope_2d_table(grid_size: int, head_dim: int, device=None, theta: float = 10000.0):
    """2-D axial rotary embedding (LightningDiT's, after EVA-02): (cos, sin), each (T, head_dim) with
    T = grid_size**2 in patch order (token = row * grid_size + col). The first half of a head's
    channels turns with the token's row, the second half with its column; within a half, channel pair
    (2i, 2i+1) turns by position * theta**(-i / (head_dim / 4)). Angles in float64 (exact for any
    grid), tables in float32; built in each forward, so the state_dict gains nothing."""
    check_rope_head_dim(head_dim)
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)  # (d_h/4,)
    pos = torch.arange(grid_size, dtype=torch.float64, device=device)
    angles = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=1)  # (G, d_h/2): a pair shares its angle
    rows = angles[:, None, :].expand(grid_size, grid_size, -1)  # token (r, c) -> the angles of r
    cols = angles[None, :, :].expand(grid_size, grid_size, -1)  # token (r, c) -> the angles of c
    table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)  # (T, d_h)
    return table.cos().float(), table.sin().float()


def check_rope_head_dim(head_dim: int) -> None:
    if head_dim % 4 != 0:
        raise ValueError(f"head dim {head_dim} (hidden_size / num_heads) must be a multiple of 4 for a 2-D RoPE")


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    # (..., d) -> (..., d): each channel pair (a, b) -> (-b, a), a quarter turn in the pair's plane
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-b, a], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn every channel pair of x (N, h, T, d_h) by its token's angle. In float32 whatever the
    input's precision (bf16 would blur the angles of far tokens), returned in the input's dtype."""
    x32 = x.float()
    return (x32 * cos + rotate_pairs(x32) * sin).to(x.dtype)


def approx_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


def block_norm(kind: str, dim: int, gain: bool = False) -> nn.Module:
    """The norm before adaLN's modulation. By default neither kind has a learned gain: a per-channel
    gain right before adaLN's per-sample (1 + scale) is the same function reparametrised (it folds into
    the adaLN linear), and without one the official "norms have no parameters" layout holds for both
    kinds. ``gain`` (norm=rms only): LightningDiT's RMSNorm, whose gain is a key of its checkpoints and
    a parameter its training moves (starting at 1)."""
    check_choice("norm", kind, NORMS)
    if kind == "layer":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    if gain:
        return HeadRMSNorm(dim, eps=1e-6)
    return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2), then W3 (Shazeer 2020). W1 and W2 are one fused matmul, ``w12``, as in
    LightningDiT (whose key names these are)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # (N, T, hidden) each
        return self.w3(F.silu(gate) * value)  # (N, T, D)


def feed_forward(kind: str, dim: int, mlp_ratio: float) -> nn.Module:
    check_choice("mlp", kind, MLPS)
    hidden = int(dim * mlp_ratio)
    if kind == "gelu":
        return Mlp(dim, hidden, act_layer=approx_gelu, drop=0)  # fc1, fc2
    # LightningDiT's int(2/3 * hidden): three matrices of 2/3 the width cost what GELU's two do.
    return SwiGLU(dim, int(2 / 3 * hidden))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: c gives shift, scale and a residual gate for
    both the attention and the MLP branch (``wo_shift``: scale and gate only). The gate starts at zero,
    so each block starts as identity."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm: str = "layer",
        mlp: str = "gelu",
        qk_norm: bool = False,
        rope: bool = False,
        qk_norm_kind: str = "rms",
        norm_gain: bool = False,
        wo_shift: bool = False,
    ):
        super().__init__()
        self.norm1 = block_norm(norm, hidden_size, norm_gain)
        self.attn = attention(hidden_size, num_heads, qk_norm=qk_norm, rope=rope, qk_norm_kind=qk_norm_kind)
        self.norm2 = block_norm(norm, hidden_size, norm_gain)
        self.mlp = feed_forward(mlp, hidden_size, mlp_ratio)
        self.wo_shift = wo_shift
        modulations = 4 if wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, modulations * hidden_size, bias=True))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        # x (N, T, D), c (N, D); rope: the (T, d_h) cos and sin tables when the model rotates q and k
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (N, T, D)
        x = x + gate_msa.unsqueeze(1) * (self.attn(h) if rope is None else self.attn(h, rope))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(
        self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layer", norm_gain: bool = False
    ):
        super().__init__()
        self.norm_final = block_norm(norm, hidden_size, norm_gain)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p * p * C_out)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE-style 2-D sin-cos table (grid_size**2, embed_dim), computed in float64 as the official
    numpy code does; the first half of the channels encodes the column (x), the second the row (y)."""
    if embed_dim % 4 != 0:
        raise ValueError(f"hidden_size={embed_dim} must be a multiple of 4 for the 2-D sin-cos embedding")
    coords = torch.arange(grid_size, dtype=torch.float64)
    # meshgrid(w, h) as in MAE: grid[0] varies along columns, grid[1] along rows
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")

    def embed_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
        omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega  # (dim/2,)
        out = pos.reshape(-1)[:, None] * omega[None]  # (M, dim/2)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)

    return torch.cat([embed_1d(embed_dim // 2, grid_w), embed_1d(embed_dim // 2, grid_h)], dim=1)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    forward(x (N, C, H, W), t (N,), y (N,)) -> (N, 2C if learn_sigma else C, H, W); with
    learn_sigma the first C channels are the predicted noise, the next C the variance interpolant.
    ``norm``, ``mlp``, ``pos``, ``qk_norm``, ``qk_norm_kind``, ``norm_gain``, ``wo_shift``:
    LightningDiT's blocks (module docstring); the defaults are the official model.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        norm: str = "layer",
        mlp: str = "gelu",
        pos: str = "sincos",
        qk_norm: bool = False,
        qk_norm_kind: str = "rms",
        norm_gain: bool = False,
        wo_shift: bool = False,
    ):
        super().__init__()
        check_switches(norm, mlp, pos, qk_norm, qk_norm_kind, norm_gain, wo_shift)
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.head_dim = hidden_size // num_heads
        self.switches = dict(norm=norm, mlp=mlp, pos=pos, qk_norm=qk_norm)
        self.switches.update(qk_norm_kind=qk_norm_kind, norm_gain=norm_gain, wo_shift=wo_shift)
        self.adds_sincos = pos in ("sincos", "sincos_rope2d")
        self.rotates_qk = pos in ("rope2d", "sincos_rope2d")

        self.x_embedder = patch_embed(input_size, patch_size, in_channels, hidden_size)
        self.grid_size = input_size // patch_size
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed, not learned; a Parameter (not a buffer) only because official checkpoints store it so.
        # Kept with pos=rope2d too, where it is not added: every position option then has the same
        # keys outside the blocks, and what reads the grid off pos_embed (official-layout loading,
        # EMA, finetune, diffusers export) works unchanged, for T * D frozen floats.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        if self.rotates_qk:
            check_rope_head_dim(self.head_dim)
        block_switches = dict(norm=norm, mlp=mlp, qk_norm=qk_norm, qk_norm_kind=qk_norm_kind, norm_gain=norm_gain)
        self.blocks = nn.ModuleList(
            [
                DiTBlock(hidden_size, num_heads, mlp_ratio, rope=self.rotates_qk, wo_shift=wo_shift, **block_switches)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=norm, norm_gain=norm_gain)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        with torch.no_grad():
            table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)
            self.pos_embed.copy_(table.float().unsqueeze(0))
        # The patch conv is initialised like the nn.Linear it is equivalent to.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def official_layout(self) -> bool:
        """Whether every LightningDiT switch is at its default (what official/diffusers formats hold)."""
        return self.switches == OFFICIAL_SWITCHES

    def rope_tables(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        return rope_2d_table(self.grid_size, self.head_dim, device=device) if self.rotates_qk else None

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # (N, T, p * p * C) -> (N, C, H, W)
        c, p, h = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, dropout_generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``dropout_generator``: where training draws its label dropout (a seeded stream of the run;
        None: the global RNG, as the official model does)."""
        if self.adds_sincos:
            x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / patch_size ** 2
        else:
            x = self.x_embedder(x)  # (N, T, D): positions enter through the rotation of q and k alone
        c = self.t_embedder(t) + self.y_embedder(y, self.training, generator=dropout_generator)  # (N, D)
        rope = self.rope_tables(x.device)  # (cos, sin), each (T, d_h); None without RoPE
        for block in self.blocks:
            x = block(x, c, rope)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)


# --------------------------------------------------------------------------------------------
# The paper's configurations
# --------------------------------------------------------------------------------------------

PAPER_SIZES = ("S", "B", "L", "XL")
PAPER_PATCHES = (2, 4, 8)
PAPER_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")


def _paper_configs() -> dict[str, dict]:
    """The paper's table, ``DiT-XL/2`` -> its sizes, read from the model options that state it
    (``conf/model/dit_xl2.yaml`` ...): the config files are the one source of the numbers, and
    ``model=dit_xl2`` on the command line and ``build_dit("DiT-XL/2")`` in code build the same net."""
    folder = resources.files("ditlab") / "conf" / "model"
    table = {}
    for size in PAPER_SIZES:
        for patch in PAPER_PATCHES:
            option = f"dit_{size.lower()}{patch}"
            values = _option_values(folder, option)
            table[f"DiT-{size}/{patch}"] = {key: values[key] for key in PAPER_KEYS}
    return table


def _option_values(folder, option: str) -> dict:
    """A model option's own keys over those of the options it inherits (its ``defaults`` other than
    ``base`` and ``_self_``), as Hydra composes them."""
    own = yaml.safe_load((folder / f"{option}.yaml").read_text())
    values = {}
    for parent in own.pop("defaults", []):
        if parent not in ("base", "_self_"):
            values.update(_option_values(folder, parent))
    return {**values, **own}


DIT_CONFIGS = _paper_configs()
# size -> (depth, hidden_size, num_heads), e.g. "XL" -> (28, 1152, 16)
DIT_SIZES = {
    size: tuple(DIT_CONFIGS[f"DiT-{size}/2"][key] for key in ("depth", "hidden_size", "num_heads"))
    for size in PAPER_SIZES
}


def dit_config(name: str) -> dict:
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; expected one of {sorted(DIT_CONFIGS)}")
    return dict(DIT_CONFIGS[name])


def build_dit(name: str, **kwargs) -> DiT:
    """``build_dit("DiT-XL/2", input_size=32)``: a paper config by name; kwargs override it."""
    return DiT(**{**dit_config(name), **kwargs})
