"""DiT speed and memory on one GPU: 1.3B T2V at 480x832x81 in every configuration, diffusers on the same weights,
Wan2.2 TI2V-5B at 704x1280x121, and 14B at 720x1280x81 with fp8 + block swap under a 24 GB budget (Wan2.1 14B, and
the Wan2.2 A14B pair of experts). Sizes are height x width x frames.

    python bench/bench_gpu.py [--steps 3] [--skip-14b] [--skip-ti2v] [--no-compile] [--json out.json]
    python bench/bench_gpu.py --smoke        # CPU, tiny model, every code path in seconds (run by the tests)
    torchrun --nproc_per_node N bench/bench_gpu.py [--smoke]   # N-GPU rows (sequence / CFG parallel, FSDP)

Weights are random with the real shapes (bench/random_dit.py). A step is one denoising step with CFG: two forwards
(positive and negative prompt, batch 1 each), as the sampler runs them. Columns: seconds per step (mean of
--steps after --warmup steps; compile time shows up in the warm-up column), peak memory allocated / reserved by
PyTorch over the timed steps (weights included), our estimate of that peak (wan_core.runtime.offload), the projected
DiT
time of 50 steps and the achieved TFLOP/s (FLOPs from `flops_per_forward`) against 798 TF/s.

Cases (1.3B): bf16 sdpa, + compile, sageattn (+ compile) when installed, fp8, fp8_scaled, fp8_fast (compute
capability >= 8.9), block swap 15 and 29, and diffusers' WanTransformer3DModel (bf16 with its fp32 modules, as
from_pretrained(torch_dtype=torch.bfloat16) loads it; its default attention).
14B: fp8_scaled with the swap count `--blocks_to_swap auto` picks for a 24 GiB card (23 GiB free, 1 GiB
margin), one warm-up forward and --steps-14b steps; goal: peak reserved below 24 GB.
N GPUs (under torchrun, rank 0 prints): the 1.3B case as Ulysses x ring over all N ranks (Ulysses as large as the
heads allow), CFG parallel x sequence parallel, and the same with the DiT sharded (FSDP); one step = both forwards.

TI2V-5B (Wan2.2, 48-channel latents of the 16-pixel-stride Wan2.2 VAE): bf16 sdpa, per-token timesteps as its
image-to-video runs them (the first latent frame at t = 0), --steps steps after --warmup; skipped past --budget-s.
A14B (Wan2.2, two 14B experts switched at the T2V boundary 0.875 by `ExpertSwitch`): both experts fp8_scaled and
resident with block swap, one swap count for both, the smallest whose two resident weight sets plus one forward
fit 23 GiB (1 GiB margin); a step alternates a high-noise (t = 900) and a low-noise (t = 500) CFG step, one warm-up
forward per expert, then --steps-14b such pairs; the column is seconds per step. --skip-14b skips both 14B cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from random_dit import materialize_, random_dit, weight_bytes  # noqa: E402

from wan_core.loading.checkpoint import build_on_meta, load_into  # noqa: E402
from wan_core.loading.convert import DIT_DIFFUSERS, rename  # noqa: E402
from wan_core.models.attention import available_backends  # noqa: E402
from wan_core.models.config import TASKS, DiTConfig  # noqa: E402
from wan_core.models.dit import WanModel  # noqa: E402
from wan_core.parallel import CfgParallel, ParallelConfig, SequenceParallel, build_mesh, init_distributed  # noqa: E402
from wan_core.parallel.fsdp import shard_blocks  # noqa: E402
from wan_core.runtime.compile import compile_blocks  # noqa: E402
from wan_core.runtime.fp8 import apply_fp8, is_dit_target  # noqa: E402
from wan_core.runtime.offload import (  # noqa: E402
    GIB,
    MemoryEstimate,
    choose_blocks_to_swap,
    enable_block_swap,
    estimate_peak_bytes,
    video_tokens,
)
from wan_core.sampling.experts import ExpertSwitch  # noqa: E402

PRACTICAL_TFLOPS = 798.0  # measured H100 bf16 GEMM rate
SMOKE = DiTConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=4, text_dim=64)
SMOKE_14B = dataclasses.replace(SMOKE, num_layers=6)
SMOKE_5B = dataclasses.replace(SMOKE, in_dim=48, out_dim=48)
WAN21_STRIDE = 8  # pixels per latent cell of the Wan2.1 VAE (the 1.3B and 14B DiTs' latents)
A14B_BOUNDARY = TASKS["t2v-A14B"].boundary


@dataclass(frozen=True)
class Case:
    name: str
    fp8: str | None = None
    swap: int = 0
    attn: str = "sdpa"
    compile: bool = False
    diffusers: bool = False


@dataclass
class Result:
    name: str
    seconds_per_step: float | None = None
    warmup_seconds: float | None = None
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    estimate: int | None = None
    note: str = ""
    diff_vs_bf16: float | None = None  # relative L2 difference of one forward's output to the bf16 sdpa case


@dataclass(frozen=True)
class Setup:
    cfg: DiTConfig
    height: int
    width: int
    frames: int
    device: torch.device
    steps: int
    warmup: int
    compile_backend: str
    stride: int = WAN21_STRIDE  # pixels per latent cell of the model's VAE (16 for Wan2.2 TI2V-5B)
    per_token_t: bool = False  # timesteps [1, L] with the first latent frame at 0 (TI2V image-to-video)

    @property
    def planner_size(self) -> tuple[int, int, int]:
        """(height, width, frames) for the memory planner (it takes the VAE stride from the DiT's channels)."""
        return self.height, self.width, self.frames

    @property
    def tokens(self) -> int:
        return video_tokens(self.cfg, *self.planner_size)


def flops_per_forward(cfg: DiTConfig, tokens: int, text_tokens: int = 512) -> float:
    """FLOPs of one forward: projections, attention cores, text k/v, FFN (patch embedding and head ignored)."""
    d, f, n = cfg.dim, cfg.ffn_dim, tokens
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * text_tokens * d * d + 4 * n * text_tokens * d
    return cfg.num_layers * (per_layer + 4 * n * d * f)


def _inputs(setup: Setup, dtype: torch.dtype = torch.bfloat16):
    cfg, dev = setup.cfg, setup.device
    gen = torch.Generator(device=dev).manual_seed(1)
    latent_frames = (setup.frames - 1) // 4 + 1
    shape = (1, cfg.in_dim, latent_frames, setup.height // setup.stride, setup.width // setup.stride)
    latents = torch.randn(shape, generator=gen, device=dev)
    positive = torch.randn(40, cfg.text_dim, generator=gen, device=dev, dtype=dtype) * 0.5
    negative = torch.randn(60, cfg.text_dim, generator=gen, device=dev, dtype=dtype) * 0.5
    t = torch.tensor([500.0], device=dev)
    if setup.per_token_t:
        t = torch.full((1, setup.tokens), 500.0, device=dev)
        t[:, : setup.tokens // latent_frames] = 0.0
    return latents, t, positive, negative


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(step: Callable[[], None], setup: Setup) -> tuple[float, float, int | None, int | None]:
    """(seconds per step, warm-up seconds, peak allocated, peak reserved) over the timed steps."""
    dev = setup.device
    t0 = time.perf_counter()
    for _ in range(setup.warmup):
        step()
    _sync(dev)
    warm = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(setup.steps):
        step()
    _sync(dev)
    per_step = (time.perf_counter() - t0) / setup.steps
    if dev.type != "cuda":
        return per_step, warm, None, None
    return per_step, warm, torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)


def _ours(case: Case, master: dict[str, torch.Tensor], setup: Setup):
    model = build_on_meta(lambda: WanModel(setup.cfg))
    load_into(model, master, what="bench DiT")  # shares the master tensors; every placement below copies
    model.eval().requires_grad_(False)
    swapper = None
    if case.swap:
        if case.fp8:
            apply_fp8(model, case.fp8)
        swapper = enable_block_swap(model, case.swap, setup.device)
    else:
        model.to(setup.device)
        if case.fp8:
            apply_fp8(model, case.fp8, device=setup.device)
    model.set_attention_backend(case.attn)
    if case.compile:
        compile_blocks(model, backend=setup.compile_backend)
    return model, swapper


def _diffusers(master: dict[str, torch.Tensor], setup: Setup):
    from diffusers import WanTransformer3DModel  # the reference: optional, seconds to import

    cfg = setup.cfg
    with torch.device(setup.device):
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=cfg.eps, rope_max_seq_len=1024)
    model.load_state_dict(rename(master, DIT_DIFFUSERS, to_ours=False, what="bench DiT"))
    # what from_pretrained(torch_dtype=bfloat16) does: bf16 except `_keep_in_fp32_modules` (same weight values)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep & set(name.split(".")) else torch.bfloat16)
    return model.eval().requires_grad_(False)


def _pad(context: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([context, context.new_zeros(length - context.shape[0], context.shape[1])])[None]


def run_case(case: Case, master: dict[str, torch.Tensor], setup: Setup) -> tuple[Result, torch.Tensor]:
    latents, t, positive, negative = _inputs(setup)
    if case.diffusers:
        model = _diffusers(master, setup)
        hidden = latents.to(torch.bfloat16)
        pos, neg = _pad(positive, setup.cfg.text_len), _pad(negative, setup.cfg.text_len)

        def forward(context):
            return model(hidden, t, context, return_dict=False)[0]
        swapper, estimate = None, None
    else:
        model, swapper = _ours(case, master, setup)
        pos, neg = [positive], [negative]

        def forward(context):
            return model(latents, t, context)
        estimate = estimate_peak_bytes(model, *setup.planner_size, case.swap).total

    with torch.no_grad():
        out = forward(pos).float()

        def step() -> None:
            forward(pos)
            forward(neg)
        per_step, warm, alloc, reserved = _measure(step, setup)
    if swapper is not None:
        swapper.remove()
    return Result(case.name, per_step, warm, alloc, reserved, estimate), out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cases_1_3b(device: torch.device, compile_on: bool) -> list[Case | Result]:
    cases: list[Case | Result] = [Case("bf16 sdpa")]
    if compile_on:
        cases.append(Case("bf16 sdpa compile", compile=True))
    if "sageattn" in available_backends() and device.type == "cuda":
        cases.append(Case("bf16 sageattn", attn="sageattn"))
        if compile_on:
            cases.append(Case("bf16 sageattn compile", attn="sageattn", compile=True))
    else:
        cases.append(Result("bf16 sageattn", note="skipped: sageattention not installed / no CUDA"))
    cases += [Case("fp8", fp8="fp8"), Case("fp8_scaled", fp8="fp8_scaled")]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        cases.append(Case("fp8_fast", fp8="fp8_fast"))
    else:
        cases.append(Result("fp8_fast", note="skipped: needs CUDA compute capability >= 8.9"))
    return cases


def run_1_3b(setup: Setup, args: argparse.Namespace, started: float) -> list[Result]:
    cfg = setup.cfg
    num = cfg.num_layers
    model = random_dit(cfg, torch.bfloat16, setup.device, seed=0)
    master = {k: v.cpu() for k, v in model.state_dict().items()}
    del model
    _free(setup.device)
    swaps = [Case(f"bf16 swap {n}", swap=n) for n in sorted({num // 2, num - 1})]
    todo = cases_1_3b(setup.device, not args.no_compile) + swaps + [Case("diffusers (reference)", diffusers=True)]
    results, outputs = [], {}
    for case in todo:
        if isinstance(case, Result):
            results.append(case)
        elif time.perf_counter() - started > args.budget_s:
            results.append(Result(case.name, note="skipped: time budget"))
        else:
            result, outputs[case.name] = run_case(case, master, setup)
            results.append(result)
            _free(setup.device)
        print(_row(results[-1], cfg, setup), flush=True)
    ref = outputs.get("bf16 sdpa")
    if ref is not None:
        for result in results:
            if result.name in outputs:
                out = outputs[result.name]
                result.diff_vs_bf16 = ((out - ref).norm() / ref.norm()).item()
        print("output rel. L2 difference to bf16 sdpa: " + ", ".join(
            f"{r.name} {r.diff_vs_bf16:.1e}" for r in results if r.diff_vs_bf16 is not None))
    return results


def build_fp8_model_blockwise(cfg: DiTConfig, device: torch.device, mode: str = "fp8_scaled",
                              seed: int = 0) -> WanModel:
    """A big random model without holding it in bf16: non-block parts on the device, each block materialised on
    the device, quantised there and moved to the CPU. Another `seed` gives other weights (a second expert)."""
    model = build_on_meta(lambda: WanModel(cfg))
    for name, child in model.named_children():
        if child is not model.blocks:
            materialize_(child, cfg.dim, torch.bfloat16, device, seed=1 + 1000 * seed, prefix=name)
    for i, block in enumerate(model.blocks):
        materialize_(block, cfg.dim, torch.bfloat16, device, seed=100 + i + 1000 * seed, prefix=f"blocks.{i}")
        apply_fp8(block, mode, is_target=lambda name, i=i: is_dit_target(f"blocks.{i}.{name}"))
        block.to("cpu")
    return model.eval()


def run_14b(setup: Setup, args: argparse.Namespace) -> Result:
    cfg = setup.cfg
    model = build_fp8_model_blockwise(cfg, setup.device)
    free = (23 * GIB) if not args.smoke else None
    if free is None:  # smoke: a budget that forces swapping about half the blocks
        half = estimate_peak_bytes(model, setup.height, setup.width, setup.frames, cfg.num_layers // 2)
        free = half.total + GIB
    plan = choose_blocks_to_swap(model, setup.height, setup.width, setup.frames, free_bytes=free)
    print(f"14B plan: {plan.describe()}", flush=True)
    swapper = enable_block_swap(model, plan.blocks_to_swap, setup.device)
    latents, t, positive, negative = _inputs(setup)
    with torch.no_grad():
        def step() -> None:
            model(latents, t, [positive])
            model(latents, t, [negative])
        steps = dataclasses.replace(setup, steps=args.steps_14b, warmup=0)
        t0 = time.perf_counter()
        model(latents, t, [positive])  # warm-up forward
        _sync(setup.device)
        warm = time.perf_counter() - t0
        per_step, _, alloc, reserved = _measure(step, steps)
    note = f"blocks_to_swap {plan.blocks_to_swap} (auto, 23 GiB free); weights {weight_bytes(model) / 1e9:.1f} GB"
    if swapper is not None:
        swapper.remove()
    return Result(f"14B {setup.height}x{setup.width}x{setup.frames} fp8_scaled+swap", per_step, warm, alloc,
                  reserved, plan.total, note)


def parallel_cases(world: int, heads: int) -> list[tuple[str, ParallelConfig]]:
    """The N-GPU layouts: all ranks on the sequence, and (N even) CFG parallel x sequence parallel, each also with
    FSDP. Ulysses takes the largest share of the ranks that divides the heads; ring the rest."""
    layouts = [(False, world)] + ([(True, world // 2)] if world % 2 == 0 else [])
    cases = []
    for cfg_parallel, sp in layouts:
        u = math.gcd(sp, heads)
        name = f"{world} GPUs {'cfg x ' if cfg_parallel else ''}ulysses {u} x ring {sp // u}"
        cases += [(name, ParallelConfig(u, sp // u, cfg_parallel)),
                  (name + " fsdp", ParallelConfig(u, sp // u, cfg_parallel, dit_fsdp=True))]
    return cases


def run_parallel(setup: Setup, world: int) -> list[Result]:
    """Time the N-GPU layouts of `parallel_cases` (every rank runs every case; the caller prints on rank 0)."""
    first = init_distributed(parallel_cases(world, setup.cfg.num_heads)[0][1],
                             "cpu" if setup.device.type == "cpu" else None)
    results = []
    for name, config in parallel_cases(world, setup.cfg.num_heads):
        mesh = build_mesh(config, first.device)
        dev_setup = dataclasses.replace(setup, device=first.device)
        model = random_dit(setup.cfg, device="cpu" if config.dit_fsdp else first.device)
        model = shard_blocks(model, mesh) if config.dit_fsdp else model
        if config.sp_size > 1:
            SequenceParallel(model, mesh)
        latents, t, positive, negative = _inputs(dev_setup)
        contexts = {"cond": [positive], "uncond": [negative]}

        def predict(x, t, branch, skip, model=model, contexts=contexts):
            return model(x, t, contexts[branch])

        wrapped = CfgParallel(mesh).wrap(predict) if config.cfg_parallel else predict

        def step(wrapped=wrapped, latents=latents, t=t) -> None:
            with torch.no_grad():
                wrapped(latents, t, "cond", ())
                wrapped(latents, t, "uncond", ())

        per_step, warm, alloc, reserved = _measure(step, dev_setup)
        results.append(Result(name, per_step, warm, alloc, reserved, None, f"rank 0 of {world}"))
        del model
        _free(first.device)
    return results


def run_ti2v_5b(setup: Setup, args: argparse.Namespace, started: float) -> Result:
    name = f"TI2V-5B {setup.height}x{setup.width}x{setup.frames} bf16"
    if time.perf_counter() - started > args.budget_s:
        return Result(name, note="skipped: time budget")
    model = random_dit(setup.cfg, torch.bfloat16, setup.device, seed=0)
    master = {k: v.cpu() for k, v in model.state_dict().items()}
    del model
    _free(setup.device)
    result, _ = run_case(Case(name), master, setup)
    result.note = f"per-token t (first latent frame at 0), {setup.tokens} tokens"
    return result


def plan_two_experts(high: WanModel, low: WanModel, setup: Setup, free: int,
                     margin: int = GIB) -> tuple[int, int]:
    """(blocks_to_swap, estimated peak bytes): the smallest swap count, the same for both experts, with which both
    resident weight sets plus the larger forward's activations and workspace fit `free` minus `margin`."""
    for count in range(len(low.blocks)):
        a, b = (estimate_peak_bytes(m, *setup.planner_size, count) for m in (high, low))
        total = max(a.total + b.weight_bytes, b.total + a.weight_bytes)
        if total <= free - margin:
            return count, total
    raise RuntimeError(f"two experts do not fit {free / GIB:.2f} GiB even swapping {count} blocks each: "
                       f"{total / GIB:.2f} GiB")


def _smoke_free(high: WanModel, low: WanModel, setup: Setup) -> int:
    """A budget that forces swapping about half of each expert's blocks."""
    half: list[MemoryEstimate] = [estimate_peak_bytes(m, *setup.planner_size, setup.cfg.num_layers // 2)
                                  for m in (high, low)]
    return half[0].total + half[1].weight_bytes + GIB


def run_a14b(setup: Setup, args: argparse.Namespace) -> Result:
    """The Wan2.2 A14B pair: two fp8_scaled experts, both block-swapped, switched by timestep."""
    high, low = (build_fp8_model_blockwise(setup.cfg, setup.device, seed=s) for s in (1, 2))
    free = _smoke_free(high, low, setup) if args.smoke else 23 * GIB
    swap, estimate = plan_two_experts(high, low, setup, free)
    print(f"A14B plan: blocks_to_swap {swap} per expert, estimated peak {estimate / GIB:.2f} GiB", flush=True)
    swappers = [enable_block_swap(m, swap, setup.device) for m in (high, low)]
    switch = ExpertSwitch(high, low, A14B_BOUNDARY, 4.0, 3.0, setup.device)
    latents, _, positive, negative = _inputs(setup)
    t_high, t_low = (torch.tensor([v], device=setup.device) for v in (900.0, 500.0))
    with torch.no_grad():
        def step() -> None:
            for t in (t_high, t_low):
                switch(latents, t, [positive])
                switch(latents, t, [negative])
        t0 = time.perf_counter()
        for t in (t_high, t_low):  # one warm-up forward per expert
            switch(latents, t, [positive])
        _sync(setup.device)
        warm = time.perf_counter() - t0
        pairs = dataclasses.replace(setup, steps=args.steps_14b, warmup=0)
        per_pair, _, alloc, reserved = _measure(step, pairs)
    if switch.used[-4:] != ["high", "high", "low", "low"]:
        raise RuntimeError(f"the expert switch ran {switch.used[-4:]} for t = 900, 900, 500, 500")
    for swapper in swappers:
        if swapper is not None:
            swapper.remove()
    note = (f"2 experts, blocks_to_swap {swap} each ({free / GIB:.1f} GiB free); weights "
            f"{2 * weight_bytes(low) / 1e9:.1f} GB in all; s/step = mean of a high- and a low-noise step")
    return Result(f"A14B {setup.height}x{setup.width}x{setup.frames} fp8_scaled+swap", per_pair / 2, warm, alloc,
                  reserved, estimate, note)


def _gb(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _row(r: Result, cfg: DiTConfig, setup: Setup) -> str:
    if r.seconds_per_step is None:
        return f"{r.name:34s} {r.note}"
    tflops = 2 * flops_per_forward(cfg, setup.tokens) / r.seconds_per_step / 1e12
    return (f"{r.name:34s} {r.seconds_per_step:8.3f} {r.warmup_seconds:8.1f} {_gb(r.peak_allocated):>9s} "
            f"{_gb(r.peak_reserved):>9s} {_gb(r.estimate):>9s} {50 * r.seconds_per_step:8.1f} {tflops:8.1f}  {r.note}")


HEADER = (f"{'case':34s} {'s/step':>8s} {'warmup s':>8s} {'alloc GiB':>9s} {'resv GiB':>9s} {'est GiB':>9s} "
          f"{'50 steps':>8s} {'TFLOP/s':>8s}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: exercise every path in seconds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per 1.3B case")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per 1.3B case")
    parser.add_argument("--steps-14b", type=int, default=1, help="timed steps of the 14B case")
    parser.add_argument("--skip-14b", action="store_true", help="skip both 14B cases (Wan2.1 14B, Wan2.2 A14B)")
    parser.add_argument("--skip-ti2v", action="store_true", help="skip the Wan2.2 TI2V-5B case")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the remaining 1.3B cases after this")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.smoke:
        torch.set_num_threads(1)
        device, size, backend = torch.device("cpu"), (64, 64, 5), "eager"
        cfg13, cfg14, size14 = SMOKE, SMOKE_14B, (64, 96, 5)
        cfg5, size5, cfg_a14, size_a14 = SMOKE_5B, (64, 96, 5), SMOKE_14B, (64, 96, 5)
        args.steps, args.steps_14b = 1, 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke for the CPU check")
        device, size, backend = torch.device("cuda"), (480, 832, 81), "inductor"
        cfg13, cfg14, size14 = TASKS["t2v-1.3B"].dit, TASKS["t2v-14B"].dit, (720, 1280, 81)
        cfg5, size5, cfg_a14, size_a14 = TASKS["ti2v-5B"].dit, (704, 1280, 121), TASKS["t2v-A14B"].dit, (720, 1280, 81)
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, backends {available_backends()}")
    setup = Setup(cfg13, *size, device, args.steps, args.warmup, backend)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        results = run_parallel(setup, world)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{world} processes, DiT {cfg13.dim}-dim at {size[0]}x{size[1]}x{size[2]}\n{HEADER}")
            for result in results:
                print(_row(result, cfg13, setup), flush=True)
        torch.distributed.destroy_process_group()
        return 0
    label = "tiny smoke DiT" if args.smoke else "T2V-1.3B-shaped DiT"
    print(f"{label} at {size[0]}x{size[1]}x{size[2]} ({video_tokens(cfg13, *size)} tokens)")
    print(HEADER, flush=True)
    results = run_1_3b(setup, args, started)
    if not args.skip_ti2v:
        setup5 = Setup(cfg5, *size5, device, args.steps, args.warmup, backend,
                       stride=TASKS["ti2v-5B"].vae.space_stride, per_token_t=True)
        results.append(run_ti2v_5b(setup5, args, started))
        _free(device)
        print(_row(results[-1], cfg5, setup5), flush=True)
    if not args.skip_14b:
        setup14 = Setup(cfg14, *size14, device, args.steps_14b, 0, backend)
        result = run_14b(setup14, args)
        _free(device)
        print(_row(result, cfg14, setup14), flush=True)
        results.append(result)
        setup_a14 = Setup(cfg_a14, *size_a14, device, args.steps_14b, 0, backend)
        results.append(run_a14b(setup_a14, args))
        _free(device)
        print(_row(results[-1], cfg_a14, setup_a14), flush=True)
    _summary(results, setup)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def _summary(results: list[Result], setup: Setup) -> None:
    by_name = {r.name: r for r in results if r.seconds_per_step is not None}
    ours = [r for r in by_name.values() if not r.name.startswith(("diffusers", "14B", "A14B", "TI2V"))]
    ref = by_name.get("diffusers (reference)")
    base = by_name.get("bf16 sdpa")
    if ours:
        best = min(ours, key=lambda r: r.seconds_per_step)
        print(f"fastest: {best.name}, 50 steps with CFG = {50 * best.seconds_per_step:.1f} s (goal <= 60 s)")
    if ref and base:
        print(f"bf16 sdpa vs diffusers at equal settings: {ref.seconds_per_step / base.seconds_per_step:.2f}x "
              f"(goal >= 1.3x)")
    for prefix in ("14B", "A14B"):
        big = next((r for r in results if r.name.startswith(prefix) and r.peak_reserved), None)
        if big:
            print(f"{prefix} peak reserved {big.peak_reserved / 1e9:.1f} GB (goal < 24 GB)")


if __name__ == "__main__":
    raise SystemExit(main())
