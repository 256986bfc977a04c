"""LightningDiT's block switches (norm, mlp, pos, qk_norm), each against a plain reference written here;
all off is the official model, bit for bit."""

import math

import pytest
import torch

from ditlab.models.dit import DiT, apply_rope, rope_2d_table
from helpers import compose_cfg, randomised, seed_reference_dit

pytestmark = pytest.mark.unit

GRID, HEADS, HIDDEN = 4, 4, 64  # tiny(): 8x8 latents, patch 2 -> a 4x4 grid of 16 tokens, head dim 16
HEAD_DIM = HIDDEN // HEADS


def tiny(**switches):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=HIDDEN, depth=2, num_heads=HEADS, num_classes=10)
    return DiT(**cfg, **switches)


def tokens(seed=0):
    """Random tokens (2, 16, 64) with a non-zero mean, so that LayerNorm and RMSNorm differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, GRID * GRID, HIDDEN, generator=g) * 1.5 + 0.7


# ------------------------------------------------------------------ plain references
def layer_norm_ref(x, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)


def rms_norm_ref(x, eps=1e-6):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps)


def linear_ref(layer, x):
    return x @ layer.weight.T + layer.bias


def gelu_mlp_ref(mlp, x):
    h = linear_ref(mlp.fc1, x)
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return linear_ref(mlp.fc2, h)


def swiglu_ref(mlp, x):
    """silu(x W1) * (x W2) W3, with W1 and W2 read as the two halves of the fused w12."""
    hidden = mlp.w3.in_features
    w1, w2 = mlp.w12.weight[:hidden], mlp.w12.weight[hidden:]
    b1, b2 = mlp.w12.bias[:hidden], mlp.w12.bias[hidden:]
    a, b = x @ w1.T + b1, x @ w2.T + b2
    return (a * torch.sigmoid(a) * b) @ mlp.w3.weight.T + mlp.w3.bias


def rope_ref(x, grid=GRID, theta=10000.0):
    """x (N, h, T, d): pair j of the first half turns by row * theta^(-j / (d/4)), pair j of the second
    half by col * theta^(-j / (d/4)), (a, b) -> (a cos - b sin, a sin + b cos), row/col of token n = divmod(n, grid)."""
    d = x.shape[-1]
    rows = torch.arange(x.shape[-2]) // grid
    cols = torch.arange(x.shape[-2]) % grid
    out = x.clone()
    for half, position in ((0, rows), (d // 2, cols)):
        for j in range(d // 4):
            angle = position.double() * theta ** (-j / (d // 4))
            cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
            a, b = x[..., half + 2 * j], x[..., half + 2 * j + 1]
            out[..., half + 2 * j] = a * cos - b * sin
            out[..., half + 2 * j + 1] = a * sin + b * cos
    return out


def attention_ref(attn, x, qk_norm=False, rope=False):
    """Softmax attention written out; QK-norm = RMS-normalise each head's q and k, times the gain."""
    n, t, d = x.shape
    qkv = linear_ref(attn.qkv, x).reshape(n, t, 3, HEADS, HEAD_DIM)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (N, h, T, d_h)
    if qk_norm:
        q, k = rms_norm_ref(q) * attn.q_norm.weight, rms_norm_ref(k) * attn.k_norm.weight
    if rope:
        q, k = rope_ref(q), rope_ref(k)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM), dim=-1)
    return linear_ref(attn.proj, (weights @ v).transpose(1, 2).reshape(n, t, d))


def block_ref(block, x, c, norm=layer_norm_ref, mlp=gelu_mlp_ref, qk_norm=False, rope=False):
    """adaLN-Zero DiT block: modulate(norm(x)) into attention and MLP, each gated into the residual."""
    mod = linear_ref(block.adaLN_modulation[1], c * torch.sigmoid(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in mod.chunk(6, dim=1))
    x = x + gate1 * attention_ref(block.attn, norm(x) * (1 + scale1) + shift1, qk_norm, rope)
    return x + gate2 * mlp(block.mlp, norm(x) * (1 + scale2) + shift2)


def run_block(model, x, c):
    return model.blocks[0](x, c, model.rope_tables(x.device))


def close(a, b):
    return torch.allclose(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ each switch on
def test_rms_norm_switch_is_rmsnorm_by_its_formula():
    model = randomised(tiny(norm="rms"))
    x, c = tokens(), torch.randn(2, HIDDEN)
    for norm in (model.blocks[0].norm1, model.blocks[0].norm2, model.final_layer.norm_final):
        assert close(norm(x), rms_norm_ref(x)) and not close(norm(x), layer_norm_ref(x))
        assert list(norm.parameters()) == []  # adaLN scales; the keys stay the official ones
    assert close(run_block(model, x, c), block_ref(model.blocks[0], x, c, norm=rms_norm_ref))
    assert model.state_dict().keys() == tiny().state_dict().keys()


def test_swiglu_switch_is_silu_gate_times_value_at_two_thirds_width():
    model = randomised(tiny(mlp="swiglu"))
    mlp = model.blocks[0].mlp
    assert mlp.w12.weight.shape == (2 * 170, HIDDEN) and mlp.w3.weight.shape == (HIDDEN, 170)  # int(2/3 * 4 * 64)
    x, c = tokens(), torch.randn(2, HIDDEN)
    assert close(mlp(x), swiglu_ref(mlp, x))
    assert close(run_block(model, x, c), block_ref(model.blocks[0], x, c, mlp=swiglu_ref))


def test_rope2d_rotates_q_and_k_by_row_and_column():
    model = randomised(tiny(pos="rope2d"))
    attn, x, c = model.blocks[0].attn, tokens(), torch.randn(2, HIDDEN)
    q = torch.randn(2, HEADS, GRID * GRID, HEAD_DIM)
    assert close(apply_rope(q, *rope_2d_table(GRID, HEAD_DIM)), rope_ref(q))
    assert close(attn(x, model.rope_tables(x.device)), attention_ref(attn, x, rope=True))
    assert close(run_block(model, x, c), block_ref(model.blocks[0], x, c, rope=True))
    # bf16 q/k are turned in float32 and come back in bf16
    rotated = apply_rope(q.bfloat16(), *rope_2d_table(GRID, HEAD_DIM))
    assert rotated.dtype == torch.bfloat16 and torch.allclose(rotated.float(), rope_ref(q), atol=0.05)


def test_rope2d_logits_depend_on_the_displacement_only():
    """The point of a rotary embedding: the same q and k at (r1, c1) and (r2, c2) score by (r2 - r1, c2 - c1)."""
    q, k = torch.randn(HEAD_DIM).expand(GRID * GRID, HEAD_DIM), torch.randn(HEAD_DIM).expand(GRID * GRID, HEAD_DIM)
    cos, sin = rope_2d_table(GRID, HEAD_DIM)
    logits = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).T  # (T, T)
    at = lambda r, c: r * GRID + c  # noqa: E731
    assert torch.allclose(logits[at(0, 0), at(1, 2)], logits[at(2, 1), at(3, 3)], atol=1e-5)
    assert torch.allclose(logits[at(0, 3), at(2, 0)], logits[at(1, 3), at(3, 0)], atol=1e-5)
    assert not torch.allclose(logits[at(0, 0), at(1, 2)], logits[at(0, 0), at(2, 1)], atol=1e-3)  # rows != cols


@pytest.mark.parametrize(
    "pos,adds_table,rotates", [("sincos", True, False), ("rope2d", False, True), ("sincos_rope2d", True, True)]
)
def test_pos_switch_decides_what_enters_the_blocks(pos, adds_table, rotates):
    model = randomised(tiny(pos=pos))
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], rope=args[2]))
    x = torch.randn(2, 4, 8, 8)
    model(x, torch.tensor([3, 500]), torch.tensor([1, 2]))
    patches = model.x_embedder(x)
    assert torch.equal(seen["x"], patches + model.pos_embed if adds_table else patches)
    assert (seen["rope"] is not None) == rotates
    assert "pos_embed" in model.state_dict()  # kept in every option: the same keys outside the blocks


def test_qk_norm_switch_normalises_each_head_before_softmax():
    model = randomised(tiny(qk_norm=True))
    attn, x, c = model.blocks[0].attn, tokens(), torch.randn(2, HIDDEN)
    assert attn.q_norm.weight.shape == (HEAD_DIM,) and attn.k_norm.weight.shape == (HEAD_DIM,)
    assert not torch.equal(attn.q_norm.weight, attn.k_norm.weight)  # randomised: q's and k's gains are used apart
    assert close(attn(x), attention_ref(attn, x, qk_norm=True))
    assert not close(attn(x), attention_ref(attn, x))
    assert close(run_block(model, x, c), block_ref(model.blocks[0], x, c, qk_norm=True))
    both = randomised(tiny(qk_norm=True, pos="rope2d")).blocks[0].attn  # norm first, then the rotation
    assert close(both(x, rope_2d_table(GRID, HEAD_DIM)), attention_ref(both, x, qk_norm=True, rope=True))


@pytest.mark.parametrize("switches", [dict(pos="rope2d"), dict(qk_norm=True)])
def test_switched_attention_still_runs_a_fused_sdpa_kernel(switches):
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    model = tiny(**switches)
    x = tokens()
    with torch.no_grad(), RecordOps() as recorder:
        model.blocks[0].attn(x, model.rope_tables(x.device))
    assert any("_scaled_dot_product_flash_attention" in op for op in recorder.ops), sorted(recorder.ops)
    assert not any(op.endswith("_softmax") or op == "aten.softmax" for op in recorder.ops)


# ------------------------------------------------------------------ all off, all on
def leaf_modules(model):
    return [(name, type(m)) for name, m in model.named_modules() if not list(m.children())]


def test_all_switches_off_is_the_official_model_bit_for_bit():
    reference = randomised(seed_reference_dit())
    model = tiny(norm="layer", mlp="gelu", pos="sincos", qk_norm=False).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    assert model.official_layout and leaf_modules(model) == leaf_modules(reference)
    assert torch.equal(model.pos_embed, reference.pos_embed)  # the sin-cos table, computed independently
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 250, 999]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        assert (model(x, t, y) - reference(x, t, y)).abs().max().item() == 0.0
    assert tiny().state_dict().keys() == model.state_dict().keys()  # the defaults are these values


def test_all_switches_on_train_forward_and_backward():
    model = randomised(tiny(norm="rms", mlp="swiglu", pos="rope2d", qk_norm=True)).train()
    assert not model.official_layout
    out = model(torch.randn(4, 4, 8, 8), torch.tensor([1, 300, 600, 999]), torch.tensor([0, 3, 6, 9]))
    assert out.shape == (4, 8, 8, 8)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.pos_embed.grad is None


def test_bad_switch_values_are_rejected_in_one_line():
    with pytest.raises(ValueError, match=r"^unknown norm='batch'; expected one of \('layer', 'rms'\)$"):
        tiny(norm="batch")
    with pytest.raises(ValueError, match=r"^unknown mlp='geglu'; expected one of \('gelu', 'swiglu'\)$"):
        tiny(mlp="geglu")
    with pytest.raises(
        ValueError, match=r"^unknown pos='rope'; expected one of \('sincos', 'rope2d', 'sincos_rope2d'\)$"
    ):
        tiny(pos="rope")
    with pytest.raises(ValueError, match=r"^qk_norm='yes'; expected true or false$"):
        tiny(qk_norm="yes")
    with pytest.raises(ValueError, match="head dim 6 .* multiple of 4"):
        DiT(input_size=8, patch_size=2, hidden_size=24, depth=1, num_heads=4, num_classes=2, pos="rope2d")


def test_model_config_reaches_the_switches():
    from hydra.utils import instantiate

    data = ["model.input_size=32", "model.in_channels=1", "model.num_classes=10"]  # what train takes from the data
    default = instantiate(compose_cfg("train", ["experiment=smoke", *data]).model)
    assert default.official_layout
    switches = ["model.norm=rms", "model.mlp=swiglu", "model.pos=rope2d", "model.qk_norm=true"]
    cfg = compose_cfg("train", ["experiment=smoke", *data, *switches])
    model = instantiate(cfg.model)
    assert model.switches == dict(
        norm="rms", mlp="swiglu", pos="rope2d", qk_norm=True, qk_norm_kind="rms", norm_gain=False, wo_shift=False
    )
    assert type(model.blocks[0].mlp).__name__ == "SwiGLU" and hasattr(model.blocks[0].attn, "q_norm")


def test_rope_table_is_float32_and_built_where_the_tokens_are():
    cos, sin = rope_2d_table(GRID, HEAD_DIM)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (GRID * GRID, HEAD_DIM)
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos))
    assert torch.equal(cos[0], torch.ones(HEAD_DIM))  # token (0, 0) is not turned
    model = tiny(pos="rope2d")
    assert model.rope_tables("meta")[0].device.type == "meta" and tiny().rope_tables("cpu") is None


def test_a_timm_encoder_gives_its_patch_tokens_as_a_grid():
    """REPA's hub encoders (DINOv2 ...) through timm: the patch tokens after the prefix tokens, as a
    (N, D, g, g) grid, from uint8 images resized and normalised as the model expects."""
    from ditlab.models.encoders import TimmEncoder

    torch.manual_seed(0)
    encoder = TimmEncoder("vit_tiny_patch16_224", image_size=32, pretrained=False)
    images = torch.randint(0, 256, (2, 1, 20, 20), dtype=torch.uint8)  # grey, another size
    grid = encoder(images)
    assert grid.shape == (2, encoder.feature_dim, 2, 2)
    x = torch.nn.functional.interpolate(images.float().expand(-1, 3, -1, -1) / 255, size=(32, 32), mode="bicubic")
    tokens = encoder.model.forward_features((x - encoder.mean) / encoder.std)[:, 1:]  # (2, 4, D) without CLS
    torch.testing.assert_close(grid, tokens.transpose(1, 2).reshape(2, -1, 2, 2))
