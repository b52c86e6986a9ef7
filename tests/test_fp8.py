"""fp8 storage: quantisation maths, FP8Linear, model conversion, pre-quantised files, fp8 matmuls, fp8 T5."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tests.numerics import assert_float32_parity, float64_run
from tests.tiny import TINY_DIT, randomize_
from wan_core import load_dit
from wan_core.models import ops
from wan_core.models.dit import WanModel, build_fp8_dit
from wan_core.models.ops import (
    CastLinear,
    FP8Linear,
    Fp32Linear,
    dequantize_weight,
    fp8_fast_support,
    probe_scaled_mm,
    quantize_rows,
    quantize_rows_bytes,
    quantize_weight,
    scale_layout,
    scaled_mm_linear,
    scaled_mm_workspace_bytes,
)
from wan_core.runtime.fp8 import (
    FP8_MODES,
    apply_fp8,
    fp8_t5,
    get_fp8_mode,
    is_dit_target,
    quantize_state_dict,
)
from wan_core.runtime.offload import LiveTensorBytes

E4M3 = torch.float8_e4m3fn
# head dim 128 so that shapes identify the architecture; in_features 128 / 256 -> 2 / 4 blocks of 64 columns
DIT = dataclasses.replace(TINY_DIT, dim=128, num_heads=1, ffn_dim=256)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(seed: int = 1):
    gen = _gen(seed)
    return torch.randn(1, 16, 2, 8, 8, generator=gen), torch.tensor([600.0]), [torch.randn(5, 32, generator=gen)]


def _model(scale: float = 0.05) -> WanModel:
    return randomize_(WanModel(DIT), seed=5, scale=scale).eval().requires_grad_(False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).float().norm() / b.float().norm()).item()


# -- quantisation maths ---------------------------------------------------------------------------------------


def _rounding_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest in e4m3: half a step, i.e. 2^-4 relative in the normal range, 2^-10·scale below it."""
    return w.abs() * 2.0**-4 + scale * 2.0**-10


def test_block_scales_are_absmax_over_64_columns() -> None:
    w = torch.randn(8, 192, generator=_gen()) * 0.02
    w[3, 64:128] = 0.0  # an all-zero block: scale clamps to 1e-8 and dequantises to exact zeros
    q, scale = quantize_weight(w, "block")
    assert q.dtype == E4M3 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (8, 3, 1)
    for row in range(8):
        for block in range(3):
            cols = w[row, block * 64:(block + 1) * 64]
            assert scale[row, block, 0].item() == pytest.approx(max(cols.abs().max().item() / 448, 1e-8), rel=1e-6)
    deq = dequantize_weight(q, scale, torch.float32)
    assert torch.equal(deq[3, 64:128], torch.zeros(64))
    per_col_scale = scale.expand(8, 3, 64).reshape(8, 192)
    assert bool(((deq - w).abs() <= _rounding_bound(w, per_col_scale)).all())
    assert q.float().abs().max().item() == 448.0  # the block maximum maps onto the top of the fp8 range


def test_block_mode_falls_back_to_per_channel_when_in_features_is_not_a_multiple_of_64() -> None:
    w = torch.randn(6, 100, generator=_gen())
    q, scale = quantize_weight(w, "block")
    assert scale.shape == (6, 1)
    assert torch.allclose(scale, w.abs().amax(dim=1, keepdim=True) / 448)
    assert scale_layout(q.shape, scale) == ("channel", 0)


def test_per_tensor_and_plain_modes() -> None:
    w = torch.randn(16, 64, generator=_gen()) * 3
    q, scale = quantize_weight(w, "tensor")
    assert scale.numel() == 1 and scale.item() == pytest.approx(w.abs().max().item() / 448, rel=1e-6)
    assert bool(((dequantize_weight(q, scale, torch.float32) - w).abs() <= _rounding_bound(w, scale)).all())
    plain, none = quantize_weight(torch.tensor([[1000.0, -0.5]]), "none")
    assert none is None and plain.float().tolist() == [[448.0, -0.5]]  # clamped, never NaN


def test_scale_layout_rejects_shapes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"does not fit a weight of shape \[4, 64\]"):
        scale_layout((4, 64), torch.ones(3, 1))
    with pytest.raises(ValueError, match="unknown fp8 scaling"):
        quantize_weight(torch.ones(2, 2), "rowwise")
    with pytest.raises(ValueError, match="unknown fp8 mode 'fp4'"):
        get_fp8_mode("fp4")


def test_plain_fp8_underflows_where_scaled_does_not() -> None:
    w = torch.randn(64, 256, generator=_gen()) * 0.004  # typical small weights: mostly e4m3 subnormals unscaled
    plain = dequantize_weight(*quantize_weight(w, "none"), torch.float32)
    scaled = dequantize_weight(*quantize_weight(w, "block"), torch.float32)
    assert _rel(scaled, w) < 0.04 < _rel(plain, w)


# -- FP8Linear ------------------------------------------------------------------------------------------------


def test_fp8_linear_is_a_linear_on_the_dequantised_weight() -> None:
    base = nn.Linear(128, 48)
    x = torch.randn(2, 7, 128, generator=_gen(2))
    for scaling in ("none", "tensor", "channel", "block"):
        layer = FP8Linear.from_linear(base, scaling, compute_dtype=torch.float32)
        q, scale = quantize_weight(base.weight, scaling)
        w = q.float() if scale is None else (q.float().view(48, -1, 64) * scale if scaling == "block" else
                                            q.float() * scale)
        expected = F.linear(x, w.reshape(48, 128), base.bias)
        assert torch.equal(layer(x), expected), scaling
        assert layer.weight.dtype == E4M3 and not layer.weight.requires_grad


def test_fp8_linear_computes_in_its_compute_dtype_and_passes_gradients_to_the_input() -> None:
    layer = FP8Linear.from_linear(nn.Linear(64, 32), "block", compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    expected = layer.dequantized_weight().float().sum(0)  # d(sum xWᵀ)/dx, rounded to bf16 by the backward matmul
    assert torch.allclose(x.grad, expected.expand(3, 64), rtol=2.0**-8, atol=0)


class _LowRankWrapper(nn.Module):
    """What an unmerged LoRA does to the layer it wraps: calls it and adds a trainable low-rank branch."""

    def __init__(self, base: nn.Module, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=_gen(3)) * 0.1)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, generator=_gen(4)) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down), self.up)


def test_unmerged_low_rank_branch_trains_on_an_fp8_base() -> None:
    linear = nn.Linear(64, 64)
    wrapped = _LowRankWrapper(FP8Linear.from_linear(linear, "block", compute_dtype=torch.float32))
    x = torch.randn(5, 64, generator=_gen(5))
    wrapped(x).pow(2).sum().backward()
    base_w = wrapped.base.dequantized_weight()
    # reference gradient of sum((xWᵀ + b + xDᵀUᵀ)²) w.r.t. U: 2·outᵀ·(xDᵀ)
    out = F.linear(x, base_w, linear.bias) + x @ wrapped.down.T @ wrapped.up.T
    assert torch.allclose(wrapped.up.grad, 2 * out.T @ (x @ wrapped.down.T), rtol=1e-5, atol=1e-5)
    assert wrapped.base.weight.grad is None


# -- model conversion -----------------------------------------------------------------------------------------


def test_targets_are_exactly_the_block_linears() -> None:
    model = WanModel(dataclasses.replace(DIT, model_type="i2v", in_dim=36))
    apply_fp8(model, "fp8_scaled")
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    per_block = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"}
    assert fp8_names == {f"blocks.{i}.{n}" for i in range(DIT.num_layers) for n in per_block}
    kept = {n for n, m in model.named_modules() if isinstance(m, (CastLinear, Fp32Linear))}
    assert kept == {"text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                    "time_projection.1", "head.head", "img_emb.proj.1", "img_emb.proj.3"}
    assert model.blocks[0].modulation.dtype == torch.float32
    assert not is_dit_target("blocks.0.self_attn.q.lora_down") and is_dit_target("blocks.3.ffn.2")


@pytest.mark.parametrize("mode", ["fp8", "fp8_scaled", "fp8_scaled_tensor", "fp8_scaled_channel"])
def test_quantised_model_stays_close_to_the_original(mode: str) -> None:
    ref = _model()
    model = apply_fp8(copy.deepcopy(ref), mode)
    with torch.no_grad():
        err = _rel(model(*_inputs()), ref(*_inputs()))
    assert 0 < err < 0.01
    assert model.dtype == torch.float32  # compute dtype, not the storage dtype


def test_scaled_beats_plain_on_small_weights() -> None:
    ref = _model(scale=0.01)
    with torch.no_grad():
        expected = ref(*_inputs())
        errors = {m: _rel(apply_fp8(copy.deepcopy(ref), m)(*_inputs()), expected) for m in ("fp8", "fp8_scaled")}
    assert errors["fp8_scaled"] < 0.5 * errors["fp8"], errors


def test_weight_bytes_shrink_as_computed_from_the_shapes() -> None:
    ref = _model().to(torch.bfloat16)
    model = apply_fp8(copy.deepcopy(ref), "fp8_scaled")
    linears = [m for m in ref.blocks.modules() if isinstance(m, CastLinear)]
    weight_elems = sum(m.weight.numel() for m in linears)
    scale_elems = sum(m.out_features * (m.in_features // 64) for m in linears)
    nbytes = lambda mod: sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])  # noqa: E731
    assert nbytes(model) == nbytes(ref) - 2 * weight_elems + weight_elems + 4 * scale_elems


def test_apply_fp8_refuses_a_model_without_targets() -> None:
    model = apply_fp8(_model(), "fp8")
    with pytest.raises(ValueError, match="no Linear layer to quantise"):
        apply_fp8(model, "fp8_scaled")


# -- fp8 matmuls ----------------------------------------------------------------------------------------------


def test_fp8_fast_refuses_the_cpu() -> None:
    with pytest.raises(RuntimeError, match=r"compute capability >= 8.9.*'cpu'"):
        apply_fp8(_model(), "fp8_fast", device="cpu")
    model = apply_fp8(_model(), "fp8_fast")
    assert model.blocks[0].ffn[0].fast and model.blocks[0].ffn[0].scaling == "channel"
    with pytest.raises(RuntimeError, match="compute capability"), torch.no_grad():
        model(*_inputs())


@pytest.mark.parametrize("scaling", ["none", "tensor", "channel"])
def test_scaled_mm_linear_matches_per_token_quantised_reference(scaling: str) -> None:
    """The fp8 matmul path (the kernel also exists on the CPU) against a float64 reference of the same maths."""
    gen = _gen(7)
    w = torch.randn(48, 64, generator=gen) * 0.05
    x, bias = torch.randn(2, 5, 64, generator=gen), torch.randn(48, generator=gen)
    q, scale = quantize_weight(w, scaling)
    out = scaled_mm_linear(x, q, scale, bias, torch.float32)
    rows = x.reshape(-1, 64).double()
    x_scale = (rows.abs().amax(1, keepdim=True) / 448).clamp_min(1e-8)
    x_deq = (rows / x_scale).to(E4M3).double() * x_scale
    w_deq = q.double() * (1.0 if scale is None else scale.double().reshape(-1, 1) if scale.numel() > 1 else scale)
    expected = (x_deq @ w_deq.T + bias.double()).reshape(2, 5, 48)
    assert (out.double() - expected).abs().max() <= 2.0**-8 * expected.abs().max()  # bf16 output rounding
    with pytest.raises(ValueError, match="block-wise"):
        scaled_mm_linear(x, *quantize_weight(w, "block"), bias, torch.float32)


def _per_row_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax/448 quantisation of the whole input in fp32 at once (what the fp8 matmul path computed)."""
    rows = x.float()
    scale = (rows.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1e-8)
    return (rows / scale).clamp(-448, 448).to(E4M3), scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_rows_in_slices_equals_the_whole_input_at_once(dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(ops, "QUANT_SLICE_ELEMENTS", 7 * 96)  # 7-row slices of 45 rows: the last one is short
    x = (torch.randn(45, 96, generator=_gen(8)) * 3).to(dtype)
    x[4] = 0.0  # an all-zero row: scale clamps to 1e-8
    original = x.clone()
    q, scale = quantize_rows(x)
    want_q, want_scale = _per_row_reference(x)
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (45, 1)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)
    assert torch.equal(x, original)  # the input is never written to (fp32 inputs are copied per slice too)


@pytest.mark.parametrize("rows,features,slice_elements", [(300, 256, 4096), (300, 256, 1 << 24), (257, 48, 1000),
                                                          (10, 64, 64)])
def test_quantize_rows_peak_bytes_match_the_estimate(rows: int, features: int, slice_elements: int,
                                                     monkeypatch) -> None:
    """Measured by dispatch on the CPU: the fp8 result and its scales plus one slice's fp32 temporaries."""
    monkeypatch.setattr(ops, "QUANT_SLICE_ELEMENTS", slice_elements)
    x = torch.randn(rows, features, generator=_gen(9)).to(torch.bfloat16)
    with LiveTensorBytes() as meter:
        quantize_rows(x)
    estimate = quantize_rows_bytes(rows, features)
    assert meter.peak <= estimate <= 1.02 * meter.peak, (meter.peak, estimate)


@pytest.mark.parametrize("rows,features,out,out_dtype,scaling", [
    (300, 256, 64, torch.bfloat16, "channel"), (300, 64, 512, torch.float32, "channel"),
    (100, 128, 128, torch.float32, "tensor"), (257, 128, 48, torch.bfloat16, "none")])
def test_scaled_mm_linear_allocates_its_workspace_and_output_only(rows: int, features: int, out: int,
                                                                   out_dtype: torch.dtype, scaling: str,
                                                                   monkeypatch) -> None:
    """The quantised activations are bounded by the slice size (the old whole-input fp32 path made ~6x the bf16
    input in temporaries); the bias is added in place. workspace <= measured peak <= workspace + output."""
    monkeypatch.setattr(ops, "QUANT_SLICE_ELEMENTS", 4096)
    gen = _gen(10)
    x = torch.randn(rows, features, generator=gen).to(torch.bfloat16)
    weight, scale = quantize_weight(torch.randn(out, features, generator=gen), scaling)
    bias = torch.randn(out, generator=gen).to(out_dtype)
    with LiveTensorBytes() as meter:
        y = scaled_mm_linear(x, weight, scale, bias, out_dtype)
    workspace = scaled_mm_workspace_bytes(rows, features, out, out_dtype)
    assert workspace <= meter.peak <= workspace + y.numel() * y.element_size(), (meter.peak, workspace)


def test_scaled_mm_linear_in_slices_equals_the_whole_input_at_once(monkeypatch) -> None:
    gen = _gen(11)
    x, bias = torch.randn(3, 40, 64, generator=gen).to(torch.bfloat16), torch.randn(48, generator=gen)
    weight, scale = quantize_weight(torch.randn(48, 64, generator=gen) * 0.05, "channel")
    monkeypatch.setattr(ops, "QUANT_SLICE_ELEMENTS", 1 << 24)
    whole = scaled_mm_linear(x, weight, scale, bias.to(torch.bfloat16), torch.bfloat16)
    monkeypatch.setattr(ops, "QUANT_SLICE_ELEMENTS", 11 * 64)
    assert torch.equal(scaled_mm_linear(x, weight, scale, bias.to(torch.bfloat16), torch.bfloat16), whole)


def test_fp8_fast_support_by_capability_and_torch_version() -> None:
    assert "no fp8 tensor cores" in fp8_fast_support((8, 6), "2.7.0")
    for old in ("2.4.1+cu124", "2.5.1", "2.6.0+cu126"):
        assert "compute capability 8.9 needs torch >= 2.7" in fp8_fast_support((8, 9), old)
    assert fp8_fast_support((8, 9), "2.7.0+cu128") is None
    assert fp8_fast_support((9, 0), "2.4.0") is None  # the Hopper kernel came first
    assert fp8_fast_support((12, 0), "2.8.0") is None  # unknown limits: the probe decides


def test_probe_scaled_mm_reports_a_failing_kernel(monkeypatch) -> None:
    assert probe_scaled_mm(torch.device("cpu")) is None  # this torch has a CPU kernel

    def missing_kernel(*args, **kwargs):
        raise RuntimeError("f8f8bf16_rowwise is only supported on SM90")

    monkeypatch.setattr(torch, "_scaled_mm", missing_kernel)
    assert "failed (RuntimeError: f8f8bf16_rowwise is only supported on SM90)" in probe_scaled_mm(torch.device("cpu"))


@pytest.fixture
def ada_with_torch_2_6(monkeypatch):
    """Pretend the CPU is an fp8-capable GPU (8.9) under torch 2.6, whose row-wise fp8 matmul is Hopper-only."""
    monkeypatch.setattr(ops, "_check_scaled_mm_device", lambda device_type, index: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    ops._fast_matmul_fallback.cache_clear()
    yield
    ops._fast_matmul_fallback.cache_clear()


def test_fp8_fast_falls_back_to_upcast_weights_with_one_warning(ada_with_torch_2_6, caplog) -> None:
    fast = FP8Linear.from_linear(nn.Linear(64, 48), "channel", compute_dtype=torch.float32, fast=True)
    upcast = FP8Linear.from_quantized(fast.weight, fast.scale_weight, fast.bias, compute_dtype=torch.float32)
    x = torch.randn(2, 7, 64, generator=_gen(12))
    with caplog.at_level(logging.WARNING, logger="wan_core.models.ops"), torch.no_grad():
        assert torch.equal(fast(x), upcast(x)) and torch.equal(fast(x), upcast(x))
        ops.mark_compile_constants()  # what wan_core.runtime.compile.compile_blocks does before compiling
        compiled = torch.compile(fast, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), upcast(x))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "compute capability 8.9 needs torch >= 2.7" in warnings[0], warnings


def test_apply_fp8_fast_on_a_device_without_the_kernel_quantises_as_fp8_scaled(ada_with_torch_2_6) -> None:
    model = apply_fp8(_model(), "fp8_fast", device="cpu")
    layer = model.blocks[0].ffn[0]
    assert layer.scaling == "block" and not layer.fast


# -- files ----------------------------------------------------------------------------------------------------


def _save(tmp_path, name: str, sd: dict) -> str:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _comfy_scaled_file(tmp_path, ref: WanModel) -> tuple[str, dict]:
    sd = {}
    for key, value in ref.state_dict().items():
        if key.endswith(".weight") and value.dim() == 2 and key.startswith("blocks."):
            scale = value.abs().max() / 448
            sd[key] = (value / scale).to(E4M3)
            sd[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            sd[key[: -len("weight")] + "scale_input"] = torch.ones(())
        else:
            sd[key] = value
    sd["scaled_fp8"] = torch.zeros(0, dtype=E4M3)
    return _save(tmp_path, "scaled.safetensors", {"model.diffusion_model." + k: v for k, v in sd.items()}), sd


def test_comfyui_scaled_fp8_file_runs_with_its_stored_weights_and_scales(tmp_path) -> None:
    ref = _model()
    path, sd = _comfy_scaled_file(tmp_path, ref)
    model = load_dit(path, dtype=torch.float32, fp8="fp8_scaled")
    layer = model.blocks[1].self_attn.q
    assert isinstance(layer, FP8Linear) and layer.scaling == "tensor"
    assert torch.equal(layer.weight.view(torch.uint8), sd["blocks.1.self_attn.q.weight"].view(torch.uint8))
    assert torch.equal(layer.scale_weight, sd["blocks.1.self_attn.q.scale_weight"])
    dequantised = load_dit(path, dtype=torch.float32)
    with torch.no_grad():
        got, want = model(*_inputs()), dequantised(*_inputs())
    assert_float32_parity(got, want, float64_run(dequantised, *_inputs()))


def test_plain_fp8_file_keeps_its_bytes_and_dequantises_the_rest(tmp_path) -> None:
    ref = _model()
    sd = {k: v.to(E4M3) for k, v in ref.state_dict().items()}
    model = load_dit(_save(tmp_path, "fp8.safetensors", sd), fp8="fp8")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.blocks[0].ffn[0].weight.view(torch.uint8), sd["blocks.0.ffn.0.weight"].view(torch.uint8))
    assert model.blocks[0].ffn[0].scale_weight is None
    assert model.head.head.weight.dtype == torch.bfloat16
    assert torch.equal(model.head.head.weight, sd["head.head.weight"].to(torch.bfloat16))


def test_loader_quantisation_equals_apply_fp8_after_loading(tmp_path) -> None:
    ref = _model()
    path = _save(tmp_path, "bf16.safetensors", {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    direct = load_dit(path, fp8="fp8_scaled")
    later = apply_fp8(load_dit(path), "fp8_scaled")
    for (name, a), (_, b) in zip(direct.state_dict().items(), later.state_dict().items()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    with torch.no_grad():
        assert torch.equal(direct(*_inputs()), later(*_inputs()))


def test_block_scaled_state_dict_is_requantised_for_fp8_fast() -> None:
    ref = _model()
    block = quantize_state_dict(ref.state_dict(), "fp8_scaled", torch.float32)
    assert block["blocks.0.ffn.2.scale_weight"].shape == (128, 4, 1)
    fast = quantize_state_dict(block, "fp8_fast", torch.float32)
    assert fast["blocks.0.ffn.2.scale_weight"].shape == (128, 1)
    model = build_fp8_dit(DIT, fast, "fp8_fast", torch.float32)
    assert model.blocks[0].ffn[2].fast


def test_every_mode_has_a_distinct_layout() -> None:
    layouts = {name: (m.scaling, m.fast) for name, m in FP8_MODES.items()}
    assert len(set(layouts.values())) == len(layouts)


# -- T5 -------------------------------------------------------------------------------------------------------


class _T5Like(nn.Module):
    """The layer types of the umT5 encoder: an embedding, RMS-style norm weights, bias-free CastLinears."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(50, 64)
        self.norm = nn.LayerNorm(64)
        self.q, self.o = CastLinear(64, 64, bias=False), CastLinear(64, 64, bias=False)
        self.pos = nn.Embedding(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.token_embedding(ids))
        return self.o(self.q(x))


def test_fp8_t5_quantises_linears_and_keeps_embeddings_and_norms() -> None:
    t5 = randomize_(_T5Like(), seed=2).to(torch.bfloat16)
    ref = copy.deepcopy(t5)
    holder = type("Holder", (), {})()
    holder.model = t5
    assert fp8_t5(holder) is holder
    assert isinstance(t5.q, FP8Linear) and isinstance(t5.o, FP8Linear) and t5.q.compute_dtype == torch.bfloat16
    assert torch.equal(t5.token_embedding.weight, ref.token_embedding.weight)
    assert t5.norm.weight.dtype == torch.bfloat16 and t5.pos.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 50, (2, 9), generator=_gen())
    with torch.no_grad():
        assert _rel(t5(ids), ref(ids)) < 0.05
    with pytest.raises(ValueError, match="fp8_t5 expects"):
        fp8_t5(object())
