"""DDP on the CPU: two gloo processes train the tiny DiT; both end with identical LoRA weights, equal (to float
rounding) to one process whose batches are the two ranks' batches combined.

The ranks are spawned (fresh interpreters importing this module), so they do not inherit what earlier tests did in
the pytest process: forked children cannot run autograd once the parent has started autograd's worker threads."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.tiny_training import memory_source, tiny_dit_file, train_args
from training.dataset.batches import MemorySource, default_epoch_batches
from training.train import train

WORLD = 2
# SGD keeps float rounding differences (mean of two per-rank means vs one mean) as small as they are; Adam's
# normalisation would blow them up for near-zero gradient entries.
FLAGS = ("--max_train_steps", "4", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5",
         "--timestep_sampling", "sigmoid", "--lr_scheduler", "linear", "--lr_warmup_steps", "1",
         "--optimizer_type", "SGD", "--optimizer_args", "momentum=0.9", "--learning_rate", "0.05")


class CombinedSource(MemorySource):
    """Batch m of an epoch = the batches that ranks 0 and 1 of a DDP run get at micro-step m, concatenated."""

    def __init__(self, per_rank: MemorySource) -> None:
        super().__init__(per_rank.samples, batch_size=WORLD * per_rank.settings.batch_size)
        self.per_rank = per_rank

    def epoch_batches(self, items, seed: int, epoch: int):
        batches = default_epoch_batches(self.per_rank, items, seed, epoch)
        return [batches[m * WORLD] + batches[m * WORLD + 1] for m in range(len(batches) // WORLD)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, dit: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    seen = []
    result = train(train_args(Path(dit), Path(out), *FLAGS), source=memory_source(8, batch_size=1),
                   on_step=lambda step, total, loss: seen.append(torch.distributed.get_world_size()))
    assert seen == [WORLD] * 4
    save_file({k: v.contiguous() for k, v in result.weights.items()}, str(Path(out) / f"rank{rank}.safetensors"))


class _Nested(torch.autograd.Function):
    """Identity whose backward runs another backward `depth` levels deep."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, depth: int) -> torch.Tensor:
        ctx.depth = depth
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.depth:
            with torch.enable_grad():
                _Nested.apply(torch.ones(1, requires_grad=True), ctx.depth - 1).sum().backward()
        return grad, None


def _start_autograd_threads() -> None:
    """Leave the process as an earlier test may: with autograd's worker threads started (any backward on a CUDA
    machine starts them; on the CPU a backward nested deeper than autograd's recursion limit does)."""
    x = torch.ones(1, requires_grad=True)
    _Nested.apply(x, 100).sum().backward()
    assert x.grad is not None


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_combined_batch(tmp_path: Path) -> None:
    _start_autograd_threads()
    dit = tiny_dit_file(tmp_path / "dit.safetensors")
    out = tmp_path / "ddp"
    out.mkdir()
    mp.start_processes(_worker, args=(_free_port(), str(dit), str(out)), nprocs=WORLD, start_method="spawn")
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert sorted(rank0) == sorted(rank1)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert (out / "lora.safetensors").is_file() and not (out / "lora-state").exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(train_args(dit, tmp_path / "single", *FLAGS),
                       source=CombinedSource(memory_source(8, batch_size=1)))
    finally:
        torch.set_num_threads(threads)
    changed = 0
    for key, value in single.weights.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-7)
        changed += int(key.endswith("lora_up.weight") and value.abs().max() > 0)
    assert changed == 20
    per_rank_only = train(train_args(dit, tmp_path / "half", *FLAGS), source=memory_source(8, batch_size=1))
    assert any(not torch.allclose(per_rank_only.weights[k], rank0[k], rtol=1e-3, atol=1e-5) for k in rank0)
