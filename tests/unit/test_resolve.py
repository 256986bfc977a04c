"""``ditlab.train.resolve``: the run config with what the prepared data decides filled in and checked,
from meta.json alone (no shards, nothing built, the given config left as it is)."""

import pytest
from omegaconf import OmegaConf

from ditlab.data.prepared import PreparedDir
from ditlab.runtime.files import write_json
from ditlab.train import ConfigError, resolve
from helpers import compose_cfg

META = {"num_classes": 3, "classes": ["cat", "dog", "fox"], "latent_shape": [4, 8, 8], "vae": {"name": "identity"}}


@pytest.fixture
def prepared(tmp_path):
    """A prepared dir as far as resolve reads one: meta.json and which reference statistics exist."""
    write_json(tmp_path / "meta.json", META)
    return PreparedDir(tmp_path)


def composed(prepared, *overrides):
    base = ["vae=identity", f"data.prepared_dir={prepared.root}", "paths.output_dir=/tmp"]
    return compose_cfg("train", [*base, *overrides])


def test_the_shape_comes_from_the_data_and_the_given_config_stays_as_it_was(prepared):
    cfg = composed(prepared, "model=dit_s2")
    resolved = resolve(cfg, prepared)
    assert (resolved.model.input_size, resolved.model.in_channels, resolved.model.num_classes) == (8, 4, 3)
    assert cfg.model.input_size is None and cfg.fid_protocol.extractor == "auto"  # untouched
    assert resolved.fid_protocol.extractor is None  # no reference statistics here: FID off
    assert resolved.model.depth == cfg.model.depth and resolved.optim == cfg.optim  # the rest as given
    assert OmegaConf.to_yaml(resolve(resolved, prepared)) == OmegaConf.to_yaml(resolved)  # resolving again: nothing


def test_the_fid_extractor_is_the_one_whose_statistics_the_dir_holds(prepared):
    prepared.reference("clf").write_bytes(b"")  # resolve asks only whether the file is there
    assert resolve(composed(prepared), prepared).fid_protocol.extractor == "clf"
    prepared.reference("inception").write_bytes(b"")  # both: the data config's extractor
    for configured in ("inception", "clf"):
        both = composed(prepared, f"data.reference.extractor={configured}")
        assert resolve(both, prepared).fid_protocol.extractor == configured
    assert resolve(composed(prepared, "fid_protocol.extractor=null"), prepared).fid_protocol.extractor is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.in_channels=3"], "model.in_channels=3 but the latents in .* have 4 channels"),
        (["model.num_classes=1000"], "model.num_classes=1000 but .* has 3 classes"),
        (["model.patch_size=3"], "model.patch_size=3 does not divide the latent size 8"),
        (["vae=small_kl"], "vae=small_kl but .* was prepared with vae=identity; expected vae=identity"),
        (["+trainer.gradient_clip_val=1.0"], r"trainer.gradient_clip_val=1.0: the option moved; expected module"),
        (["+trainer.accumulate_grad_batches=2"], "expected module.accumulate_grad_batches=2"),
        (["trainer.precision=16-mixed"], "trainer.precision=16-mixed: fp16's gradient scaler is not supported"),
        (["repa=classifier", "data.module.with_images=false"], "repa needs each latent's clean image"),
    ],
)
def test_what_does_not_fit_the_data_or_moved_is_one_line(prepared, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        resolve(composed(prepared, *overrides), prepared)
    assert "\n" not in str(err.value)
