"""tests/numerics.py: the float64 reference really is float64, and the float32 parity bound accepts rounding
differences (such as a CPU with another summation order produces) while rejecting a wrong weight."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.numerics import (
    assert_float32_parity,
    float32_tolerance,
    float64_run,
    reference_pair,
    rel_err,
    to_float64,
)
from tests.tiny import TINY_DIT, randomize_
from wan_core.models.dit import WanModel

DIT = dataclasses.replace(TINY_DIT, dim=128, num_heads=1, ffn_dim=256)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 2, 8, 8, generator=gen), torch.tensor([600.0]), [torch.randn(5, 32, generator=gen)]


@pytest.fixture(scope="module")
def model() -> WanModel:
    return randomize_(WanModel(DIT), seed=11).eval()


def test_float64_run_is_float64_where_a_plain_double_copy_is_not(model: WanModel) -> None:
    out32, out64 = reference_pair(model, *_inputs())
    assert out64.dtype == torch.float64 and 0 < rel_err(out32, out64) < 1e-5
    with torch.no_grad():  # the model's float32 upcasts: a plain float64 copy still computes (and returns) float32
        plain = copy.deepcopy(model).double()(*to_float64(_inputs()))
    assert plain.dtype == torch.float32
    with pytest.raises(AssertionError, match="the float64 reference is torch.float32"):
        assert_float32_parity(out32, out32, plain)
    assert model.patch_embedding.weight.dtype == torch.float32  # the model itself is untouched


def test_bound_accepts_rounding_differences_and_rejects_a_wrong_weight(model: WanModel) -> None:
    out32, out64 = reference_pair(model, *_inputs())
    tol = float32_tolerance(out32, out64)
    # every element off by 3x the reference's own float32 error (a fixed bound of 1e-6 relative rejected 1.2e-6 from
    # a CPU with another summation order, where this model's own float32 error is 5.8e-7)
    noise = torch.randn(out32.shape, generator=torch.Generator().manual_seed(1)).sign()
    assert_float32_parity(out32 + noise * 3 * rel_err(out32, out64) * out64.abs().max().float(), out32, out64)
    swapped = copy.deepcopy(model)
    q, k = swapped.blocks[0].self_attn.q, swapped.blocks[0].self_attn.k
    q.weight.data, k.weight.data = k.weight.data.clone(), q.weight.data.clone()
    with torch.no_grad():
        wrong = swapped(*_inputs())
    assert rel_err(wrong, out64) > 1000 * tol
    with pytest.raises(AssertionError, match="exceeds"):
        assert_float32_parity(wrong, out32, out64)


def test_float64_run_passes_keyword_arguments_and_nested_inputs() -> None:
    layer = torch.nn.Linear(4, 3)
    out = float64_run(layer, input=torch.ones(2, 4))
    assert out.dtype == torch.float64 and layer.weight.dtype == torch.float32
    nested = to_float64({"a": [torch.ones(1)], "b": (torch.ones(1, dtype=torch.int64), "text")})
    assert nested["a"][0].dtype == torch.float64 and nested["b"][0].dtype == torch.int64 and nested["b"][1] == "text"
