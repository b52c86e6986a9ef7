"""fp8 weight storage for the DiT and the T5: modes, target selection, quantisation, pre-quantised files.

Everything here works on a built model from the outside (style R7): target `nn.Linear` layers are replaced by
`ops.FP8Linear`, a drop-in that upcasts its weight per call, so no model `forward` changes.

Modes (`FP8_MODES`):
- `fp8`: plain cast of the target weights to float8_e4m3fn (no scale), compute in bf16/fp16.
- `fp8_scaled`: block-wise scales over 64 input columns (absmax/448, fp32, [out, in/64, 1]); per channel when
  in_features % 64 != 0. `fp8_scaled_tensor` / `fp8_scaled_channel`: one scale per tensor / output row.
- `fp8_fast`: per-channel weight scales plus per-token activation quantisation, fp8 matmuls through
  `torch._scaled_mm` (CUDA compute capability >= 8.9 only; a RuntimeError elsewhere). Where the GPU has fp8
  tensor cores but this torch has no row-wise kernel for it (compute capability 8.9 before torch 2.7, or a failed
  test call), it warns once and upcasts the weights per call instead (fp8_scaled when `apply_fp8` is told the
  device).

Targets (all modes, DiT): the Linear weights inside `blocks.*`, i.e. self/cross-attention q, k, v, o, k_img,
v_img and ffn.0/ffn.2. Norms, biases, modulation, the patch/text/time/image embeddings, the time projection and
the head keep their dtype: together they are ~2 % of the 1.3B model's weight bytes, and musubi's cast-everything
variant costs accuracy for that (bench/bench_fp8_cpu.py measures both).

Order with LoRA: merge into bf16 weights first, then `apply_fp8(model, mode)`; unmerged LoRA wrappers simply
call the FP8Linear they wrap. Files that are already fp8 (ComfyUI `scaled_fp8`, plain e4m3fn) are loaded with
their stored weights and scales by `load_dit(..., fp8=mode)` (`wan_core.models.dit.build_fp8_dit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from wan_core.models.ops import (
    FP8_DTYPES,
    FP8Linear,
    Fp32Linear,
    dequantize_weight,
    fast_matmul_fallback,
    quantize_weight,
)
from wan_core.models.ops import scale_layout as _scale_layout

if TYPE_CHECKING:
    from wan_core.models.t5 import T5Encoder

T5Like = TypeVar("T5Like", bound="nn.Module | T5Encoder")

logger = logging.getLogger(__name__)

SCALE_KEY = "scale_weight"  # our buffer / state-dict name (musubi and old ComfyUI files)
_STORED_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI wrote both over time
_DROPPED_SUFFIXES = (".scale_input", ".input_scale")  # static activation scales: we quantise activations per token
FP8_MARKER_KEY = "scaled_fp8"
DIT_EXCLUDE = ("norm", "patch_embedding", "text_embedding", "time_embedding", "time_projection", "head",
               "modulation", "img_emb")


@dataclass(frozen=True)
class FP8Mode:
    """How target weights are stored and multiplied."""

    name: str
    scaling: str  # "none" | "tensor" | "channel" | "block"
    block_size: int = 64
    fast: bool = False  # fp8 matmuls (torch._scaled_mm)


FP8_MODES: dict[str, FP8Mode] = {
    "fp8": FP8Mode("fp8", "none"),
    "fp8_scaled": FP8Mode("fp8_scaled", "block"),
    "fp8_scaled_tensor": FP8Mode("fp8_scaled_tensor", "tensor"),
    "fp8_scaled_channel": FP8Mode("fp8_scaled_channel", "channel"),
    "fp8_fast": FP8Mode("fp8_fast", "channel", fast=True),
}


def get_fp8_mode(mode: str | FP8Mode) -> FP8Mode:
    if isinstance(mode, FP8Mode):
        return mode
    try:
        return FP8_MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"unknown fp8 mode {mode!r}; expected one of {', '.join(FP8_MODES)}") from None


def is_dit_target(name: str) -> bool:
    """True for the module path of a Linear that the fp8 modes quantise (a Linear inside `blocks.*`)."""
    return name.startswith("blocks.") and not any(p in name for p in DIT_EXCLUDE) and "lora" not in name.lower()


def _quantizable(name: str, module: nn.Module, is_target: Callable[[str], bool]) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, Fp32Linear) and is_target(name)


def _fast_capable(in_features: int, out_features: int) -> bool:
    return in_features % 16 == 0 and out_features % 16 == 0  # torch._scaled_mm shape rule


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def apply_fp8(model: nn.Module, mode: str | FP8Mode, *, compute_dtype: torch.dtype | None = None,
              device: str | torch.device | None = None,
              is_target: Callable[[str], bool] = is_dit_target) -> nn.Module:
    """Quantise the target Linear layers of `model` in place (call after merging LoRAs); returns the model.

    `compute_dtype` defaults to each layer's current weight dtype. With `fp8_fast`, pass the device the model will
    run on to fail now rather than at the first forward on a device without fp8 tensor cores, and to get
    fp8_scaled instead where this torch cannot run fp8 matmuls on it (`ops.fast_matmul_fallback`).
    """
    mode = get_fp8_mode(mode)
    if mode.fast and device is not None and fast_matmul_fallback(device) is not None:
        mode = FP8_MODES["fp8_scaled"]  # the reason is logged once; no fp8 matmuls here, so keep block scales
    targets = [(n, m) for n, m in model.named_modules() if _quantizable(n, m, is_target)]
    if not targets:
        raise ValueError(f"apply_fp8({mode.name}): the model has no Linear layer to quantise "
                         f"({sum(isinstance(m, FP8Linear) for m in model.modules())} are fp8 already)")
    before = weight_bytes(model)
    for name, linear in targets:
        fast = mode.fast and _fast_capable(linear.in_features, linear.out_features)
        new = FP8Linear.from_linear(linear, mode.scaling, block_size=mode.block_size, compute_dtype=compute_dtype,
                                    fast=fast)
        _replace(model, name, new)
    logger.info("fp8 (%s): %d Linear layers quantised, weights %.2f -> %.2f GB", mode.name, len(targets),
                before / 1e9, weight_bytes(model) / 1e9)
    return model


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ----------------------------------------------------------------------------------------------------------------
# T5
# ----------------------------------------------------------------------------------------------------------------


def fp8_t5(t5: T5Like, mode: str | FP8Mode = "fp8_scaled", compute_dtype: torch.dtype | None = None) -> T5Like:
    """Store every Linear of a T5 encoder in fp8 (norms, the token and relative-position embeddings untouched).

    Accepts an `nn.Module` or a wrapper with a `.model` module (`wan_core.models.t5.T5Encoder`); returns its argument.
    """
    module = t5 if isinstance(t5, nn.Module) else getattr(t5, "model", None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"fp8_t5 expects a T5 nn.Module or an object with a .model module, got {type(t5).__name__}")
    mode = get_fp8_mode(mode)
    if mode.fast:
        raise ValueError("fp8_t5 stores weights only; fp8_fast matmuls are for the DiT")
    apply_fp8(module, mode, compute_dtype=compute_dtype, is_target=lambda name: "lora" not in name.lower())
    return t5


# ----------------------------------------------------------------------------------------------------------------
# State dicts and pre-quantised files
# ----------------------------------------------------------------------------------------------------------------


def drop_fp8_markers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the `scaled_fp8` marker and static input scales (weight scales are kept)."""
    return {k: v for k, v in sd.items() if k != FP8_MARKER_KEY and not k.endswith(_DROPPED_SUFFIXES)}


def pop_fp8_scales(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a state dict into (tensors, {module path: stored weight scale}); drops the `scaled_fp8` marker and
    static input scales. Accepts `.scale_weight` (ours, musubi, older ComfyUI) and `.weight_scale` (newer)."""
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == FP8_MARKER_KEY or key.endswith(_DROPPED_SUFFIXES):
            continue
        suffix = next((s for s in _STORED_SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            scales[key[: -len(suffix)]] = value
        else:
            tensors[key] = value
    orphans = [m for m in scales if f"{m}.weight" not in tensors]
    if orphans:
        raise ValueError(f"fp8 scale without a weight: {orphans[0]!r}{SCALE_KEY} (and {len(orphans) - 1} more)")
    return tensors, scales


def _to_target(weight: torch.Tensor, scale: torch.Tensor | None,
               mode: FP8Mode) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One target weight -> (fp8 weight, scale) for `mode`; pre-quantised weights keep their stored values."""
    if weight.dtype not in FP8_DTYPES:
        return quantize_weight(weight, mode.scaling, mode.block_size)
    layout, _ = _scale_layout(weight.shape, scale)
    if mode.fast and (layout == "block" or weight.dtype != torch.float8_e4m3fn):
        return quantize_weight(dequantize_weight(weight, scale, torch.float32), mode.scaling, mode.block_size)
    return weight, None if scale is None else scale.float()


def quantize_state_dict(sd: Mapping[str, torch.Tensor], mode: str | FP8Mode,
                        compute_dtype: torch.dtype = torch.bfloat16,
                        is_target: Callable[[str], bool] = is_dit_target) -> dict[str, torch.Tensor]:
    """Official-named DiT state dict -> the state dict of the fp8 model: target `<m>.weight` in fp8 with
    `<m>.scale_weight` (fp32) where the mode scales; everything else floating in `compute_dtype`.

    Pre-quantised inputs (ComfyUI `scaled_fp8`, plain e4m3fn files, our own fp8 files) keep their fp8 weights and
    stored scales; fp8 weights outside the targets are dequantised.
    """
    mode = get_fp8_mode(mode)
    tensors, scales = pop_fp8_scales(sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        scale = scales.get(module) if module else None
        if module and value.dim() == 2 and is_target(module):
            out[key], new_scale = _to_target(value, scale, mode)
            if new_scale is not None:
                out[f"{module}.{SCALE_KEY}"] = new_scale
        elif value.dtype in FP8_DTYPES:
            out[key] = _dequantize_any(value, scale, compute_dtype)
        else:
            out[key] = value.to(compute_dtype) if value.is_floating_point() else value
    return out


def _dequantize_any(value: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if value.dim() == 2:
        return dequantize_weight(value, scale, dtype)
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"cannot dequantise a {value.dim()}-D fp8 tensor with a scale of shape {list(scale.shape)}")
    return (value.float() * (1.0 if scale is None else scale.float())).to(dtype)


def convert_to_fp8_modules(model: nn.Module, sd: Mapping[str, torch.Tensor], mode: str | FP8Mode,
                           compute_dtype: torch.dtype) -> nn.Module:
    """Replace the Linear layers of a (meta) model whose weight in `sd` is fp8 by FP8Linear of matching layout,
    so that `load_state_dict(sd)` fits. Returns the model."""
    mode = get_fp8_mode(mode)
    for name, linear in list(model.named_modules()):
        weight = sd.get(f"{name}.weight")
        if not isinstance(linear, nn.Linear) or weight is None or weight.dtype not in FP8_DTYPES:
            continue
        scale = sd.get(f"{name}.{SCALE_KEY}")
        fast = mode.fast and _fast_capable(linear.in_features, linear.out_features)
        new = FP8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                        compute_dtype=compute_dtype, fp8_dtype=weight.dtype, fast=fast, device="meta",
                        scale_shape=None if scale is None else tuple(scale.shape))
        _replace(model, name, new)
    return model
