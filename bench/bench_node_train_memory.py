"""Peak CPU memory (VmHWM) of the ComfyUI Train LoRA node, each run in a fresh process.

The models folder holds the tiny test model set (tests/tiny_model_set.py) with its T2V DiT replaced by a random
DiT of the 1.3B width (dim 1536, ffn 8960, 12 heads) with 2 blocks (--smoke: the tiny DiT); a two-clip toy-world
dataset is cached once with the Cache Dataset node. A measuring process then loads the DiT with the DiT Loader
node (under torch.inference_mode, as ComfyUI runs nodes), reads VmHWM, trains a LoRA with the Train LoRA node for
--steps steps and reads VmHWM again.

    PYTHONPATH=. python bench/bench_node_train_memory.py [--smoke] [--code OTHER_CHECKOUT ...]

Each --code folder (a checkout of this repository, e.g. an older commit from `git worktree add`) is measured with
its own code on the same files; the default is this checkout. Prints one JSON row per checkout (MB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDE = {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 2}
CLIP_SIZE, CLIP_FRAMES = 32, 5


def _vm_hwm_mb() -> float:
    """The process's peak resident set size so far (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _environment(work: Path) -> dict[str, str]:
    from nodes import comfy_adapter as adapter

    return {adapter.MODELS_DIR_ENV: str(work / "models"), adapter.OUTPUT_DIR_ENV: str(work / "output"),
            adapter.INPUT_DIR_ENV: str(work / "input")}


def prepare(work: Path, smoke: bool) -> Path:
    """Models, dataset and caches under `work`; returns the dataset TOML."""
    import torch

    from tests import tiny_model_set as tms
    from training.init_dit import write_dit
    from wan_core.models.dit import WanModel, load_dit
    from wan_core.toy.world import Combo, write_dataset

    paths = tms.write_model_set(work / "models")
    dit_path = paths[tms.FILES["dit_t2v"][1]]
    if not smoke:
        cfg = dataclasses.replace(load_dit(dit_path).config, **WIDE)
        torch.manual_seed(0)
        write_dit(WanModel(cfg), dit_path)
    combos = [Combo("purple", "square", "right"), Combo("purple", "circle", "left")]
    write_dataset(work / "input" / "wantuner_dataset", combos, 1, seed=3, fmt="mp4", size=CLIP_SIZE,
                  num_frames=CLIP_FRAMES)
    os.environ.update(_environment(work))
    from nodes import NODE_CLASS_MAPPINGS as N

    vae = N["WanTunerVAELoader"]().load(tms.FILES["vae"][1], "fp32", False, "auto")[0]
    t5 = N["WanTunerT5Loader"]().load(tms.FILES["t5"][1], "default", False, "")[0]
    handle = N["WanTunerCacheDataset"]().cache(
        vae=vae, t5=t5, dataset_path="wantuner_dataset/videos", width=CLIP_SIZE, height=CLIP_SIZE,
        frames=CLIP_FRAMES, frame_extraction="head", enable_bucket=False, num_repeats=1, batch_size=1,
        caption_extension=".txt")["result"][0]
    return handle.config


def measure(work: Path, dataset_config: Path, steps: int) -> dict[str, float]:
    """In this (fresh) process: load the DiT with the loader node, train with the Train LoRA node."""
    import torch

    from nodes import NODE_CLASS_MAPPINGS as N
    from nodes import training as tr
    from tests import tiny_model_set as tms

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with torch.inference_mode():
        dit = N["WanTunerDiTLoader"]().load(tms.FILES["dit_t2v"][1], "auto", "default", "none", "sdpa", 0,
                                            False)[0]
    loaded = _vm_hwm_mb()
    params = sum(p.numel() for p in dit.model.obj.parameters())
    dataset = tr.DatasetHandle(dataset_config, 2, ((CLIP_SIZE, CLIP_SIZE, CLIP_FRAMES),), False, False, False, "")
    with torch.inference_mode():
        N["WanTunerTrainLoRA"]().train(
            dit=dit, dataset=dataset, output_name="bench/lora", rank=4, alpha=4.0, learning_rate=1e-3, steps=steps,
            epochs=0, optimizer="AdamW", timestep_sampling="shift", discrete_flow_shift=3.0, seed=1,
            gradient_checkpointing=True, save_every_n_steps=0, save_format="musubi", mixed_precision="no")
    peak = _vm_hwm_mb()
    return {"dit_params_m": round(params / 1e6, 1), "dit_mb": round(params * 4 / 2**20, 1),
            "hwm_after_load_mb": round(loaded, 1), "hwm_after_train_mb": round(peak, 1),
            "training_adds_mb": round(peak - loaded, 1)}


def run_measurement(code: Path, work: Path, dataset_config: Path, steps: int) -> dict[str, object]:
    env = {**os.environ, **_environment(work), "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", str(work), "--dataset",
                          str(dataset_config), "--steps", str(steps)], env=env, cwd=str(code), check=True,
                         capture_output=True, text=True)
    return {"code": str(code), **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny DiT instead of the 1.3B-wide one")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--code", type=Path, nargs="*", default=None, help="checkouts to measure (default: this)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.dataset, args.steps)))
        return 0
    with tempfile.TemporaryDirectory(prefix="wantuner_node_memory_") as folder:
        work = Path(folder)
        dataset_config = prepare(work, args.smoke)
        for code in args.code or [ROOT]:
            print(json.dumps(run_measurement(code.resolve(), work, dataset_config, args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
