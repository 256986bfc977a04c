"""The DiT backbone: paper sizes and costs, official layout, attention and guidance."""

import math

import pytest
import torch
import torch.nn.functional as F

from ditlab.diffusion import official_forward_with_cfg
from ditlab.models.dit import DIT_CONFIGS, DiT, build_dit
from ditlab.models.flops import forward_macs
from ditlab.models.official import infer_dit_kwargs, load_official_checkpoint
from helpers import randomised

# DiT paper, Table 4 ("Gflops" there are multiply-accumulates), 256x256 images = 32x32x4 latents.
PAPER_GMACS = {
    "DiT-S/8": 0.36,
    "DiT-S/4": 1.41,
    "DiT-S/2": 6.06,
    "DiT-B/8": 1.42,
    "DiT-B/4": 5.56,
    "DiT-B/2": 23.01,
    "DiT-L/8": 5.01,
    "DiT-L/4": 19.70,
    "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39,
    "DiT-XL/4": 29.05,
    "DiT-XL/2": 118.64,
}
PAPER_PARAMS_M = {"DiT-S/2": 33, "DiT-B/2": 130, "DiT-L/2": 458, "DiT-XL/2": 675}


def tiny(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    return DiT(**{**cfg, **kw})


def meta_dit(name, **kw):
    with torch.device("meta"):  # shapes and costs without allocating 675M parameters
        return build_dit(name, **kw)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_paper(name):
    n = sum(p.numel() for p in meta_dit(name, input_size=32).parameters())
    assert abs(n / 1e6 - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.01


@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_gmacs_match_paper(name):
    gmacs = forward_macs(meta_dit(name, input_size=32)) / 1e9
    assert gmacs == pytest.approx(PAPER_GMACS[name], rel=0.02)


@pytest.mark.parametrize("image_size", [256, 512])
@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_output_shapes(name, image_size):
    latent = image_size // 8
    model = meta_dit(name, input_size=latent)
    x = torch.empty(2, 4, latent, latent, device="meta")
    t = torch.empty(2, dtype=torch.long, device="meta")
    out = model(x, t, t)
    assert out.shape == (2, 8, latent, latent)
    assert model.pos_embed.shape == (1, (latent // model.patch_size) ** 2, model.blocks[0].attn.qkv.in_features)


def test_output_is_zero_at_init_and_learn_sigma_false_has_c_channels():
    x = torch.randn(3, 4, 8, 8)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3])
    assert torch.equal(tiny()(x, t, y), torch.zeros(3, 8, 8, 8))
    assert tiny(learn_sigma=False)(x, t, y).shape == (3, 4, 8, 8)


def test_official_state_dict_layout():
    sd = tiny().state_dict()
    assert "pos_embed" in sd and sd["y_embedder.embedding_table.weight"].shape == (11, 64)
    for key in [
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.bias",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.proj.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias",
        "blocks.1.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
        "final_layer.linear.weight",
    ]:
        assert key in sd, key
    assert not any("norm" in k for k in sd), "LayerNorms must have no parameters"
    assert tiny().pos_embed.requires_grad is False


def test_pos_embed_is_mae_sincos():
    model = tiny(hidden_size=16, input_size=8, patch_size=2)  # 4x4 grid
    pe = model.pos_embed[0].double()  # (16, 16)
    # token index = row * 4 + col; first half of channels encodes the column (MAE's grid[0])
    row, col = 2, 3
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4.0)
    expect_col = torch.cat([torch.sin(col * omega), torch.cos(col * omega)])
    expect_row = torch.cat([torch.sin(row * omega), torch.cos(row * omega)])
    assert torch.allclose(pe[row * 4 + col], torch.cat([expect_col, expect_row]).double(), atol=1e-7)


def test_sdpa_attention_equals_plain_softmax():
    attn = tiny().blocks[0].attn
    x = torch.randn(2, 16, 64)
    n, t, d = x.shape
    q, k, v = attn.qkv(x).reshape(n, t, 3, 4, 16).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
    reference = attn.proj((weights @ v).transpose(1, 2).reshape(n, t, d))
    assert torch.allclose(attn(x), reference, atol=1e-5)


def test_attention_runs_a_fused_sdpa_kernel():
    """The attention goes through a fused kernel (CPU: flash attention), not an unfused matmul-softmax."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    attn = tiny().blocks[0].attn
    with torch.no_grad(), RecordOps() as recorder:
        attn(torch.randn(2, 16, 64))
    assert any("_scaled_dot_product_flash_attention" in op for op in recorder.ops), sorted(recorder.ops)
    assert not any(op.endswith("_softmax") or op == "aten.softmax" for op in recorder.ops)


def test_forward_with_cfg_scale_one_is_conditional():
    model = randomised(tiny())
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 10, 10, 10])
    y = torch.tensor([3, 4, 10, 10])
    out = official_forward_with_cfg(model, torch.cat([x, x]), t, y, cfg_scale=1.0)
    cond = model(x, t[:2], y[:2])
    assert torch.allclose(out[:2], cond, atol=1e-6)


def test_forward_with_cfg_guided_channels_three_is_official():
    model = randomised(tiny())
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 20, 10, 20])
    y = torch.tensor([3, 4, 10, 10])
    both = model(torch.cat([x, x]), t, y)
    cond, uncond = both[:2], both[2:]
    out = official_forward_with_cfg(model, torch.cat([x, x]), t, y, cfg_scale=4.0, guided_channels=3)
    # official: eps[:, :3] guided, everything from channel 3 on (4th latent + variance) untouched
    assert torch.equal(out[:2, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:2, 3:], cond[:, 3:])
    assert torch.equal(out[2:, 3:], uncond[:, 3:])
    default = official_forward_with_cfg(model, torch.cat([x, x]), t, y, cfg_scale=4.0)
    assert torch.allclose(default[:2, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(default[:2, 4:], cond[:, 4:])


def test_label_dropout_only_in_training():
    """Through DiT.forward: train mode drops every label (p = 1) to the null class, eval mode never."""
    model = randomised(tiny(class_dropout_prob=1.0))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    null = torch.full_like(y, 10)
    model.eval()
    conditional, unconditional = model(x, t, y), model(x, t, null)
    assert not torch.allclose(conditional, unconditional)
    model.train()
    assert torch.equal(model(x, t, y), unconditional)
    model.eval()
    assert torch.equal(model(x, t, y), conditional)


def test_official_checkpoint_round_trip(tmp_path):
    model = randomised(build_dit("DiT-S/8", input_size=16, num_classes=7))
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 999]), torch.tensor([0, 6])
    torch.save(model.state_dict(), tmp_path / "DiT-S-8.pt")
    loaded = load_official_checkpoint(tmp_path / "DiT-S-8.pt")
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    # a training checkpoint of the official train.py: the EMA weights are taken
    import argparse

    ema = randomised(build_dit("DiT-S/8", input_size=16, num_classes=7))
    torch.save(
        {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(a=1)},
        tmp_path / "0001000.pt",
    )
    assert torch.equal(load_official_checkpoint(tmp_path / "0001000.pt")(x, t, y), ema(x, t, y))


def test_infer_config_from_shapes():
    sd = meta_dit("DiT-XL/2", input_size=64).state_dict()
    kw = infer_dit_kwargs(sd)
    assert kw == dict(
        input_size=64,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        num_classes=1000,
        learn_sigma=True,
    )


def test_bad_checkpoint_files_get_clear_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable DiT checkpoint"):
        load_official_checkpoint(tmp_path / "junk.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing keys"):
        load_official_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official_checkpoint(tmp_path / "nope.pt")


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="unknown DiT config"):
        build_dit("DiT-M/2")


def test_sdpa_gradients_match_the_math_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = randomised(tiny()).train()
    model.y_embedder.dropout_prob = 0.0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 2])

    def grads(backends):
        model.zero_grad()
        with sdpa_kernel(backends):
            F.mse_loss(model(x, t, y), torch.zeros(2, 8, 8, 8)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused, math = (
        grads([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]),
        grads([SDPBackend.MATH]),
    )
    assert fused.keys() == math.keys() and len(fused) > 0
    for name in fused:
        assert torch.allclose(fused[name], math[name], atol=1e-6, rtol=1e-4), name


def test_label_dropout_draws_from_the_generator_it_is_given():
    model = randomised(tiny(class_dropout_prob=0.5)).train()
    x, t, y = torch.randn(16, 4, 8, 8), torch.full((16,), 50), torch.arange(16) % 10
    state = torch.get_rng_state()
    out = model(x, t, y, dropout_generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not drawn from
    assert torch.equal(out, model(x, t, y, dropout_generator=torch.Generator().manual_seed(3)))
    dropped = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 0 < dropped.sum() < 16
    expected = model.eval()(x, t, torch.where(dropped, 10, y))
    assert torch.allclose(out, expected, atol=1e-6)
