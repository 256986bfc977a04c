"""The checkpoint record (``runtime.record``): written from today's config, read back unchanged; a
renamed, missing or mistyped field, a newer format, an old config without a model: one line each;
the format-0 layouts that no stored checkpoint covers (flow objectives with the first sampler names,
a pretrained VAE, the small VAE) upgraded as their runs meant. The stored checkpoints of each past
format are read in tests/integration/test_checkpoint_formats.py."""

import pytest
from omegaconf import OmegaConf, open_dict

from ditlab.diffusion import Guidance, Sampler
from ditlab.runtime.record import FIELDS, FORMAT_VERSION, RecordError, read_record, record_of_run
from helpers import compose_cfg

pytestmark = pytest.mark.unit


def run_config(extra=()):
    """A composed training config with the shape resolved as ditlab.train resolves it."""
    cfg = compose_cfg("train", ["experiment=smoke", "data=folder", "guidance.scale=3.0", *extra])
    with open_dict(cfg):
        cfg.model.update(input_size=8, in_channels=3, num_classes=3)
        cfg.fid_protocol.extractor = None
        cfg.data.prepared_dir = "/data/prepared"
        cfg.paths.output_dir = "/out"
    return cfg


def written(extra=()):
    codec = {"record": {"kind": "identity", "scale_factor": 1.0, "name": "identity"}}
    return record_of_run(run_config(extra), codec, ["cat", "dog", "fox"])


def test_a_written_record_reads_back_unchanged_and_builds_its_objects():
    record = written()
    assert record.format_version == FORMAT_VERSION and tuple(record.section()) == FIELDS
    back = read_record({**record.section(), "nonfinite": {}, "rng": {}}, "'x.ckpt'")
    assert back == record
    assert back.num_classes == 3 and back.latent_shape == (3, 8, 8) and back.classes == ["cat", "dog", "fox"]
    assert Sampler(**back.sampler).describe() == "ddim x 10 steps, eta=0.0"  # experiment=smoke's
    assert Guidance(**back.guidance) == Guidance(3.0)
    assert back.fid_protocol["guidance"] == back.guidance and back.fid_protocol["sampler"] is None
    assert back.prepared_dir == "/data/prepared" and "hidden_size: 64" in back.config_yaml


def test_the_grids_own_sampler_and_guidance_are_the_records():
    record = written(
        [
            "callbacks.sample_grid.guidance={_target_:ditlab.diffusion.Guidance,scale:5.0}",
            "callbacks.sample_grid.sampler={_target_:ditlab.diffusion.Sampler,name:ddim,steps:7}",
        ]
    )
    assert record.guidance["scale"] == 5.0 and record.sampler["steps"] == 7
    assert record.fid_protocol["guidance"]["scale"] == 3.0  # the FID keeps the run's node
    no_grid = written(["callbacks.sample_grid=null"])
    assert no_grid.guidance["scale"] == 3.0 and no_grid.sampler["steps"] == 10


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.update(samplr=s.pop("sampler")),
            "'x.ckpt': the checkpoint record has no field 'sampler' (it has 'samplr', which format 1 does not "
            "know); expected the fields model, objective, codec, sampler, guidance, fid_protocol, classes, "
            "prepared_dir, config_yaml, format_version",
        ),
        (
            lambda s: s.pop("prepared_dir"),
            "'x.ckpt': the checkpoint record has no field 'prepared_dir'; expected the fields model, objective, "
            "codec, sampler, guidance, fid_protocol, classes, prepared_dir, config_yaml, format_version",
        ),
        (
            lambda s: s["model"].pop("num_classes"),
            "'x.ckpt': checkpoint record field 'model' is {'_target_': 'ditlab.models.dit.DiT', 'input_size': 8, "
            "'p...; expected a dict with _target_, num_classes, in_channels, input_size",
        ),
        (
            lambda s: s.update(sampler="ddim"),
            "'x.ckpt': checkpoint record field 'sampler' is 'ddim'; expected a dict with name, steps",
        ),
        (
            lambda s: s.update(format_version=FORMAT_VERSION + 1),
            f"'x.ckpt' has checkpoint format_version {FORMAT_VERSION + 1}; this ditlab reads formats 0 to "
            f"{FORMAT_VERSION} (a newer ditlab wrote it?)",
        ),
    ],
    ids=["renamed", "missing", "model without classes", "mistyped", "newer"],
)
def test_a_bad_record_is_one_line_naming_the_field(change, message):
    section = written().section()
    change(section)
    with pytest.raises(RecordError) as caught:
        read_record(section, "'x.ckpt'")
    assert str(caught.value) == message


def test_format_0_without_a_config_or_a_model_is_one_line():
    with pytest.raises(RecordError, match=r"^'x.ckpt' is not a ditlab checkpoint \(no stored run config\)$"):
        read_record({"rng": {}}, "'x.ckpt'")
    cfg = OmegaConf.to_yaml(run_config())
    without_model = cfg.replace("\nmodel:", "\nnetwork:")
    with pytest.raises(RecordError) as caught:
        read_record({"config_yaml": without_model}, "'x.ckpt'")
    assert str(caught.value) == "'x.ckpt': its stored run config has no model; expected a ditlab training config"


def old_config(sampler: str, objective: str, vae: dict, **grid) -> str:
    """A format-0 run config in the first layout (before the sampler registry and the guidance node)."""
    return OmegaConf.to_yaml(
        {
            "model": {"_target_": "ditlab.models.dit.DiT", "input_size": 8, "in_channels": 4, "num_classes": 10},
            "diffusion": {"objective": {"_target_": objective}},
            "sampler": {"_target_": "ditlab.diffusion.Sampler", "name": sampler, "steps": 25, "eta": 0.0},
            "vae": vae,
            "data": {"prepared_dir": "/p"},
            "callbacks": {"sample_grid": {"cfg_scale": 4.0, "guided_channels": 3, **grid}},
        }
    )


IDENTITY = {"name": "identity", "codec": {"_target_": "ditlab.vae.IdentityVAE", "scale_factor": 1.0}}
SD = {"name": "sd_ema", "codec": {"_target_": "ditlab.vae.PretrainedVAE", "path": "sd", "scale_factor": 0.18215}}
SMALL = {"name": "small_kl", "codec": {"_target_": "ditlab.vae.SmallVAERecipe", "latent_channels": 4}}


@pytest.mark.parametrize(
    "name, objective, expected",
    [
        ("heun", "ditlab.diffusion.FlowMatching", {"name": "flow_heun", "steps": 25}),
        ("euler", "ditlab.diffusion.FlowMatching", {"name": "flow_euler", "steps": 25}),
        ("heun", "ditlab.diffusion.create_diffusion", {"name": "ode_heun", "steps": 25}),
        ("dpmpp", "ditlab.diffusion.create_diffusion", {"name": "dpmpp_2m", "steps": 25}),
        ("ddim", "ditlab.diffusion.create_diffusion", {"name": "ddim", "steps": 25, "eta": 0.0}),
        ("ddpm", "ditlab.diffusion.create_diffusion", {"name": "ddpm", "steps": 25}),
    ],
)
def test_format_0_first_sampler_names_become_todays(name, objective, expected):
    record = read_record({"config_yaml": old_config(name, objective, IDENTITY)}, "'x.ckpt'")
    assert record.sampler == expected and record.format_version == 0
    Sampler(**record.sampler)  # today's registry takes it
    assert record.guidance == {"scale": 4.0, "channels": 3, "interval": None}
    assert record.fid_protocol is None  # no FID settings in this config


def test_format_0_codec_from_the_config_where_it_describes_one():
    def codec(vae, checked=True):  # checked: written since 5ec4f39, whose train refused a vae not the data's
        section = {
            "config_yaml": old_config("ddpm", "x.create_diffusion", vae),
            **({"nonfinite": {}} if checked else {}),
        }
        return read_record(section, "'x.ckpt'").codec

    assert codec(IDENTITY) == {"record": {"kind": "identity", "scale_factor": 1.0, "name": "identity"}}
    assert codec(SD) == {"record": {"kind": "pretrained", "path": "sd", "scale_factor": 0.18215, "name": "sd_ema"}}
    assert codec(SMALL) is None  # its weights: only in the prepared dir
    assert codec(IDENTITY, checked=False) is None  # the config's vae need not be the data's: the prepared dir's
    carried = {"record": {"kind": "small_kl"}, "state_dict": {}}
    section = {"config_yaml": old_config("ddpm", "x", SMALL), "codec": carried, "classes": ["a"] * 10}
    assert read_record(section, "'x.ckpt'").codec is carried  # the travelling checkpoints carried it
