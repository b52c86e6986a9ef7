"""DiT benchmarks on the CPU against diffusers on the same weights (issue: model stack).

1. forward: a 1.3B-wide config (dim 1536, 12 heads, ffn 8960, 2 layers, ~1,560 video tokens + 512 text tokens),
   ours vs diffusers' WanTransformer3DModel in the same process, fp32, best of N -> time ratio (goal <= 1.0).
2. load: a full-size random bf16 1.3B checkpoint written to disk (~2.8 GB); each loader runs in a fresh
   subprocess and reports its peak RSS (VmHWM) and wall time: ours `load_dit` vs diffusers `from_single_file`.

    python bench/bench_dit_cpu.py [--quick] [--skip-load] [--threads N]
"""

from __future__ import annotations

import argparse
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
from wan_core.models.config import TASKS, DiTConfig  # noqa: E402

WIDE = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2)


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


def bench_forward(repeats: int, frames: int) -> dict:
    ours = random_dit(WIDE, dtype=torch.float32)
    ref = diffusers_from(ours, WIDE)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, frames, 30, 52, generator=gen)
    context = torch.randn(1, 20, 4096, generator=gen)
    padded = torch.cat([context, context.new_zeros(1, 492, 4096)], dim=1)
    t = torch.tensor([700.0])
    with torch.no_grad():
        ours_s = _best(lambda: ours(x, t, [context[0]]), repeats)
        ref_s = _best(lambda: ref(x, t, padded, return_dict=False), repeats)
        diff = (ours(x, t, [context[0]]) - ref(x, t, padded, return_dict=False)[0]).abs().max().item()
    tokens = frames * 15 * 26
    return {"tokens": tokens, "ours_s": ours_s, "diffusers_s": ref_s, "ratio": ours_s / ref_s, "max_abs_diff": diff}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 2 latent frames")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--folder", default=None, help="where to write the 2.8 GB checkpoint (default: a temp dir)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fwd = bench_forward(repeats=2 if args.quick else 5, frames=2 if args.quick else 4)
    print(f"forward, {fwd['tokens']} video tokens, 1.3B-wide 2-layer fp32: ours {fwd['ours_s'] * 1000:.0f} ms, "
          f"diffusers {fwd['diffusers_s'] * 1000:.0f} ms, ratio {fwd['ratio']:.3f} (goal <= 1.0), "
          f"max |diff| {fwd['max_abs_diff']:.2e}")
    if args.skip_load:
        return
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        load = bench_load(Path(tmp))
    size = load["file_bytes"]
    for which in ("ours", "diffusers"):
        r = load[which]
        print(f"load {which:9s}: {r['seconds']:.2f} s, peak RSS {r['vmhwm_kb'] * 1024 / 1e9:.2f} GB = "
              f"{r['vmhwm_kb'] * 1024 / size:.2f} x file size ({size / 1e9:.2f} GB)")
    print(f"load time ratio ours/diffusers: {load['ours']['seconds'] / load['diffusers']['seconds']:.2f}")


if __name__ == "__main__":
    main()
