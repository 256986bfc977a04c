"""Parallelism applied from outside the model (torchtitan style): the DiT stays a plain nn.Module."""

from __future__ import annotations


def block_wrap_policy():
    """FSDP unit = one DiT block (the natural sharding granularity of a transformer)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from ditlab.models.dit import DiTBlock

    return ModuleWrapPolicy({DiTBlock})
