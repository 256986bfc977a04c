"""Every past checkpoint format loads and samples: a tiny checkpoint of each (tests/data/checkpoints,
written by the commit that made the format, its README says how) is read through the one record
reader, upgraded where it predates the record, and then loads in ``load_model``, samples in
``ditlab.sample``, exports to diffusers, scores its FID curve and initialises a fine-tuning run; its
record says what its run said (sampler, guidance, FID protocol, codec, classes). A checkpoint from
before the codec travelled needs its prepared dir (``latents``, relative in these runs) where it
cannot name its codec otherwise, and says so; a renamed record field is one line."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ditlab.data.prepared import PreparedDir
from ditlab.inference import load_model
from ditlab.metrics.curve import RUN_REFERENCE_DIR, read_curve, score_checkpoints
from ditlab.pipelines.export import export_pipeline
from ditlab.runtime.record import FORMAT_VERSION
from ditlab.sample import main as sample_main
from ditlab.training.finetune import init_from_weights
from helpers import invoke_main

STORED = Path(__file__).resolve().parents[1] / "data" / "checkpoints"
IDENTITY = {"record": {"kind": "identity", "scale_factor": 1.0, "name": "identity"}}
DDIM4 = {"name": "ddim", "steps": 4, "eta": 0.0}
GRID = {"scale": 3.0, "channels": None, "interval": [0, 600]}  # the runs' grid guidance (interval since f931c80)
DIT_15 = {"scale": 1.5, "channels": None, "interval": None}
# format dir: (format_version, codec in the record, classes in the record, guidance, FID protocol subset)
FORMATS = {
    "f0_first_layout": (0, None, None, {**GRID, "interval": None}, {"sampler": DDIM4, "guidance": DIT_15}),
    "f0_sampler_registry": (0, None, None, {**GRID, "interval": None}, {"sampler": DDIM4, "num_samples": 6}),
    "f0_nonfinite": (0, IDENTITY, None, GRID, {"sampler": {"name": "dpmpp_2m", "steps": 20}, "num_samples": 6}),
    "f0_guidance_node": (0, IDENTITY, None, GRID, {"sampler": None, "guidance": GRID, "num_samples": 6}),
    "f0_travelling": (0, IDENTITY, ["cat", "dog", "fox"], GRID, {"sampler": None, "guidance": GRID}),
    "f1_record": (1, IDENTITY, ["cat", "dog", "fox"], GRID, {"sampler": None, "guidance": GRID, "num_samples": 6}),
}


def test_every_stored_format_is_tested_and_the_newest_is_todays():
    assert sorted(p.name for p in STORED.iterdir() if p.is_dir()) == sorted(FORMATS)
    assert max(version for version, *_ in FORMATS.values()) == FORMAT_VERSION
    assert all((STORED / name / "last.ckpt").stat().st_size < 200_000 for name in FORMATS)


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_checkpoint_of_each_past_format_loads_samples_exports_scores_and_fine_tunes(
    name, prepared_clf, tmp_path, monkeypatch, capsys
):
    version, codec, classes, guidance, protocol = FORMATS[name]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copyfile(STORED / name / "last.ckpt", ckpt)
    monkeypatch.chdir(tmp_path)  # the runs named their prepared dir "latents": none here yet

    if codec is None:  # its codec is its prepared dir's: without it, one line
        with pytest.raises(FileNotFoundError, match="no prepared dataset at"):
            load_model(ckpt)
    else:
        alone = load_model(ckpt)
        assert alone.classes == classes and alone.codec.describe() == {"kind": "identity", "scale_factor": 1.0}
    (tmp_path / "latents").symlink_to(prepared_clf)  # the tests' tiny folder: identity latents, 3 classes

    model = load_model(ckpt)
    record = model.record
    assert record.format_version == version and record.codec == codec and record.classes == classes
    assert model.classes == ["cat", "dog", "fox"]  # carried, or from the prepared dir
    assert {k: record.model[k] for k in ("hidden_size", "depth", "num_heads", "num_classes", "in_channels")} == {
        "hidden_size": 8,
        "depth": 1,
        "num_heads": 2,
        "num_classes": 3,
        "in_channels": 3,
    }
    assert model.latent_shape == record.latent_shape == (3, 8, 8) and record.prepared_dir == "latents"
    assert record.sampler == DDIM4 and record.guidance == guidance
    assert {k: record.fid_protocol[k] for k in protocol} == protocol
    assert "hidden_size: 8" in record.config_yaml

    # ditlab.sample draws with the record's sampler and guidance
    images = model.generate([0, 1, 2], seed=0)
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
    args = [f"ckpt={ckpt}", "grid=true", "per_class=1", f"out={tmp_path / 'grid'}"]
    code, _, err = invoke_main(sample_main, "ditlab.sample", args, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert (tmp_path / "grid" / "grid.png").is_file()

    # export: the folder carries the record (its codec is the folder's own) and the same weights
    folder = export_pipeline(ckpt, tmp_path / "export")
    exported = load_model(folder)
    assert exported.record.section() == {**record.section(), "codec": None}
    assert exported.classes == ["cat", "dog", "fox"]
    for key, value in exported.net.state_dict().items():
        assert torch.equal(value, model.net.state_dict()[key]), key

    # the FID curve with the record's protocol, against the reference kept in the run dir
    kept = PreparedDir(tmp_path / "run" / RUN_REFERENCE_DIR)
    kept.root.mkdir()
    shutil.copyfile(PreparedDir(prepared_clf).reference("clf"), kept.reference("clf"))
    shutil.copytree(PreparedDir(prepared_clf).classifier, kept.classifier)
    csv_path, scored = score_checkpoints(tmp_path / "run", num_samples=6, extractor="clf", progress=False)
    assert scored == 1 and math.isfinite(float(read_curve(csv_path)[0]["fid_clf"]))

    # init_from: a fresh network of the record's architecture takes its EMA weights
    net = instantiate(record.model)
    init_from_weights(net, ckpt)
    for key, value in net.state_dict().items():
        assert torch.equal(value, model.net.state_dict()[key]), key


def test_a_renamed_record_field_is_one_line_for_every_reader(tmp_path, monkeypatch, capsys):
    checkpoint = torch.load(STORED / "f1_record" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["ditlab"]["samplr"] = checkpoint["ditlab"].pop("sampler")
    bad = tmp_path / "renamed.ckpt"
    torch.save(checkpoint, bad)
    expected = (
        f"{str(bad)!r}: the checkpoint record has no field 'sampler' (it has 'samplr', which format 1 does not "
        "know); expected the fields model, objective, codec, sampler, guidance, fid_protocol, classes, "
        "prepared_dir, config_yaml, format_version"
    )
    with pytest.raises(ValueError) as caught:
        load_model(bad)
    assert str(caught.value) == expected
    with pytest.raises(ValueError) as caught:
        init_from_weights(instantiate(checkpoint["ditlab"]["model"]), bad)
    assert str(caught.value) == expected
    code, _, err = invoke_main(
        sample_main, "ditlab.sample", [f"ckpt={bad}", "num_samples=2", f"out={tmp_path / 's'}"], monkeypatch, capsys
    )
    assert code == 2 and err.strip().splitlines() == [f"ditlab.sample: error: {expected}"]
