"""The CPU training benchmark runs (tiny config, in process) and reports sane numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_train_cpu  # noqa: E402


def test_smoke_rows() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = bench_train_cpu.run_case("tiny", False, (32, 32, 1), 1, 4)
        checkpointed = bench_train_cpu.run_case("tiny", True, (32, 32, 1), 1, 4)
    finally:
        torch.set_num_threads(threads)
    # 2 blocks x (8 attention Linears 64->64, ffn.0 64->128, ffn.2 128->64), rank 4: r·(in + out) each
    assert plain["tokens"] == 4 and plain["lora_params"] == 2 * (8 * 4 * 128 + 2 * 4 * 192)
    assert plain["step_s"] > 0 and plain["peak_live_mb"] > 0 and plain["peak_rss_mb"] > 0
    assert checkpointed["peak_live_mb"] < plain["peak_live_mb"]  # checkpointing keeps fewer activations
