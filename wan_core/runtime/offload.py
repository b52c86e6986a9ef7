"""Block swap: keep the last N DiT blocks in CPU memory and stream each onto the GPU just before it runs.

Layout (musubi `--blocks_to_swap N`, 1 <= N <= num_blocks - 1): the non-block modules and blocks [0, L-N) live on
the device; the frozen tensors of blocks [L-N, L) live in a CPU arena (one buffer per block, pageable unless
pinning is asked for) and are copied, one block at a time, into a small ring of device slots on a side CUDA stream,
overlapped with the compute of the previous block (fully only from pinned memory).
Trainable parameters (LoRA) are never swapped: they stay on the device, so optimisers and gradients see them
where they are; so do tensors added to a block after swapping was enabled (unmerged LoRA for one run).

Three layers, each testable on its own:
- `SwapPlan` (pure): which swapped blocks should be on the device when block i runs in a given direction, and so
  what to evict and fetch before it. Forward runs 0..L-1, backward L-1..0; skipped blocks (skip-layer guidance)
  simply never ask, and the plan still holds because every decision is taken from the block that does run.
- `BlockSwapper` (runtime): the arena, the slots, the streams and events, and the hooks. It is attached with
  module hooks (a forward pre-hook on the model and on every block, a full backward pre-hook on every block), so
  `WanModel.forward` knows nothing about it (style R7). Gradient checkpointing re-runs a block's forward inside
  backward; the pre-hook then just confirms the block is resident.
- Memory estimate and `choose_blocks_to_swap` (`--blocks_to_swap auto`): see `estimate_activation_bytes`.

Usage: `swapper = enable_block_swap(model, 20, "cuda")` instead of `model.to("cuda")`; `swapper.remove()` undoes
it and unpins the arena. Do not call `model.to()` while a swapper is attached. `torch.compile` of the blocks
(`wan_core.runtime.compile`) compiles the block computation only; the hooks and movements stay outside the compiled
code.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wan_core.models import dit as wan_model
from wan_core.models.config import DiTConfig, latent_space_stride
from wan_core.models.ops import FP8Linear, scaled_mm_workspace_bytes
from wan_core.runtime.devices import canonical_device, same_device

logger = logging.getLogger(__name__)

Direction = Literal["forward", "backward"]
GIB = 1024**3
_ALIGN = 256  # byte alignment of every tensor inside the arena and the slots


# ----------------------------------------------------------------------------------------------------------------
# The pure planner
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moves:
    """What happens before a block runs: blocks to evict, blocks to start fetching (in order), block to wait for."""

    evict: tuple[int, ...]
    fetch: tuple[int, ...]
    wait: int | None


@dataclass(frozen=True)
class SwapPlan:
    """Which blocks are swapped and, for each block about to run, which swapped blocks belong on the device.

    The device holds `slots` = min(N, prefetch + 1) swapped blocks: the one about to run (when it is swapped) and
    the next `prefetch` swapped blocks in the direction of travel. While resident blocks run, the first swapped
    blocks of that direction are already being fetched.
    """

    num_blocks: int
    blocks_to_swap: int
    prefetch: int = 1

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError(f"block swap needs a model with at least 2 blocks, got {self.num_blocks}")
        if not 1 <= self.blocks_to_swap <= self.num_blocks - 1:
            raise ValueError(f"blocks_to_swap must be between 1 and {self.num_blocks - 1} (number of blocks - 1) "
                             f"for a model with {self.num_blocks} blocks, got {self.blocks_to_swap}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")

    @property
    def first_swapped(self) -> int:
        return self.num_blocks - self.blocks_to_swap

    @property
    def resident_blocks(self) -> tuple[int, ...]:
        return tuple(range(self.first_swapped))

    @property
    def swapped_blocks(self) -> tuple[int, ...]:
        return tuple(range(self.first_swapped, self.num_blocks))

    @property
    def slots(self) -> int:
        return min(self.blocks_to_swap, self.prefetch + 1)

    def is_swapped(self, index: int) -> bool:
        return index >= self.first_swapped

    def window(self, index: int, direction: Direction, wrap: bool = False) -> tuple[int, ...]:
        """Swapped blocks wanted on the device while block `index` runs, most urgent first.

        `wrap` (inference: another forward pass follows, not a backward) continues the forward order into the
        next pass, so the last blocks of a pass prefetch the first swapped blocks of the next one.
        """
        if not 0 <= index < self.num_blocks:
            raise ValueError(f"block index {index} is out of range for {self.num_blocks} blocks")
        if direction == "forward":
            ahead = list(range(max(index, self.first_swapped), self.num_blocks))
            if wrap:
                ahead += [b for b in self.swapped_blocks if b not in ahead]
        elif direction == "backward":
            ahead = list(range(index, self.first_swapped - 1, -1))
        else:
            raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
        return tuple(ahead[: self.slots])

    def moves(self, on_device: Iterable[int], index: int, direction: Direction, wrap: bool = False) -> Moves:
        """Evictions first (freeing slots), then fetches in order of need, then the wait for `index`."""
        present = frozenset(on_device)
        want = self.window(index, direction, wrap)
        return Moves(evict=tuple(sorted(b for b in present if b not in want)),
                     fetch=tuple(b for b in want if b not in present),
                     wait=index if self.is_swapped(index) else None)

    def simulate(self, steps: Iterable[tuple[int, Direction]],
                 wrap: bool = False) -> list[tuple[Moves, frozenset[int]]]:
        """Run the plan over (block, direction) steps; returns each step's moves and the device set after it."""
        on_device: frozenset[int] = frozenset()
        trace = []
        for index, direction in steps:
            moves = self.moves(on_device, index, direction, wrap)
            on_device = (on_device - set(moves.evict)) | set(moves.fetch)
            trace.append((moves, on_device))
        return trace

    def describe(self) -> str:
        return (f"block swap: blocks 0-{self.first_swapped - 1} resident, {self.first_swapped}-{self.num_blocks - 1} "
                f"({self.blocks_to_swap}) streamed from CPU memory through {self.slots} device slot(s)")


def parse_blocks_to_swap(value: int | str | None, num_blocks: int) -> int | Literal["auto"]:
    """CLI / node value -> 0 (off), 'auto', or a validated count in [1, num_blocks - 1]."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "0", "none", "off")):
        return 0
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"blocks_to_swap must be an integer or 'auto', got {value!r}") from None
    if count == 0:
        return 0
    SwapPlan(num_blocks, count)  # validates the range
    return count


# ----------------------------------------------------------------------------------------------------------------
# Runtime
# ----------------------------------------------------------------------------------------------------------------


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _byte_view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view of `buffer` (uint8) at `offset` with the dtype and shape of `like`."""
    nbytes = like.numel() * like.element_size()
    return buffer[offset:offset + nbytes].view(like.dtype).view(like.shape)


@dataclass
class _BlockLayout:
    tensors: list[torch.Tensor]  # the block's frozen parameters and buffers (the objects the model holds)
    offsets: list[int]  # byte offset of each inside the block's host buffer
    nbytes: int  # size of the block's region
    ids: set[int]  # ids of every tensor of the block known to the swapper (streamed or kept on the device)
    host: torch.Tensor  # the block's buffer in the arena (uint8, `nbytes` long)


PIN_MODES = ("none", "register", "pin_memory")
PINNED_MEMORY_HELP = ("with --blocks_to_swap: keep the CPU copy of the swapped blocks in pinned (page-locked) RAM, so "
                      "that copies to the GPU are faster and overlap compute. As much RAM as the swapped blocks take "
                      "(about 0.7 GB per block of a 14B bf16 DiT, 27 GB for 39 blocks) must then be free, and it is "
                      "unavailable to other programs while it runs. Default: ordinary pageable memory")


def _unregister(buffers: list[torch.Tensor]) -> None:
    """Unpin buffers pinned with cudaHostRegister; their memory stays valid as ordinary pageable memory."""
    while buffers:
        torch.cuda.cudart().cudaHostUnregister(buffers.pop().data_ptr())


class _HostArena:
    """CPU memory of the swapped blocks: one buffer per block, allocated as each block moves in, so that moving a
    model in needs about one block of extra host memory (not a second copy of every swapped weight).

    `pin`: "none" leaves the buffers pageable (host-to-device copies are then staged by the driver and do not
    overlap compute); "register" pins each buffer in place with cudaHostRegister (exact size); "pin_memory"
    allocates from PyTorch's pinned allocator (rounds each buffer up to a power of two). Pinned memory is
    page-locked: no other program can use it while the arena holds it. Registered buffers are unregistered by
    `release()` or, at the latest, when the arena is garbage collected.
    """

    def __init__(self, pin: str) -> None:
        self.pin = pin
        self.buffers: list[torch.Tensor] = []
        self._registered: list[torch.Tensor] = []
        self._finalizer = weakref.finalize(self, _unregister, self._registered)
        self._finalizer.atexit = False  # the process exit frees page-locked memory anyway

    def allocate(self, nbytes: int) -> torch.Tensor:
        if not self._finalizer.alive:
            raise RuntimeError("block swap: the host arena was released; enable block swap again")
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin == "pin_memory")
        if self.pin == "register":
            error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
            if int(error) != 0:
                raise RuntimeError(f"block swap: cudaHostRegister of {nbytes / 1e9:.2f} GB failed ({error}); raise "
                                   f"the locked-memory limit (ulimit -l) or do without pinned memory (pin='none')")
            self._registered.append(buffer)
        self.buffers.append(buffer)
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() for buffer in self.buffers)

    def holds(self, tensor: torch.Tensor) -> bool:
        """True when `tensor`'s data lies in one of the arena's buffers."""
        pointer = tensor.data_ptr()
        return any(b.data_ptr() <= pointer < b.data_ptr() + b.numel() for b in self.buffers)

    def release(self) -> None:
        """Unpin the registered buffers now (idempotent); the data stays readable."""
        self._finalizer()


def _host_pin(pin: str, device: torch.device) -> str:
    """Pinning only serves copies to a CUDA device: for any other device the arena stays pageable."""
    return pin if device.type == "cuda" else "none"


class BlockSwapper:
    """Streams the swapped blocks of a `SwapPlan` between a CPU arena and device slots (see the module docs)."""

    def __init__(self, blocks: Iterable[nn.Module], plan: SwapPlan, device: str | torch.device,
                 pin: str = "none") -> None:
        self.blocks, self.plan = list(blocks), plan
        if len(self.blocks) != plan.num_blocks:
            raise ValueError(f"the plan is for {plan.num_blocks} blocks but the model has {len(self.blocks)}")
        if pin not in PIN_MODES:
            raise ValueError(f"pin must be one of {', '.join(PIN_MODES)}, got {pin!r}")
        self.device = canonical_device(device)
        self.cuda = self.device.type == "cuda"
        self.pin = _host_pin(pin, self.device)
        self.direction: Direction = "forward"
        self.wrap = False
        self.on_device: dict[int, int] = {}  # swapped block -> slot
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._layouts: dict[int, _BlockLayout] = {}
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: dict[int, torch.cuda.Event] = {}
        self._slot_free: dict[int, torch.cuda.Event] = {}
        self._prepare()

    # -- setup ----------------------------------------------------------------------------------------------

    def _frozen_tensors(self, block: nn.Module) -> list[torch.Tensor]:
        seen: set[int] = set()
        out = []
        for tensor in [*block.parameters(), *block.buffers()]:
            if id(tensor) in seen or tensor is None:
                continue
            seen.add(id(tensor))
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                tensor.data = tensor.data.to(self.device)  # trainable: stays on the device
            else:
                out.append(tensor)
        return out

    def _prepare(self) -> None:
        for index in self.plan.resident_blocks:
            self.blocks[index].to(self.device)
        self._arena = _HostArena(self.pin)
        for index in self.plan.swapped_blocks:
            self._layouts[index] = self._move_in(self.blocks[index])
        slot_bytes = max((layout.nbytes for layout in self._layouts.values()), default=0)
        if self.plan.blocks_to_swap <= self.plan.slots:
            logger.warning("block swap: %d swapped block(s) fit in the %d device slot(s), so no memory is saved "
                           "(inference keeps them there); swap more blocks", self.plan.blocks_to_swap,
                           self.plan.slots)
        self._slots = [torch.empty(max(slot_bytes, 1), dtype=torch.uint8, device=self.device)
                       for _ in range(self.plan.slots)]
        logger.info("%s; %.2f GB in CPU memory (%s), %d x %.2f GB device slots", self.plan.describe(),
                    self._arena.nbytes / 1e9, f"pin: {self.pin}", self.plan.slots, slot_bytes / 1e9)

    def _move_in(self, block: nn.Module) -> _BlockLayout:
        """Copy the frozen tensors of `block` into a new arena buffer and point them at it; each tensor's former
        memory is freed as soon as it is copied (when nothing else holds it)."""
        tensors = self._frozen_tensors(block)
        offsets, size = [], 0
        for tensor in tensors:
            offsets.append(size)
            size += _aligned(tensor.numel() * tensor.element_size())
        known = {id(t) for t in [*block.parameters(), *block.buffers()]}
        layout = _BlockLayout(tensors, offsets, size, known, self._arena.allocate(size))
        for tensor, off in zip(tensors, offsets):
            master = _byte_view(layout.host, off, tensor)
            master.copy_(tensor.data)
            tensor.data = master
        return layout

    # -- movement -------------------------------------------------------------------------------------------

    def before_block(self, index: int, direction: Direction) -> None:
        """Apply the plan's moves for block `index` and make the compute stream wait until it is resident."""
        moves = self.plan.moves(self.on_device, index, direction, wrap=self.wrap)
        for block in moves.evict:
            self._evict(block)
        for block in moves.fetch:
            self._fetch(block)
        if moves.wait is not None:
            self._adopt_new_tensors(moves.wait)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self._ready[moves.wait])

    def _adopt_new_tensors(self, index: int) -> None:
        """Tensors added to a swapped block after `enable_block_swap` (e.g. unmerged LoRA branches applied for one
        sampling run) are not streamed: they move to the device once and stay there."""
        managed = self._layouts[index].ids
        for tensor in [*self.blocks[index].parameters(), *self.blocks[index].buffers()]:
            if id(tensor) not in managed and not same_device(tensor.device, self.device):
                tensor.data = tensor.data.to(self.device)
                managed.add(id(tensor))
                logger.debug("block swap: block %d gained a %s tensor; it stays on %s", index,
                             list(tensor.shape), self.device)

    def _evict(self, index: int) -> None:
        slot = self.on_device.pop(index)
        layout = self._layouts[index]
        for tensor, off in zip(layout.tensors, layout.offsets):
            tensor.data = _byte_view(layout.host, off, tensor)  # frozen: the CPU copy is still exact
        if self.cuda:  # the slot may be refilled once the compute queued so far (which reads it) is done
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._slot_free[slot] = event

    def _fetch(self, index: int) -> None:
        slot = min(set(range(self.plan.slots)) - set(self.on_device.values()))
        layout = self._layouts[index]
        target = self._slots[slot][: layout.nbytes]
        stream = self._stream  # set exactly when self.cuda
        if stream is not None:
            with torch.cuda.stream(stream):
                if slot in self._slot_free:
                    stream.wait_event(self._slot_free.pop(slot))
                target.copy_(layout.host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                self._ready[index] = event
        else:
            target.copy_(layout.host)
        for tensor, off in zip(layout.tensors, layout.offsets):
            tensor.data = _byte_view(target, off, tensor)
        self.on_device[index] = slot

    def is_resident(self, index: int) -> bool:
        """True when every frozen tensor of block `index` points into device memory of this swapper."""
        if not self.plan.is_swapped(index):
            return True
        if index not in self.on_device:
            return False
        slot = self._slots[self.on_device[index]]
        start, end = slot.data_ptr(), slot.data_ptr() + slot.numel()
        return all(start <= t.data_ptr() < end for t in self._layouts[index].tensors)

    # -- hooks ----------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> BlockSwapper:
        """Install the hooks: a model forward pre-hook (a new pass), a forward pre-hook on every block, a full
        backward pre-hook on every swapped block (resident blocks need nothing in backward)."""
        self._hooks.append(model.register_forward_pre_hook(self._begin_pass))
        for index, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._forward_hook(index)))
            if self.plan.is_swapped(index):
                self._hooks.append(block.register_full_backward_pre_hook(self._backward_hook(index)))
        return self

    def _begin_pass(self, module: nn.Module, args: tuple) -> None:
        self.direction = "forward"
        self.wrap = not torch.is_grad_enabled()  # without autograd no backward follows: prefetch the next pass

    def _forward_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            # during backward, gradient checkpointing re-runs the forward of the block being differentiated
            self.before_block(index, self.direction)
        return hook

    def _backward_hook(self, index: int):
        def hook(module: nn.Module, grad_output: tuple) -> None:
            self.direction = "backward"
            self.before_block(index, "backward")
        return hook

    def remove(self, device: str | torch.device | None = None) -> None:
        """Detach the hooks, free the device slots and unregister the arena's pinned memory (pin="pin_memory"
        buffers are freed with their last tensor). With `device`, every swapped tensor gets its own memory there
        (the model is whole again); without, they stay in the (now pageable) CPU arena, e.g. to discard the model.
        A second call without `device` does nothing."""
        if self._stream is not None:  # pending prefetches write into the slots, queued compute reads them
            self._stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for index in list(self.on_device):
            self._evict(index)
        if device is not None:
            target = torch.device(device)
            for layout in self._layouts.values():
                for tensor in layout.tensors:
                    tensor.data = tensor.data.to(target, copy=True)
        self._slots = []
        self._slot_free.clear()
        self._ready.clear()
        self._arena.release()


def enable_block_swap(model: nn.Module, blocks_to_swap: int, device: str | torch.device, *,
                      prefetch: int = 1, pin: str = "none") -> BlockSwapper | None:
    """Move `model` to `device` except the frozen tensors of its last `blocks_to_swap` blocks, which stream in
    as needed. 0 moves the whole model and returns None. The model must have a `blocks` ModuleList.
    `pin` chooses whether the CPU copy is pinned on CUDA ("none", "register", "pin_memory"; see `_HostArena`):
    pinned copies overlap compute, but page-lock as much RAM as the swapped blocks take."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"block swap needs a model with a `blocks` ModuleList, got {type(model).__name__}")
    if blocks_to_swap == 0:
        model.to(device)
        return None
    plan = SwapPlan(len(blocks), blocks_to_swap, prefetch)
    for child in model.children():
        if child is not blocks:
            child.to(device)
    for tensor in [*model.parameters(recurse=False), *model.buffers(recurse=False)]:
        tensor.data = tensor.data.to(device)
    if isinstance(model, wan_model.WanModel):
        model._rope_cache = {}
    return BlockSwapper(blocks, plan, device, pin).attach(model)


def pin_mode(pinned: bool) -> str:
    """The `pin` of `enable_block_swap` for musubi's `--use_pinned_memory_for_block_swap` (off: pageable)."""
    return "register" if pinned else "none"


def release_block_swap(model: nn.Module) -> None:
    """Detach the swapper a model holds as `block_swapper` (if any) and unpin its CPU memory now, rather than
    whenever the garbage collector gets to it (the swapper and the model's hooks refer to each other)."""
    swapper = getattr(model, "block_swapper", None)
    if isinstance(swapper, BlockSwapper):
        swapper.remove()
        del model.block_swapper


# ----------------------------------------------------------------------------------------------------------------
# Memory estimate and --blocks_to_swap auto
# ----------------------------------------------------------------------------------------------------------------


def video_tokens(cfg: DiTConfig, height: int, width: int, frames: int) -> int:
    """Tokens of one video: latent (1 + (frames-1)/4) x h/s x w/s, patchified by 1x2x2 (32,760 at 480x832x81 with
    the Wan2.1 VAE, s = 8; s = 16 for the Wan2.2 VAE of TI2V-5B: 27,280 at 704x1280x121)."""
    stride = latent_space_stride(cfg)
    pt, ph, pw = cfg.patch_size
    if height % (stride * ph) or width % (stride * pw):
        raise ValueError(f"height and width must be multiples of {stride * ph} for this DiT's VAE, got "
                         f"{height}x{width}")
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1 (1, 5, ..., 81), got {frames}")
    return ((frames - 1) // 4 + 1) // pt * (height // stride // ph) * (width // stride // pw)


def self_attention_phase_bytes(cfg: DiTConfig, tokens: int, batch: int, s: int) -> int:
    """Live bytes in self-attention, per token unless noted: the block input and the modulated input (fp32, 8C)
    + q, k, v and the rotated q (4sC), and then the larger of
    - the float64 rotation of k (pair view 8C, real/imaginary products 16C) for at most one `apply_rope` slice
      (with slicing, the rotated k is allocated up front: +sC per token);
    - the attention call itself once both are rotated: rotated k, the kernel's transposed copies of q, k, v and
      its output (+5sC; measured on the CPU with bf16).
    """
    c = cfg.dim
    slice_tokens = batch * max(1, wan_model.ROPE_CHUNK_ELEMENTS // max(1, batch * c))
    base = tokens * (8 * c + 4 * s * c)
    rotation = min(tokens, slice_tokens) * 24 * c + (tokens * s * c if tokens > slice_tokens else 0)
    return base + max(rotation, tokens * 5 * s * c)


def activation_bytes_per_token(cfg: DiTConfig, dtype: torch.dtype) -> int:
    """Peak live activation bytes per video token inside a block, cross-attention and FFN phases (inference, no
    grad), from our block code; the self-attention phase is `self_attention_phase_bytes`.

    With s = bytes of the compute dtype, C = dim, F = ffn_dim:
    - cross-attention: block input, residual and normed input (fp32, 12C) + the self-attention output and the
      query (2sC; + sC for the text attention output of image models), plus a context-sized term (see
      `estimate_activation_bytes`);
    - FFN: 12C + the self-attention output (sC) + hidden and GELU output (2sF).
    """
    s = torch.empty((), dtype=dtype).element_size()
    c, f = cfg.dim, cfg.ffn_dim
    cross = 12 * c + (3 if cfg.has_image_input else 2) * s * c
    return max(cross, 12 * c + s * c + 2 * s * f)


def estimate_activation_bytes(cfg: DiTConfig, height: int, width: int, frames: int, *, batch: int = 1,
                              dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak activation bytes of one DiT forward without autograd (validated against CPU measurements in tests).

    peak = persistent + max over phases, with L = batch x video tokens, Lt = text_len (512), Li = image tokens:
    - persistent: the float64 RoPE cos/sin table (8·head_dim per token),
      the embedded context (s·(Lt + Li)·C per sample) and the time embedding/modulation (52C per sample);
    - phases: `self_attention_phase_bytes`; L x `activation_bytes_per_token` for the FFN; for cross-attention the
      per-token part plus the key projection of the longer context part and its RMSNorm in fp32
      ((2s + 8)·max(Lt, Li)·C per sample);
    - image models also peak while embedding the CLIP tokens (only at small token counts).
    """
    s = torch.empty((), dtype=dtype).element_size()
    c = cfg.dim
    tokens = batch * video_tokens(cfg, height, width, frames)
    image = cfg.image_tokens if cfg.has_image_input else 0
    persistent = tokens * 8 * cfg.head_dim + batch * ((cfg.text_len + image) * c * s + 52 * c)
    per_token = activation_bytes_per_token(cfg, dtype)
    cross_context = batch * (2 * s + 8) * max(cfg.text_len, image) * c
    cross = tokens * (12 * c + (3 if image else 2) * s * c) + cross_context
    blocks = persistent + max(tokens * per_token, cross, self_attention_phase_bytes(cfg, tokens, batch, s))
    if not image:
        return blocks
    # image models embed the CLIP tokens before the blocks: fp32 LayerNorm output + two dtype-sized activations
    embed = (tokens * (s * c + 8 * cfg.head_dim + 4 * c)
             + batch * (cfg.text_len * (c * s + 4 * cfg.text_dim) + 28 * c + image * cfg.clip_dim * (4 + 2 * s)))
    return max(blocks, embed)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _module_bytes(module: nn.Module) -> int:
    return _nbytes([*module.parameters(), *module.buffers()])


def dequant_workspace_bytes(model: nn.Module) -> int:
    """Transient bytes of the largest fp8 weight being upcast (fp32 product + compute-dtype copy)."""
    sizes = [m.weight.numel() * (4 + torch.empty((), dtype=m.compute_dtype).element_size())
             for m in model.modules() if isinstance(m, FP8Linear) and not m.fast]
    return max(sizes, default=0)


_CONTEXT_ROWS = {"cross_attn.k": "text", "cross_attn.v": "text", "cross_attn.k_img": "image",
                 "cross_attn.v_img": "image"}


def fp8_fast_workspace_bytes(model: wan_model.WanModel, height: int, width: int, frames: int, *,
                             batch: int = 1) -> int:
    """Transient bytes of the largest fp8 matmul of an fp8_fast model at this video size
    (`ops.scaled_mm_workspace_bytes`: the quantised activations, their scales and the fp32 slice temporaries).

    A layer's rows are the video tokens, or the text / image context length for the cross-attention keys and
    values. Where the device has no fp8 matmul (`ops.fast_matmul_fallback`), the layer upcasts its weight
    instead, so each layer counts the larger of the two."""
    cfg = model.config
    rows = {"video": batch * video_tokens(cfg, height, width, frames), "text": batch * cfg.text_len,
            "image": batch * (cfg.image_tokens if cfg.has_image_input else 0)}
    sizes = [0]
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear) and module.fast:
            kind = next((k for suffix, k in _CONTEXT_ROWS.items() if name.endswith(suffix)), "video")
            upcast = module.weight.numel() * (4 + torch.empty((), dtype=module.compute_dtype).element_size())
            sizes.append(max(upcast, scaled_mm_workspace_bytes(rows[kind], module.in_features, module.out_features,
                                                               module.compute_dtype)))
    return max(sizes)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak device bytes of one DiT forward under block swap."""

    blocks_to_swap: int
    weight_bytes: int
    activation_bytes: int
    workspace_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.workspace_bytes

    def describe(self) -> str:
        return (f"swap {self.blocks_to_swap}: weights {self.weight_bytes / GIB:.2f} + activations "
                f"{self.activation_bytes / GIB:.2f} + workspace {self.workspace_bytes / GIB:.2f} = "
                f"{self.total / GIB:.2f} GiB")


def resident_weight_bytes(model: wan_model.WanModel, blocks_to_swap: int, prefetch: int = 1) -> int:
    """Device bytes of the weights under block swap: everything but the swapped blocks, plus the slots (and the
    trainable parameters of swapped blocks, which never move)."""
    blocks = model.blocks
    total = _module_bytes(model)
    if blocks_to_swap == 0:
        return total
    plan = SwapPlan(len(blocks), blocks_to_swap, prefetch)
    swapped = [_nbytes(t for t in [*blocks[i].parameters(), *blocks[i].buffers()]
                       if not (isinstance(t, nn.Parameter) and t.requires_grad)) for i in plan.swapped_blocks]
    return total - sum(swapped) + plan.slots * max(swapped)


def estimate_peak_bytes(model: wan_model.WanModel, height: int, width: int, frames: int, blocks_to_swap: int, *,
                        batch: int = 1, prefetch: int = 1) -> MemoryEstimate:
    """Weights under swap + activations of one forward + the largest per-layer transient (an fp8 weight being
    upcast, or the activations of an fp8 matmul being quantised); layers run one at a time, so the largest counts."""
    cfg = model.config
    fast = fp8_fast_workspace_bytes(model, height, width, frames, batch=batch)
    workspace = max(dequant_workspace_bytes(model), fast)
    return MemoryEstimate(blocks_to_swap, resident_weight_bytes(model, blocks_to_swap, prefetch),
                          estimate_activation_bytes(cfg, height, width, frames, batch=batch, dtype=model.dtype),
                          workspace)


def _budget(model: nn.Module, device: torch.device) -> int:
    """Free device memory plus what this model already occupies there (it is part of the estimate)."""
    device = canonical_device(device)
    free, _ = torch.cuda.mem_get_info(device)
    on_device = _nbytes(t for t in [*model.parameters(), *model.buffers()] if same_device(t.device, device))
    return free + on_device


def choose_blocks_to_swap(model: wan_model.WanModel, height: int, width: int, frames: int, *,
                          device: str | torch.device = "cuda", free_bytes: int | None = None,
                          margin_bytes: int = GIB, batch: int = 1, prefetch: int = 1) -> MemoryEstimate:
    """`--blocks_to_swap auto`: the smallest swap count whose estimated peak fits the free memory minus a
    margin (CUDA workspaces, allocator fragmentation). Logs the plan; raises a RuntimeError when even the
    maximum swap does not fit."""
    budget = (free_bytes if free_bytes is not None else _budget(model, torch.device(device))) - margin_bytes
    num_blocks = len(model.blocks)
    for count in range(num_blocks):
        estimate = estimate_peak_bytes(model, height, width, frames, count, batch=batch, prefetch=prefetch)
        if estimate.total <= budget:
            logger.info("blocks_to_swap auto at %dx%dx%d: %s (budget %.2f GiB after a %.2f GiB margin)", height,
                        width, frames, estimate.describe(), budget / GIB, margin_bytes / GIB)
            return estimate
    raise RuntimeError(f"blocks_to_swap auto: even swapping {num_blocks - 1} blocks needs about "
                       f"{estimate.total / GIB:.2f} GiB ({estimate.describe()}) at {height}x{width}x{frames}, but "
                       f"only {budget / GIB:.2f} GiB are free after a {margin_bytes / GIB:.2f} GiB margin; use fp8, "
                       f"a smaller size or fewer frames")


# ----------------------------------------------------------------------------------------------------------------
# Measuring (validates the estimate on the CPU)
# ----------------------------------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active, counted until their last tensor dies.

    Tensors that existed before (weights, inputs) are not counted; kernel-internal scratch is not visible.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, tuple[int, set[int]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self._live:
            if key in inputs:
                return  # a view of (or in-place op on) a tensor from before
            self._live[key] = (storage.nbytes(), set())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        ids = self._live[key][1]
        if id(tensor) not in ids:
            ids.add(id(tensor))
            weakref.finalize(tensor, self._release, key, id(tensor))

    def _release(self, key: int, tensor_id: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1].discard(tensor_id)
        if not entry[1]:
            del self._live[key]
            self.current -= entry[0]

