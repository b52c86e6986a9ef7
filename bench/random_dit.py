"""Random-weight Wan DiTs of any size for the benchmarks, materialised directly in the target dtype and device.

Initialisation follows the official one so activations have realistic scales: Xavier-uniform
Linear and patch-embedding weights, N(0, 0.02) text/time embeddings, zero biases, unit norm weights, modulation
~ randn/sqrt(dim). The head weight, zero in the official init, gets Xavier too so the output is not trivially zero.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wan_core.loading.checkpoint import build_on_meta  # noqa: E402
from wan_core.models.config import DiTConfig  # noqa: E402
from wan_core.models.dit import WanModel  # noqa: E402


def _init_(name: str, t: torch.Tensor, dim: int, gen: torch.Generator) -> None:
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("modulation"):
        t.normal_(0.0, 1.0 / math.sqrt(dim), generator=gen)
    elif leaf == "bias" or name.endswith("emb_pos"):
        t.zero_()
    elif t.dim() == 1:  # norm weights
        t.fill_(1.0)
    elif name.startswith(("text_embedding", "time_embedding")):
        t.normal_(0.0, 0.02, generator=gen)
    else:
        fan_out, fan_in = t.shape[0], math.prod(t.shape[1:])
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        t.uniform_(-bound, bound, generator=gen)


def materialize_(module: nn.Module, dim: int, dtype: torch.dtype, device: str | torch.device, seed: int,
                 prefix: str = "") -> nn.Module:
    """Replace every (meta) parameter of `module` by a randomly initialised one (frozen) on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for module_name, sub in module.named_modules():
        for pname, param in list(sub._parameters.items()):
            if param is None:
                continue
            full = ".".join(p for p in (prefix, module_name, pname) if p)
            tensor = torch.empty(param.shape, dtype=dtype, device=device)
            _init_(full, tensor, dim, gen)
            sub._parameters[pname] = nn.Parameter(tensor, requires_grad=False)
    return module


def random_dit(cfg: DiTConfig, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               seed: int = 0) -> WanModel:
    """A full WanModel of `cfg` with random weights in `dtype` on `device` (no fp32 copy is ever made)."""
    model = build_on_meta(lambda: WanModel(cfg))
    return materialize_(model, cfg.dim, dtype, device, seed).eval()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers (each tensor once)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
