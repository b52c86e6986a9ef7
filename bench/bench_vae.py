"""Wan VAE decode benchmark: peak resident memory at few vs many frames, and speed vs diffusers' AutoencoderKLWan.

    python bench/bench_vae.py [--model wan2.1|wan2.2] [--quick] [--size PX] [--threads N] [--json out.json]
    python bench/bench_vae.py --model wan2.2 --tiny   # a tiny config of the same kind: every path in seconds

Models: `wan2.1` is the Wan2.1 VAE (dim 96, 126.9 M parameters; 17 vs 81 frames, 64 x 64 px); `wan2.2` is the
Wan2.2 (TI2V-5B) VAE (dim 160, decoder 256, z 48, 2 x 2 patchify, residual up/down blocks, 704.7 M parameters;
17 vs 121 frames, 64 x 64 px). --quick: 32 x 32 px and one timing repeat. Random fp32 weights of the real shapes
(PyTorch's default init) are written once to a temporary safetensors file and loaded by both implementations:
ours through `load_vae` (architecture detected from the shapes), diffusers through our official -> diffusers key
map.

Memory: every (implementation, frame count) case runs in a fresh subprocess. After loading and one warm-up decode,
the process trims the heap, resets its peak-RSS mark (`/proc/self/clear_refs` = 5; Linux >= 4.0), decodes, and
reads `VmHWM` from /proc/self/status: the peak resident set of the decode itself, weights included, caught by the
kernel whatever allocated it (torch's CPU allocator, oneDNN scratch, the Python heap). `tracemalloc` would miss
all of it.
RSS before the decode differs by how the weights were loaded (diffusers `assign`s the memory-mapped safetensors
tensors, so the encoder weights that decoding never touches stay out of its RSS; ours copies them in): the decode
working set (peak - before) compares the decoders themselves.
Time: one more process builds both models on the same weights and times decoding the smaller frame count
alternately (best of N), after comparing the two outputs (with --tiny also against diffusers run in float64).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wan_core.loading.checkpoint import load_state_dict, save_safetensors  # noqa: E402
from wan_core.loading.convert import rename, vae22_diffusers_rules, vae_diffusers_rules  # noqa: E402
from wan_core.models.config import WAN21_VAE, WAN22_VAE, VAEConfig  # noqa: E402
from wan_core.models.vae import WanVAEModel, latent_frames, latent_stats, load_vae  # noqa: E402


@dataclass(frozen=True)
class Model:
    """One VAE kind: its real config, a tiny config of the same kind (for --tiny) and the frame counts compared."""

    label: str
    config: VAEConfig
    tiny: VAEConfig
    frames: tuple[int, int]
    tiny_frames: tuple[int, int] = (5, 13)


MODELS = {
    "wan2.1": Model("Wan2.1", WAN21_VAE, VAEConfig(dim=8), (17, 81)),
    "wan2.2": Model("Wan2.2", WAN22_VAE, VAEConfig(dim=8, dec_dim=12, z_dim=48, patch_size=2, is_residual=True),
                    (17, 121)),
}


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


def _latents(cfg: VAEConfig, frames: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    cells = size // cfg.space_stride
    return torch.randn(1, cfg.z_dim, latent_frames(frames), cells, cells, generator=gen)


def _denormalize(z: torch.Tensor, cfg: VAEConfig) -> torch.Tensor:
    """The official inverse (z / (1 / std) + mean), so that both sides decode bit-identical inputs."""
    mean, std = latent_stats(cfg.z_dim)
    inv_std = 1.0 / torch.tensor(std, dtype=z.dtype).view(1, -1, 1, 1, 1)
    return z / inv_std + torch.tensor(mean, dtype=z.dtype).view(1, -1, 1, 1, 1)


def _diffusers(cfg: VAEConfig, weights: Path):
    from diffusers import AutoencoderKLWan  # the reference: optional, seconds to import

    mean, std = latent_stats(cfg.z_dim)
    with torch.device("meta"):
        model = AutoencoderKLWan(
            base_dim=cfg.dim, decoder_base_dim=cfg.decoder_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks, attn_scales=list(cfg.attn_scales),
            temperal_downsample=list(cfg.temperal_downsample), dropout=0.0, is_residual=cfg.is_residual,
            in_channels=cfg.pixel_channels, out_channels=cfg.pixel_channels,
            patch_size=cfg.patch_size if cfg.patch_size > 1 else None, scale_factor_spatial=cfg.space_stride,
            latents_mean=list(mean), latents_std=list(std))
    rules = (vae22_diffusers_rules if cfg.is_residual else vae_diffusers_rules)(cfg.num_res_blocks, len(cfg.dim_mult))
    model.load_state_dict(rename(load_state_dict(weights), rules, to_ours=False, what="bench VAE"), assign=True)
    return model.eval().requires_grad_(False)


def _decoder(impl: str, cfg: VAEConfig, weights: Path):
    """A function latents -> video for `impl` (ours takes normalized latents, diffusers raw ones)."""
    if impl == "ours":
        vae = load_vae(weights, tiling=False)
        if vae.config != cfg:
            raise RuntimeError(f"load_vae detected {vae.config}, but the file holds {cfg}")
        return vae.decode
    model = _diffusers(cfg, weights)

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.decode(_denormalize(z, cfg)).sample

    decode.model = model  # for the float64 reference
    return decode


def child(impl: str, cfg: VAEConfig, frames: int, size: int, weights: Path) -> dict:
    decode = _decoder(impl, cfg, weights)
    decode(_latents(cfg, 5, size))  # warm-up: one-off allocator / oneDNN setup is not charged to the frame count
    z = _latents(cfg, frames, size)
    _trim_heap()
    exact = _reset_peak()
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    out = decode(z)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"impl": impl, "frames": frames, "out_shape": list(out.shape), "seconds": seconds,
            "rss_before_mib": (base or 0) / 1024, "peak_mib": (peak or 0) / 1024, "peak_exact": exact}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def timing(cfg: VAEConfig, frames: int, size: int, weights: Path, repeats: int, float64: bool) -> dict:
    ours, ref = _decoder("ours", cfg, weights), _decoder("diffusers", cfg, weights)
    z = _latents(cfg, frames, size)
    a, b = ours(z), ref(z)
    result = {"max_abs_diff": (a - b).abs().max().item(), "rel_diff": _rel(a, b)}
    if float64:  # the reference's own float32 rounding: the scale the two float32 results may differ by
        model64 = copy.deepcopy(ref.model).double()
        with torch.no_grad():
            want = model64.decode(_denormalize(z.double(), cfg)).sample
        result.update(ref_err_vs_float64=_rel(b, want), ours_err_vs_float64=_rel(a, want))
    best = {"ours": float("inf"), "diffusers": float("inf")}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("diffusers", ref)):
            start = time.perf_counter()
            fn(z)
            best[name] = min(best[name], time.perf_counter() - start)
    return {**best, **result}


def _run_child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_weights(cfg: VAEConfig, folder: Path) -> Path:
    torch.manual_seed(0)
    model = WanVAEModel(cfg)  # PyTorch's default init: random, well-scaled weights of the real shapes
    path = save_safetensors(model.state_dict(), folder / "vae_random.safetensors")
    del model
    return path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="wan2.1")
    parser.add_argument("--quick", action="store_true", help="32 x 32 px frames and one timing repeat")
    parser.add_argument("--tiny", action="store_true", help="a tiny config of the same kind, 5 vs 13 frames, 32 px")
    parser.add_argument("--size", type=int, default=None, help="frame height = width in pixels")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the rows and the summary here")
    parser.add_argument("--child", choices=("ours", "diffusers", "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=17, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    kind = MODELS[args.model]
    args.config = kind.tiny if args.tiny else kind.config
    args.frame_counts = kind.tiny_frames if args.tiny else kind.frames
    args.size = args.size or (32 if args.quick or args.tiny else 64)
    stride = args.config.space_stride
    if args.size <= 0 or args.size % stride:
        parser.error(f"--size must be a positive multiple of {stride} (the {kind.label} VAE's pixel stride), got "
                     f"{args.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    cfg, size = args.config, args.size
    if args.child == "timing":
        print(json.dumps(timing(cfg, args.frames, size, args.weights, args.repeats, float64=args.tiny)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, cfg, args.frames, size, args.weights)))
        return 0

    repeats = 1 if args.quick or args.tiny else 2
    model = ["--model", args.model, "--size", str(size)] + (["--tiny"] if args.tiny else [])
    with tempfile.TemporaryDirectory(prefix="bench_vae_") as tmp:
        weights = _write_weights(cfg, Path(tmp))
        common = [*model, "--weights", str(weights)]
        rows = [_run_child(["--child", impl, "--frames", str(f), *common], args.threads)
                for impl in ("ours", "diffusers") for f in args.frame_counts]
        speed = _run_child(["--child", "timing", "--frames", str(args.frame_counts[0]), "--repeats", str(repeats),
                            *common], args.threads)
    summary = _report(args, rows, speed, repeats)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "timing": speed, "summary": summary}, indent=1))
    return 0


def _report(args: argparse.Namespace, rows: list[dict], speed: dict, repeats: int) -> dict:
    cfg, size, (few, many) = args.config, args.size, args.frame_counts
    label = MODELS[args.model].label + (" (tiny config)" if args.tiny else "")
    print(f"{label} VAE decode - dim {cfg.dim}, decoder {cfg.decoder_dim}, z {cfg.z_dim}, patch {cfg.patch_size}, "
          f"fp32 random weights, {size}x{size} px, {args.threads} torch threads, CPU")
    print(f"{'impl':<10} {'frames':>6} {'seconds':>8} {'RSS before MiB':>15} {'peak MiB':>9} {'peak - before':>14}")
    for r in rows:
        print(f"{r['impl']:<10} {r['frames']:>6} {r['seconds']:>8.1f} {r['rss_before_mib']:>15.0f} "
              f"{r['peak_mib']:>9.0f} {r['peak_mib'] - r['rss_before_mib']:>14.0f}")
    if not all(r["peak_exact"] for r in rows):
        print("note: /proc/self/clear_refs unavailable; peaks are ru_maxrss over the whole process")
    by = {(r["impl"], r["frames"]): r for r in rows}
    summary: dict = {}
    for impl in ("ours", "diffusers"):
        lo, hi = by[(impl, few)], by[(impl, many)]
        ratio = hi["peak_mib"] / lo["peak_mib"]
        extra = (hi["peak_mib"] - hi["rss_before_mib"]) / max(lo["peak_mib"] - lo["rss_before_mib"], 1e-9)
        summary[f"{impl}_peak_ratio"], summary[f"{impl}_working_set_ratio"] = ratio, extra
        goal = "  (goal <= 1.10: " + ("met" if ratio <= 1.10 else "MISSED") + ")" if impl == "ours" else ""
        print(f"{impl}: peak RSS {many} / {few} frames = {ratio:.3f}{goal}; decode working set {many} / {few} = "
              f"{extra:.2f}")
    for f in (few, many):
        ours, ref = by[("ours", f)], by[("diffusers", f)]
        peak = summary[f"peak_ratio_ours_over_diffusers_{f}"] = ours["peak_mib"] / ref["peak_mib"]
        work = summary[f"working_set_ratio_ours_over_diffusers_{f}"] = (
            (ours["peak_mib"] - ours["rss_before_mib"]) / max(ref["peak_mib"] - ref["rss_before_mib"], 1e-9))
        print(f"ours / diffusers at {f} frames: peak RSS {peak:.3f}, decode working set {work:.2f}")
    summary["time_ratio"] = speed["ours"] / speed["diffusers"]
    print(f"time, same process, {few} frames, best of {repeats}: ours {speed['ours']:.2f} s, diffusers "
          f"{speed['diffusers']:.2f} s, ratio {summary['time_ratio']:.3f}; max |ours - diffusers| = "
          f"{speed['max_abs_diff']:.3g} (rel. {speed['rel_diff']:.3g})")
    if "ref_err_vs_float64" in speed:
        print(f"vs diffusers in float64: ours {speed['ours_err_vs_float64']:.3g}, diffusers fp32 "
              f"{speed['ref_err_vs_float64']:.3g} (rel. max error)")
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
