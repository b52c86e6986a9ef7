"""Preparing a DiT for inference: load, merge LoRAs, quantise to fp8, block swap, compile - in that order.

LoRAs are merged into bf16/fp32 weights before any quantisation; fp8, block swap and compile wrap the loaded
model from outside (the model's forward knows none of them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .model import WanModel, load_dit

if TYPE_CHECKING:
    from .models import ModelSpec

logger = logging.getLogger(__name__)


def prepare_dit(path: str | Path, spec: ModelSpec, device: torch.device) -> WanModel:
    staged = spec.fp8 is not None or spec.blocks_to_swap is not None
    model = load_dit(path, task=spec.task, device="cpu" if staged else device, attn=spec.attn)
    if spec.loras:
        raise NotImplementedError("LoRA loading is not wired into generation yet")
    if spec.fp8 is not None:
        raise NotImplementedError(f"--{spec.fp8} is not available yet")
    if spec.blocks_to_swap is not None:
        raise NotImplementedError("--blocks_to_swap is not available yet")
    if spec.compile:
        raise NotImplementedError("--compile is not available yet")
    return model.to(device)
