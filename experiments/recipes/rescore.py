"""Score one checkpoint of a run with its own FID protocol but another sampler (the sampler switches
need no training): `python experiments/recipes/rescore.py <ckpt> <sampler name> <steps> [option=value ...]`,
e.g. `... last.ckpt flow_heun 13 shift=3.0` or `... last.ckpt flow_sde 50`. Prints one table row."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ditlab.data.prepared import PreparedDir
from ditlab.diffusion import Sampler
from ditlab.inference import load_model
from ditlab.metrics.curve import run_protocol


def main(ckpt: str, name: str, steps: str, *options: str) -> None:
    torch.set_num_threads(2)
    kwargs = {k: float(v) if k != "last_step" else v for k, v in (o.split("=", 1) for o in options)}
    model = load_model(Path(ckpt))
    protocol = replace(run_protocol(model.record), sampler=Sampler(name, int(steps), **kwargs))
    prepared = PreparedDir(model.record.prepared_dir)
    start = time.time()
    labels = protocol.labels(model.num_classes)
    images = protocol.generate(
        model.net, model.objective, model.codec, model.num_classes, labels, torch.arange(len(labels)),
        model.latent_shape, "cpu",
    )  # fmt: skip
    results = protocol.measure(
        protocol.make_extractor(prepared, "cpu")(images), protocol.load_reference(prepared), labels
    )
    print(
        f"| {Path(ckpt).parent.parent.name} | {protocol.sampler.describe()} | {results['fid_clf']:.2f} | "
        f"{results['sample_accuracy_clf']:.3f} | {time.time() - start:.0f} s |"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
