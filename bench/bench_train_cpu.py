"""LoRA training step on the CPU: step time and peak memory, with and without gradient checkpointing.

    python bench/bench_train_cpu.py [--size 256 256 1] [--steps 3] [--rank 32] [--threads N] [--json out.json]
    python bench/bench_train_cpu.py --smoke      # tiny config in this process, seconds (run by the test suite)

Configs: `tiny` (dim 64, ffn 128, 4 heads, 2 blocks, text dim 32: the test model) and `1.3B-wide` (dim 1536,
ffn 8960, 12 heads, text dim 4096: the 1.3B model's blocks, two of them). Weights are random with the official
initialisation (bench/random_dit.py) in fp32, frozen; a LoRA of `--rank` (alpha = rank) sits on every block Linear.
One step = `training.step.training_step` (flow matching, `uniform` timesteps) on one video of `--size`
(H W frames; latent F = (frames-1)/4+1, H/8 x W/8) with a 64-token caption, backward, AdamW step.

Each case runs in its own process so its numbers are its own:
- `step s`: mean wall time of `--steps` steps after one warm-up step;
- `peak live MB`: the largest total size of tensors created during one step and alive at the same time (forward
  activations kept for backward, gradients, temporaries), counted with `wan_core.runtime.offload.LiveTensorBytes`;
  weights
  and inputs that existed before the step are not included;
- `peak RSS MB`: the process's maximum resident set size (weights, Python, allocator caches included).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from random_dit import random_dit  # noqa: E402

from training.step import StepConfig, sample_seeds, training_step  # noqa: E402
from training.timesteps import TimestepConfig  # noqa: E402
from wan_core.lora.network import LoRANetwork  # noqa: E402
from wan_core.models.config import DiTConfig  # noqa: E402
from wan_core.runtime.offload import LiveTensorBytes  # noqa: E402

CONFIGS = {
    "tiny": DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32),
    "1.3B-wide": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2),
}
TEXT_TOKENS = 64


def _batch(cfg: DiTConfig, size: tuple[int, int, int]) -> dict:
    height, width, frames = size
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.out_dim, (frames - 1) // 4 + 1, height // 8, width // 8, generator=gen)
    return {"latents": latents, "t5": [torch.randn(TEXT_TOKENS, cfg.text_dim, generator=gen)]}


def _step(model, network, optimizer, batch, step: int) -> float:
    result = training_step(model, batch, StepConfig(TimestepConfig("uniform")), sample_seeds(0, step, 0, 0, 1))
    result.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(result.loss.detach())


def run_case(name: str, checkpointing: bool, size: tuple[int, int, int], steps: int, rank: int) -> dict:
    cfg = CONFIGS[name]
    model = random_dit(cfg, torch.float32)
    model.gradient_checkpointing = checkpointing
    network = LoRANetwork(model, rank=rank, alpha=rank)
    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=1e-4)
    batch = _batch(cfg, size)
    _step(model, network, optimizer, batch, 0)
    start = time.perf_counter()
    for i in range(steps):
        _step(model, network, optimizer, batch, i + 1)
    seconds = (time.perf_counter() - start) / steps
    with LiveTensorBytes() as live:
        _step(model, network, optimizer, batch, steps + 1)
    tokens = batch["latents"].shape[2] * (size[0] // 16) * (size[1] // 16)
    return {"config": name, "checkpointing": checkpointing, "size": list(size), "tokens": tokens,
            "lora_params": sum(p.numel() for p in network.trainable_parameters()),
            "dit_params": sum(p.numel() for p in model.parameters()), "step_s": seconds,
            "peak_live_mb": live.peak / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def _table(rows: list[dict]) -> str:
    lines = [f"{'config':<10} {'ckpt':<5} {'tokens':>6} {'step s':>8} {'peak live MB':>13} {'peak RSS MB':>12}"]
    for r in rows:
        lines.append(f"{r['config']:<10} {'yes' if r['checkpointing'] else 'no':<5} {r['tokens']:>6} "
                     f"{r['step_s']:>8.3f} {r['peak_live_mb']:>13.1f} {r['peak_rss_mb']:>12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 1], metavar=("H", "W", "FRAMES"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--smoke", action="store_true", help="tiny config, 32x32, 1 step")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--case", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: NAME CHECKPOINTING
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:  # in this process, both modes of the tiny config
        rows = [run_case("tiny", checkpointing, (32, 32, 1), 1, 4) for checkpointing in (False, True)]
        print(_table(rows))
        return 0
    if args.case:
        row = run_case(args.case[0], args.case[1] == "1", tuple(args.size), args.steps, args.rank)
        print(json.dumps(row))
        return 0
    rows = []
    for name in args.configs:
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--case", name, "1" if checkpointing else "0", "--size",
                       *map(str, args.size), "--steps", str(args.steps), "--rank", str(args.rank)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
