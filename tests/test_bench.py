"""The benchmark scripts' CPU smoke modes run end to end (the GPU numbers come from bench/bench_gpu.py on a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import bench_fp8_cpu, bench_gpu


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_gpu_bench_smoke_mode_runs_every_case(tmp_path, capsys) -> None:
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--smoke", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    ran = ["bf16 sdpa", "bf16 sdpa compile", "fp8", "fp8_scaled", "bf16 swap 2", "bf16 swap 3",
           "diffusers (reference)", "14B 64x96x5 fp8_scaled+swap", "TI2V-5B 64x96x5 bf16",
           "A14B 64x96x5 fp8_scaled+swap"]
    assert all(rows[name]["seconds_per_step"] > 0 for name in ran), rows
    assert rows["TI2V-5B 64x96x5 bf16"]["note"] == "per-token t (first latent frame at 0), 12 tokens"
    assert rows["A14B 64x96x5 fp8_scaled+swap"]["note"].startswith("2 experts, blocks_to_swap 3 each")
    assert rows["fp8_fast"]["note"].startswith("skipped")
    for name in ("bf16 sdpa compile", "bf16 swap 2", "bf16 swap 3"):
        assert rows[name]["diff_vs_bf16"] == 0.0, name  # compile and block swap change nothing
    assert 0 < rows["diffusers (reference)"]["diff_vs_bf16"] < 2e-2  # bf16 vs an independent implementation
    assert 0 < rows["fp8_scaled"]["diff_vs_bf16"] < 2e-2
    assert "output rel. L2 difference to bf16 sdpa" in text


@pytest.mark.slow
def test_fp8_cpu_bench_smoke_mode(tmp_path, capsys) -> None:
    out = tmp_path / "fp8.json"
    assert bench_fp8_cpu.main(["--smoke", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(bench_fp8_cpu.OURS) <= set(rows) and rows["bf16"]["ratio"] == 1.0
    assert all(0 < rows[m]["rel_l2"] < 0.05 and rows[m]["ratio"] < 0.7 for m in bench_fp8_cpu.OURS)
    assert "goal fp8 <= 0.55" in capsys.readouterr().out
