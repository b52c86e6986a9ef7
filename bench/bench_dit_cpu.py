"""DiT benchmarks on the CPU against diffusers on the same weights (issue: model stack).

1. forward: ours vs diffusers' WanTransformer3DModel in the same process, fp32, best of N -> time ratio (goal
   <= 1.0), for two 2-layer configs of the real widths:
   - 1.3B-wide (dim 1536, 12 heads, ffn 8960, in/out 16), one timestep per sample;
   - 5B-wide (Wan2.2 TI2V-5B: dim 3072, 24 heads, ffn 14336, in/out 48) with per-token timesteps [B, L] as its
     image-to-video uses them (the first latent frame's tokens at t = 0, the others at t = 700);
   each on 4 latent frames of 30 x 52 (1,560 video tokens) + 20 text tokens (diffusers gets them zero-padded to
   512, as its pipeline does).
2. load: a full-size random bf16 1.3B checkpoint written to disk (~2.8 GB); each loader runs in a fresh
   subprocess and reports its peak RSS (VmHWM) and wall time: ours `load_dit` vs diffusers `from_single_file`.

    python bench/bench_dit_cpu.py [--quick] [--forward 1.3B 5B] [--skip-load] [--threads N] [--json out.json]
    python bench/bench_dit_cpu.py --tiny    # tiny configs of both kinds, no load case: every path in seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from random_dit import random_dit  # noqa: E402

from wan_core.loading.convert import DIT_DIFFUSERS, rename  # noqa: E402
from wan_core.models.config import TASKS, WAN22_TI2V_5B_DIT, DiTConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ForwardCase:
    label: str
    cfg: DiTConfig
    per_token_t: bool  # Wan2.2 TI2V: t of shape [B, L], 0 on the first latent frame


WIDE = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2)
WIDE_5B = dataclasses.replace(WAN22_TI2V_5B_DIT, num_layers=2)
FORWARD = {"1.3B": ForwardCase("1.3B-wide 2-layer", WIDE, per_token_t=False),
           "5B": ForwardCase("5B-wide 2-layer, per-token t", WIDE_5B, per_token_t=True)}
_TINY = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2)
TINY_FORWARD = {"1.3B": ForwardCase("tiny (1.3B kind)", _TINY, per_token_t=False),
                "5B": ForwardCase("tiny (5B kind), per-token t", dataclasses.replace(_TINY, in_dim=48, out_dim=48),
                                  per_token_t=True)}
LATENT_HW = (30, 52)
TINY_LATENT_HW = (4, 6)


def diffusers_from(ours: torch.nn.Module, cfg: DiTConfig):
    from diffusers import WanTransformer3DModel  # the reference: optional, seconds to import

    ref = WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim,
                                freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers)
    ref.load_state_dict(rename(ours.state_dict(), DIT_DIFFUSERS, to_ours=False, what="bench"))
    return ref.eval()


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _timesteps(case: ForwardCase, frames: int, tokens: int) -> torch.Tensor:
    if not case.per_token_t:
        return torch.tensor([700.0])
    t = torch.full((1, tokens), 700.0)
    t[:, : tokens // frames] = 0.0  # the first latent frame holds the encoded start image
    return t


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def bench_forward(case: ForwardCase, repeats: int, frames: int, latent_hw: tuple[int, int] = LATENT_HW,
                  float64: bool = False) -> dict:
    """Time ours and diffusers on the same weights and inputs; with `float64`, also compare both with diffusers run
    in float64 (its own float32 error is the scale the two float32 results may differ by)."""
    cfg = case.cfg
    ours = random_dit(cfg, dtype=torch.float32)
    ref = diffusers_from(ours, cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, frames, *latent_hw, generator=gen)
    context = torch.randn(1, 20, cfg.text_dim, generator=gen)
    padded = torch.cat([context, context.new_zeros(1, cfg.text_len - 20, cfg.text_dim)], dim=1)
    _, ph, pw = cfg.patch_size
    tokens = frames * (latent_hw[0] // ph) * (latent_hw[1] // pw)
    t = _timesteps(case, frames, tokens)
    with torch.no_grad():
        ours_s = _best(lambda: ours(x, t, [context[0]]), repeats)
        ref_s = _best(lambda: ref(x, t, padded, return_dict=False), repeats)
        a, b = ours(x, t, [context[0]]), ref(x, t, padded, return_dict=False)[0]
    result = {"case": case.label, "tokens": tokens, "ours_s": ours_s, "diffusers_s": ref_s, "ratio": ours_s / ref_s,
              "max_abs_diff": (a - b).abs().max().item(), "rel_diff": _rel(a, b)}
    if float64:
        with torch.no_grad():
            want = copy.deepcopy(ref).double()(x.double(), t.double(), padded.double(), return_dict=False)[0]
        result.update(ours_err_vs_float64=_rel(a, want), ref_err_vs_float64=_rel(b, want))
    return result


CHILD = r"""
import json, os, sys, time, torch
sys.path.insert(0, {root!r})
which, path, cfg_dir = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
if which == "ours":
    from wan_core import load_dit
    model = load_dit(path)
else:
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel.from_single_file(path, config=cfg_dir, torch_dtype=torch.bfloat16)
loaded = time.perf_counter() - start
touched = sum(float(p.float().sum()) * 0 + p.numel() for p in model.parameters())  # read every weight once
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({{"seconds": loaded, "vmhwm_kb": int(status["VmHWM"].split()[0]),
                  "vmrss_kb": int(status["VmRSS"].split()[0]), "params": touched}}))
"""


def bench_load(folder: Path) -> dict:
    cfg = TASKS["t2v-1.3B"].dit
    path = folder / "wan2.1_t2v_1.3B_random_bf16.safetensors"
    if not path.exists():
        model = random_dit(cfg, dtype=torch.bfloat16)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        del model
    cfg_dir = folder / "diffusers_config"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
        "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
        "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6, "rope_max_seq_len": 1024}))
    out = {"file_bytes": path.stat().st_size}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for which in ("ours", "diffusers"):
        result = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), which, str(path), str(cfg_dir)],
                                capture_output=True, text=True, env=env, check=True)
        out[which] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 2 latent frames")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of both kinds, no load case (seconds)")
    parser.add_argument("--forward", nargs="*", choices=tuple(FORWARD), default=list(FORWARD),
                        help="forward cases to run (default: all; none: only the load case)")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--folder", default=None, help="where to write the 2.8 GB checkpoint (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = TINY_FORWARD if args.tiny else FORWARD
    repeats, frames = (1, 2) if args.quick or args.tiny else (3 if "5B" in args.forward else 5, 4)
    results: dict = {"forward": []}
    for name in args.forward:
        fwd = bench_forward(cases[name], repeats, frames, TINY_LATENT_HW if args.tiny else LATENT_HW,
                            float64=args.tiny)
        results["forward"].append(fwd)
        print(f"forward, {fwd['tokens']} video tokens, {fwd['case']} fp32: ours {fwd['ours_s'] * 1000:.0f} ms, "
              f"diffusers {fwd['diffusers_s'] * 1000:.0f} ms, ratio {fwd['ratio']:.3f} (goal <= 1.0), "
              f"max |diff| {fwd['max_abs_diff']:.2e} (rel. {fwd['rel_diff']:.2e}), best of {repeats}", flush=True)
    if not (args.skip_load or args.tiny):
        results["load"] = _load_report(args.folder)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _load_report(folder: str | None) -> dict:
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        load = bench_load(Path(tmp))
    size = load["file_bytes"]
    for which in ("ours", "diffusers"):
        r = load[which]
        print(f"load {which:9s}: {r['seconds']:.2f} s, peak RSS {r['vmhwm_kb'] * 1024 / 1e9:.2f} GB = "
              f"{r['vmhwm_kb'] * 1024 / size:.2f} x file size ({size / 1e9:.2f} GB)")
    print(f"load time ratio ours/diffusers: {load['ours']['seconds'] / load['diffusers']['seconds']:.2f}")
    return load


if __name__ == "__main__":
    raise SystemExit(main())
