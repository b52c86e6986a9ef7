"""Wan2.1 VAE decode benchmark: peak resident memory at 17 vs 81 frames, and speed vs diffusers' AutoencoderKLWan.

    python bench/bench_vae.py [--quick] [--size PX] [--threads N]

Uses the real architecture (dim 96, 126.9 M parameters) with random fp32 weights, written once to a temporary
safetensors file and loaded by both implementations (ours through `load_vae`, diffusers through the official ->
diffusers key map), at a small CPU-friendly frame size (64 x 64 px; 32 x 32 with --quick).

Memory: every (implementation, frame count) case runs in a fresh subprocess. After loading and one warm-up decode,
the process trims the heap, resets its peak-RSS mark (`/proc/self/clear_refs` = 5; Linux >= 4.0), decodes, and
reads `VmHWM` from /proc/self/status: the peak resident set of the decode itself, weights included, caught by the
kernel whatever allocated it (torch's CPU allocator, oneDNN scratch, the Python heap). `tracemalloc` would miss
all of it.
Time: one more process builds both models on the same weights and times decoding 17 frames alternately (best of N),
after checking that the two outputs agree.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wan_core.loading.checkpoint import load_state_dict, save_safetensors  # noqa: E402
from wan_core.loading.convert import rename, vae_diffusers_rules  # noqa: E402
from wan_core.models.config import VAEConfig  # noqa: E402
from wan_core.models.vae import VAE_MEAN, VAE_STD, WanVAEModel, latent_frames, load_vae  # noqa: E402

FRAMES = (17, 81)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the baseline RSS is the live memory, not old garbage."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _latents(frames: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, latent_frames(frames), size // 8, size // 8, generator=gen)


def _denormalize(z: torch.Tensor) -> torch.Tensor:
    """The official inverse (z / (1 / std) + mean), so that both sides decode bit-identical inputs."""
    inv_std = 1.0 / torch.tensor(VAE_STD).view(1, -1, 1, 1, 1)
    return z / inv_std + torch.tensor(VAE_MEAN).view(1, -1, 1, 1, 1)


def _diffusers(weights: Path):
    from diffusers import AutoencoderKLWan  # the reference: optional, seconds to import

    with torch.device("meta"):
        model = AutoencoderKLWan()  # the default config is the Wan2.1 VAE
    sd = rename(load_state_dict(weights), vae_diffusers_rules(2, 4), to_ours=False, what="bench VAE")
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


def _decoder(impl: str, weights: Path):
    """A function latents -> video for `impl` (ours takes normalized latents, diffusers raw ones)."""
    if impl == "ours":
        vae = load_vae(weights, tiling=False)
        return vae.decode
    model = _diffusers(weights)

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.decode(_denormalize(z)).sample

    return decode


def child(impl: str, frames: int, size: int, weights: Path) -> dict:
    decode = _decoder(impl, weights)
    decode(_latents(5, size))  # warm-up: one-off allocator / oneDNN setup is not charged to the frame count
    z = _latents(frames, size)
    _trim_heap()
    exact = _reset_peak()
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    out = decode(z)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"impl": impl, "frames": frames, "out_shape": list(out.shape), "seconds": seconds,
            "rss_before_mib": (base or 0) / 1024, "peak_mib": (peak or 0) / 1024, "peak_exact": exact}


def timing(size: int, weights: Path, repeats: int) -> dict:
    ours, ref = _decoder("ours", weights), _decoder("diffusers", weights)
    z = _latents(FRAMES[0], size)
    a, b = ours(z), ref(z)
    best = {"ours": float("inf"), "diffusers": float("inf")}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("diffusers", ref)):
            start = time.perf_counter()
            fn(z)
            best[name] = min(best[name], time.perf_counter() - start)
    return {**best, "max_abs_diff": (a - b).abs().max().item()}


def _run_child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--threads", str(threads), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_weights(folder: Path) -> Path:
    torch.manual_seed(0)
    model = WanVAEModel(VAEConfig())  # PyTorch's default init: random, well-scaled weights of the real shapes
    path = save_safetensors(model.state_dict(), folder / "wan21_vae_random.safetensors")
    del model
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 x 32 px frames and one timing repeat")
    parser.add_argument("--size", type=int, default=None, help="frame height = width in pixels (multiple of 8)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", choices=("ours", "diffusers", "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=17, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.size or (32 if args.quick else 64)
    if args.child == "timing":
        print(json.dumps(timing(size, args.weights, args.repeats)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.frames, size, args.weights)))
        return

    repeats = 1 if args.quick else 2
    with tempfile.TemporaryDirectory(prefix="bench_vae_") as tmp:
        weights = _write_weights(Path(tmp))
        common = ["--size", str(size), "--weights", str(weights)]
        rows = [_run_child(["--child", impl, "--frames", str(f), *common], args.threads)
                for impl in ("ours", "diffusers") for f in FRAMES]
        speed = _run_child(["--child", "timing", "--repeats", str(repeats), *common], args.threads)
    _report(rows, speed, size, args.threads, repeats)


def _report(rows: list[dict], speed: dict, size: int, threads: int, repeats: int) -> None:
    print(f"Wan2.1 VAE decode - real config (dim 96, 126.9 M params, fp32 random weights), {size}x{size} px, "
          f"{threads} torch threads, CPU")
    print(f"{'impl':<10} {'frames':>6} {'seconds':>8} {'RSS before MiB':>15} {'peak MiB':>9} {'peak - before':>14}")
    for r in rows:
        print(f"{r['impl']:<10} {r['frames']:>6} {r['seconds']:>8.1f} {r['rss_before_mib']:>15.0f} "
              f"{r['peak_mib']:>9.0f} {r['peak_mib'] - r['rss_before_mib']:>14.0f}")
    if not all(r["peak_exact"] for r in rows):
        print("note: /proc/self/clear_refs unavailable; peaks are ru_maxrss over the whole process")
    by = {(r["impl"], r["frames"]): r for r in rows}
    for impl in ("ours", "diffusers"):
        lo, hi = by[(impl, FRAMES[0])], by[(impl, FRAMES[1])]
        ratio = hi["peak_mib"] / lo["peak_mib"]
        extra = (hi["peak_mib"] - hi["rss_before_mib"]) / max(lo["peak_mib"] - lo["rss_before_mib"], 1e-9)
        goal = "  (goal <= 1.10: " + ("met" if ratio <= 1.10 else "MISSED") + ")" if impl == "ours" else ""
        print(f"{impl}: peak RSS 81 / 17 frames = {ratio:.3f}{goal}; decode working set 81 / 17 = {extra:.2f}")
    ratio = speed["ours"] / speed["diffusers"]
    print(f"time, same process, {FRAMES[0]} frames, best of {repeats}: ours {speed['ours']:.2f} s, diffusers "
          f"{speed['diffusers']:.2f} s, ratio {ratio:.3f}; max |ours - diffusers| = {speed['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
