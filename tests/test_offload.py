"""Block swap: the pure planner, the runtime on the CPU (and on CUDA when present), the memory estimate."""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.tiny import TINY_DIT, randomize_
from wan_core.models.config import TASKS
from wan_core.models.dit import WanModel
from wan_core.runtime import offload
from wan_core.runtime.devices import canonical_device, same_device
from wan_core.runtime.fp8 import apply_fp8
from wan_core.runtime.offload import (
    LiveTensorBytes,
    SwapPlan,
    choose_blocks_to_swap,
    enable_block_swap,
    estimate_activation_bytes,
    estimate_peak_bytes,
    parse_blocks_to_swap,
    resident_weight_bytes,
    video_tokens,
)

CFG = dataclasses.replace(TINY_DIT, num_layers=5)
NUM = CFG.num_layers


# ----------------------------------------------------------------------------------------------------------------
# Planner
# ----------------------------------------------------------------------------------------------------------------


def _forward(num: int, skip: set[int] = frozenset()):
    return [(i, "forward") for i in range(num) if i not in skip]


def _backward(num: int, skip: set[int] = frozenset()):
    return [(i, "backward") for i in reversed(range(num)) if i not in skip]


def _check_invariants(plan: SwapPlan, steps, trace) -> None:
    for (index, _), (moves, on_device) in zip(steps, trace):
        if plan.is_swapped(index):
            assert index in on_device and moves.wait == index
        else:
            assert moves.wait is None
        assert len(on_device) <= plan.slots
        assert all(plan.is_swapped(b) for b in on_device)
        assert not set(moves.evict) & set(moves.fetch)


def test_plan_validates_its_range() -> None:
    for bad in (0, NUM, -1):
        with pytest.raises(ValueError, match=rf"between 1 and {NUM - 1} .* got {bad}"):
            SwapPlan(NUM, bad)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        SwapPlan(1, 1)
    with pytest.raises(ValueError, match="prefetch"):
        SwapPlan(NUM, 2, prefetch=-1)
    with pytest.raises(ValueError, match="out of range"):
        SwapPlan(NUM, 2).window(NUM, "forward")


def test_parse_blocks_to_swap() -> None:
    assert parse_blocks_to_swap(None, 30) == 0 and parse_blocks_to_swap("0", 30) == 0
    assert parse_blocks_to_swap("auto", 30) == "auto" and parse_blocks_to_swap("29", 30) == 29
    with pytest.raises(ValueError, match="between 1 and 29"):
        parse_blocks_to_swap(30, 30)
    with pytest.raises(ValueError, match="integer or 'auto'"):
        parse_blocks_to_swap("many", 30)


def test_layout_resident_first_swapped_last() -> None:
    plan = SwapPlan(30, 12, prefetch=1)
    assert plan.resident_blocks == tuple(range(18)) and plan.swapped_blocks == tuple(range(18, 30))
    assert plan.slots == 2 and SwapPlan(30, 1, prefetch=3).slots == 1


def test_forward_streams_each_swapped_block_once_and_prefetches_during_resident_blocks() -> None:
    plan = SwapPlan(8, 4, prefetch=1)
    steps = _forward(8) * 2  # two passes (cond and uncond)
    trace = plan.simulate(steps)
    _check_invariants(plan, steps, trace)
    fetched = [b for moves, _ in trace for b in moves.fetch]
    assert fetched == [4, 5, 6, 7, 4, 5, 6, 7]
    # the first swapped blocks are requested while block 0 (resident) runs; later ones one block ahead, into the
    # slot of the block that ran before
    assert [moves.fetch for moves, _ in trace[:8]] == [(4, 5), (), (), (), (), (6,), (7,), ()]
    assert [moves.evict for moves, _ in trace[:8]] == [(), (), (), (), (), (4,), (5,), (6,)]
    # the last block of a pass stays until the next pass asks for room
    assert trace[7][1] == {7} and trace[8][0].evict == (7,)


def test_backward_reuses_the_last_block_and_streams_in_reverse() -> None:
    plan = SwapPlan(8, 5, prefetch=2)
    steps = _forward(8) + _backward(8) + _forward(8)
    trace = plan.simulate(steps)
    _check_invariants(plan, steps, trace)
    backward = trace[8:16]
    assert backward[0][0].fetch == (6, 5)  # block 7 is still there from the forward pass
    assert [b for moves, _ in backward for b in moves.fetch] == [6, 5, 4, 3]
    assert backward[-1][1] == frozenset()  # resident blocks at the end of backward: all slots released


@pytest.mark.parametrize("num,swap,prefetch", [(5, 1, 1), (5, 4, 1), (6, 3, 0), (30, 29, 1), (40, 20, 3)])
def test_invariants_hold_with_skipped_blocks(num: int, swap: int, prefetch: int) -> None:
    plan = SwapPlan(num, swap, prefetch)
    for skip in ({num - swap}, {num - 1}, {0, num - 2}, set(range(num - swap, num, 2))):
        steps = _forward(num, skip) + _backward(num, skip) + _forward(num)
        _check_invariants(plan, steps, plan.simulate(steps))
        steps = _forward(num, skip) + _forward(num) + _forward(num, skip)
        _check_invariants(plan, steps, plan.simulate(steps, wrap=True))


def test_inference_passes_prefetch_the_next_pass() -> None:
    plan = SwapPlan(8, 4, prefetch=1)
    trace = plan.simulate(_forward(8) * 2, wrap=True)
    _check_invariants(plan, _forward(8) * 2, trace)
    assert trace[7][0].fetch == (4,)  # block 7 runs while block 4 comes back for the next pass
    assert trace[8][0].evict == (7,) and trace[8][0].fetch == (5,)
    assert [b for moves, _ in trace for b in moves.fetch] == [4, 5, 6, 7, 4, 5, 6, 7, 4]


def test_swapping_no_more_blocks_than_slots_keeps_them_on_the_device_in_inference() -> None:
    plan = SwapPlan(6, 2, prefetch=1)
    trace = plan.simulate(_forward(6) * 3, wrap=True)
    assert [b for moves, _ in trace for b in moves.fetch] == [4, 5]


# ----------------------------------------------------------------------------------------------------------------
# Runtime on the CPU: the arena is ordinary memory and the "device" slots are CPU buffers, but every placement
# decision is the real one, and a dispatch mode proves that no computation ever reads the CPU master copies.
# ----------------------------------------------------------------------------------------------------------------


class _NoArenaReads(TorchDispatchMode):
    """Fails a computing op that reads arena memory (views and the swapper's own copies out of it are fine)."""

    def __init__(self, swapper) -> None:
        super().__init__()
        self.arena = swapper._arena
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten.copy_.default and not func.is_view:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and t.numel() and self.arena.holds(t):
                    raise AssertionError(f"{func} read a swapped tensor from CPU master memory")
            self.ops += 1
        return func(*args, **(kwargs or {}))


def _model(seed: int = 0) -> WanModel:
    return randomize_(WanModel(CFG), seed).eval()


def _inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 3, 8, 8, generator=gen), torch.tensor([500.0]), [torch.randn(5, 32, generator=gen)]


def _run(model: nn.Module, swapper=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if swapper is None:
            return model(*_inputs(), **kwargs)
        with _NoArenaReads(swapper) as guard:
            out = model(*_inputs(), **kwargs)
        assert guard.ops > 0
        return out


@pytest.mark.parametrize("swap,prefetch", [(1, 1), (2, 0), (NUM - 1, 1), (NUM - 1, 2)])
def test_forward_is_identical_with_any_swap_count(swap: int, prefetch: int) -> None:
    ref = _model()
    expected = _run(ref)
    model = copy.deepcopy(ref)
    swapper = enable_block_swap(model, swap, "cpu", prefetch=prefetch)
    for _ in range(2):  # a second pass starts from the state the first one left
        assert torch.equal(_run(model, swapper), expected)
    swapper.remove("cpu")
    assert torch.equal(_run(model), expected) and not model.blocks[-1]._forward_pre_hooks
    assert not any(swapper._arena.holds(p) for p in model.parameters())


def test_skip_blocks_with_swap() -> None:
    ref = _model()
    model = copy.deepcopy(ref)
    swapper = enable_block_swap(model, 3, "cpu")
    for skip in ({2}, {3}, {4}, {2, 4}):
        assert torch.equal(_run(model, swapper, skip_blocks=skip), _run(ref, skip_blocks=skip))


def test_fp8_weights_and_their_scales_are_swapped() -> None:
    ref = apply_fp8(_model(), "fp8_scaled")
    model = copy.deepcopy(ref)
    swapper = enable_block_swap(model, NUM - 1, "cpu")
    assert torch.equal(_run(model, swapper), _run(ref))
    assert any(t is model.blocks[-1].ffn[0].scale_weight for t in swapper._layouts[NUM - 1].tensors)


class _BufferLoRA(nn.Module):
    """An inference-time unmerged low-rank wrapper whose factors are buffers created where its base layer is."""

    def __init__(self, base: nn.Module, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.base = base
        device = base.weight.device
        self.register_buffer("down", (torch.randn(2, base.in_features, generator=gen) * 0.1).to(device))
        self.register_buffer("up", (torch.randn(base.out_features, 2, generator=gen) * 0.1).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # computes in its factors' dtype, as the base layer does
        return self.base(x) + F.linear(F.linear(x.to(self.down.dtype), self.down), self.up)


def test_tensors_added_after_enabling_stay_on_the_device() -> None:
    ref = _model()
    model = copy.deepcopy(ref)
    swapper = enable_block_swap(model, NUM - 1, "cpu")
    for net in (ref, model):  # e.g. a LoRA applied unmerged for one sampling run, after the model was placed
        for i, block in enumerate(net.blocks):
            block.ffn[0] = _BufferLoRA(block.ffn[0], seed=i)
    assert torch.equal(_run(model, swapper), _run(ref))
    assert not any(swapper._arena.holds(b) for blk in model.blocks for b in blk.ffn[0].buffers())


class _LoRA(nn.Module):
    """An unmerged low-rank wrapper (calls its base layer) with trainable factors."""

    def __init__(self, base: nn.Module, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.base = base
        self.down = nn.Parameter(torch.randn(2, base.in_features, generator=gen) * 0.1)
        self.up = nn.Parameter(torch.randn(base.out_features, 2, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x.to(self.down.dtype), self.down), self.up)


def _with_lora(model: WanModel) -> WanModel:
    model.requires_grad_(False)
    for i, block in enumerate(model.blocks):
        block.self_attn.q = _LoRA(block.self_attn.q, seed=i)
        block.ffn[2] = _LoRA(block.ffn[2], seed=100 + i)
    return model


def _loss_and_grads(model: WanModel, swapper=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, t, ctx = _inputs()
    guard = _NoArenaReads(swapper) if swapper is not None else None
    with guard or _nullcontext():
        loss = model(x, t, ctx).pow(2).mean()
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("swap,checkpointing", [(1, False), (3, True), (NUM - 1, False), (NUM - 1, True)])
def test_training_gradients_are_identical_with_swap(swap: int, checkpointing: bool) -> None:
    ref = _with_lora(_model()).train()
    ref.gradient_checkpointing = checkpointing
    model = copy.deepcopy(ref)
    swapper = enable_block_swap(model, swap, "cpu")
    expected_loss, expected = _loss_and_grads(ref)
    for _ in range(2):
        loss, grads = _loss_and_grads(model, swapper)
        assert torch.equal(loss, expected_loss)
        assert len(grads) == 4 * NUM and all(torch.equal(a, b) for a, b in zip(grads, expected))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(swapper._arena.holds(p) for p in trainable)  # LoRA factors never move


def test_refuses_a_model_without_blocks() -> None:
    with pytest.raises(ValueError, match="`blocks` ModuleList"):
        enable_block_swap(nn.Linear(2, 2), 1, "cpu")
    with pytest.raises(ValueError, match=f"between 1 and {NUM - 1}"):
        enable_block_swap(_model(), NUM, "cpu")
    with pytest.raises(ValueError, match="pin must be one of"):
        enable_block_swap(_model(), 2, "cpu", pin="yes")


# ----------------------------------------------------------------------------------------------------------------
# Host memory: pinning only when asked, released when the swapper goes, moved in block by block
# ----------------------------------------------------------------------------------------------------------------


class _FakeCudart:
    """Stands in for torch.cuda.cudart(): records host memory (un)registrations by address."""

    def __init__(self) -> None:
        self.registered: list[int] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:
        self.registered.append(pointer)
        return 0

    def cudaHostUnregister(self, pointer: int) -> int:
        self.unregistered.append(pointer)
        return 0


@pytest.fixture
def cudart(monkeypatch) -> Iterator[_FakeCudart]:
    """Registration through a counter, and the CPU treated like a CUDA device for pinning."""
    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(offload, "_host_pin", lambda pin, device: pin)
    yield fake
    gc.collect()  # arenas the test left behind unregister here, with the fake


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting frees objects: a release that needs the garbage collector does not happen."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_pinning_registers_each_swapped_block_and_only_when_asked(cudart) -> None:
    enable_block_swap(_model(), 3, "cpu")
    assert cudart.registered == []  # pageable by default, as musubi without --use_pinned_memory_for_block_swap
    swapper = enable_block_swap(_model(), 3, "cpu", pin="register")
    assert len(cudart.registered) == 3 and sorted(cudart.registered) == sorted(b.data_ptr()
                                                                                for b in swapper._arena.buffers)
    assert offload.pin_mode(True) == "register" and offload.pin_mode(False) == "none"


def test_dropped_swapper_unregisters_its_memory_on_garbage_collection(cudart) -> None:
    model = _model()
    enable_block_swap(model, 3, "cpu", pin="register")
    del model  # the hooks and the swapper refer to each other: only the garbage collector frees them
    gc.collect()
    assert len(cudart.registered) == 3 and sorted(cudart.unregistered) == sorted(cudart.registered)


def test_remove_unregisters_at_once_and_only_once(cudart, no_gc) -> None:
    model = _model()
    swapper = enable_block_swap(model, 3, "cpu", pin="register")
    expected = _run(model, swapper)
    swapper.remove()
    assert sorted(cudart.unregistered) == sorted(cudart.registered) and len(cudart.registered) == 3
    swapper.remove()
    del swapper
    gc.collect()
    assert len(cudart.unregistered) == 3  # idempotent, also for the finalizer
    swapper = enable_block_swap(model, 3, "cpu", pin="register")  # again, from the (now pageable) arena
    assert torch.equal(_run(model, swapper), expected)


@pytest.fixture
def dit_file(tmp_path) -> Path:
    from tests.model_set import _save

    return _save(_model(), CFG, tmp_path / "diffusion_models" / "swap_dit.safetensors")


@pytest.mark.parametrize("pinned", [False, True])
def test_model_set_release_unpins_the_swapped_dit(cudart, no_gc, monkeypatch, dit_file: Path, pinned: bool) -> None:
    """generate's --use_pinned_memory_for_block_swap reaches the swapper; releasing the DiT unpins it at once."""
    from wan_core.generate import cli as generate
    from wan_core.loading import model_set as wan_models

    args = generate.build_parser().parse_args(["--dit", str(dit_file), "--device", "cpu", "--blocks_to_swap", "3",
                                               *(["--use_pinned_memory_for_block_swap"] if pinned else [])])
    spec = generate.spec_from_args(args)
    assert spec.pinned_block_swap is pinned
    models = wan_models.ModelSet(spec)
    assert models.get("dit").block_swapper is not None
    assert len(cudart.registered) == (3 if pinned else 0)
    monkeypatch.setattr(wan_models, "gc", types.SimpleNamespace(collect=lambda: 0))  # release must not need it
    models.release("dit")
    assert sorted(cudart.unregistered) == sorted(cudart.registered)


@pytest.mark.parametrize("pinned", [False, True])
def test_training_block_swap_pins_only_with_the_flag(cudart, tmp_path: Path, dit_file: Path, pinned: bool) -> None:
    from training.args import parse_train_config
    from training.trainable import inspect_dit, load_training_dit

    flag = ["--use_pinned_memory_for_block_swap"] if pinned else []
    (tmp_path / "data.toml").write_text("")
    cfg = parse_train_config(["--dit", str(dit_file), "--dataset_config", str(tmp_path / "data.toml"), "--output_dir",
                              str(tmp_path / "out"), "--blocks_to_swap", "3", *flag])
    assert cfg.memory.use_pinned_memory_for_block_swap is pinned
    model = load_training_dit(cfg.model, cfg.memory, inspect_dit(dit_file), torch.device("cpu"), full=False)
    assert len(cudart.registered) == (3 if pinned else 0)
    assert model._block_swapper.pin == ("register" if pinned else "none")


def test_comfyui_loader_releases_the_dit_it_replaces(cudart, no_gc, monkeypatch, dit_file: Path) -> None:
    from nodes import comfy_adapter as adapter
    from nodes.loaders import WanTunerDiTLoader

    monkeypatch.setattr(offload, "_host_pin", lambda pin, device: "register")  # as if the node pinned
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(dit_file.parent.parent))
    adapter.clear_cache()
    options = {"task": "auto", "dtype": "default", "fp8": "none", "attention": "sdpa", "compile": False}
    try:
        first = WanTunerDiTLoader().load(dit_file.name, blocks_to_swap=3, **options)[0]
        first.model.ready()
        assert len(cudart.registered) == 3 and not cudart.unregistered
        second = WanTunerDiTLoader().load(dit_file.name, blocks_to_swap=2, **options)[0]  # new inputs: replaced
        assert sorted(cudart.unregistered) == sorted(cudart.registered)
        assert not first.model.obj.blocks[-1]._forward_pre_hooks
        second.model.ready()
        assert len(cudart.registered) == 5 and len(cudart.unregistered) == 3
    finally:
        adapter.clear_cache()


_HOST_PEAK_SCRIPT = """
import ctypes, re, sys
import torch
from torch import nn
from wan_core.runtime import offload

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

class PageLocking:  # cudaHostRegister makes every page of the range resident; so does writing it
    def cudaHostRegister(self, pointer, size, flags):
        ctypes.memset(pointer, 0, size)
        return 0

    def cudaHostUnregister(self, pointer):
        return 0

class Net(nn.Module):
    def __init__(self, blocks, elements):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ParameterList(nn.Parameter(torch.rand(elements), requires_grad=False)
                                                     for _ in range(2)) for _ in range(blocks))

blocks, swapped, elements = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.cuda.cudart = PageLocking
offload._host_pin = lambda pin, device: pin  # pin on the CPU as on a CUDA device
for pin in sys.argv[4:]:
    offload.enable_block_swap(Net(3, 1000), 2, "cpu", pin=pin)  # warm-up: imports and first allocations
    model = Net(blocks, elements)
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current RSS
    before = status("VmRSS")
    swapper = offload.enable_block_swap(model, swapped, "cpu", pin=pin)
    print(pin, status("VmHWM") - before, status("VmRSS") - before, sum(b.numel() for b in swapper._arena.buffers))
    swapper.remove()
    del model, swapper
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
def test_moving_blocks_into_the_arena_needs_about_one_block_of_extra_host_memory() -> None:
    """4 swapped blocks of 2 x 40 MB: the peak resident memory while enabling grows by at most one block (each
    weight is freed as soon as it is copied), not by a second copy of all swapped weights (320 MB), also when
    pinning makes a whole buffer resident at once."""
    elements = 10_000_000  # 40 MB per tensor: above glibc's largest mmap threshold, so freeing returns it at once
    block = 2 * elements * 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _HOST_PEAK_SCRIPT, "5", "4", str(elements), "none", "register"],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = [line.split() for line in out.splitlines()]
    assert [line[0] for line in lines] == ["none", "register"]
    for pin, peak, after, arena in ((pin, *map(int, rest)) for pin, *rest in lines):
        assert arena >= 4 * block  # the swapped weights all moved
        assert peak <= 1.25 * block, (pin, peak / block, after / block)
        assert after <= 0.25 * block, (pin, peak / block, after / block)


# ----------------------------------------------------------------------------------------------------------------
# Memory estimate
# ----------------------------------------------------------------------------------------------------------------


def test_video_tokens_match_the_reference_counts() -> None:
    cfg = TASKS["t2v-14B"].dit
    assert video_tokens(cfg, 480, 832, 81) == 32760 and video_tokens(cfg, 720, 1280, 81) == 75600
    with pytest.raises(ValueError, match="4k\\+1"):
        video_tokens(cfg, 480, 832, 80)
    with pytest.raises(ValueError, match="multiples of 16"):
        video_tokens(cfg, 481, 832, 81)


def test_live_tensor_bytes_counts_storages_until_their_last_view_dies() -> None:
    x = torch.randn(1000, 250)  # 1 MB, created before: not counted
    with LiveTensorBytes() as meter:
        a = x * 2  # +1 MB
        view = a[:10]
        b = a.double()  # +2 MB -> 3 MB
        del a  # the view keeps it alive
        c = b + 1  # +2 MB -> 5 MB
        del b, c, view  # -> 0
        d = x.float().add_(1)  # `float()` of fp32 is x itself: add_ works in place on x
    assert meter.peak == 5_000_000 and meter.current == 0
    assert d is x


@pytest.mark.parametrize("dim,ffn,frames,size,kind", [(128, 256, 9, 128, "t2v"), (128, 1024, 5, 128, "t2v"),
                                                        (256, 512, 5, 96, "t2v"), (128, 512, 9, 160, "t2v"),
                                                        (128, 256, 5, 64, "i2v")])
def test_activation_estimate_matches_cpu_measurement(dim: int, ffn: int, frames: int, size: int, kind: str) -> None:
    """bf16 forward on the CPU, live bytes measured by dispatch: the formula is an upper bound within 2 %.

    The cases cover each phase being the peak (context-sized cross-attention at few tokens, the FFN at a wide
    ffn_dim, RoPE at many tokens) and the image cross-attention of I2V models."""
    cfg = dataclasses.replace(TINY_DIT, dim=dim, ffn_dim=ffn, num_heads=dim // 64, num_layers=2,
                              model_type=kind, in_dim=16 if kind == "t2v" else 36)
    model = randomize_(WanModel(cfg), 0).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.in_dim, (frames - 1) // 4 + 1, size // 8, size // 8, generator=gen)
    context = [torch.randn(20, cfg.text_dim, generator=gen)]
    clip = torch.randn(1, 257, 1280, generator=gen) if kind == "i2v" else None
    with torch.no_grad(), LiveTensorBytes() as meter:
        model(latents, torch.tensor([500.0]), context, clip_fea=clip)
    estimate = estimate_activation_bytes(cfg, size, size, frames, dtype=torch.bfloat16)
    assert meter.peak <= estimate <= 1.02 * meter.peak, (meter.peak, estimate)


def test_activation_estimate_with_sliced_rope(monkeypatch) -> None:
    """When RoPE runs in token slices, the float64 work is bounded by one slice (the 720p case, scaled down)."""
    import wan_core.models.dit as wan_model

    monkeypatch.setattr(wan_model, "ROPE_CHUNK_ELEMENTS", 40 * 128)  # 40-token slices of 768 tokens
    cfg = dataclasses.replace(TINY_DIT, dim=128, ffn_dim=128, num_heads=2, num_layers=2)  # RoPE phase binds
    model = randomize_(WanModel(cfg), 0).to(torch.bfloat16).eval()
    latents = torch.randn(1, 16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    context = [torch.randn(20, cfg.text_dim)]
    with torch.no_grad(), LiveTensorBytes() as meter:
        model(latents, torch.tensor([500.0]), context)
    estimate = estimate_activation_bytes(cfg, 256, 256, 9, dtype=torch.bfloat16)
    assert meter.peak <= estimate <= 1.02 * meter.peak, (meter.peak, estimate)


def test_resident_weights_under_swap_are_computed_from_the_modules() -> None:
    model = _model().requires_grad_(False)
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    assert resident_weight_bytes(model, 0) == total
    assert resident_weight_bytes(model, 3, prefetch=1) == total - 3 * block + 2 * block
    assert resident_weight_bytes(model, 3, prefetch=0) == total - 3 * block + 1 * block
    lora = _with_lora(_model())  # trainable factors never leave the device
    lora_total = sum(p.numel() * 4 for p in lora.parameters())
    frozen = sum(p.numel() * 4 for p in lora.blocks[-1].parameters() if not p.requires_grad)
    assert frozen < sum(p.numel() * 4 for p in lora.blocks[-1].parameters())
    assert resident_weight_bytes(lora, 3, prefetch=0) == lora_total - 3 * frozen + frozen


def test_auto_picks_the_smallest_count_that_fits() -> None:
    model = _model().requires_grad_(False)
    h = w = 64
    peaks = [estimate_peak_bytes(model, h, w, 9, n).total for n in range(NUM)]
    assert peaks[0] == peaks[1] == peaks[2] > peaks[3] > peaks[4]  # swapping <= 2 blocks fills the 2 slots
    margin = 1000
    assert choose_blocks_to_swap(model, h, w, 9, free_bytes=peaks[0] + margin, margin_bytes=margin).blocks_to_swap == 0
    budget = peaks[3] + margin
    assert choose_blocks_to_swap(model, h, w, 9, free_bytes=budget, margin_bytes=margin).blocks_to_swap == 3
    with pytest.raises(RuntimeError, match=rf"even swapping {NUM - 1} blocks"):
        choose_blocks_to_swap(model, h, w, 9, free_bytes=peaks[-1] + margin - 1, margin_bytes=margin)


def test_devices_compare_with_their_index(monkeypatch) -> None:
    """A tensor on the first GPU reports cuda:0; "cuda" means the current device, whatever its spelling."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert canonical_device("cuda") == torch.device("cuda", 0)
    assert same_device("cuda", torch.device("cuda:0")) and same_device(torch.device("cuda"), "cuda:0")
    assert not same_device("cuda", "cuda:1") and not same_device("cuda", "cpu")
    assert same_device("cpu", "cpu:0") and canonical_device("cpu:0") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert same_device("cuda", "cuda:1") and not same_device("cuda", "cuda:0")


def test_auto_budget_counts_the_weights_already_on_the_device(monkeypatch) -> None:
    """`--blocks_to_swap auto` on "cuda": weights that report cuda:0 are part of the budget (fake CUDA tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    free = 10_000_000
    asked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (asked.append(device), (free, 2 * free))[1])
    on_gpu = nn.Linear(64, 32, device="meta")
    with FakeTensorMode():
        on_gpu.weight, on_gpu.bias = (nn.Parameter(torch.empty(p.shape, device="cuda")) for p in on_gpu.parameters())
    assert on_gpu.weight.device == torch.device("cuda", 0)
    model = nn.Sequential(on_gpu, nn.Linear(16, 16))  # the second layer is in CPU memory: not counted
    assert offload._budget(model, torch.device("cuda")) == free + (64 * 32 + 32) * 4
    assert offload._budget(model, torch.device("cuda:1")) == free
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)]


# ----------------------------------------------------------------------------------------------------------------
# bf16 on each device: on CUDA real streams, events and pinned memory (skipped without a GPU); the same bodies run
# on the CPU so that they are exercised everywhere
# ----------------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, gpu])]


def _inputs_on(device: str):
    x, t, ctx = _inputs()
    return x.to(device), t.to(device), [c.to(device) for c in ctx]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("swap,pin", [(0, "register"), (1, "register"), (NUM - 1, "register"),
                                      (NUM - 1, "pin_memory")])
def test_bf16_forward_and_backward_are_bit_identical(device: str, swap: int, pin: str) -> None:
    """bf16: outputs and LoRA gradients with swap equal those without, bit for bit (math attention, whose
    backward is deterministic, unlike the fused kernels' atomics)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ref = _with_lora(_model()).to(torch.bfloat16).to(device).train()
    x, t, ctx = _inputs_on(device)
    model = copy.deepcopy(ref).cpu()
    swapper = enable_block_swap(model, swap, device, pin=pin)
    with torch.no_grad():  # inference path (default kernels, prefetch of the next pass)
        expected = ref(x, t, ctx)
        assert all(torch.equal(model(x, t, ctx), expected) for _ in range(2))
    results = []
    with sdpa_kernel(SDPBackend.MATH):
        for m in (ref, model):
            for _ in range(2):
                m.zero_grad(set_to_none=True)
                out = m(x, t, ctx)
                out.float().pow(2).mean().backward()
            results.append((out.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(results[0][0], results[1][0])
    assert len(results[1][1]) == 4 * NUM and all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    if swapper is not None:
        assert all(p.device.type == device for p in model.parameters() if p.requires_grad)
        if device == "cuda":
            assert all(buffer.is_pinned() for buffer in swapper._arena.buffers)
        swapper.remove(device)
        with torch.no_grad():
            assert torch.equal(model(x, t, ctx), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_lora_applied_after_placement_moves_to_the_device(device: str) -> None:
    ref = _model().to(torch.bfloat16)
    model = copy.deepcopy(ref)
    ref.to(device)
    enable_block_swap(model, NUM - 1, device)
    for net in (ref, model):  # evicted blocks live in CPU memory, so their new buffers start there
        for i, block in enumerate(net.blocks):
            block.ffn[0] = _BufferLoRA(block.ffn[0], seed=i).to(torch.bfloat16)
    x, t, ctx = _inputs_on(device)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), ref(x, t, ctx))
    assert all(b.device.type == device for blk in model.blocks for b in blk.ffn[0].buffers())
