"""The `--blocks_to_swap auto` estimate of an fp8_fast model counts the activation quantisation of its fp8 matmuls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.tiny import TINY_DIT, randomize_
from wan_core.models import ops
from wan_core.models.config import TASKS
from wan_core.models.dit import WanModel
from wan_core.runtime.fp8 import apply_fp8
from wan_core.runtime.offload import (
    LiveTensorBytes,
    dequant_workspace_bytes,
    estimate_activation_bytes,
    estimate_peak_bytes,
    fp8_fast_workspace_bytes,
    video_tokens,
)


@pytest.fixture
def fp8_matmuls_on_cpu(monkeypatch):
    """This torch runs torch._scaled_mm on the CPU: let fp8_fast use it there."""
    monkeypatch.setattr(ops, "_fast_matmul_fallback", lambda device_type, index: None)


@pytest.mark.parametrize("ffn,frames,size", [(1024, 5, 128), (512, 9, 160), (256, 9, 128)])
def test_fp8_fast_forward_peak_is_within_the_estimate(fp8_matmuls_on_cpu, monkeypatch, ffn: int, frames: int,
                                                      size: int) -> None:
    """bf16 fp8_fast forward on the CPU, live bytes measured by dispatch: activations + workspace bound it.

    The slices are made small against the activations, as they are at real sizes (16M elements against the 1G of
    the 14B FFN input at 720p); quantising whole inputs in fp32 exceeded the estimate by up to 1.3x here."""
    monkeypatch.setattr(ops, "QUANT_SLICE_ELEMENTS", 2048)
    cfg = dataclasses.replace(TINY_DIT, dim=128, ffn_dim=ffn, num_heads=2, num_layers=2)
    model = apply_fp8(randomize_(WanModel(cfg), 0).to(torch.bfloat16).eval().requires_grad_(False), "fp8_fast")
    assert all(m.fast for m in model.modules() if isinstance(m, ops.FP8Linear))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, size // 8, size // 8, generator=gen)
    with torch.no_grad(), LiveTensorBytes() as meter:
        model(latents, torch.tensor([500.0]), [torch.randn(20, cfg.text_dim, generator=gen)])
    estimate = estimate_peak_bytes(model, size, size, frames, 0)
    assert estimate.workspace_bytes == fp8_fast_workspace_bytes(model, size, size, frames) > 0
    assert meter.peak <= estimate.activation_bytes + estimate.workspace_bytes, (meter.peak, estimate)


def test_fp8_fast_workspace_is_the_largest_quantised_input_at_the_video_size() -> None:
    """14B at 720p x 81: the FFN down-projection quantises 75,600 x 13,824 activations (1 byte each + a 4-byte
    scale per row) with one 16M-element slice of fp32 temporaries; without fp8_fast nothing is counted."""
    cfg = TASKS["t2v-14B"].dit
    with torch.device("meta"):
        model = WanModel(cfg).to(torch.bfloat16).requires_grad_(False)
    assert fp8_fast_workspace_bytes(model, 720, 1280, 81) == 0
    apply_fp8(model, "fp8_fast")
    tokens = video_tokens(cfg, 720, 1280, 81)
    slice_rows = (1 << 24) // cfg.ffn_dim
    expected = tokens * cfg.ffn_dim + 4 * tokens + 8 * slice_rows * cfg.ffn_dim + 4 * slice_rows
    assert fp8_fast_workspace_bytes(model, 720, 1280, 81) == expected
    assert fp8_fast_workspace_bytes(model, 720, 1280, 81, batch=2) > expected
    estimate = estimate_peak_bytes(model, 720, 1280, 81, 6)
    assert estimate.workspace_bytes == expected > dequant_workspace_bytes(model) == 0
    assert estimate.activation_bytes == estimate_activation_bytes(cfg, 720, 1280, 81)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_quantize_rows_peak_matches_the_estimate() -> None:
    """On the GPU, measured by the caching allocator, which rounds each of the (at most 5) live blocks up to a
    multiple of 512 bytes: a 14B-width input in two slices."""
    x = torch.randn(4096, 5120, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ops.quantize_rows(x)
    peak = torch.cuda.max_memory_allocated() - before
    estimate = ops.quantize_rows_bytes(4096, 5120)
    assert peak - 5 * 512 <= estimate <= peak, (peak, estimate)


def test_video_tokens_follow_the_vae_stride_of_the_dit():
    """TI2V-5B takes latents of the 16-pixel Wan2.2 VAE: 704x1280x121 is 31 x 44 x 80 / (2 x 2) = 27,280 tokens,
    a quarter of what the Wan2.1 VAE's 8-pixel cells would give at the same size (the A14B experts keep 8)."""
    ti2v, a14b = TASKS["ti2v-5B"].dit, TASKS["t2v-A14B"].dit
    assert video_tokens(ti2v, 704, 1280, 121) == 31 * (704 // 32) * (1280 // 32) == 27280
    assert video_tokens(a14b, 704, 1280, 121) == 4 * video_tokens(ti2v, 704, 1280, 121)
    with pytest.raises(ValueError, match="multiples of 32"):
        video_tokens(ti2v, 720, 1280, 121)
