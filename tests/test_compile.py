"""--compile: regional compilation of the blocks (one graph, no breaks, block swap outside) and the attention op."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.numerics import assert_float32_parity, to_float64
from tests.tiny import TINY_DIT, randomize_
from wan_core.compile import attention_op, compile_blocks, compile_safe_kernel, uncompile_blocks
from wan_core.model import WanModel
from wan_core.offload import enable_block_swap


def _qkv(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 24, 4, 16, generator=gen) for _ in range(3)]


def test_attention_op_matches_sdpa_and_passes_opcheck() -> None:
    q, k, v = _qkv()
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert torch.equal(attention_op(q, k, v, "sdpa"), expected.contiguous())
    torch.library.opcheck(attention_op, (q, k, v, "sdpa"), test_utils=("test_schema", "test_faketensor"))


def test_attention_op_compiles_into_one_graph() -> None:
    torch._dynamo.reset()
    kernel = compile_safe_kernel("torch")  # alias of sdpa
    compiled = torch.compile(lambda q, k, v: kernel(q * 2, k, v) + 1, backend="aot_eager", fullgraph=True)
    q, k, v = _qkv(1)
    expected = attention_op(q * 2, k, v, "sdpa") + 1
    exact = attention_op(*to_float64((q * 2, k, v)), "sdpa") + 1
    assert_float32_parity(compiled(q, k, v), expected, exact)
    with pytest.raises(ValueError, match="unknown attention backend"):
        compile_safe_kernel("nope")


def test_compiled_blocks_share_one_graph_and_work_with_block_swap() -> None:
    """fullgraph=True: the block computation has no graph break; swapping weights between calls recompiles nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = dataclasses.replace(TINY_DIT, num_layers=3)
    ref = randomize_(WanModel(cfg), 0).eval()
    gen = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 16, 3, 8, 8, generator=gen), torch.tensor([500.0]), [torch.randn(5, 32, generator=gen)]
    with torch.no_grad():
        expected = ref(x, t, ctx)
        model = compile_blocks(copy.deepcopy(ref), backend="aot_eager", fullgraph=True)
        assert torch.equal(model(x, t, ctx), expected)
        swapper = enable_block_swap(model, 2, "cpu", prefetch=0)
        assert torch.equal(model(x, t, ctx), expected)
        assert torch.equal(model(x, t, ctx, skip_blocks={1}), ref(x, t, ctx, skip_blocks={1}))
    assert counters["stats"]["unique_graphs"] == 1
    swapper.remove()
    uncompile_blocks(model)
    assert "forward" not in model.blocks[0].__dict__
    with pytest.raises(ValueError, match="non-empty `blocks`"):
        compile_blocks(torch.nn.Linear(2, 2))
