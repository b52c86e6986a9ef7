"""The project's first-run check for a CUDA machine: every GPU-only path exercised once, with a summary.

    python bench/gpu_check.py --out gpu_check_out            # on a CUDA GPU: every stage (about 6 min on an H100)
    python bench/gpu_check.py --cpu --out /tmp/gpu_check     # the CPU-runnable parts (tests/test_gpu_check.py)
    python bench/gpu_check.py --stages env,micro,cli         # a subset

Stages (each in its own process with its own time limit; a failure never stops the rest, read the summary):
- env: torch / CUDA / device, the optional packages (importable, missing or broken) and the attention backends.
- pytest: the tests marked `gpu` (streams, events, pinned arena, CUDA noise, fp16 CLIP, VAE cache on the CPU).
- micro: every attention backend against float32 SDPA; fp8_fast (`torch._scaled_mm`) against the dequantised
  linear and its temporary memory against the planner's estimate; `Fp32Linear` under autocast; the swap budget
  with `cuda` vs `cuda:0`; the host arena (pinned on CUDA).
- cli: `python -m wan_core.generate` on the embedded toy models with each memory flag; block swap must equal the
  plain run bit for bit, fp8 runs must differ from it (proof the mode is active) and stay close.
- bench: bench/bench_gpu.py on the 1.3B shapes (its `--smoke` mode on the CPU).
- b14: the 14B 720p fp8_scaled + `--blocks_to_swap auto` case for a 24 GiB card (CUDA only).

Results: OUT/summary.txt (one line a stage), OUT/summary.json, OUT/<stage>.log. Exit status 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "pytest", "micro", "cli", "bench", "b14")
CPU_STAGES = ("env", "micro", "cli", "bench")  # pytest -m gpu and the 14B case need CUDA
LIMITS_S = {"env": 60, "pytest": 240, "micro": 150, "cli": 420, "bench": 240, "b14": 200}
# A sanity bound on the whole 12-step toy run, not a parity test (tests/test_fp8.py checks each layer's error):
# rounding weights to fp8 (3 mantissa bits) or changing attention kernels moves the latent by a few percent; a
# broken kernel moves it by order 1. 'fp8' runs must also differ from the plain run (zero: the mode never ran).
FP8_SANITY = 0.2
OPTIONAL = ("triton", "diffusers", "transformers", "accelerate", "safetensors", "sageattention", "flash_attn",
            "flash_attn_interface", "xformers", "bitsandbytes", "ftfy", "av")


@dataclass
class StageResult:
    name: str
    status: str  # PASS, FAIL(rc=N), TIMEOUT, SKIP
    seconds: float
    log: str


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_stage(name: str, argv: list[str], out: Path, limit_s: float) -> StageResult:
    """Run one stage's command with a time limit, its output to OUT/<name>.log and echoed."""
    log = out / f"{name}.log"
    print(f"\n=================== {name} (limit {limit_s:.0f} s) ===================", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT, timeout=limit_s,
                                  stdin=subprocess.DEVNULL)
            status = "PASS" if proc.returncode == 0 else f"FAIL(rc={proc.returncode})"
        except subprocess.TimeoutExpired:
            status = "TIMEOUT"
    print(log.read_text(errors="replace"), end="", flush=True)
    return StageResult(name, status, round(time.perf_counter() - t0, 1), str(log))


def stage_command(name: str, args: argparse.Namespace) -> list[str] | None:
    """The command line of one stage (None: not runnable on this device)."""
    py, me = sys.executable, str(Path(__file__).resolve())
    inner = [py, me, "--inner", name, "--device", args.device, "--out", str(args.out)]
    if name in ("env", "micro", "cli"):
        return inner
    if name == "pytest":
        return None if args.device == "cpu" else [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                                   "-rA", "tests"]
    if name == "bench":
        bench = [py, str(ROOT / "bench" / "bench_gpu.py"), "--json", str(args.out / "bench_gpu.json")]
        if args.device == "cpu":
            return bench + ["--smoke"]
        return bench + ["--steps", "1", "--warmup", "1", "--no-compile", "--skip-14b", "--budget-s", "150"]
    if name == "b14":
        return None if args.device == "cpu" else inner
    raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")


def run_all(args: argparse.Namespace) -> list[StageResult]:
    results = []
    for name in args.stages:
        argv = stage_command(name, args)
        if argv is None:
            results.append(StageResult(name, "SKIP", 0.0, "needs CUDA"))
            continue
        results.append(run_stage(name, argv, args.out, LIMITS_S[name] * args.limit_scale))
    return results


def write_summary(results: list[StageResult], out: Path) -> str:
    lines = [f"{r.name:10s} {r.status:14s} {r.seconds:7.1f} s" for r in results]
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    (out / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return text


# ---------------------------------------------------------------------------------------------------------------
# Inner stages: run in their own process by run_stage.
# ---------------------------------------------------------------------------------------------------------------

def inner_env(device: str, out: Path) -> int:
    import importlib

    import torch

    from wan_core.models.attention import available_backends

    print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
    if device != "cpu":
        if not torch.cuda.is_available():
            print(f"--device {device} but torch.cuda.is_available() is False")
            return 1
        free, total = torch.cuda.mem_get_info()
        print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
              f"free/total {free / 2**30:.1f}/{total / 2**30:.1f} GiB")
    broken = []
    for module in OPTIONAL:
        try:
            mod = importlib.import_module(module)
            print(f"  {module:22s} {getattr(mod, '__version__', '?')}")
        except ModuleNotFoundError:
            print(f"  {module:22s} not installed")
        except Exception as e:  # noqa: BLE001 - a package built for another torch raises anything
            print(f"  {module:22s} BROKEN ({type(e).__name__}: {str(e)[:100]})")
            broken.append(module)
    print("wan_core attention backends:", available_backends())
    print("broken optional packages (used only when asked for):", broken or "none")
    return 0


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _attention_checks(dev, fails: list[str]) -> None:
    import torch
    import torch.nn.functional as F

    from wan_core.models.attention import attention, available_backends

    gen = torch.Generator(device=dev).manual_seed(0)
    # self-attention, text cross-attention (512 tokens), CLIP image tokens (257), the CLIP's head dim 80
    shapes = ([(4096, 4096, 12, 128), (4096, 512, 12, 128), (4096, 257, 40, 128), (257, 257, 16, 80)]
              if dev.type == "cuda" else [(256, 256, 2, 64), (256, 77, 2, 64), (50, 50, 2, 80)])
    # Against a float64 run on the same inputs: a half-precision output is rounded with unit roundoff 2**-9 (bf16)
    # or 2**-12 (fp16), so 1e-2 is about 5x the bf16 rounding; float32 kernels stay near 1e-7. SageAttention
    # quantises q and k to int8 (coarser).
    limits = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
    print("--- attention: relative L2 error against float32 SDPA")
    for backend in available_backends():
        for lq, lk, heads, hd in shapes:
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                if dev.type == "cpu" and dt is torch.float16:
                    continue
                q, k, v = (torch.randn(1, n, heads, hd, device=dev, generator=gen, dtype=dt) for n in (lq, lk, lk))
                ref = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
                label = f"{backend:9s} {str(dt):15s} q{lq} k{lk} h{heads} d{hd}"
                try:
                    out = attention(q, k, v, backend)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"  {label}: FAIL {type(e).__name__}: {str(e)[:160]}")
                    if backend == "sdpa" or dt is not torch.float32:
                        fails.append(f"attention {label}: {type(e).__name__}")
                    continue
                err, limit = _rel(out, ref), 5e-2 if backend == "sageattn" else limits[dt]
                ok = out.shape == q.shape and out.dtype == dt and err < limit
                print(f"  {label}: err {err:.2e} (limit {limit:.0e}) {'ok' if ok else 'BAD'}")
                if not ok:
                    fails.append(f"attention {label}: err {err:.2e}, {tuple(out.shape)} {out.dtype}")


def _fp32_linear_check(dev, fails: list[str]) -> None:
    import torch

    from wan_core.models.ops import Fp32Linear

    print("--- Fp32Linear under bf16 autocast (the trainer's accelerator.autocast): float32 output, same values")
    torch.manual_seed(0)
    lin = Fp32Linear(64, 32).to(dev)
    x = torch.randn(4, 64, device=dev)
    ref = lin(x)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        out = lin(x)
    ok = out.dtype == torch.float32 and torch.equal(out, ref)
    print(f"  output {out.dtype}, max difference to no autocast {(out.float() - ref).abs().max().item():.2e}"
          f" {'ok' if ok else 'BAD'}")
    if not ok:
        fails.append(f"Fp32Linear under autocast gives {out.dtype}")


def _fp8_fast_checks(dev, fails: list[str]) -> None:
    import torch
    import torch.nn.functional as F

    from wan_core.models.ops import dequantize_weight, quantize_weight, scaled_mm_linear

    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
        print("--- fp8_fast: needs CUDA compute capability >= 8.9; skipped here")
        return
    print("--- fp8_fast: scaled_mm_linear against the dequantised float32 linear (fp8 e4m3: 3 mantissa bits)")
    gen = torch.Generator(device=dev).manual_seed(0)
    for m, k, n, scaling, out_dtype in [(32760, 1536, 8960, "channel", torch.bfloat16),
                                        (32761, 1536, 1536, "tensor", torch.bfloat16),
                                        (7, 5120, 5120, "channel", torch.float16)]:
        w = torch.randn(n, k, device=dev, generator=gen) / k**0.5
        wq, s = quantize_weight(w, scaling)
        x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
        bias = torch.randn(n, device=dev, generator=gen).to(out_dtype)
        try:
            y = scaled_mm_linear(x, wq, s, bias, out_dtype)
        except Exception as e:  # noqa: BLE001
            print(f"  M={m} K={k} N={n} {scaling}: FAIL {type(e).__name__}: {str(e)[:200]}")
            fails.append(f"scaled_mm {m}x{k}x{n} {scaling}: {type(e).__name__}")
            continue
        ref = F.linear(x.float(), dequantize_weight(wq, s, torch.float32), bias.float())
        err = _rel(y, ref)  # activations are quantised too: about 2**-4 relative per element, averaging down
        ok = err < 4e-2 and y.dtype == out_dtype
        print(f"  M={m} K={k} N={n} {scaling}: {y.dtype} err {err:.2e} {'ok' if ok else 'BAD'}")
        if not ok:
            fails.append(f"scaled_mm {m}x{k}x{n} {scaling}: err {err:.2e} {y.dtype}")


def _fp8_memory_check(dev, fails: list[str]) -> None:
    import torch

    from wan_core.models.ops import quantize_rows, quantize_rows_bytes
    from wan_core.runtime.offload import LiveTensorBytes

    # 14B 720p FFN down-projection input on CUDA ([75600, 13824] bf16 = 2.09 GB); a small one on the CPU
    rows, k = (75600, 13824) if dev.type == "cuda" else (4096, 1024)
    print(f"--- fp8_fast activation quantisation [{rows}, {k}] bf16: measured peak against quantize_rows_bytes")
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    estimate = quantize_rows_bytes(rows, k)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        q, s = quantize_rows(x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with LiveTensorBytes() as meter:
            q, s = quantize_rows(x)
        peak = meter.peak
    del q, s
    # the caching allocator rounds each block up to 512 bytes: a few blocks of slack at most
    ok = peak <= estimate + 8 * 512 and estimate <= 1.05 * peak
    print(f"  peak {peak / 2**20:.1f} MiB, estimate {estimate / 2**20:.1f} MiB, input {x.nbytes / 2**20:.1f} MiB"
          f" {'ok' if ok else 'BAD'}")
    if not ok:
        fails.append(f"quantize_rows peak {peak} vs estimate {estimate}")


def _fp8_support_check(dev, fails: list[str]) -> None:
    import torch

    from wan_core.models.ops import fp8_fast_support, probe_scaled_mm

    if dev.type != "cuda":
        print("--- fp8_fast support decision: CUDA only; skipped here")
        return
    capability = torch.cuda.get_device_capability(dev)
    reason = fp8_fast_support(capability, torch.__version__)
    probe = probe_scaled_mm(dev) if capability >= (8, 9) else None
    print(f"--- fp8_fast support on {capability}: {reason or 'supported'}; 16x16 probe: {probe or 'ok'}")
    if reason is None and probe is not None:
        fails.append(f"fp8_fast: the version rule allows it but the probe failed: {probe}")


def _budget_check(dev, fails: list[str]) -> None:
    import torch

    from wan_core.runtime.devices import same_device
    from wan_core.runtime.offload import _budget

    print("--- devices compare with their index ('cuda' and 'cuda:0' are one device)")
    if dev.type != "cuda":
        ok = same_device("cpu", "cpu:0") and not same_device("cpu", "meta")
        print(f"  cpu / cpu:0 {'ok' if ok else 'BAD'}")
        if not ok:
            fails.append("same_device on the CPU")
        return
    small = torch.nn.Linear(4096, 4096).to(dev)
    b0, b1 = _budget(small, torch.device("cuda")), _budget(small, torch.device("cuda:0"))
    # free memory may move by a few MiB between the two calls (other processes); the weights are 64 MiB
    ok = abs(b0 - b1) < 2**24 and b0 > torch.cuda.mem_get_info(dev)[0] + 2**25
    print(f"  swap budget: cuda {b0 / 2**30:.3f} GiB, cuda:0 {b1 / 2**30:.3f} GiB {'ok' if ok else 'BAD'}")
    if not ok:
        fails.append(f"_budget cuda {b0} vs cuda:0 {b1}")


def _arena_check(dev, fails: list[str]) -> None:
    import torch

    from wan_core.runtime.offload import _HostArena

    pin = "register" if dev.type == "cuda" else "none"
    print(f"--- host arena of block swap (pin mode {pin!r})")
    arena = _HostArena(pin)
    buffer = arena.allocate(1 << 26)
    if dev.type == "cuda":
        dst = torch.empty(1 << 26, dtype=torch.uint8, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(buffer, non_blocking=True)
        torch.cuda.synchronize()
        pinned = buffer.is_pinned()
        print(f"  is_pinned {pinned}, 64 MiB host-to-device {1 / 16 / (time.perf_counter() - t0):.1f} GiB/s")
        if not pinned:
            fails.append("registered host arena is not pinned")
    arena.release()
    ok = buffer.is_pinned() is False if dev.type == "cuda" else True
    print(f"  {arena.nbytes} bytes held, released (unpinned) {'ok' if ok else 'BAD'}")
    if not ok:
        fails.append("host arena still pinned after release()")


def inner_micro(device: str, out: Path) -> int:
    import torch

    dev = torch.device(device)
    fails: list[str] = []
    for check in (_attention_checks, _fp8_fast_checks, _fp8_support_check, _fp8_memory_check, _fp32_linear_check,
                  _budget_check, _arena_check):
        try:
            check(dev, fails)
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            print(f"  {check.__name__}: FAIL {type(e).__name__}: {str(e)[:200]}")
            fails.append(f"{check.__name__}: {type(e).__name__}")
    print("MICRO FAILURES:", fails or "none")
    return 1 if fails else 0


def cli_cases(device: str) -> list[tuple[str, list[str], str]]:
    """(name, flags, comparison with the plain run: 'equal', 'fp8', 'close' or 'any'; see FP8_SANITY)."""
    cases = [("plain", [], "any"), ("swap3", ["--blocks_to_swap", "3"], "equal"),
             ("fp8_scaled", ["--fp8", "--fp8_scaled"], "fp8")]
    if device == "cpu":
        return cases
    import importlib.util

    sage = importlib.util.find_spec("sageattention") is not None
    cases += [("cpu_noise", ["--cpu_noise"], "any"), ("swap_auto", ["--blocks_to_swap", "auto"], "equal"),
              ("fp8_fast", ["--fp8_fast"], "fp8"), ("compile_swap", ["--compile", "--blocks_to_swap", "3"], "close"),
              ("compile_fp8fast_swap", ["--compile", "--fp8_fast", "--blocks_to_swap", "3"], "fp8")]
    if sage:
        cases += [("sage", ["--attn_mode", "sageattn"], "close"),
                  ("compile_sage", ["--compile", "--attn_mode", "sageattn"], "close")]
    return cases


def _generate(device: str, out: Path, flags: list[str]) -> tuple[int, float]:
    argv = [sys.executable, "-m", "wan_core.generate", "--prompt", "a red square moving right", "--seed", "7",
            "--device", device, "--output_type", "latent", "--save_path", str(out), *flags]
    t0 = time.perf_counter()
    rc = subprocess.run(argv, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL).returncode
    return rc, time.perf_counter() - t0


def _latent(folder: Path):
    from safetensors.torch import load_file

    files = sorted(folder.glob("*_latent.safetensors"))
    return load_file(files[-1])["latent"] if files else None


def inner_cli(device: str, out: Path) -> int:
    root = out / "cli"
    fails = []
    for name, flags, _ in cli_cases(device):
        rc, seconds = _generate(device, root / name, flags)
        print(f"  {name:22s} rc {rc} {seconds:6.1f} s")
        if rc != 0:
            fails.append(f"{name}: rc {rc}")
    ref = _latent(root / "plain")
    for name, _, rule in cli_cases(device):
        x = _latent(root / name)
        if x is None or ref is None or rule == "any":
            continue
        err = _rel(x, ref)
        ok = {"equal": err == 0, "fp8": 0 < err < FP8_SANITY, "close": err < FP8_SANITY}[rule]
        print(f"  {name:22s} relative difference to plain {err:.2e} ({rule}) {'ok' if ok else 'BAD'}")
        if not ok:
            fails.append(f"{name}: difference {err:.2e} ({rule})")
    print("CLI FAILURES:", fails or "none")
    return 1 if fails else 0


def inner_b14(device: str, out: Path) -> int:
    import dataclasses

    import torch

    sys.path.insert(0, str(ROOT))
    import bench.bench_gpu as B
    from wan_core.models.config import TASKS

    cfg = TASKS["t2v-14B"].dit
    setup = B.Setup(cfg, 720, 1280, 81, torch.device(device), 1, 0, "inductor")
    r = B.run_14b(setup, argparse.Namespace(smoke=False, steps_14b=1))
    print(B.HEADER)
    print(B._row(r, cfg, setup))
    print(f"peak reserved {r.peak_reserved / 1e9:.1f} GB (goal < 24), estimate {r.estimate / 1e9:.1f} GB")
    (out / "bench_14b.json").write_text(json.dumps(dataclasses.asdict(r), indent=1))
    return 0 if r.peak_reserved is not None and r.peak_reserved < 24e9 else 1


INNER = {"env": inner_env, "micro": inner_micro, "cli": inner_cli, "b14": inner_b14}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run the CPU-runnable parts on the CPU (what CI runs)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu; --cpu is --device cpu")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for logs and the summary")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every stage's time limit")
    p.add_argument("--inner", choices=sorted(INNER), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = "cpu" if args.cpu else (args.device or "cuda")
    default = CPU_STAGES if args.device == "cpu" else STAGES
    args.stages = tuple(s for s in args.stages.split(",") if s) if args.stages else default
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)}; expected a comma-separated subset of {','.join(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.inner:
        return INNER[args.inner](args.device, args.out)
    results = run_all(args)
    print("\n=================== SUMMARY ===================")
    print(write_summary(results, args.out), end="")
    return 0 if all(r.status in ("PASS", "SKIP") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
