"""`--compile`: torch.compile of the DiT blocks, compatible with block swap, and compile-safe attention kernels.

Regional compilation: one compiled function for `WanAttentionBlock.forward`, installed as each block's `forward`.
The blocks share their structure, so Dynamo traces once and reuses the graph for every block (parameters are
graph inputs, not constants). Module hooks run in `nn.Module.__call__`, outside the compiled function, so the
block-swap hooks (`wan_core.offload`) keep moving weights between calls while the compiled code only computes.
Use the default mode (not "reduce-overhead"): CUDA graphs would pin the addresses that block swap changes.

Attention kernels from other packages (SageAttention, flash-attn) are opaque to Dynamo. `attention_op` wraps
them in a `torch.library.custom_op` with a fake (meta) implementation, so a compiled block keeps one graph
around them; `install_compile_safe_kernels()` puts those wrappers into the attention dispatch table.
The wrappers are for inference: they register no backward formula (use sdpa to train with --compile).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from . import attention as _attention

logger = logging.getLogger(__name__)

_RAW_KERNELS: dict[str, _attention.AttnFn] = {}


def _raw_kernel(backend: str) -> _attention.AttnFn:
    """The package's own kernel (never a compile-safe wrapper, so the op cannot call itself)."""
    if backend not in _RAW_KERNELS:
        resolved = _attention.resolve_backend(backend)
        _RAW_KERNELS[backend] = (_attention._sdpa if resolved is _attention.Backend.SDPA
                                 else _attention._load_kernel(resolved))
    return _RAW_KERNELS[backend]


@torch.library.custom_op("wantuner::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """[B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, Dv] through the named backend's kernel (contiguous output)."""
    return _raw_kernel(backend)(q, k, v).contiguous()


@attention_op.register_fake
def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def compile_safe_kernel(backend: str) -> _attention.AttnFn:
    """An attention kernel that Dynamo sees as one opaque op."""
    name = _attention.resolve_backend(backend).value
    return functools.partial(_call_op, backend=name)


def _call_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    return attention_op(q, k, v, backend)


def install_compile_safe_kernels() -> list[str]:
    """Route every installed non-sdpa backend of the dispatch table through `attention_op`; returns their names.

    (SDPA is a PyTorch op already.) Selection-time checks stay in `wan_core.attention`.
    """
    installed = []
    for name in _attention.available_backends():
        backend = _attention.Backend(name)
        if backend is _attention.Backend.SDPA:
            continue
        _raw_kernel(name)  # fail now if the package is broken
        _attention._KERNELS[backend] = compile_safe_kernel(name)
        installed.append(name)
    return installed


def compile_blocks(model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                   fullgraph: bool = False, dynamic: bool | None = False) -> nn.Module:
    """torch.compile the computation of every block in `model.blocks` (one shared compiled function).

    Hooks (block swap), the embeddings and the head stay eager. `uncompile_blocks` undoes it.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"compile_blocks needs a model with a non-empty `blocks` ModuleList, got "
                         f"{type(model).__name__}")
    if mode in ("reduce-overhead", "max-autotune"):
        logger.warning("compile mode %r uses CUDA graphs, which do not work with block swap", mode)
    kinds = {type(b) for b in blocks}
    if len(kinds) != 1:
        raise ValueError(f"compile_blocks expects blocks of one class, got {sorted(k.__name__ for k in kinds)}")
    installed = install_compile_safe_kernels()
    compiled = torch.compile(kinds.pop().forward, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    for block in blocks:
        block.forward = functools.partial(compiled, block)
    logger.info("compiled %d blocks (backend %s, mode %s); compile-safe attention kernels: %s", len(blocks),
                backend, mode or "default", ", ".join(installed) or "none needed")
    return model


def uncompile_blocks(model: nn.Module) -> nn.Module:
    for block in model.blocks:
        block.__dict__.pop("forward", None)
    return model
