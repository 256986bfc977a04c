"""Representation alignment (REPA) in a training run: the projector's loss against a plain cosine,
coef 0 trains bit-identically to no REPA, the encoder sees the clean image of the latent's own view,
and the projector is trained and checkpointed but kept out of the EMA, the export and sampling."""

import pytest
import torch
import torch.nn.functional as F

from ditlab.data.datamodule import LatentDataModule
from ditlab.inference import load_model
from ditlab.models.dit import DiT
from ditlab.models.encoders import ClassifierEncoder
from ditlab.train import train
from ditlab.training.repa import REPA
from helpers import compose_run, prepare_tiny_folder, randomised


@pytest.fixture(scope="module")
def prepared_images(tmp_path_factory):
    """The tiny folder with its images stored (flips too: two views) and a classifier to encode them."""
    return prepare_tiny_folder(tmp_path_factory.mktemp("repa"), reference="clf", store_images=True)


def repa_overrides(prepared, coef=0.5, depth=1):
    return [
        "repa=classifier",
        f"data.prepared_dir={prepared}",  # the option's own `-images` dir would be another one
        "data.flip=true",
        f"repa.coef={coef}",
        f"repa.depth={depth}",
        "repa.projector_dim=16",
    ]


def test_the_alignment_loss_is_one_minus_the_mean_cosine_of_block_k_tokens(prepared_images):
    torch.manual_seed(0)
    net = randomised(
        DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=3)
    )
    repa = REPA(ClassifierEncoder(prepared_images / "classifier"), depth=2, projector_dim=16)
    repa.attach(net)
    net.train(), repa.train()
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 0])
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    net(x, t, y, dropout_generator=torch.Generator().manual_seed(0))
    loss = repa.loss(repa.take_tokens(), images)
    with pytest.raises(RuntimeError, match="no tokens kept"):
        repa.take_tokens()  # one loss per forward: the tokens are handed over once
    repa.eval()  # the reference's own forward below keeps nothing
    # the plain reference: block 2's tokens written out, the projector applied, the cosine by its formula
    h = net.x_embedder(x) + net.pos_embed
    c = net.t_embedder(t) + net.y_embedder(y, True, generator=torch.Generator().manual_seed(0))
    for block in net.blocks[:2]:
        h = block(h, c)  # (N, T, D)
    a = repa.projector(h)  # (N, T, E)
    features = ClassifierEncoder(prepared_images / "classifier")(images)  # (N, E, 1, 1) for 8x8 images
    b = F.adaptive_avg_pool2d(features, 4).flatten(2).transpose(1, 2)  # (N, T, E): the 4x4 token grid
    cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(loss, 1 - cosine.mean(1))
    assert repa._tokens is None


def test_coef_zero_trains_bit_identically_to_no_repa(prepared_images, tmp_path):
    plain = tmp_path / "plain"
    train(compose_run(prepared_images, plain, steps=3, extra=["data.flip=true", "data.module.with_images=true"]))
    aligned = tmp_path / "aligned"
    train(compose_run(prepared_images, aligned, steps=3, extra=repa_overrides(prepared_images, coef=0.0)))
    a = torch.load(plain / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(aligned / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {k for k in b if k.startswith("repa.projector.")}  # the projector is in the checkpoint ...
    for key, value in a.items():  # ... and with coef 0 everything else is what training without REPA gives
        assert torch.equal(value, b[key]), key


def test_the_encoder_sees_the_clean_image_of_the_latents_view(prepared_images, prepared):
    dm = LatentDataModule(str(prepared_images), batch_size=16, num_workers=0, with_images=True)
    batch = next(iter(dm.train_dataloader()))
    generator = torch.Generator().manual_seed(3)
    latents, labels, images = dm.to_model_batch(batch, generator)  # identity codec: the latent is the image
    which = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5  # the views drawn
    assert which.any() and not which.all()  # both views occur in this batch
    torch.testing.assert_close(latents, images.float() / 127.5 - 1, atol=2e-3, rtol=0)  # float16 storage
    stored = batch["image"]
    assert torch.equal(images[which], stored[which].flip(-1)) and torch.equal(images[~which], stored[~which])
    with pytest.raises(ValueError, match="stores no images; expected data prepared with data.store_images=true"):
        LatentDataModule(str(prepared), with_images=True)  # the session's tiny folder keeps no images


def test_a_repa_run_logs_its_term_resumes_exactly_and_keeps_the_projector_out_of_the_ema(prepared_images, tmp_path):
    extra = repa_overrides(prepared_images, coef=0.5, depth=2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose_run(prepared_images, straight, steps=4, extra=extra))
    train(compose_run(prepared_images, resumed, steps=2, extra=extra))
    train(compose_run(prepared_images, resumed, steps=4, extra=[*extra, "ckpt_path=last"]))
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in a["state_dict"].items():  # the projector and its optimizer state resume too
        assert torch.equal(value, b["state_dict"][key]), key
    assert not any("projector" in k for k in a["state_dict"] if k.startswith(("ema.", "net.")))
    header = (straight / "csv" / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "train/repa" in header
    model = load_model(straight / "checkpoints" / "last.ckpt")  # samples from the network alone
    assert model.generate([0, 1], 2, 1.0, seed=0).shape == (2, 3, 8, 8)
