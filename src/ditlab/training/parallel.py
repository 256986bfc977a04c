"""Parallelism applied from outside the model (torchtitan's habit): the DiT stays a plain nn.Module.

``parallelize(net, mesh, ...)`` does, per DiT block and in this order, activation checkpointing,
``torch.compile`` and FSDP2 ``fully_shard``, then shards the root. Parameter names never change
(no wrapper modules), so a checkpoint's ``net.*`` keys are the plain model's keys whatever was
applied. ``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` with one data-parallel mesh
dimension over every rank (what ``trainer=fsdp`` uses); ``DiTModule.configure_model`` calls
``parallelize`` with the mesh it gets from it (or with none: DDP / one device).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.checkpoint import checkpoint


def checkpointed_blocks(depth: int, every: int) -> list[int]:
    """The blocks whose activations are recomputed in backward: ``every`` 0 none, 1 all, k every k-th."""
    if every < 0:
        raise ValueError(f"activation_checkpointing={every}; expected 0 (off), 1 (every block) or k (every k-th)")
    return [] if every == 0 else list(range(0, depth, every))


def _checkpoint_forward(block: nn.Module) -> None:
    # Replace the instance's forward (not the module): the state_dict keys stay the plain model's.
    forward = block.forward
    block.forward = functools.partial(checkpoint, forward, use_reentrant=False)


def parallelize(
    net: nn.Module,
    mesh=None,
    *,
    activation_checkpointing: int = 0,
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply, in place and from outside, to ``net.blocks``: activation checkpointing (``0`` off, ``1``
    every block, ``k`` every k-th), ``torch.compile`` (per block: one short compile reused by every
    block), and with a device ``mesh`` FSDP2 sharding per block then the root. ``param_dtype``
    (bf16 for bf16-mixed runs) is the compute dtype of the gathered parameters; the sharded
    parameters, the optimizer state and the gradient reduction stay fp32."""
    blocks = net.blocks
    for i in checkpointed_blocks(len(blocks), activation_checkpointing):
        _checkpoint_forward(blocks[i])
    if compile:
        for block in blocks:
            block.compile()  # in place: no `_orig_mod.` in the keys
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        # The root's output back in fp32: the loss is computed in fp32 as in every other strategy.
        root_policy = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32
        )
        fully_shard(net, mesh=mesh, mp_policy=root_policy)
    return net


def shard(module: nn.Module, mesh) -> nn.Module:
    """FSDP2 ``fully_shard`` of a module trained beside the network (e.g. REPA's projector), in fp32:
    its gradients are then reduced over the ranks as the network's are."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, mesh=mesh)


# ----------------------------------------------------------------------------- sharded tensors
def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if is_sharded(t) else t


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a full tensor) distributed the way ``like`` (a DTensor) is."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(local(like).device), like.device_mesh, like.placements)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state with every sharded tensor gathered. Collective: call it on every rank."""
    return {k: v.full_tensor() if is_sharded(v) else v for k, v in module.state_dict().items()}


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every tensor on the meta device (no memory), for ``materialize``."""
    memo = {id(b): torch.empty_like(b, device="meta") for b in module.buffers()}
    memo.update(
        {
            id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()
        }
    )
    return copy.deepcopy(module, memo)


def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of ``skeleton`` (a meta-device module) holding ``state`` (full tensors)."""
    net = copy.deepcopy(skeleton)
    net.load_state_dict(state, strict=True, assign=True)
    return net.requires_grad_(False)


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose mesh shards data-parallel over every rank (no tensor
    parallelism): FSDP2 through ``DiTModule.configure_model``. Checkpoints are one full file
    (rank 0 writes), which ``ditlab.sample`` loads on one device and a sharded run resumes from."""

    def __init__(self, **kwargs):
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        # Known only now (the trainer set the devices): every rank is one data-parallel shard.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()
