"""Attention dispatch: one table keyed by backend name, probed at import, explicit selection, no silent fallback.

All backends take and return [B, L, H, D]. `sdpa` (PyTorch scaled_dot_product_attention) is the default and the
only one that runs on the CPU. Optional backends are used only when asked for; asking for one whose package is
missing fails at selection time with the pip command to run.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from enum import Enum
from typing import cast

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class Backend(str, Enum):
    SDPA = "sdpa"
    XFORMERS = "xformers"
    SAGE = "sageattn"
    FLASH2 = "flash2"
    FLASH3 = "flash3"


# Names users know from musubi (--attn_mode) and kijai, mapped to ours.
ALIASES = {"torch": "sdpa", "sdpa": "sdpa", "xformers": "xformers", "sageattn": "sageattn", "sage": "sageattn",
           "flash": "flash2", "flash2": "flash2", "flash_attn": "flash2", "flash3": "flash3"}
_PACKAGES = {Backend.XFORMERS: ("xformers", "pip install xformers"),
             Backend.SAGE: ("sageattention", "pip install sageattention"),
             Backend.FLASH2: ("flash_attn", "pip install flash-attn --no-build-isolation"),
             Backend.FLASH3: ("flash_attn_interface", "build flash-attention 3 from its hopper/ directory")}
_HALF = (torch.float16, torch.bfloat16)
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """Backends whose packages are importable here (sdpa always)."""
    return [b.value for b in Backend if b is Backend.SDPA or _installed(_PACKAGES[b][0])]


def resolve_backend(name: str | Backend | None) -> Backend:
    """Validate a backend name (aliases accepted) and check its package is installed."""
    if name is None:
        return Backend.SDPA
    if isinstance(name, Backend):
        backend = name
    else:
        key = ALIASES.get(str(name).lower())
        if key is None:
            raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(sorted(ALIASES))}")
        backend = Backend(key)
    if backend is not Backend.SDPA:
        module, install = _PACKAGES[backend]
        if not _installed(module):
            raise RuntimeError(f"attention backend {backend.value!r} needs the package {module!r}, which is not "
                               f"installed: {install}")
    return backend


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _load_kernel(backend: Backend) -> AttnFn:
    """Import the optional kernel (guarded: broken builds raise ImportError/OSError/RuntimeError)."""
    try:
        if backend is Backend.XFORMERS:
            import xformers.ops  # optional kernels: imported only when their backend is chosen

            return lambda q, k, v: xformers.ops.memory_efficient_attention(q, k, v)
        if backend is Backend.SAGE:
            from sageattention import sageattn  # optional

            return lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD")
        if backend is Backend.FLASH2:
            from flash_attn import flash_attn_func  # optional

            return lambda q, k, v: flash_attn_func(q, k, v)
        from flash_attn_interface import flash_attn_func as fa3  # optional (FlashAttention 3)

        def _fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = fa3(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        return _fa3
    except (ImportError, OSError, RuntimeError) as exc:
        module, install = _PACKAGES[backend]
        raise RuntimeError(f"attention backend {backend.value!r}: the package {module!r} is installed but failed to "
                           f"import ({type(exc).__name__}: {exc}); it is probably built for another torch than "
                           f"{torch.__version__}: reinstall it ({install}) or use sdpa") from exc


_KERNELS: dict[str, AttnFn] = {Backend.SDPA: _sdpa}  # by Backend (a str enum)


def get_kernel(backend: str | Backend | None) -> AttnFn:
    backend = resolve_backend(backend)
    if backend not in _KERNELS:
        _KERNELS[backend] = _load_kernel(backend)
    return _KERNELS[backend]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | Backend | AttnFn | None = None,
              k_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D] (scale 1/sqrt(D)).

    `k_lens` [B] limits each sample's keys to its first k_lens[b] positions; every backend gives the same result
    because padded samples are computed one at a time on their valid keys. `backend` may also be a kernel object
    that wraps a named backend (sequence-parallel attention, `wan_core.parallel`); it is called as it is.
    """
    if callable(backend) and k_lens is None:
        return backend(q, k, v)
    # dict hit first (a Backend is a str, so names hit too): no import probing per call
    name = cast("str | Backend | None", backend)
    kernel = (_KERNELS.get(name) if name is not None else None) or get_kernel(name)
    if k_lens is not None and bool((k_lens < k.shape[1]).any()):
        return torch.cat([attention(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n], backend)
                          for i, n in enumerate(k_lens.tolist())])
    if kernel is _sdpa or q.dtype in _HALF:
        return kernel(q, k, v)
    dtype = q.dtype  # kernels other than SDPA need fp16/bf16
    return kernel(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)).to(dtype)
