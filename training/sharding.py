"""Sharded training: the DiT's weights split over the processes with FSDP2 (torch's `fully_shard`), configured the
accelerate way (`accelerate launch --config_file configs/accelerate/fsdp_2gpu.yaml -m training train ...`).

`accelerate launch` turns the config file's `fsdp_config` into `ACCELERATE_USE_FSDP` / `FSDP_*` environment
variables; `sharding_from_env` reads them, accepting what this trainer implements and refusing the rest with one
line naming the option. The sharding itself is `fully_shard` on every `WanAttentionBlock` and then on the whole DiT
(the root group holds the embeddings and the head), over a one-dimensional device mesh of all processes. It is
applied here, not through `accelerator.prepare(model)`: accelerate 1.16 enables its FSDP plugin only on GPUs (on
CPU processes it stays plain multi-process), and the LoRA network lives outside the DiT's module tree.

- Full fine-tuning (`--network_module full`): every DiT parameter is a sharded DTensor; FSDP2 averages the
  gradients over the processes (reduce-scatter), the optimizer updates each process's shard.
- LoRA on a sharded base: the frozen DiT is sharded, the small LoRA network stays whole on every process and its
  gradients are averaged like in plain data-parallel training.

Saved weights and training states hold full (gathered) tensors, written by the main process in the usual format,
so a state saved by a sharded run resumes in a sharded run of any size. Gathering a full fine-tune's optimizer
state needs host memory for the whole state on the main process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

BLOCK_CLASS = "WanAttentionBlock"
_TRUE = ("true", "1", "yes")


@dataclass(frozen=True)
class ShardingConfig:
    """What an FSDP config asks for (the options this trainer implements)."""

    reshard_after_forward: bool = True  # False keeps the gathered weights from forward to backward (ZeRO-2-like)


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in _TRUE


# (environment variable set by `accelerate launch`, its config-file key, why it is refused when set)
_REFUSED_FLAGS = (
    ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params", "parameter offload is not supported with sharding here; use "
                                                   "more processes, or --blocks_to_swap without FSDP"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "fsdp_cpu_ram_efficient_loading", "every process loads the DiT file and "
                                                                         "keeps its own shard; set it to false"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing", "use --gradient_checkpointing instead"),
    ("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "fsdp_activation_checkpointing_offload",
     "use --gradient_checkpointing_cpu_offload instead"),
)


def sharding_from_env(env: Mapping[str, str] | None = None) -> ShardingConfig | None:
    """The FSDP request of an `accelerate launch` config (None without one); ValueError naming the first option
    this trainer does not implement. DeepSpeed configs are refused (see the README's multi-GPU section)."""
    env = os.environ if env is None else env
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        raise ValueError("accelerate config distributed_type: DEEPSPEED is not supported by this trainer; use an "
                         "FSDP config (configs/accelerate/fsdp_2gpu.yaml; fsdp_reshard_after_forward: false is "
                         "ZeRO-2-like, true ZeRO-3-like)")
    if not _flag(env, "ACCELERATE_USE_FSDP"):
        return None
    version = env.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ValueError(f"accelerate FSDP option fsdp_version: {version} is not supported; set fsdp_version: 2 "
                         f"(FSDP2)")
    for name, key, why in _REFUSED_FLAGS:
        if _flag(env, name):
            raise ValueError(f"accelerate FSDP option {key}: true is not supported: {why}")
    _check_choice(env, "FSDP_STATE_DICT_TYPE", "fsdp_state_dict_type", ("FULL_STATE_DICT",),
                  "weights and states are saved gathered")
    _check_choice(env, "FSDP_AUTO_WRAP_POLICY", "fsdp_auto_wrap_policy", ("TRANSFORMER_BASED_WRAP",),
                  f"each {BLOCK_CLASS} is one shard group")
    _check_choice(env, "FSDP_TRANSFORMER_CLS_TO_WRAP", "fsdp_transformer_layer_cls_to_wrap", (BLOCK_CLASS,),
                  "the DiT's blocks are the shard groups")
    if env.get("FSDP_IGNORED_MODULES"):
        raise ValueError(f"accelerate FSDP option fsdp_ignored_modules: {env['FSDP_IGNORED_MODULES']} is not "
                         f"supported; remove it")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    if reshard not in ("true", "false"):
        raise ValueError(f"accelerate FSDP option fsdp_reshard_after_forward: {reshard} is not supported; expected "
                         f"true or false (FSDP2)")
    return ShardingConfig(reshard_after_forward=reshard == "true")


def _check_choice(env: Mapping[str, str], name: str, key: str, allowed: tuple[str, ...], why: str) -> None:
    value = env.get(name, "").strip()
    if value and value not in allowed:
        raise ValueError(f"accelerate FSDP option {key}: {value} is not supported; expected "
                         f"{' or '.join(allowed)} ({why})")


def check_sharded_run(world: int, *, fp8: bool, blocks_to_swap: int | None, given_model: bool, previews: bool,
                      validation: bool, expert_pair: bool = False) -> None:
    """Refuse, before the DiT is loaded, what a sharded run cannot do; one line naming the setting."""
    if world < 2:
        raise ValueError(f"an FSDP config needs 2 or more processes (num_processes), got {world}; to train in one "
                         f"process, launch without the FSDP config")
    problems = {"--fp8_base": fp8, "--blocks_to_swap": blocks_to_swap is not None,
                "a DiT loaded by the caller": given_model, "--sample_prompts": previews,
                "validation (--validation_split / --validation_dataset_config)": validation,
                "a Wan2.2 expert pair (--dit_high_noise; train each expert alone on its range)": expert_pair}
    for name, present in problems.items():
        if present:
            raise ValueError(f"{name} is not supported with an FSDP config (sharded training); remove it or train "
                             f"without FSDP")


def shard_dit(model: nn.Module, sharding: ShardingConfig, device: torch.device) -> None:
    """`fully_shard` every block, then the whole DiT, over all processes (in place: parameters become DTensors)."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    blocks = [m for m in model.modules() if type(m).__name__ == BLOCK_CLASS]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=sharding.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=sharding.reshard_after_forward)
    local = sum(p.to_local().numel() for p in model.parameters())
    logger.info("FSDP2: %d blocks and the root sharded over %d processes (%.1fM parameters here of %.1fM)",
                len(blocks), mesh.size(), local / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all tensors together, the same on every process (a collective when they are sharded)."""
    norm = torch.nn.utils.get_total_norm(tensors, foreach=True)
    return norm.full_tensor() if is_sharded(norm) else norm


def _options(**kwargs: bool):
    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_model_state(model: nn.Module, everywhere: bool) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded module (collective): on the CPU of the main process only, or, with
    `everywhere`, on every process."""
    state = get_model_state_dict(model, options=_options(cpu_offload=not everywhere))
    return {k: v.detach() for k, v in state.items()}


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a full state dict (given on every process) into a sharded module: each process keeps its shard."""
    set_model_state_dict(model, dict(state), options=_options())


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state of a sharded module (keyed by parameter names), on the main process (collective)."""
    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (given on every process) into the optimizer of a sharded module."""
    set_optimizer_state_dict(model, optimizer, state, options=_options())
