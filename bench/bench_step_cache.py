"""Step caching on the toy world: model calls skipped, denoising wall time and the toy scorer's colour+motion of
TeaCache / MagCache at a few thresholds against uncached sampling, with the toy T2V DiT's calibration
(`wan_core/toy_models/wan21_toy_t2v_dit.stepcache.json`, written by `python -m wan_core.calibrate_cache`).

    python bench/bench_step_cache.py [--heldout_seeds 2] [--train_count 24] [--threads 1] [--settings none:0 ...]

Prints a Markdown table (one row per setting). The pairs are `training.toy.evaluate.base_pairs`, whose noise
seeds the calibration never used.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from training.toy.evaluate import Pair, Sampling, ToySet, base_pairs, sampling_from_file
from wan_core.runtime.step_cache import CacheCalibration, StepCache, StepCacheSettings, calibration_path
from wan_core.sampling.conditioning import text_to_video
from wan_core.sampling.pipeline import SamplerSettings, decode_latents, denoise, encode_prompts
from wan_core.toy.score import score_many

SETTINGS = [("none", 0.0), ("teacache", 0.1), ("teacache", 0.15), ("teacache", 0.2), ("magcache", 0.005),
            ("magcache", 0.01), ("magcache", 0.02)]


def run(models: ToySet, pairs: Sequence[Pair], sampling: Sampling, cache: StepCacheSettings) -> dict[str, float]:
    prompts = sorted({p.combo.caption for p in pairs} | {sampling.negative_prompt})
    embeds = dict(zip(prompts, encode_prompts(models.t5, prompts)))
    cond = text_to_video(sampling.height, sampling.width, sampling.frames)
    latents, computed, skipped, seconds = [], 0, 0, 0.0
    for pair in pairs:
        settings = SamplerSettings(steps=sampling.steps, guidance_scale=sampling.guidance, flow_shift=sampling.shift,
                                   seed=pair.seed, solver=sampling.solver)
        step_cache = StepCache(cache)
        start = time.perf_counter()
        latents.append(denoise(models.dit, cond, [embeds[pair.combo.caption]], [embeds[sampling.negative_prompt]],
                               settings, step_cache=step_cache))
        seconds += time.perf_counter() - start
        computed += step_cache.computed if cache.active else 2 * sampling.steps
        skipped += step_cache.skipped
    clips = torch.cat([decode_latents(models.vae, lat) for lat in latents])
    summary = score_many(list(clips), [p.combo for p in pairs])
    return {"skipped": skipped, "calls": computed + skipped, "seconds": seconds,
            "colour_motion": summary.colour_motion, "colour": summary.colour, "motion": summary.motion}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout_seeds", type=int, default=2)
    parser.add_argument("--train_count", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=[f"{m}:{t}" for m, t in SETTINGS],
                        help="mode:threshold pairs, e.g. none:0 teacache:0.3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = ToySet.load()
    sampling = sampling_from_file(models.dit_path)
    calibration = CacheCalibration.load(calibration_path(models.dit_path))
    pairs = base_pairs(args.heldout_seeds, args.train_count)
    print(f"{len(pairs)} prompt x seed pairs, {sampling.steps} steps, guidance {sampling.guidance}\n")
    print("| cache | threshold | model calls skipped | denoise s | colour+motion | colour | motion |")
    print("|---|---|---|---|---|---|---|")
    for mode, threshold in ((m, float(t)) for m, t in (item.split(":") for item in args.settings)):
        r = run(models, pairs, sampling, StepCacheSettings(mode, threshold, calibration))
        print(f"| {mode} | {threshold} | {r['skipped']}/{r['calls']} ({100 * r['skipped'] / r['calls']:.0f}%) | "
              f"{r['seconds']:.1f} | {r['colour_motion']:.3f} | {r['colour']:.3f} | {r['motion']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
