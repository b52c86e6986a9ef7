"""--compile: regional compilation of the blocks (one graph, no breaks, block swap outside) and the attention op."""

from __future__ import annotations

import copy
import dataclasses
import importlib.abc
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.numerics import assert_float32_parity, to_float64
from tests.tiny import TINY_DIT, randomize_
from wan_core.models.attention import available_backends
from wan_core.models.dit import WanModel
from wan_core.runtime.compile import (
    attention_op,
    compile_blocks,
    compile_safe_kernel,
    enable_module_inlining,
    uncompile_blocks,
)
from wan_core.runtime.offload import enable_block_swap


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


def _inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 3, 8, 8, generator=gen), torch.tensor([500.0]), [torch.randn(5, 32, generator=gen)]


def test_identical_blocks_compile_once() -> None:
    """Six blocks, two passes: one compilation, whatever block the compiled function is called with."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    ref = randomize_(WanModel(dataclasses.replace(TINY_DIT, num_layers=6)), 0).eval()
    model = compile_blocks(copy.deepcopy(ref), backend=counting_backend, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(*_inputs()), ref(*_inputs()))
    assert len(graphs) == 1
    uncompile_blocks(model)


def test_module_inlining_is_switched_on_where_torch_defaults_it_off() -> None:
    """torch 2.4 has `inline_inbuilt_nn_modules` off: each block would be a new module constant and recompile."""
    old = SimpleNamespace(inline_inbuilt_nn_modules=False)
    assert enable_module_inlining(old, "2.4.1+cu124") and old.inline_inbuilt_nn_modules is True
    assert not enable_module_inlining(old, "2.4.1+cu124")  # already on
    newer = SimpleNamespace(inline_inbuilt_nn_modules=False)
    assert not enable_module_inlining(newer, "2.5.0") and newer.inline_inbuilt_nn_modules is False
    assert not enable_module_inlining(SimpleNamespace(), "2.3.1")  # no such option: nothing to set
    with pytest.raises(ValueError, match="not a torch version: 'nightly'"):
        enable_module_inlining(SimpleNamespace(), "nightly")


class _BrokenPackage(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `name` (so it counts as installed) but fails to import it, like a wheel built for another torch."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname.split(".")[0] == self.name else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: object) -> None:
        raise OSError(f"{self.name}/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")


@pytest.fixture
def broken_xformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [_BrokenPackage("xformers"), *sys.meta_path])
    for name in [n for n in sys.modules if n.split(".")[0] == "xformers"]:
        monkeypatch.delitem(sys.modules, name)


def test_compile_does_not_import_an_unused_broken_attention_package(broken_xformers: None) -> None:
    assert "xformers" in available_backends()  # installed, but importing it fails
    torch._dynamo.reset()
    ref = randomize_(WanModel(TINY_DIT), 0).eval()
    model = compile_blocks(copy.deepcopy(ref), backend="eager")  # sdpa
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), ref(*_inputs()))
    uncompile_blocks(model)
    ref.set_attention_backend("xformers")
    with pytest.raises(RuntimeError, match=r"backend 'xformers': the package 'xformers' is installed but failed to "
                                           r"import \(OSError: xformers/_C.so: undefined symbol"):
        compile_blocks(ref, backend="eager")
    assert "forward" not in ref.blocks[0].__dict__  # it failed before compiling anything


def test_importing_the_cli_does_not_import_dynamo() -> None:
    """Dynamo costs about two seconds to import; only compiling needs it (`ops.mark_compile_constants`)."""
    code = "import sys, wan_core.generate.cli, nodes; print('torch._dynamo' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
