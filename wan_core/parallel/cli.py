"""The generate CLI's multi-GPU flags (launched with `torchrun --nproc_per_node N -m wan_core.generate ...`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from wan_core.loading.checkpoint import peek_shapes, read_metadata
from wan_core.loading.model_set import ModelSpec
from wan_core.models.config import DiTConfig, detect_config, stored_config
from wan_core.models.dit import normalize_dit_keys
from wan_core.parallel.mesh import ParallelConfig, ParallelMesh, init_distributed, launched_world_size
from wan_core.parallel.models import check_spec, same_random_state


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-GPU (launch with torchrun --nproc_per_node N; ulysses x ring x cfg = N)")
    g.add_argument("--ulysses_size", type=int, default=1,
                   help="sequence parallel over N ranks by all-to-all over attention heads (N divides the heads)")
    g.add_argument("--ring_size", type=int, default=1,
                   help="sequence parallel over N ranks by ring attention (any head count)")
    g.add_argument("--cfg_parallel", action="store_true",
                   help="conditional and negative-prompt forwards on two halves of the ranks (needs guidance != 1)")
    g.add_argument("--dit_fsdp", action="store_true", help="shard the DiT weights over all ranks (FSDP)")
    g.add_argument("--t5_fsdp", action="store_true", help="shard the umT5 weights over all ranks (FSDP)")


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(args.ulysses_size, args.ring_size, args.cfg_parallel, args.dit_fsdp, args.t5_fsdp)


def setup_parallel(args: argparse.Namespace, spec: ModelSpec) -> ParallelMesh | None:
    """None for a one-process run without sharding; else, after checking every flag against the launch, this
    rank's mesh (process group joined, random seeds made equal on all ranks)."""
    config = parallel_config(args)
    world = launched_world_size()
    if not config.active and world == 1:
        return None
    config.check_world(world)
    check_spec(config, spec)
    for path in (spec.path("dit"), *([spec.path("dit_high")] if spec.dit_high else [])):
        if config.sp_size > 1 and path.exists():
            config.check_heads(dit_config(path).num_heads)
    for flag, used in (("--interactive", args.interactive), ("--latent_path", args.latent_path),
                       ("--save_merged_model", args.save_merged_model)):
        if used:
            raise ValueError(f"{flag} runs in one process: drop torchrun and the multi-GPU flags")
    if config.cfg_parallel and args.cache_mode != "none":
        raise ValueError(f"--cache_mode {args.cache_mode} decides per branch which forwards to skip; it cannot be "
                         f"combined with --cfg_parallel, which runs the branches on different ranks")
    mesh = init_distributed(config, args.device)
    same_random_state(mesh)
    return mesh


def dit_config(path: Path) -> DiTConfig:
    """A DiT file's architecture from its stored config or its header shapes (no weights read)."""
    return (stored_config(read_metadata(path), DiTConfig, f"--dit {path.name}")
            or detect_config(normalize_dit_keys(peek_shapes(path), path.name)))


def finish_parallel(mesh: ParallelMesh | None) -> None:
    if mesh is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
