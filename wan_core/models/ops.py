"""Layer operations shared by the models: Linear layers that handle their own compute dtype.

The model code never mentions storage formats: a `CastLinear` casts its input to the dtype it computes in, so
replacing it (or its weight) with an fp8 or LoRA-wrapped variant needs no change inside any `forward`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class CastLinear(nn.Linear):
    """nn.Linear that computes in its weight's dtype whatever the input dtype (output in that dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        return F.linear(x.to(weight.dtype), weight, self.bias)


class Fp32Linear(nn.Linear):
    """nn.Linear that always computes in float32 (the official time embedding and head run under fp32 autocast).

    Autocast is switched off inside, for the input's device type, so that an enclosing bf16/fp16 autocast region
    (training, `accelerator.autocast()`) does not cast the matmul down.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with without_autocast(x.device):
            return F.linear(x.float(), self.weight.float(), bias)


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where autocast is off for `device`'s type (a no-op context when it is off already)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type without autocast (meta)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False) if enabled else contextlib.nullcontext()


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as "2.4.1+cu121" or "2.7.0a0+git1234"."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None:
        raise ValueError(f"not a torch version: {version!r}; expected 'major.minor...' such as '2.4.1'")
    return int(match.group(1)), int(match.group(2))


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: an explicit `compute_dtype` attribute (fp8 wrappers) or its weight dtype."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    weight: torch.Tensor = module.weight  # type: ignore[assignment]  # every layer passed here has a weight
    return weight.dtype


# ----------------------------------------------------------------------------------------------------------------
# fp8 weight storage
# ----------------------------------------------------------------------------------------------------------------

FP8_E4M3 = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = torch.finfo(FP8_E4M3).max  # 448
SCALE_MIN = 1e-8  # scales are clamped from below so all-zero rows/blocks stay finite
SCALINGS = ("none", "tensor", "channel", "block")
_FAST_CAPABILITY = (8, 9)  # torch._scaled_mm needs Ada (sm89) or Hopper+


def scale_layout(weight_shape: tuple[int, ...] | torch.Size, scale: torch.Tensor | None) -> tuple[str, int]:
    """How a scale tensor maps onto a 2-D weight [out, in]: ("none"|"tensor"|"channel"|"block", block size).

    tensor: 1 element; channel: [out] or [out, 1]; block: [out, in/block, 1] (block = in / scale.shape[1]).
    """
    if scale is None:
        return "none", 0
    out_features, in_features = weight_shape
    shape = tuple(scale.shape)
    if scale.numel() == 1:
        return "tensor", 0
    if shape in ((out_features,), (out_features, 1)):
        return "channel", 0
    if len(shape) == 3 and shape[0] == out_features and shape[2] == 1 and in_features % shape[1] == 0:
        return "block", in_features // shape[1]
    raise ValueError(f"a scale of shape {list(shape)} does not fit a weight of shape {[out_features, in_features]}: "
                     f"expected [] / [1] (per tensor), [{out_features}, 1] (per channel) or "
                     f"[{out_features}, in/block, 1] (block-wise)")


def quantize_weight(weight: torch.Tensor, scaling: str = "block", block_size: int = 64,
                    fp8_dtype: torch.dtype = FP8_E4M3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight [out, in] -> (fp8 weight [out, in], fp32 scale or None) with weight ≈ fp8 · scale.

    scale = absmax / 448 (clamped to >= 1e-8), computed in fp32 over the whole tensor ([]), each output row
    ([out, 1]) or each run of `block_size` input columns ([out, in/block_size, 1]). Block-wise falls back to per
    channel when in_features is not a multiple of `block_size`. "none" is a plain (clamped) cast.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown fp8 scaling {scaling!r}; expected one of {', '.join(SCALINGS)}")
    if weight.dim() != 2:
        raise ValueError(f"fp8 quantisation expects a 2-D Linear weight, got shape {list(weight.shape)}")
    fmax = torch.finfo(fp8_dtype).max
    w = weight.detach().float()
    if scaling == "none":
        return w.clamp(-fmax, fmax).to(fp8_dtype), None
    out_features, in_features = w.shape
    if scaling == "block" and in_features % block_size:
        scaling = "channel"
    if scaling == "tensor":
        amax = w.abs().amax()
    elif scaling == "channel":
        amax = w.abs().amax(dim=1, keepdim=True)  # [out, 1]
    else:
        w = w.view(out_features, in_features // block_size, block_size)
        amax = w.abs().amax(dim=2, keepdim=True)  # [out, in/bs, 1]
    scale = (amax / fmax).clamp_min(SCALE_MIN)
    quantized = (w / scale).clamp(-fmax, fmax).to(fp8_dtype)
    return quantized.reshape(out_features, in_features), scale


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight [out, in] (and its scale, any layout of `scale_layout`) -> weight in `dtype`.

    The product is formed in fp32 and rounded once to `dtype`; without a scale the cast is exact for bf16/fp16.
    """
    if scale is None:
        return weight.to(dtype)
    layout, block = scale_layout(weight.shape, scale)
    w = weight.float()
    s = scale.float()
    if layout == "block":
        out_features, in_features = w.shape
        return (w.view(out_features, in_features // block, block) * s).view(out_features, in_features).to(dtype)
    return (w * (s.reshape(-1, 1) if layout == "channel" else s.reshape(()))).to(dtype)


ROWWISE_SM89_FROM = (2, 7)  # first torch release with a row-wise torch._scaled_mm kernel for compute capability 8.9


def fp8_fast_support(capability: tuple[int, int], torch_version: str) -> str | None:
    """Why row-wise scaled fp8 matmuls (`torch._scaled_mm`) cannot run on a CUDA GPU of `capability` with this
    torch, or None when nothing known stands in the way (`probe_scaled_mm` then tries one).

    Compute capability < 8.9 has no fp8 tensor cores. Row-wise scaling was first a Hopper-only (sm90) kernel;
    compute capability 8.9 (Ada: RTX 40xx, L4, L40) got one in torch 2.7.
    """
    major, minor = capability[:2]
    if (major, minor) < _FAST_CAPABILITY:
        return (f"compute capability {major}.{minor} has no fp8 tensor cores (fp8 matmuls need >= 8.9: Ada, "
                f"Hopper or newer)")
    if (major, minor) == (8, 9) and torch_release(torch_version) < ROWWISE_SM89_FROM:
        return (f"torch {torch_version} has row-wise scaled fp8 matmuls (torch._scaled_mm) for Hopper (9.0) only; "
                f"compute capability 8.9 needs torch >= {ROWWISE_SM89_FROM[0]}.{ROWWISE_SM89_FROM[1]}")
    return None


def probe_scaled_mm(device: torch.device) -> str | None:
    """One 16 x 16 row-wise scaled fp8 matmul on `device`: None when it runs and is right, else what went wrong."""
    ones = torch.ones(16, 16, device=device)
    try:
        out = torch._scaled_mm(ones.to(FP8_E4M3), ones.to(FP8_E4M3).t(), scale_a=ones[:, :1].contiguous(),
                               scale_b=ones[:1].contiguous(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"a 16x16 test of torch._scaled_mm with row-wise scales failed ({type(exc).__name__}: {exc})"
    if not bool((out == 16).all()):
        return "a 16x16 test of torch._scaled_mm with row-wise scales gave a wrong result"
    return None


def check_scaled_mm_device(device: torch.device) -> None:
    """Raise unless `device` is a CUDA GPU of compute capability >= 8.9 (what fp8 matmuls need)."""
    _check_scaled_mm_device(device.type, device.index)


@functools.cache
def _check_scaled_mm_device(device_type: str, index: int | None) -> None:
    device = _device(device_type, index)
    if device.type != "cuda":
        raise RuntimeError(f"fp8_fast (fp8 matmuls with torch._scaled_mm) needs a CUDA GPU with compute capability "
                           f">= 8.9 (Ada, Hopper or newer), but the model runs on {device.type!r}; use fp8_scaled")
    capability = torch.cuda.get_device_capability(device)
    if capability < _FAST_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"fp8_fast needs compute capability >= 8.9 (Ada, Hopper or newer), but {name} has "
                           f"{capability[0]}.{capability[1]}; use fp8_scaled")


def fast_matmul_fallback(device: torch.device | str) -> str | None:
    """None when fp8_fast can run fp8 matmuls on `device`; else the reason, logged once as a warning, and the fp8
    weights are upcast per call instead (the fp8_scaled way). Raises for devices without fp8 tensor cores.

    Decided once per device: the known torch-version limits (`fp8_fast_support`), then one tiny test call."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _fast_matmul_fallback(device.type, device.index)


@functools.cache
def _fast_matmul_fallback(device_type: str, index: int | None) -> str | None:
    _check_scaled_mm_device(device_type, index)
    device = _device(device_type, index)
    reason = fp8_fast_support(torch.cuda.get_device_capability(device), torch.__version__)
    if reason is None:
        reason = probe_scaled_mm(device)
    if reason is not None:
        logger.warning("fp8_fast on %s: %s. Falling back to upcasting the fp8 weights per call (as fp8_scaled: same "
                       "memory, no fp8 matmul speed-up)", device, reason)
    return reason


def _use_fast_matmul(device_type: str, index: int | None) -> bool:
    return fast_matmul_fallback(_device(device_type, index)) is None


_COMPILE_CONSTANTS_MARKED = False


def mark_compile_constants() -> None:
    """Let torch.compile treat the per-device fp8_fast decision as a constant (no graph break in FP8Linear).

    Called by `wan_core.runtime.compile` before compiling: the decorator imports Dynamo, which costs about two
    seconds, so it is not applied when this module is imported."""
    global _use_fast_matmul, _COMPILE_CONSTANTS_MARKED
    if not _COMPILE_CONSTANTS_MARKED:
        _use_fast_matmul = torch.compiler.assume_constant_result(_use_fast_matmul)
        _COMPILE_CONSTANTS_MARKED = True


def _device(device_type: str, index: int | None) -> torch.device:
    return torch.device(device_type) if index is None else torch.device(device_type, index)


QUANT_SLICE_ELEMENTS = 1 << 24  # activations are quantised in row slices of ~16M elements (~128 MB per fp32 copy)


def quant_slice_rows(rows: int, in_features: int) -> int:
    """Rows per slice of `quantize_rows` (at least one)."""
    return min(rows, max(1, QUANT_SLICE_ELEMENTS // max(1, in_features)))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) fp8 quantisation of activations [M, K] -> (float8_e4m3fn [M, K], fp32 scales [M, 1]).

    scale = absmax / 448 of the row in fp32 (clamped to >= 1e-8), values = (x / scale) clamped and rounded to e4m3.
    The fp32 work runs one slice of `quant_slice_rows` rows at a time, in place, so the temporaries stay at
    8 bytes per slice element whatever M is (`quantize_rows_bytes`); under torch.compile the whole expression is
    left to the compiler, which fuses it. Same values either way.
    """
    if torch.compiler.is_compiling():
        return _quantize_rows_at_once(x)
    m, k = x.shape
    quantized = torch.empty((m, k), dtype=FP8_E4M3, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    step = quant_slice_rows(m, k)
    for start in range(0, m, step):
        rows = slice(start, start + step)
        part = x[rows].to(torch.float32, copy=True)
        scale = scales[rows]
        scale.copy_(part.abs().amax(dim=1, keepdim=True)).div_(FP8_MAX).clamp_min_(SCALE_MIN)
        quantized[rows].copy_(part.div_(scale).clamp_(-FP8_MAX, FP8_MAX))
    return quantized, scales


def _quantize_rows_at_once(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.float()
    scale = (rows.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(SCALE_MIN)
    return (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_E4M3), scale


def quantize_rows_bytes(rows: int, in_features: int) -> int:
    """Peak bytes `quantize_rows` allocates for [rows, in_features]: the fp8 result and its fp32 scales, plus, for
    one slice of r rows, the fp32 copy, its absolute values and their row maxima (8·r·K + 4·r)."""
    r = quant_slice_rows(rows, in_features)
    return rows * in_features + 4 * rows + 8 * r * in_features + 4 * r


def scaled_mm_workspace_bytes(rows: int, in_features: int, out_features: int, out_dtype: torch.dtype) -> int:
    """Peak bytes `scaled_mm_linear` allocates besides its output: the larger of `quantize_rows_bytes` and, with
    the fp32 weight-scale row (4·out), the quantised input during the matmul or the bf16 product while it is
    converted to `out_dtype` (when that is not bf16)."""
    product = 2 * rows * out_features if out_dtype != torch.bfloat16 else 0
    during = max(rows * in_features + 4 * rows, product) + 4 * out_features
    return max(quantize_rows_bytes(rows, in_features), during)


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """y = x · (weight·scale)ᵀ + bias with an fp8 matmul (`torch._scaled_mm`, row-wise scales).

    x [..., in] is quantised per row (`quantize_rows`: per token, absmax/448); the weight [out, in] must be
    float8_e4m3fn with no scale, a per-tensor or a per-channel scale (both expressed as a [1, out] row-wise scale).
    Block-wise scales are not accepted by `_scaled_mm`. The output is computed in bf16 and returned in `out_dtype`;
    the bias is added in place (no second output-sized tensor).
    """
    layout, _ = scale_layout(weight.shape, scale)
    if layout == "block":
        raise ValueError("fp8 matmuls need per-tensor or per-channel weight scales, got block-wise scales; "
                         "quantise with scaling='channel' (the fp8_fast mode does)")
    if weight.dtype != FP8_E4M3:
        raise ValueError(f"fp8 matmuls need float8_e4m3fn weights, got {weight.dtype}")
    out_features, in_features = weight.shape
    if in_features % 16 or out_features % 16:
        raise ValueError(f"fp8 matmuls need in and out features divisible by 16, got {in_features} -> {out_features}")
    lead = x.shape[:-1]
    x_q, x_scale = quantize_rows(x.reshape(-1, in_features))
    if scale is None:
        w_scale = torch.ones(1, out_features, dtype=torch.float32, device=weight.device)
    else:
        w_scale = scale.float().reshape(1, -1).expand(1, out_features).contiguous()  # [1, out]
    out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
    del x_q, x_scale
    out = out.to(out_dtype)
    if bias is not None:
        out.add_(bias.to(out_dtype))
    return out.reshape(*lead, out_features)


class FP8Linear(nn.Module):
    """A drop-in for `CastLinear` whose weight is stored in fp8 (optionally with a scale) and upcast per call.

    `weight` is a frozen fp8 Parameter [out, in]; `scale_weight` a buffer of any `scale_layout` (or None);
    the bias stays in `compute_dtype`. With `fast=True` the matmul itself runs in fp8 (`scaled_mm_linear`) when
    no gradient is needed w.r.t. the input and the device runs fp8 matmuls (`fast_matmul_fallback`); otherwise
    (and for backward) the weight is dequantised.
    """

    bias: nn.Parameter | None
    scale_weight: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.bfloat16, fp8_dtype: torch.dtype = FP8_E4M3,
                 scale_shape: tuple[int, ...] | None = None, fast: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if fp8_dtype not in FP8_DTYPES:
            raise ValueError(f"fp8_dtype must be one of {FP8_DTYPES}, got {fp8_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.fast = compute_dtype, fast
        weight = torch.empty(out_features, in_features, dtype=fp8_dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None
        scale = None if scale_shape is None else torch.ones(scale_shape, dtype=torch.float32, device=device)
        self.register_buffer("scale_weight", scale)
        if scale is not None:
            scale_layout(self.weight.shape, scale)  # validate
        if fast and scale_layout(self.weight.shape, scale)[0] == "block":
            raise ValueError("fp8_fast needs per-tensor or per-channel weight scales, not block-wise")

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaling: str = "block", *, block_size: int = 64,
                    compute_dtype: torch.dtype | None = None, fast: bool = False) -> FP8Linear:
        """Quantise an existing Linear (its weight dtype is the default compute dtype)."""
        dtype = compute_dtype or (linear.weight.dtype if linear.weight.dtype not in FP8_DTYPES else torch.bfloat16)
        q, scale = quantize_weight(linear.weight, scaling, block_size)
        return cls.from_quantized(q, scale, linear.bias, compute_dtype=dtype, fast=fast)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, *,
                       compute_dtype: torch.dtype, fast: bool = False) -> FP8Linear:
        """Wrap an already-quantised fp8 weight (e.g. from a ComfyUI scaled_fp8 file) and its scale."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, compute_dtype=compute_dtype,
                     fp8_dtype=weight.dtype, scale_shape=None if scale is None else tuple(scale.shape), fast=fast,
                     device="meta")
        module.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        module.scale_weight = None if scale is None else scale.detach().float()
        return module

    @property
    def scaling(self) -> str:
        return scale_layout(self.weight.shape, self.scale_weight)[0]

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight, self.scale_weight, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias: torch.Tensor | None = self.bias
        input_grad = torch.is_grad_enabled() and x.requires_grad
        if self.fast and not input_grad and _use_fast_matmul(x.device.type, x.device.index):
            return scaled_mm_linear(x, self.weight, self.scale_weight, bias, self.compute_dtype)
        bias = None if bias is None else bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.dequantized_weight(), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8={self.weight.dtype}, scaling={self.scaling}, compute_dtype={self.compute_dtype}, "
                f"fast={self.fast}")
