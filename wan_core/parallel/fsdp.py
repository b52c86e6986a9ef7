"""Weight sharding for models that do not fit one device: torch FSDP2 (`fully_shard`) over all ranks.

Each transformer block is one FSDP unit (its weights are gathered just before it runs and freed after), the rest
of the model is the root unit. Every rank must run the same modules in the same order, which the sampler does: all
ranks take the same steps, and with CFG parallel both groups run the same blocks (skip-layer passes included).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar, cast

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from wan_core.parallel.mesh import ParallelMesh

M = TypeVar("M", bound=nn.Module)

logger = logging.getLogger(__name__)


def world_mesh(mesh: ParallelMesh) -> DeviceMesh:
    return init_device_mesh(mesh.device.type, (mesh.world_size,))


def shard_blocks(model: M, mesh: ParallelMesh) -> M:
    """Shard `model` (anything with a `blocks` ModuleList: the DiT, the umT5 encoder) over every rank; its
    weights move to this rank's device, one shard each."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"FSDP sharding needs a model with a `blocks` ModuleList, got {type(model).__name__}")
    device_mesh = world_mesh(mesh)
    for block in blocks:
        fully_shard(block, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    if hasattr(model, "_rope_cache"):
        cast(Any, model)._rope_cache = {}
    total = sum(p.numel() for p in model.parameters())
    logger.info("FSDP: %s sharded over %d ranks (%.2f G parameters in all)", type(model).__name__, mesh.world_size,
                total / 1e9)
    return model


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of this rank's shard of the model's parameters (what it holds between forwards)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
