"""The Wan2.2 CPU benchmarks run end to end in their tiny modes, so they cannot rot: the VAE decode memory / time
benchmark against diffusers' AutoencoderKLWan (z 48, patch size 2, residual blocks) and the DiT forward against
WanTransformer3DModel with per-token timesteps. Both compare ours with diffusers on the same weights; the results
must agree within float32 rounding (diffusers' own float32-vs-float64 error times the suite's margin), so a bench
that fed the two sides different weights, latents or timesteps fails here."""

from __future__ import annotations

import json

import pytest
import torch

from bench import bench_dit_cpu, bench_vae
from tests.numerics import FLOOR, MARGIN


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _within_float32(result: dict) -> bool:
    return result["ours_err_vs_float64"] <= MARGIN * result["ref_err_vs_float64"] + FLOOR


@pytest.mark.slow
def test_vae_bench_tiny_wan22(tmp_path, capsys) -> None:
    out = tmp_path / "vae.json"
    assert bench_vae.main(["--model", "wan2.2", "--tiny", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert sorted((r["impl"], r["frames"]) for r in rows) == [("diffusers", 5), ("diffusers", 13), ("ours", 5),
                                                              ("ours", 13)]
    for r in rows:  # 2x2 unpatchified RGB frames at the requested size, and a measured peak
        assert r["out_shape"] == [1, 3, r["frames"], 32, 32], r
        assert r["peak_mib"] >= r["rss_before_mib"] > 0 and r["seconds"] > 0, r
    assert _within_float32(result["timing"]), result["timing"]
    summary = result["summary"]
    assert summary["time_ratio"] > 0 and summary["ours_peak_ratio"] > 0
    assert summary["peak_ratio_ours_over_diffusers_13"] > 0 and summary["working_set_ratio_ours_over_diffusers_13"] > 0
    text = capsys.readouterr().out
    assert "Wan2.2 (tiny config) VAE decode - dim 8, decoder 12, z 48, patch 2" in text
    assert "ours: peak RSS 13 / 5 frames" in text


def test_vae_bench_refuses_a_size_off_the_stride(capsys) -> None:
    with pytest.raises(SystemExit):
        bench_vae.main(["--model", "wan2.2", "--size", "40"])
    err = capsys.readouterr().err
    assert "--size must be a positive multiple of 16 (the Wan2.2 VAE's pixel stride), got 40" in err


@pytest.mark.slow
def test_dit_bench_tiny_both_kinds(tmp_path, capsys) -> None:
    out = tmp_path / "dit.json"
    assert bench_dit_cpu.main(["--tiny", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "load" not in result  # --tiny never writes the 2.8 GB checkpoint
    rows = {r["case"]: r for r in result["forward"]}
    assert set(rows) == {"tiny (1.3B kind)", "tiny (5B kind), per-token t"}
    for r in rows.values():  # 2 latent frames of 4 x 6, patchified 1x2x2
        assert r["tokens"] == 12 and r["ours_s"] > 0 and r["diffusers_s"] > 0, r
        assert _within_float32(r), r
    assert "5B kind), per-token t fp32: ours" in capsys.readouterr().out


def test_dit_bench_5b_case_is_the_ti2v_width_with_two_layers() -> None:
    case = bench_dit_cpu.FORWARD["5B"]
    cfg = case.cfg
    assert case.per_token_t and (cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.num_layers) == (3072, 24, 14336, 2)
    assert (cfg.in_dim, cfg.out_dim) == (48, 48)
    t = bench_dit_cpu._timesteps(case, frames=4, tokens=8)
    assert t.tolist() == [[0.0, 0.0, 700.0, 700.0, 700.0, 700.0, 700.0, 700.0]]
