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


def merge_spec_loras(model: WanModel, spec: ModelSpec) -> None:
    """Merge the LoRAs of `spec` (path, multiplier, include, exclude) and log what each matched."""
    from .lora import merge_loras

    paths, multipliers, includes, excludes = zip(*spec.loras)
    for report in merge_loras(model, list(paths), list(multipliers), include_patterns=list(includes),
                              exclude_patterns=list(excludes)):
        logger.info("LoRA %s", report)
        if report.unmatched:
            logger.warning("LoRA %s: %d keys matched no module: %s", report.source, len(report.unmatched),
                           ", ".join(report.unmatched[:10]))


def prepare_dit(path: str | Path, spec: ModelSpec, device: torch.device) -> WanModel:
    staged = spec.loras or spec.fp8 is not None or spec.blocks_to_swap is not None
    # pre-quantised fp8 files keep their stored weights only when nothing has to be merged into them first
    model = load_dit(path, task=spec.task, device="cpu" if staged else device, attn=spec.attn,
                     fp8=spec.fp8 if not spec.loras else None)
    if spec.loras:
        merge_spec_loras(model, spec)
        if spec.fp8 is not None:
            from .fp8 import apply_fp8

            apply_fp8(model, spec.fp8, device=device)
    if spec.blocks_to_swap is not None:
        raise NotImplementedError("--blocks_to_swap is not available yet")
    if spec.compile:
        raise NotImplementedError("--compile is not available yet")
    return model.to(device)
