"""The layout of a multi-process run: how the world is split into CFG groups, and each CFG group's sequence-parallel
ranks into Ulysses groups (all-to-all over heads) and ring groups (key/value blocks passed around).

World rank w = cfg_index · (ulysses · ring) + ring_index · ulysses + ulysses_index. The token sequence of one
forward is split into ulysses · ring equal chunks over the ranks of a CFG group in sequence-parallel rank order
(ring_index · ulysses + ulysses_index), so a Ulysses group holds consecutive chunks and a ring step passes one
contiguous block of keys.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelConfig:
    """What the multi-GPU flags ask for (the official Wan names: --ulysses_size, --ring_size, --dit_fsdp,
    --t5_fsdp; --cfg_parallel runs the conditional and the negative-prompt forwards on two halves of the world)."""

    ulysses_size: int = 1
    ring_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ("ulysses_size", "ring_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")

    @property
    def cfg_size(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def sp_size(self) -> int:
        """Ranks that share one forward's token sequence."""
        return self.ulysses_size * self.ring_size

    @property
    def world_size(self) -> int:
        return self.cfg_size * self.sp_size

    @property
    def active(self) -> bool:
        return self.world_size > 1 or self.dit_fsdp or self.t5_fsdp

    def check_world(self, world_size: int) -> None:
        """ValueError unless ulysses x ring x cfg (2 with --cfg_parallel) equals the number of processes."""
        if self.world_size != world_size:
            raise ValueError(f"--ulysses_size {self.ulysses_size} x --ring_size {self.ring_size} x {self.cfg_size} "
                             f"({'with' if self.cfg_parallel else 'without'} --cfg_parallel) = {self.world_size} "
                             f"must equal the number of processes ({world_size}; torchrun --nproc_per_node)")

    def check_heads(self, num_heads: int) -> None:
        """Ulysses gives each rank num_heads / ulysses_size heads; ring attention is for sizes that do not divide."""
        if num_heads % self.ulysses_size:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(f"--ulysses_size {self.ulysses_size} does not divide the DiT's {num_heads} attention "
                             f"heads; use a divisor ({', '.join(map(str, divisors))}) and put the other factor in "
                             f"--ring_size")


@dataclass(frozen=True)
class ParallelMesh:
    """This process's place in the layout and its process groups (None for a group of one)."""

    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    sp_group: dist.ProcessGroup | None  # the ulysses · ring ranks of this CFG group
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    cfg_group: dist.ProcessGroup | None  # the two ranks (one per CFG group) with the same sequence chunk
    ring_ranks: tuple[int, ...]  # world ranks of this rank's ring group, in ring order

    @property
    def cfg_index(self) -> int:
        return self.rank // self.config.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.config.sp_size

    @property
    def ulysses_index(self) -> int:
        return self.sp_rank % self.config.ulysses_size

    @property
    def ring_index(self) -> int:
        return self.sp_rank // self.config.ulysses_size

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the outputs."""
        return self.rank == 0


def _new_groups(all_ranks: list[list[int]], mine: int) -> dist.ProcessGroup | None:
    """Create every group of a partition (all processes must create all of them, in the same order) and return
    the one holding rank `mine`; None when the groups have one rank each."""
    if len(all_ranks[0]) == 1:
        return None
    found = None
    for ranks in all_ranks:
        group = dist.new_group(ranks)
        if mine in ranks:
            found = group
    return found


def build_mesh(config: ParallelConfig, device: torch.device) -> ParallelMesh:
    """The groups of `config` over the initialised default process group (checks the world size first)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    config.check_world(world)
    u, r, sp = config.ulysses_size, config.ring_size, config.sp_size
    cfg_starts = [c * sp for c in range(config.cfg_size)]
    sp_groups = [[s + i for i in range(sp)] for s in cfg_starts]
    ulysses_groups = [[s + j * u + i for i in range(u)] for s in cfg_starts for j in range(r)]
    ring_groups = [[s + j * u + i for j in range(r)] for s in cfg_starts for i in range(u)]
    cfg_groups = [[c * sp + i for c in range(config.cfg_size)] for i in range(sp)]
    mine = next(g for g in ring_groups if rank in g)
    return ParallelMesh(config, rank, world, device, _new_groups(sp_groups, rank), _new_groups(ulysses_groups, rank),
                        _new_groups(ring_groups, rank), _new_groups(cfg_groups, rank), tuple(mine))


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(config: ParallelConfig, device: str | None = None) -> ParallelMesh:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU), pick this rank's device
    (cuda:LOCAL_RANK), and build the mesh. The layout is checked against WORLD_SIZE before any connection."""
    config.check_world(launched_world_size())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    mesh = build_mesh(config, dev)
    logger.info("rank %d of %d on %s: ulysses %d x ring %d x cfg %d", mesh.rank, mesh.world_size, dev,
                config.ulysses_size, config.ring_size, config.cfg_size)
    return mesh
