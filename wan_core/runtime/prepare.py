"""Preparing a DiT for inference: load, merge LoRAs, quantise to fp8, block swap, compile - in that order.

LoRAs are merged into bf16/fp32 weights before any quantisation; fp8, block swap and compile wrap the loaded
model from outside (the model's forward knows none of them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wan_core.lora.apply import merge_loras
from wan_core.models.dit import WanModel, load_dit
from wan_core.runtime.compile import compile_blocks
from wan_core.runtime.fp8 import apply_fp8
from wan_core.runtime.offload import choose_blocks_to_swap, enable_block_swap, parse_blocks_to_swap, pin_mode

if TYPE_CHECKING:
    from wan_core.loading.model_set import ModelSpec

logger = logging.getLogger(__name__)


def merge_spec_loras(model: WanModel, spec: ModelSpec) -> None:
    """Merge the LoRAs of `spec` (path, multiplier, include, exclude) and log what each matched."""
    paths, multipliers, includes, excludes = zip(*spec.loras)
    for report in merge_loras(model, list(paths), list(multipliers), include_patterns=list(includes),
                              exclude_patterns=list(excludes)):
        logger.info("LoRA %s", report)
        if report.unmatched:
            logger.warning("LoRA %s: %d keys matched no module: %s", report.source, len(report.unmatched),
                           ", ".join(report.unmatched[:10]))


def place_on_device(model: WanModel, spec: ModelSpec, device: torch.device,
                    size_hint: tuple[int, int, int] | None) -> WanModel:
    """Move the model to `device`, streaming its last blocks from CPU memory when `blocks_to_swap` asks for it."""
    count = parse_blocks_to_swap(spec.blocks_to_swap, len(model.blocks))
    if count == "auto":
        if device.type != "cuda":
            raise ValueError("--blocks_to_swap auto sizes the swap to the free GPU memory: it needs a CUDA device")
        if size_hint is None:
            raise ValueError("--blocks_to_swap auto needs the video size to estimate memory")
        count = choose_blocks_to_swap(model, *size_hint, device=device).blocks_to_swap
    model.block_swapper = enable_block_swap(model, count, device,  # None when count == 0 (plain move)
                                            pin=pin_mode(spec.pinned_block_swap))
    return model


def prepare_dit(path: str | Path, spec: ModelSpec, device: torch.device,
                size_hint: tuple[int, int, int] | None = None) -> WanModel:
    """Load the DiT and apply LoRA merge, fp8, block swap and compile as `spec` asks. `size_hint` (height,
    width, frames of the largest video) sizes `--blocks_to_swap auto`."""
    # pre-quantised fp8 files keep their stored weights only when nothing has to be merged into them first
    model = load_dit(path, task=spec.task, device="cpu", attn=spec.attn, fp8=spec.fp8 if not spec.loras else None)
    if spec.loras:
        merge_spec_loras(model, spec)
        if spec.fp8 is not None:
            apply_fp8(model, spec.fp8, device=device)
    place_on_device(model, spec, device, size_hint)
    if spec.compile:
        compile_blocks(model)
    return model
