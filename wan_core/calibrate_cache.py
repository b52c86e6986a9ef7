"""`python -m wan_core.calibrate_cache`: calibrate step caching (`wan_core.runtime.step_cache`) for one DiT.

Runs a few uncached samplings (each prompt x seed) with the generate CLI's model flags and settings, records per
step how much the timestep modulation and the velocity change, fits the TeaCache polynomial and the MagCache
magnitude ratios, and writes them to a small JSON file (default: ``<dit stem>.stepcache.json`` beside the DiT,
where `python -m wan_core.generate --cache_mode ...` finds it).

    python -m wan_core.calibrate_cache --dit wan2.1_t2v_1.3B_bf16.safetensors --vae ... --t5 ... \\
        --prompts "a cat walking on grass" "a red car on a coastal road" --seeds 2
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from wan_core.generate.cli import (
    build_job_conditioning,
    build_parser,
    check_files_and_outputs,
    encode_job_prompts,
    jobs_from_lines,
    spec_from_args,
)
from wan_core.loading.checkpoint import ensure_writable_file
from wan_core.loading.model_set import ModelSet
from wan_core.runtime.step_cache import CacheCalibration, CalibrationRecorder, calibration_path
from wan_core.sampling.pipeline import denoise

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a cat walking on grass", "a red car driving along a coastal road at sunset",
                   "a person dancing in the rain")
SEED_BASE = 4242


def parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "python -m wan_core.calibrate_cache"
    p.description = "Calibrate TeaCache / MagCache step caching for a DiT from a few uncached samplings."
    g = p.add_argument_group("calibration")
    g.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS),
                   help="prompts to sample (inline options allowed)")
    g.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    g.add_argument("--out", default=None, help="calibration JSON (default: <dit stem>.stepcache.json beside the DiT)")
    return p


def calibrate(models: ModelSet, lines: Sequence[str], args: argparse.Namespace) -> CacheCalibration:
    """Uncached samplings of `lines`, recorded and fitted."""
    jobs = jobs_from_lines(lines, args, models.spec)
    steps = {r.settings.steps for r in jobs}
    if len(steps) != 1:
        raise ValueError(f"calibration prompts must share one step count, got {sorted(steps)}")
    embeds = encode_job_prompts(models, jobs, keep_loaded=False)
    conds = build_job_conditioning(models, jobs, keep_loaded=False)
    dit = models.get("dit")
    recorder = CalibrationRecorder()
    for n, (r, c) in enumerate(zip(jobs, conds)):
        logger.info("calibration run %d/%d: %s (seed %d)", n + 1, len(jobs), r.job.prompt, r.settings.seed)
        needs_uncond = r.settings.guidance_scale != 1.0 or r.settings.slg is not None
        denoise(dit, c, [embeds[r.job.prompt]], [embeds[r.negative_prompt]] if needs_uncond else None, r.settings,
                step_cache=recorder)
    return recorder.fit(steps.pop(), source=models.spec.path("dit").name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        spec = spec_from_args(args)
        check_files_and_outputs(args, spec)
        out = Path(args.out) if args.out else calibration_path(spec.path("dit"))
        ensure_writable_file(out, "--out")
        lines = [f"{p} --d {SEED_BASE + k}" for p in args.prompts for k in range(args.seeds)]
        calibration = calibrate(ModelSet(spec), lines, args)
        sys.stdout.write(f"{calibration.save(out)}\n")
        return 0
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
