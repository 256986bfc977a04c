"""The benchmark commands themselves (not their speed): they must keep working."""

import pytest

from ditlab.bench.__main__ import main


def test_benchmarks_run_on_tiny_sizes(capsys, tmp_path):
    main(["data", "--count", "300", "--size", "8", "--batch", "64", "--workers", "0", "--epochs", "1"])
    main(["train", "--models", "dit_s8", "--batches", "2", "--size", "8", "--steps", "1", "--warmup", "0"])
    main(["sampling", "--batch", "2", "--size", "4", "--hidden", "32", "--depth", "1"])
    out = capsys.readouterr().out
    assert "samples/s" in out and "img/s" in out and "dpmpp_2m" in out and "object store" in out
    # a model config and chosen samplers (NFE counted through generate: Heun 3 steps = 5 evaluations)
    main(["sampling", "--batch", "2", "--size", "4", "--model", "dit_s2", "--samplers", "dpmpp_2m:4,flow_heun:3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("Gaussian", "Flow"))]
    assert [(r[1], r[2], r[3]) for r in rows] == [("dpmpp_2m", "4", "4"), ("flow_heun", "3", "5")]
    with pytest.raises(ValueError, match="unknown sampler 'fast'"):
        main(["sampling", "--samplers", "fast:3"])
    assert "| DiT-S/8 | 2 | official fp32+TF32 |" in out and "| DiT-S/8 | 2 | ditlab |" in out
    # any model config (its own channels and classes), ditlab alone, profiled
    main(
        ["train", "--models", "dit_fmnist", "--batches", "2", "--size", "8", "--steps", "1", "--warmup", "1"]
        + ["--official", "off", "--override", "model.in_channels=1", "--profile", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "| dit_fmnist | 2 | ditlab |" in out and "official" not in out.split("|---")[-1]
    assert (tmp_path / "dit_fmnist_b2_trace.json").stat().st_size > 0
