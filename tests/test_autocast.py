"""fp32 parts of the DiT stay fp32 inside a bf16 autocast region (training runs the model under autocast)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tests.tiny import TINY_DIT, randomize_
from wan_core.models.dit import WanModel
from wan_core.models.ops import Fp32Linear


def test_fp32_linear_ignores_an_enclosing_bf16_autocast() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = Fp32Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64, generator=gen))
        layer.bias.copy_(torch.randn(48, generator=gen))
    x = torch.randn(3, 64, generator=gen)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert torch.is_autocast_enabled("cpu")  # re-enabled after the layer
        assert F.linear(x, layer.weight).dtype == torch.bfloat16
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_fp32_linear_runs_on_the_meta_device() -> None:
    with torch.device("meta"):
        out = Fp32Linear(8, 4)(torch.empty(2, 8))
    assert out.shape == (2, 4) and out.dtype == torch.float32


def test_bf16_model_gives_the_same_output_with_and_without_autocast() -> None:
    """Every layer of a bf16 DiT chooses its own precision (bf16 matmuls, fp32 time embedding, modulation, norms,
    residual stream and head, float64 RoPE), so an enclosing bf16 autocast changes nothing, bit for bit."""
    model = randomize_(WanModel(TINY_DIT), 0).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 16, 3, 8, 8, generator=gen), torch.tensor([500.0]), [torch.randn(5, 32, generator=gen)]
    with torch.no_grad():
        plain = model(x, t, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = copy.deepcopy(model)(x, t, ctx)
    assert autocast.dtype == plain.dtype == torch.float32
    assert torch.equal(autocast, plain)
