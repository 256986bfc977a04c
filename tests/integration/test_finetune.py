"""Fine-tuning (``init_from``): official / ditlab / diffusers weights into a new run, adapted or refused."""

import pytest
import torch

from ditlab.models.dit import DiT, build_dit
from ditlab.train import ConfigError, build, train
from ditlab.train import main as train_main
from helpers import compose_run, invoke_main, randomised, tiny_overrides


def official_s2(path, input_size=16):
    """An official-layout DiT-S/2 state_dict (1000 classes, 3 channels) saved as a plain .pt."""
    torch.manual_seed(0)
    net = randomised(build_dit("DiT-S/2", input_size=input_size, in_channels=3, num_classes=1000))
    torch.save(net.state_dict(), path)
    return net.state_dict()


S2_INTO_TINY_DATA = ["model=dit_s2", "model.input_size=8", "model.in_channels=3", "model.num_classes=3"]


def test_finetune_official_s2_with_1000_classes_into_a_3_class_run(prepared, tmp_path, caplog):
    source = official_s2(tmp_path / "DiT-S-2.pt")  # 16x16 latents: 64 tokens; the run has 8x8: 16
    cfg = compose_run(
        prepared, tmp_path / "run", steps=2, extra=[*S2_INTO_TINY_DATA, f"init_from={tmp_path / 'DiT-S-2.pt'}"]
    )
    with caplog.at_level("INFO", logger="ditlab.finetune"):
        _, module = build(cfg)
    assert "label table rebuilt for 3 classes (source has 1000): null row kept" in caplog.text
    assert "position table recomputed for 16 tokens (source has 64)" in caplog.text
    start = module.net.state_dict()
    for key, value in source.items():
        if key == "y_embedder.embedding_table.weight":
            assert torch.equal(start[key][-1], value[-1])  # the null row
            assert start[key].shape == (4, 384) and not torch.equal(start[key][:3], value[:3])
        elif key == "pos_embed":
            assert torch.equal(start[key], DiT(input_size=8, hidden_size=384, depth=1, num_heads=6).pos_embed)
        else:
            assert torch.equal(start[key], value), key  # step 0: the shared weights are the source's
    assert all(torch.equal(a, b) for a, b in zip(module.ema.net.state_dict().values(), start.values()))
    # ... and the run trains from there: a fresh run (step 0, new optimizer) that moves the weights
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert not torch.equal(ckpt["state_dict"]["net.blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])


def test_finetune_freezes_by_pattern_and_reads_ditlab_and_diffusers_weights(prepared, tmp_path):
    from ditlab.models.diffusers_dit import to_diffusers

    base = compose_run(prepared, tmp_path / "base", steps=2)
    train(base)
    ckpt = tmp_path / "base" / "checkpoints" / "last.ckpt"
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    only = ["finetune.train_only=[blocks.*.adaLN_modulation.*,y_embedder.*]"]
    cfg = compose_run(prepared, tmp_path / "ft", steps=2, extra=[f"init_from={ckpt}", "finetune.ema=false", *only])
    _, module = build(cfg)
    trainable = {n for n, p in module.net.named_parameters() if p.requires_grad}
    assert trainable == {"y_embedder.embedding_table.weight"} | {
        f"blocks.{i}.adaLN_modulation.1.{w}" for i in range(2) for w in ("weight", "bias")
    }
    for name, value in module.net.state_dict().items():
        assert torch.equal(value, weights[f"net.{name}"]), name  # raw weights, as asked
    train(cfg)
    after = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    after = after["state_dict"]
    assert torch.equal(after["net.blocks.0.attn.qkv.weight"], weights["net.blocks.0.attn.qkv.weight"])  # frozen
    assert not torch.equal(
        after["net.blocks.0.adaLN_modulation.1.weight"], weights["net.blocks.0.adaLN_modulation.1.weight"]
    )

    # a diffusers DiTTransformer2DModel folder is a source too
    folder = tmp_path / "diffusers"
    net = randomised(
        DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=3)
    )
    to_diffusers(net).save_pretrained(str(folder))
    _, module = build(compose_run(prepared, tmp_path / "y", steps=1, extra=[f"init_from={folder}"]))
    for name, value in module.net.state_dict().items():
        assert torch.equal(value, net.state_dict()[name]), name

    with pytest.raises(ConfigError, match="pattern 'blocks.*.atn.*' matches no trainable parameter"):
        build(compose_run(prepared, tmp_path / "z", extra=["finetune.freeze=[blocks.*.atn.*]"]))


def test_a_misfit_is_one_line_before_training(prepared, tmp_path, monkeypatch, capsys):
    official_s2(tmp_path / "DiT-S-2.pt")
    # dit_tiny (hidden 64) cannot take DiT-S/2 weights (hidden 384): `python -m ditlab.train` (its main
    # in this process, a fresh one costs seconds of imports) says so in one line, exit 2
    monkeypatch.chdir(tmp_path)
    args = tiny_overrides(prepared, tmp_path, extra=[f"init_from={tmp_path / 'DiT-S-2.pt'}"])
    code, _, err = invoke_main(train_main, "ditlab.train", args, monkeypatch, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"ditlab.train: error: init_from='{tmp_path / 'DiT-S-2.pt'}' has hidden size 384, the model config 64"
    )
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs" / "train").iterdir())
    # learn_sigma differs: one line too (checked without a process)
    with pytest.raises(ConfigError, match="has output channels 6, the model config 3 \\(learn_sigma differs\\)"):
        extra = [*S2_INTO_TINY_DATA, "diffusion.learn_sigma=false", f"init_from={tmp_path / 'DiT-S-2.pt'}"]
        build(compose_run(prepared, tmp_path / "r", extra=extra))
