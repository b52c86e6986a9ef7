"""`--compile`: torch.compile of the DiT blocks, compatible with block swap, and compile-safe attention kernels.

Regional compilation: one compiled function for `WanAttentionBlock.forward`, installed as each block's `forward`.
The blocks share their structure, so Dynamo traces once and reuses the graph for every block (parameters are
graph inputs, not constants). Module hooks run in `nn.Module.__call__`, outside the compiled function, so the
block-swap hooks (`wan_core.runtime.offload`) keep moving weights between calls while the compiled code only computes.
Use the default mode (not "reduce-overhead"): CUDA graphs would pin the addresses that block swap changes.

Attention kernels from other packages (SageAttention, flash-attn) are opaque to Dynamo. `attention_op` wraps
them in a `torch.library.custom_op` with a fake (meta) implementation, so a compiled block keeps one graph
around them; `install_compile_safe_kernels()` puts those wrappers into the attention dispatch table for the
backends the blocks use (other installed attention packages are never imported).
The wrappers are for inference: they register no backward formula (use sdpa to train with --compile).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import torch
from torch import nn

from wan_core.models import attention as _attention
from wan_core.models.ops import mark_compile_constants, torch_release

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


def install_compile_safe_kernels(backends: Iterable[str]) -> list[str]:
    """Route the named non-sdpa backends of the dispatch table through `attention_op`; returns their names.

    Only these packages are imported: a broken package that the model does not use (flash-attn or xformers
    built for another torch) cannot stop `--compile`; a broken one that is asked for raises a RuntimeError naming
    the package. (SDPA is a PyTorch op already.) Selection-time checks stay in `wan_core.models.attention`.
    """
    installed = []
    for name in sorted({_attention.resolve_backend(b).value for b in backends}):
        backend = _attention.Backend(name)
        if backend is _attention.Backend.SDPA:
            continue
        _raw_kernel(name)  # fail now if the package is broken
        _attention._KERNELS[backend] = compile_safe_kernel(name)
        installed.append(name)
    return installed


def attention_backends(module: nn.Module) -> set[str]:
    """The attention backends selected inside `module` (the `attn_backend` of its attention layers)."""
    backends = (getattr(m, "attn_backend", None) for m in module.modules())
    return {backend for backend in backends if isinstance(backend, str)}


INLINE_DEFAULT_FROM = (2, 5)  # torch release from which Dynamo inlines nn.Module calls by default


def enable_module_inlining(config: object | None = None, version: str | None = None) -> bool:
    """Make Dynamo trace through nn.Modules passed as arguments (`inline_inbuilt_nn_modules`), so that one compiled
    block function serves every block; returns True when it changed the setting.

    The option is on by default from torch 2.5. Before, each block is a different module constant to Dynamo: every
    block recompiles and, past the recompile limit (8), the remaining blocks run eagerly.
    """
    config = torch._dynamo.config if config is None else config
    if torch_release(torch.__version__ if version is None else version) >= INLINE_DEFAULT_FROM:
        return False
    if not hasattr(config, "inline_inbuilt_nn_modules") or config.inline_inbuilt_nn_modules:
        return False
    config.inline_inbuilt_nn_modules = True
    logger.info("torch %s: set torch._dynamo.config.inline_inbuilt_nn_modules = True so that the blocks share "
                "one compiled graph", version or torch.__version__)
    return True


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
    installed = install_compile_safe_kernels(attention_backends(blocks))
    enable_module_inlining()
    mark_compile_constants()
    compiled = torch.compile(kinds.pop().forward, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    for block in blocks:
        block.forward = functools.partial(compiled, block)
    logger.info("compiled %d blocks (backend %s, mode %s); compile-safe attention kernels: %s", len(blocks),
                backend, mode or "default", ", ".join(installed) or "none needed")
    return model


def uncompile_blocks(model: nn.Module) -> nn.Module:
    for block in model.get_submodule("blocks").children():
        block.__dict__.pop("forward", None)
    return model
