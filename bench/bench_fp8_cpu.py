"""fp8 on the CPU: resident weight bytes and output error of each fp8 mode on a full-size 1.3B DiT.

    python bench/bench_fp8_cpu.py [--smoke] [--no-fp32] [--json out.json]

Builds the real T2V-1.3B architecture (1.42 B parameters) with random weights in bf16 (bench/random_dit.py, the
official initialisation), runs one forward on 16 video tokens (latent 1x8x8) and 40 text tokens (padded to 512 by
the model), and compares every fp8 variant with the bf16 model on the same weights and inputs:

- ours: `fp8` (plain cast), `fp8_scaled` (block-wise, 64 columns), `fp8_scaled_channel`, `fp8_scaled_tensor`;
  targets are the Linear weights inside the blocks (wan_core/runtime/fp8.py);
- two alternatives for the plain mode, emulated by rounding the weights through float8_e4m3fn (what upcasting
  stored fp8 computes): musubi's cast of every parameter (norms, modulation, embeddings, head included) and
  ComfyUI's fp8 weights for every Linear/conv (norms and biases kept).

Reported: bytes of all parameters and buffers (goal: fp8 <= 0.55 x bf16), relative L2 error of the output
||out - ref|| / ||ref|| and max |out - ref| / max |ref| (goal: fp8_scaled clearly below fp8). The noise floor of bf16
itself (bf16 vs fp32 compute on the same bf16 weights) is printed for scale unless --no-fp32.
--smoke runs a tiny model in a second (used by the test suite).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from random_dit import random_dit, weight_bytes  # noqa: E402

from wan_core.models.config import TASKS, DiTConfig  # noqa: E402
from wan_core.models.ops import FP8_E4M3, Fp32Linear  # noqa: E402
from wan_core.runtime.fp8 import apply_fp8  # noqa: E402

SMOKE = DiTConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=3, text_dim=64)
OURS = ("fp8", "fp8_scaled", "fp8_scaled_channel", "fp8_scaled_tensor")


def _inputs(cfg: DiTConfig):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, cfg.in_dim, 1, 8, 8, generator=gen)
    context = [torch.randn(40, cfg.text_dim, generator=gen) * 0.5]
    return latents, torch.tensor([500.0]), context


def _forward(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).float()


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"rel_l2": ((out - ref).norm() / ref.norm()).item(),
            "rel_max": ((out - ref).abs().max() / ref.abs().max()).item()}


def _round_through_fp8_(model: nn.Module, select) -> int:
    """Round the selected parameters through e4m3fn in place; returns the fp8 bytes saved vs their dtype."""
    saved = 0
    for name, param in model.named_parameters():
        if select(name, param):
            fmax = torch.finfo(FP8_E4M3).max
            param.data = param.data.float().clamp(-fmax, fmax).to(FP8_E4M3).to(param.dtype)
            saved += param.numel() * (param.element_size() - 1)
    return saved


def _linear_or_conv_weight(model: nn.Module):
    weights = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, Fp32Linear, nn.Conv3d))}
    return lambda name, param: name in weights


EMULATED = {
    "fp8 cast-all (musubi --fp8, emulated)": lambda model: (lambda name, param: param.is_floating_point()),
    "fp8 all Linear/conv (ComfyUI, emulated)": _linear_or_conv_weight,
}


def run(cfg: DiTConfig, fp32_floor: bool) -> list[dict]:
    t0 = time.perf_counter()
    model = random_dit(cfg, torch.bfloat16, "cpu", seed=0)
    inputs = _inputs(cfg)
    ref = _forward(model, inputs)
    base = weight_bytes(model)
    rows = [{"variant": "bf16", "bytes": base, "ratio": 1.0, "rel_l2": 0.0, "rel_max": 0.0,
             "seconds": time.perf_counter() - t0}]
    if fp32_floor:
        t0 = time.perf_counter()
        full = copy.deepcopy(model).float()
        rows.append({"variant": "bf16 noise floor (bf16 vs fp32 compute)", "bytes": None, "ratio": None,
                     **_errors(ref, _forward(full, inputs)), "seconds": time.perf_counter() - t0})
        del full
        gc.collect()
    for mode in OURS:
        t0 = time.perf_counter()
        quantised = apply_fp8(copy.deepcopy(model), mode)
        nbytes = weight_bytes(quantised)
        rows.append({"variant": mode, "bytes": nbytes, "ratio": nbytes / base,
                     **_errors(_forward(quantised, inputs), ref), "seconds": time.perf_counter() - t0})
        del quantised
        gc.collect()
    for name, selector in EMULATED.items():
        t0 = time.perf_counter()
        rounded = copy.deepcopy(model)
        nbytes = base - _round_through_fp8_(rounded, selector(rounded))
        rows.append({"variant": name, "bytes": nbytes, "ratio": nbytes / base,
                     **_errors(_forward(rounded, inputs), ref), "seconds": time.perf_counter() - t0})
        del rounded
        gc.collect()
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"{'variant':42s} {'weights GB':>10s} {'x bf16':>7s} {'rel L2 err':>11s} {'rel max err':>11s} {'s':>6s}"]
    for r in rows:
        size = "-" if r["bytes"] is None else f"{r['bytes'] / 1e9:.3f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"{r['variant']:42s} {size:>10s} {ratio:>7s} {r['rel_l2']:11.2e} {r['rel_max']:11.2e} "
                     f"{r['seconds']:6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model (seconds), for the test suite")
    parser.add_argument("--no-fp32", action="store_true", help="skip the bf16-vs-fp32 noise floor (saves 5.7 GB)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 with --smoke)")
    args = parser.parse_args(argv)
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    cfg = SMOKE if args.smoke else TASKS["t2v-1.3B"].dit
    print(f"DiT dim {cfg.dim}, {cfg.num_layers} blocks, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = run(cfg, fp32_floor=not args.no_fp32)
    print(_table(rows))
    by_name = {r["variant"]: r for r in rows}
    fp8, scaled = by_name["fp8"], by_name["fp8_scaled"]
    print(f"goal fp8 <= 0.55 x bf16: fp8 {fp8['ratio']:.3f}, fp8_scaled {scaled['ratio']:.3f}; "
          f"goal fp8_scaled error < fp8 error: {scaled['rel_l2']:.2e} vs {fp8['rel_l2']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
