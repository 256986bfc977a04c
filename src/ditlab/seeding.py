"""One seeding scheme for every random stream of a run.

Each stream is named ("timesteps", "diffusion_noise", "label_dropout", "data", "sample", ...) and
its seed derived from (run seed, stream name, rank, step, micro-batch) or, for generation, from
(seed, stream name, sample index). Two streams never share a seed, a resumed run redraws exactly
what the uninterrupted one drew (EDM2's practice), and a sample's noise depends on its index only,
not on how many GPUs drew it or in which batch.
"""

from __future__ import annotations

import hashlib

import torch

# The streams a training step and the data draw from; each gets its own generator.
TRAIN_STREAMS = ("timesteps", "diffusion_noise", "label_dropout", "data")


def stream_seed(seed: int, stream: str, *parts: int) -> int:
    """A 63-bit seed for ``stream`` from integers such as (rank, step, micro_batch).

    A cryptographic hash of the text, not Python's ``hash``: identical in every process and
    session (string hashing is randomised per process), and unrelated for neighbouring inputs.
    """
    text = ":".join([str(int(seed)), stream, *(str(int(p)) for p in parts)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def stream_generator(device: torch.device | str, seed: int, stream: str, *parts: int) -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded for one stream at one point of the run."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, stream, *parts))
    return generator


def per_sample_normal(
    shape: tuple[int, ...], indices: torch.Tensor, seed: int, stream: str, *parts: int, device="cpu"
) -> torch.Tensor:
    """(len(indices), *shape) standard normal; row i from its own stream (seed, stream, indices[i], *parts),
    so a sample's noise is the same whatever batch or rank draws it. Drawn on the CPU (generators of
    other devices give other numbers), then moved."""
    rows = [torch.randn(shape, generator=stream_generator("cpu", seed, stream, int(i), *parts)) for i in indices]
    return (torch.stack(rows) if rows else torch.empty(0, *shape)).to(device)
