"""The family's released checkpoints (SiT, REPA, LightningDiT), exactly: small files in each official
format (random weights, the official key names, shapes and file layouts; ``released_formats``) read
by ditlab's real readers, run through ditlab's network, time convention, samplers and guidance, and
compared with plain restatements of each official forward pass and sampler (<= 1e-5)."""

import argparse
import logging

import pytest
import torch
from safetensors.torch import save_file

from ditlab.diffusion import FlowMatching, Sampler
from ditlab.diffusion.protocols import PROTOCOLS, published_protocol
from ditlab.inference import load_network
from ditlab.models.weights import read_dit_weights
from released_formats import (
    forward_with_cfg,
    lightningdit_sample_ode,
    lightningdit_training_checkpoint,
    official_forward,
    official_state_dict,
    repa_euler_maruyama,
    sit_sample_sde,
    sit_training_checkpoint,
)

pytestmark = pytest.mark.unit

HEADS, CLASSES, CHANNELS, SIZE = 2, 5, 4, 8
TOL = dict(atol=1e-5, rtol=1e-5)


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, CHANNELS, SIZE, SIZE, generator=g), torch.tensor([0, 3, 4, 1, 2, 0][:n])


def noise_list(count, shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


class ReplayNoise:
    """ditlab's ``noise(like)``: the official sampler's k-th draw at its k-th call (the first rows:
    the official SiT sampler draws for its doubled, guided batch and keeps the first half)."""

    def __init__(self, noises):
        self.noises, self.calls = noises, 0

    def __call__(self, like):
        self.calls += 1
        return self.noises[self.calls - 1][: like.shape[0]]


def sit_file(tmp_path, name="SiT-XL-2-256x256.pt", **kw):
    sd = official_state_dict(seed=0, learn_sigma=True, **kw)
    torch.save(sd, tmp_path / name)  # the released file: a plain state_dict
    return tmp_path / name, sd


def repa_file(tmp_path, qknorm=False):
    # qknorm: timm's Attention(qk_norm=True), LayerNorm(head_dim) with gain and bias
    ema, raw = (official_state_dict(seed=s, projectors=(12,), qknorm=qknorm) for s in (0, 1))
    torch.save(sit_training_checkpoint(ema, raw, encoder_depth=1, qk_norm=qknorm), tmp_path / "0004000.pt")
    return tmp_path / "0004000.pt", ema, raw


LIGHTNING_SWITCHES = dict(rmsnorm=True, swiglu=True, rope=True, qknorm=False, wo_shift=False)  # its released config


def lightningdit_file(tmp_path, name="lightningdit-xl-imagenet256-800ep.pt", **switches):
    switches = {**LIGHTNING_SWITCHES, **switches}
    ema, raw = (official_state_dict(seed=s, **switches) for s in (0, 1))
    flags = {f"use_{k}": v for k, v in switches.items() if k != "wo_shift"} | {"wo_shift": switches["wo_shift"]}
    torch.save(lightningdit_training_checkpoint(ema, raw, **flags), tmp_path / name)
    return tmp_path / name, ema, raw


# ------------------------------------------------------------------ forward passes
def test_sit_file_loads_and_its_velocity_is_the_official_forward_in_its_time(tmp_path, caplog):
    path, sd = sit_file(tmp_path)
    with caplog.at_level(logging.INFO, logger="ditlab.weights"):
        net, objective, config = load_network(path, num_heads=HEADS)  # hidden 32: no paper width
    assert config is None and isinstance(objective, FlowMatching)
    assert "SiT-XL-2-256x256.pt: SiT format (its file name)" in caplog.text
    assert "a plain state_dict (released: EMA)" in caplog.text and "4x8x8 latents, 5 classes" in caplog.text
    x, y = inputs()
    s = torch.tensor([0.0, 0.37, 0.93])  # SiT's time: 0 noise, 1 data
    with torch.no_grad():
        theirs = official_forward(sd, x, s, y, HEADS, learn_sigma=True)  # SiT's forward drops the sigma half
        assert torch.allclose(net(x, s, y)[:, :CHANNELS], theirs, **TOL)
        # ditlab's time t = 1 - s, its velocity noise - data: the negated SiT velocity
        assert torch.allclose(objective.velocity(net, x, 1 - s, {"y": y}), -theirs, **TOL)


def test_repa_file_loads_without_its_projectors_and_matches_the_official_forward(tmp_path, caplog):
    path, ema, raw = repa_file(tmp_path)
    with caplog.at_level(logging.INFO, logger="ditlab.weights"):
        net, objective, _ = load_network(path, num_heads=HEADS)
        raw_net, _, _ = load_network(path, ema=False, num_heads=HEADS)
    text = caplog.text
    assert "0004000.pt: REPA format (its args.model and projectors)" in text and "EMA weights" in text
    assert "not used: 1 REPA projector (width, feature dim) [(16, 12)], used in training only" in text
    assert "raw weights" in text
    assert not any(k.startswith("projectors") for k in net.state_dict())
    x, y = inputs()
    t = torch.tensor([0.02, 0.5, 1.0])  # REPA's time is ditlab's (1 noise), unscaled
    with torch.no_grad():
        assert torch.allclose(net(x, t, y), official_forward(ema, x, t, y, HEADS), **TOL)
        assert torch.allclose(raw_net(x, t, y), official_forward(raw, x, t, y, HEADS), **TOL)
        assert torch.allclose(objective.velocity(net, x, t, {"y": y}), official_forward(ema, x, t, y, HEADS), **TOL)


def test_repa_with_timm_qk_norm_is_layernorm_on_q_and_k(tmp_path):
    path, ema, _ = repa_file(tmp_path, qknorm=True)
    net, _, _ = load_network(path)
    assert net.switches["qk_norm"] and net.switches["qk_norm_kind"] == "layer"
    x, y = inputs()
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.allclose(net(x, t, y), official_forward(ema, x, t, y, HEADS), **TOL)


@pytest.mark.parametrize(
    "switches",
    [
        {},  # the released config: RMSNorm (gain), SwiGLU, RoPE + sin-cos
        dict(qknorm=True),  # q/k normalised by its RMSNorm
        dict(rmsnorm=False, qknorm=True, wo_shift=True),  # LayerNorm blocks, timm's LayerNorm on q/k, no shift
        dict(swiglu=False, rope=False),
    ],
    ids=["released", "qknorm_rms", "layer_qknorm_wo_shift", "gelu_norope"],
)
def test_lightningdit_file_loads_with_its_switches_and_matches_the_official_forward(tmp_path, switches, caplog):
    path, ema, _ = lightningdit_file(tmp_path, **switches)
    on = {**LIGHTNING_SWITCHES, **switches}
    heads = None if on["rope"] or on["qknorm"] else HEADS  # a RoPE table or a q/k norm shows a head's width
    with caplog.at_level(logging.INFO, logger="ditlab.weights"):
        net, objective, _ = load_network(path, num_heads=heads)
    assert "LightningDiT format (its config's model_type LightningDiT-XL/1)" in caplog.text
    assert net.switches["norm_gain"] == on["rmsnorm"] and net.switches["wo_shift"] == on["wo_shift"]
    assert net.switches["mlp"] == ("swiglu" if on["swiglu"] else "gelu")
    assert net.switches["pos"] == ("sincos_rope2d" if on["rope"] else "sincos")
    assert ("RoPE table feat_rope" in caplog.text) == on["rope"]
    x, y = inputs()
    s = torch.tensor([0.0, 0.125, 0.8])  # its time: 0 noise, 1 data
    with torch.no_grad():
        theirs = official_forward(ema, x, s, y, HEADS)
        assert torch.allclose(net(x, s, y), theirs, **TOL)
        assert torch.allclose(objective.velocity(net, x, 1 - s, {"y": y}), -theirs, **TOL)


def test_a_safetensors_file_and_a_family_given_by_name(tmp_path):
    sd = official_state_dict(seed=3, learn_sigma=True)
    save_file(sd, str(tmp_path / "model.safetensors"))
    file = tmp_path / "model.safetensors"
    assert read_dit_weights(file, num_heads=HEADS).family.name == "dit"  # DiT and SiT keys are the same
    weights = read_dit_weights(file, family="sit", num_heads=HEADS)
    assert weights.family.name == "sit" and weights.family.flow_time == {"time_scale": 1.0, "data_at_one": True}
    net, objective, _ = load_network(tmp_path / "model.safetensors", family="sit", num_heads=HEADS)
    x, y = inputs()
    s = torch.tensor([0.2, 0.4, 0.6])
    with torch.no_grad():
        assert torch.allclose(net(x, s, y)[:, :CHANNELS], official_forward(sd, x, s, y, HEADS, True), **TOL)


# ------------------------------------------------------------------ samplers and guidance: the published protocols
def family_sampler(family, steps, **options):
    sampler = published_protocol(family).sampler
    return Sampler(sampler.name, steps, **{**sampler.options, **options})


@pytest.mark.parametrize(
    "options, official",
    [
        ({}, {}),  # SiT's command-line defaults: Euler-Maruyama, sigma, Mean last step
        (dict(solver="heun", last_step="tweedie"), dict(method="Heun", last_step="Tweedie")),
        (
            dict(diffusion="sbdm", sample_eps=0.05, last_step="euler"),
            dict(form="SBDM", sample_eps=0.05, last_step="Euler"),
        ),
        (
            dict(diffusion="decreasing", diffusion_norm=0.5, last_step="none"),
            dict(form="decreasing", norm=0.5, last_step=None),
        ),
        (dict(diffusion="constant", diffusion_norm=0.3), dict(form="constant", norm=0.3)),
        (dict(diffusion="increasing_decreasing", last_step_size=0.1), dict(form="inc-dec", last_step_size=0.1)),
    ],
    ids=["defaults", "heun_tweedie", "sbdm_euler", "decreasing_none", "constant", "increasing_decreasing"],
)
def test_sit_protocol_is_sits_sde_sampler_with_its_guidance(tmp_path, options, official):
    """SiT's sample_sde (every diffusion form, norm, last step, Euler and Heun) with its forward_with_cfg
    (1.5 on 3 channels), against ditlab's flow_sde + CFGModel on the loaded SiT file."""
    path, sd = sit_file(tmp_path)
    net, objective, _ = load_network(path, num_heads=HEADS)
    protocol = published_protocol("sit")
    assert (protocol.guidance.scale, protocol.guidance.channels, protocol.guidance.interval) == (1.5, 3, None)
    steps, (z, y) = 9, inputs()
    noises = noise_list(2 * steps, (2 * len(z), CHANNELS, SIZE, SIZE))  # SiT draws for the doubled batch
    null = torch.full_like(y, CLASSES)

    def model_fn(x, s):
        return forward_with_cfg(
            lambda a, b, c: official_forward(sd, a, b, c, HEADS, True), x, s, torch.cat([y, null]), 1.5
        )

    with torch.no_grad():
        theirs = sit_sample_sde(model_fn, torch.cat([z, z]), noises, steps, **official)[: len(z)]
        ours = family_sampler("sit", steps, **options)(
            protocol.guidance.wrap(net, CLASSES, CHANNELS), objective, z, {"y": y}, noise=ReplayNoise(noises)
        )
    assert torch.isfinite(theirs).all()
    assert torch.allclose(ours, theirs, **TOL), (ours - theirs).abs().max()


def test_repa_protocol_is_its_euler_maruyama_sampler_with_its_guidance_interval(tmp_path):
    path, ema, _ = repa_file(tmp_path)
    net, objective, _ = load_network(path, num_heads=HEADS)
    protocol = published_protocol("repa")
    assert (protocol.guidance.scale, protocol.guidance.channels, protocol.guidance.interval) == (1.8, None, (0.0, 0.7))
    steps, (z, y) = 12, inputs()
    noises = noise_list(steps, tuple(z.shape))
    network = {k: v for k, v in ema.items() if not k.startswith("projectors")}

    def repa_model(x, t, labels):  # REPA's SiT returns (output, projected tokens)
        return official_forward(network, x, t, labels, HEADS), None

    with torch.no_grad():
        theirs = repa_euler_maruyama(repa_model, z, y, noises, steps, 1.8, 0.0, 0.7, null_label=CLASSES)
        ours = family_sampler("repa", steps)(
            protocol.guidance.wrap(net, CLASSES, CHANNELS), objective, z, {"y": y}, noise=ReplayNoise(noises)
        )
    assert torch.allclose(ours.double(), theirs, **TOL), (ours.double() - theirs).abs().max()


def test_lightningdit_protocol_is_its_shifted_euler_ode_with_its_3_channel_guidance_interval(tmp_path):
    path, ema, _ = lightningdit_file(tmp_path)
    net, objective, _ = load_network(path)
    protocol = published_protocol("lightningdit")
    assert (protocol.guidance.scale, protocol.guidance.channels, protocol.guidance.interval) == (6.7, 3, (0.125, 1.0))
    assert protocol.sampler.describe() == "flow_euler x 249 steps, shift=3.3333333333333335"  # 250 grid points
    points, (z, y) = 16, inputs()
    null = torch.full_like(y, CLASSES)

    def model_fn(x, s):  # its do_sample: forward_with_cfg with cfg_interval=True
        return forward_with_cfg(
            lambda a, b, c: official_forward(ema, a, b, c, HEADS), x, s, torch.cat([y, null]), 6.7, 0.125
        )

    with torch.no_grad():
        theirs = lightningdit_sample_ode(model_fn, torch.cat([z, z]), points, timestep_shift=0.3)[: len(z)]
        ours = family_sampler("lightningdit", points - 1)(
            protocol.guidance.wrap(net, CLASSES, CHANNELS), objective, z, {"y": y}
        )
    assert torch.allclose(ours, theirs, **TOL), (ours - theirs).abs().max()


def test_the_protocols_are_named_options():
    assert PROTOCOLS == ("dit", "lightningdit", "repa", "sit")
    dit = published_protocol("dit")
    assert (
        dit.sampler.describe() == "ddpm x 250 steps"
        and dit.guidance.describe() == "guidance 1.5 on the first 3 channels"
    )
    assert published_protocol("sit").sampler.nfe() == 250 and published_protocol("repa").sampler.nfe() == 250
    with pytest.raises(ValueError, match=r"^unknown protocol='edm'; expected one of"):
        published_protocol("edm")


# ------------------------------------------------------------------ what the readers refuse, in one line
def test_a_misfit_family_or_file_is_one_line(tmp_path):
    repa, _, _ = repa_file(tmp_path)
    with pytest.raises(
        ValueError, match=r"is a REPA checkpoint \(its args.model and projectors\), not SiT; expected family=repa"
    ):
        read_dit_weights(repa, family="sit")
    sit, _ = sit_file(tmp_path)
    with pytest.raises(ValueError, match=r"has no projectors\.\*; expected a REPA checkpoint \(or family=sit"):
        read_dit_weights(sit, family="repa", num_heads=HEADS)
    lightning, _, _ = lightningdit_file(tmp_path)
    with pytest.raises(ValueError, match="is a LightningDiT checkpoint .* not DiT; expected family=lightningdit"):
        read_dit_weights(lightning, family="dit")
    with pytest.raises(
        ValueError, match=r"^unknown family='edm'; expected one of \('auto', 'dit', 'sit', 'repa', 'lightningdit'\)$"
    ):
        read_dit_weights(sit, family="edm")
    # a LightningDiT checkpoint whose config contradicts its weights
    ema = official_state_dict(**LIGHTNING_SWITCHES)
    torch.save(lightningdit_training_checkpoint(ema, ema, use_swiglu=False), tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="its config says use_swiglu=False but its weights have mlp=swiglu"):
        read_dit_weights(tmp_path / "odd.pt")
    # a RoPE table of another layout
    ema["feat_rope.freqs_cos"] = ema["feat_rope.freqs_cos"].flip(0)
    torch.save(ema, tmp_path / "lightningdit-odd.pt")
    with pytest.raises(ValueError, match="feat_rope.freqs_cos .* is not the 2-D RoPE of a 4x4 grid with 2 heads"):
        read_dit_weights(tmp_path / "lightningdit-odd.pt")


def test_the_head_count_no_tensor_shows_comes_from_an_option_or_is_one_line(tmp_path):
    """hidden 32 is no paper width: an official-layout file does not tell its heads; LightningDiT's RoPE
    table (or q/k norm) does."""
    sit, sd = sit_file(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"hidden size 32, not a paper config, and no tensor tells its head count; expected num_heads=<heads>",
    ):
        read_dit_weights(sit)
    assert read_dit_weights(sit, num_heads=4).architecture["num_heads"] == 4
    with pytest.raises(ValueError, match="hidden size 32, not divisible by num_heads=5"):
        read_dit_weights(sit, num_heads=5)
    lightning, _, _ = lightningdit_file(tmp_path)
    assert read_dit_weights(lightning).architecture["num_heads"] == HEADS  # the RoPE table's width is a head's


def test_a_training_checkpoint_without_ema_and_dit_args_read_as_dit(tmp_path):
    sd = official_state_dict(seed=4, learn_sigma=True)
    torch.save({"model": sd, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "0000100.pt")
    weights = read_dit_weights(tmp_path / "0000100.pt", num_heads=HEADS)
    assert weights.family.name == "dit" and torch.equal(weights.state_dict["pos_embed"], sd["pos_embed"])


# ------------------------------------------------------------------ LightningDiT's latents: per-channel statistics
def test_per_channel_latent_statistics_as_lightningdit_normalises_and_denormalises(tmp_path):
    """Its ImgLatentDataset: (z - mean) / std * latent_multiplier for training; its do_sample:
    (x * std) / latent_multiplier + mean before decoding; its latents_stats.pt: {"mean", "std"} (1, C, 1, 1)."""
    from ditlab.data.datamodule import latents_from_block
    from ditlab.models.vae import (
        PretrainedVAE,
        measure_latent_stats,
        read_latent_stats,
        small_autoencoder,
        to_model_space,
    )

    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(1, CHANNELS, 1, 1, generator=g), torch.rand(1, CHANNELS, 1, 1, generator=g) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")
    stats = read_latent_stats(tmp_path / "latents_stats.pt")
    assert stats == {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    autoencoder = small_autoencoder(
        image_channels=3, latent_channels=CHANNELS, block_out_channels=(8, 8), norm_num_groups=4
    )
    codec = PretrainedVAE("vavae", 1.0, autoencoder=autoencoder, latent_stats=str(tmp_path / "latents_stats.pt"))
    record = codec.describe()
    assert record["latent_mean"] == stats["mean"] and record["latent_std"] == stats["std"]
    z = torch.randn(2, CHANNELS, 4, 4, generator=g) * 3 + 1  # raw latents
    model_space = (z - mean) / std * 1.0
    assert torch.allclose(to_model_space(z, record), model_space, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(
            codec.decode(model_space), autoencoder.decode((model_space * std) / 1.0 + mean).sample, atol=1e-5
        )
    # the shards' raw posterior (N, V, M, C, H, W) -> model space by the record, in the data module
    block = torch.stack([z, torch.zeros_like(z)], dim=1).unsqueeze(1)  # one view, [mean, std 0]
    assert torch.allclose(latents_from_block(block, record), model_space, atol=1e-6)
    assert torch.equal(latents_from_block(block, 0.5), z * 0.5)  # one scale factor: as before
    # measured as LightningDiT's compute_latent_stats: over samples and positions, unbiased std
    measured = measure_latent_stats(z)
    assert torch.allclose(torch.tensor(measured["mean"]), z.mean(dim=[0, 2, 3]), atol=1e-5)
    assert torch.allclose(torch.tensor(measured["std"]), z.std(dim=[0, 2, 3]), atol=1e-5)
    torch.save({"avg": mean}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"is not a latents_stats.pt \(KeyError\); expected \{'mean', 'std'\}"):
        read_latent_stats(tmp_path / "bad.pt")


# ------------------------------------------------------------------ REPA's projector, the switches
def test_repa_projector_starts_as_repa_initialises_it():
    """REPA's SiT.initialize_weights reaches its projectors: Xavier-uniform weights, zero biases."""
    from torch import nn

    from ditlab.models.dit import DiT
    from ditlab.training.repa import REPA

    class Features(nn.Module):
        feature_dim = 12

    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    for init, zero_bias in (("xavier", True), ("torch", False)):
        repa = REPA(Features(), depth=1, projector_dim=16, projector_init=init)
        repa.attach(net)
        layers = [m for m in repa.projector if isinstance(m, nn.Linear)]
        assert all(bool((m.bias == 0).all()) == zero_bias for m in layers)
        if init == "xavier":  # uniform on +-sqrt(6 / (fan_in + fan_out))
            bounds = [(6 / (m.in_features + m.out_features)) ** 0.5 for m in layers]
            assert all(0.5 * b < m.weight.abs().max() <= b for m, b in zip(layers, bounds))
    with pytest.raises(ValueError, match=r"repa.projector_init='normal'; expected one of \('xavier', 'torch'\)"):
        REPA(Features(), projector_init="normal")


def test_lightningdit_switch_values_are_checked_in_one_line():
    from ditlab.models.dit import DiT

    tiny = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    with pytest.raises(ValueError, match=r"^norm_gain=true with norm='layer'; expected norm=rms"):
        DiT(**tiny, norm_gain=True)
    with pytest.raises(ValueError, match=r"^unknown qk_norm_kind='batch'; expected one of \('rms', 'layer'\)$"):
        DiT(**tiny, qk_norm_kind="batch")
    with pytest.raises(ValueError, match=r"^wo_shift='no'; expected true or false$"):
        DiT(**tiny, wo_shift="no")
    net = DiT(**tiny, norm="rms", norm_gain=True, wo_shift=True, qk_norm=True, qk_norm_kind="layer")
    keys = net.state_dict().keys()
    assert {"blocks.0.norm1.weight", "final_layer.norm_final.weight", "blocks.0.attn.q_norm.bias"} <= keys
    assert net.blocks[0].adaLN_modulation[1].weight.shape == (4 * 32, 32) and not net.official_layout
    assert all(
        torch.equal(net.state_dict()[k], torch.ones(32)) for k in ("blocks.0.norm1.weight", "blocks.0.norm2.weight")
    )


def test_sde_options_are_checked_and_counted():
    with pytest.raises(ValueError, match=r"^unknown sampler diffusion='vp'; expected one of \('sigma', 'sbdm'"):
        Sampler("flow_sde", 10, diffusion="vp")
    with pytest.raises(ValueError, match=r"^unknown sampler solver='rk4'; expected one of \('euler', 'heun'\)$"):
        Sampler("flow_sde", 10, solver="rk4")
    with pytest.raises(ValueError, match="diffusion_norm=-1 must be a finite number >= 0"):
        Sampler("flow_sde", 10, diffusion_norm=-1)
    assert Sampler("flow_sde", 10, solver="heun").nfe() == 19 and Sampler("flow_sde", 10, last_step="none").nfe() == 9
    with pytest.raises(
        ValueError, match=r"sampler diffusion=sbdm starts where its coefficient t / \(1 - t\) is infinite"
    ):
        Sampler("flow_sde", 4, diffusion="sbdm")  # SiT's velocity models start where SBDM is infinite
    assert Sampler("flow_sde", 4, diffusion="sbdm", sample_eps=0.01).options["sample_eps"] == 0.01
