"""Layer operations shared by the models: Linear layers that handle their own compute dtype.

The model code never mentions storage formats: a `CastLinear` casts its input to the dtype it computes in, so
replacing it (or its weight) with an fp8 or LoRA-wrapped variant needs no change inside any `forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CastLinear(nn.Linear):
    """nn.Linear that computes in its weight's dtype whatever the input dtype (output in that dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        return F.linear(x.to(weight.dtype), weight, self.bias)


class Fp32Linear(nn.Linear):
    """nn.Linear that always computes in float32 (the official time embedding and head run under fp32 autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: an explicit `compute_dtype` attribute (fp8 wrappers) or its weight dtype."""
    dtype = getattr(module, "compute_dtype", None)
    return dtype if dtype is not None else module.weight.dtype
