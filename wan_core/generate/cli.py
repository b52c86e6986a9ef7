"""`python -m wan_core.generate`: the generate CLI, with musubi's `wan_generate_video.py` flag names.

Single prompt, `--from_file` batch (models load once; T5 encodes every prompt, then the DiT runs them all, then
the VAE decodes) and `--interactive` (prompts from stdin, models kept loaded). With no model paths it runs the
embedded toy model set (see wan_core/toy_models/README.md).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from tqdm import tqdm

from wan_core.generate.jobs import Job, parse_prompt_line, read_prompt_lines
from wan_core.generate.outputs import OUTPUT_TYPES, load_latent, output_stem, save_outputs
from wan_core.loading.checkpoint import (
    ensure_writable_dir,
    ensure_writable_file,
    peek_shapes,
    read_metadata,
    save_safetensors,
)
from wan_core.loading.model_set import (
    ModelSet,
    ModelSpec,
    check_model_file,
    expert_paths,
    read_dit_config,
    sampling_defaults,
    with_toy_experts,
)
from wan_core.media.io import frames_to_tensor, image_to_tensor, read_image, read_video
from wan_core.models.config import (
    CONFIG_METADATA_KEY,
    TASKS,
    DiTConfig,
    TaskPreset,
    VAEConfig,
    config_to_json,
    detect_config,
    get_task,
    stored_config,
    tasks_matching,
)
from wan_core.models.dit import WanModel, load_dit, normalize_dit_keys
from wan_core.parallel.cli import add_parallel_args, finish_parallel, setup_parallel
from wan_core.parallel.models import ParallelModelSet
from wan_core.runtime.offload import PINNED_MEMORY_HELP
from wan_core.runtime.prepare import merge_spec_loras
from wan_core.runtime.step_cache import (
    CACHE_MODES,
    DEFAULT_THRESHOLDS,
    CacheCalibration,
    StepCache,
    StepCacheSettings,
    cache_for_run,
    calibration_path,
    describe,
    find_calibration,
)
from wan_core.sampling import conditioning as cond
from wan_core.sampling.experts import ExpertSwitch, LazyExpert, boundary_fraction
from wan_core.sampling.guidance import CFG_SKIP_MODES, SLG_MODES, SLGConfig, cfg_apply_pattern
from wan_core.sampling.pipeline import SamplerSettings, decode_latents, denoise, encode_prompts
from wan_core.sampling.solvers import SAMPLERS

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wan_core.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--task", choices=sorted(TASKS), default=None,
                   help="task (defaults for steps/shift/guidance/size); inferred from the DiT when omitted")
    g.add_argument("--dit", help="DiT checkpoint (.safetensors/.pth; official, ComfyUI or diffusers layout, or a "
                                  "sharded model folder); for Wan2.2 A14B the low-noise expert, or the official "
                                  "folder holding high_noise_model/ and low_noise_model/ (both experts)")
    g.add_argument("--dit_high_noise", help="Wan2.2 A14B high-noise expert (used for t >= boundary * 1000); the "
                                             "official root folder picks its high_noise_model/")
    g.add_argument("--timestep_boundary", type=float, default=None,
                   help="Wan2.2 expert boundary, 0-1 or 0-1000 (default: the task's, 0.875 T2V / 0.9 I2V)")
    g.add_argument("--offload_inactive_dit", action="store_true",
                   help="keep only the active Wan2.2 expert on the device, the other in CPU memory")
    g.add_argument("--lazy_loading", action="store_true",
                   help="load each Wan2.2 expert when the sampler first needs it (the low-noise one at the switch); "
                        "without --offload_inactive_dit the expert switched away from is freed")
    g.add_argument("--force_v2_1_time_embedding", action="store_true",
                   help="accepted for compatibility: one timestep per sample is what this sampler passes already")
    g.add_argument("--vae", help="VAE checkpoint (Wan2.1_VAE.pth or wan_2.1_vae.safetensors)")
    g.add_argument("--vae_dtype", default=None, choices=["float32", "float16", "bfloat16"])
    g.add_argument("--vae_cache_cpu", action="store_true", help="keep the VAE causal cache in main memory")
    g.add_argument("--vae_tiling", action="store_true", help="decode in spatial tiles (default: automatic at 720p)")
    g.add_argument("--t5", help="umT5 checkpoint (models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors)")
    g.add_argument("--tokenizer", help="umT5 tokenizer (folder with spiece.model, or the .model file)")
    g.add_argument("--ckpt_dir", help="official checkpoint folder (tokenizer in <ckpt_dir>/google/umt5-xxl)")
    g.add_argument("--fp8_t5", action="store_true", help="run the T5 in fp8")
    g.add_argument("--clip", help="CLIP vision checkpoint (I2V/FLF2V/Fun-Control with a start image)")
    g.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    g = p.add_argument_group("prompt and size")
    g.add_argument("--prompt", help="prompt text (inline --w/--h/--f/--d/--s/--g/--fs/--n/--i/--ei/--cn allowed)")
    g.add_argument("--negative_prompt", default=None, help="negative prompt (default: the task's)")
    g.add_argument("--video_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None)
    g.add_argument("--video_length", type=int, default=None, help="frames, 4n+1 (1 for an image)")
    g.add_argument("--fps", type=int, default=None)
    g.add_argument("--infer_steps", type=int, default=None)
    g.add_argument("--flow_shift", type=float, default=None)
    g.add_argument("--guidance_scale", type=float, default=None, help="guidance (Wan2.2: of the low-noise expert)")
    g.add_argument("--guidance_scale_high_noise", type=float, default=None,
                   help="guidance of the Wan2.2 high-noise expert (default: the task's)")
    g.add_argument("--seed", type=int, default=None, help="random when omitted")
    g.add_argument("--cpu_noise", action="store_true", help="draw the initial noise on the CPU (ComfyUI-compatible)")
    g.add_argument("--sample_solver", choices=sorted(SAMPLERS), default="unipc",
                   help="flowmatch_distill: the step/CFG-distilled LoRAs' schedule (lightx2v, CausVid), e.g. "
                        "--infer_steps 4 --flow_shift 5 --guidance_scale 1")
    g.add_argument("--cfg_skip_mode", choices=CFG_SKIP_MODES, default="none")
    g.add_argument("--cfg_apply_ratio", type=float, default=None)
    g.add_argument("--slg_mode", choices=SLG_MODES, default=None)
    g.add_argument("--slg_layers", default=None, help="comma-separated block indices, e.g. 4,5,6")
    g.add_argument("--slg_scale", type=float, default=3.0)
    g.add_argument("--slg_start", type=float, default=0.0)
    g.add_argument("--slg_end", type=float, default=0.3)
    g = p.add_argument_group("image and control inputs")
    g.add_argument("--image_path", help="start image (I2V, Fun-Control, TI2V-5B)")
    g.add_argument("--end_image_path", help="end image (FLF2V; experimental for I2V)")
    g.add_argument("--trim_tail_frames", type=int, default=0)
    g.add_argument("--control_path", help="control video file or folder of images (Fun-Control)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_weight", nargs="*", default=[])
    g.add_argument("--lora_multiplier", nargs="*", type=float, default=[])
    g.add_argument("--lora_weight_high_noise", nargs="*", default=[], help="LoRAs of the Wan2.2 high-noise expert")
    g.add_argument("--lora_multiplier_high_noise", nargs="*", type=float, default=[])
    g.add_argument("--include_patterns", nargs="*", default=None)
    g.add_argument("--exclude_patterns", nargs="*", default=None)
    g.add_argument("--lycoris", action="store_true", help="accepted for compatibility (LoHa/LoKr are auto-detected)")
    g.add_argument("--save_merged_model", default=None, help="save the DiT with the LoRAs merged, then exit")
    g = p.add_argument_group("memory and speed")
    g.add_argument("--attn_mode", default="torch", help="torch/sdpa, xformers, sageattn, flash2/flash, flash3")
    g.add_argument("--fp8", action="store_true", help="DiT weights in fp8")
    g.add_argument("--fp8_scaled", action="store_true", help="block-wise scaled fp8 (with --fp8)")
    g.add_argument("--fp8_fast", action="store_true", help="fp8 matmuls (compute capability >= 8.9)")
    g.add_argument("--blocks_to_swap", default=None, help="number of DiT blocks to stream from CPU memory, or 'auto'")
    g.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help=PINNED_MEMORY_HELP)
    g.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    g.add_argument("--cache_mode", choices=CACHE_MODES, default="none",
                   help="skip DiT forwards that barely change between steps (needs a calibration, see "
                        "`python -m wan_core.calibrate_cache`; without one the official Wan2.1 T2V / I2V models use "
                        "the published TeaCache coefficients)")
    g.add_argument("--cache_threshold", type=float, default=None,
                   help=f"skip threshold (0 = compute every step; default per mode: {DEFAULT_THRESHOLDS})")
    g.add_argument("--cache_calibration", default=None,
                   help="calibration JSON (default: <dit stem>.stepcache.json beside the DiT)")
    g = p.add_argument_group("output")
    g.add_argument("--save_path", default="outputs", help="output folder")
    g.add_argument("--output_type", choices=OUTPUT_TYPES, default="video")
    g.add_argument("--no_metadata", action="store_true")
    g.add_argument("--latent_path", nargs="*", default=None, help="decode saved latents instead of generating")
    g.add_argument("--from_file", help="prompt file: one prompt per line with inline options")
    g.add_argument("--interactive", action="store_true", help="read prompts from standard input")
    add_parallel_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Resolving settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """A job with every setting decided."""

    job: Job
    task: str
    height: int
    width: int
    frames: int
    settings: SamplerSettings
    negative_prompt: str
    fps: int
    image: torch.Tensor | None = None
    end_image: torch.Tensor | None = None
    control: torch.Tensor | None = None
    boundary: float | None = None  # Wan2.2 A14B: expert boundary (fraction of 1000)
    guidance_high: float | None = None  # Wan2.2 A14B: guidance of the high-noise expert


def infer_task(spec: ModelSpec, image_given: bool) -> str:
    """The task for defaults: --task, else the DiT's stored task, else from its architecture."""
    if spec.task:
        return spec.task
    path = spec.path("dit")
    meta = sampling_defaults_for(spec)
    if "task" in meta:
        return meta["task"]
    metadata = read_metadata_safe(path)
    check_model_file(path, "dit", "--dit")
    cfg = (stored_config(metadata, DiTConfig, f"--dit {path.name}")
           or detect_config(normalize_dit_keys(peek_shapes(path), path.name)))
    fits = tasks_matching(cfg)
    if cfg.out_dim == 48:
        return "ti2v-5B"
    if not cfg.has_image_input and cfg.in_dim == cfg.out_dim + 20:
        return "i2v-A14B"
    if spec.dit_high and cfg.model_type == "t2v":
        return "t2v-A14B"
    if cfg.in_dim == 48:
        return "i2v-14B-FC" if image_given else ("t2v-1.3B-FC" if cfg.dim == 1536 else "t2v-14B-FC")
    if fits:
        return fits[0]
    return {"t2v": "t2v-1.3B", "i2v": "i2v-14B", "flf2v": "flf2v-14B"}[cfg.model_type]


def read_metadata_safe(path: Path) -> dict[str, str]:
    return read_metadata(path) if path.exists() else {}


def sampling_defaults_for(spec: ModelSpec) -> dict:
    path = spec.path("dit")
    return sampling_defaults(path) if path.exists() else {}


def _first(*values):
    return next((v for v in values if v is not None), None)


T = TypeVar("T")


def _given(value: T | None, what: str) -> T:
    """`value`, which the earlier checks (`_check_inputs`, `Job.with_seed`) guarantee is not None."""
    if value is None:
        raise ValueError(f"{what} is missing")
    return value


def resolve_job(job: Job, args: argparse.Namespace, task: str, defaults: dict) -> Resolved:
    """Fill every setting: inline option > command line > the model file's defaults > the task preset."""
    preset = get_task(task)
    image = image_to_tensor(read_image(job.image_path)) if job.image_path else None
    end_image = image_to_tensor(read_image(job.end_image_path)) if job.end_image_path else None
    control = frames_to_tensor(read_video(job.control_path)) if job.control_path else None
    size = args.video_size or defaults.get("video_size") or (256, 256)
    height, width = _first(job.height, size[0]), _first(job.width, size[1])
    if image is not None and cond.takes_first_frame(preset):
        height, width = cond.first_frame_size((image.shape[-2], image.shape[-1]), height * width,
                                              preset.vae.space_stride * cond.PATCH)
    elif image is not None and not preset.is_fun_control and preset.dit.model_type != "flf2v":
        height, width = cond.size_for_image((image.shape[-2], image.shape[-1]), height * width)
    frames = 1 if preset.is_t2i else _first(job.frames, args.video_length, defaults.get("video_length"),
                                             preset.frame_num)
    cond.validate_video_size(height, width, frames)
    slg = None
    if args.slg_mode and args.slg_layers:
        slg = SLGConfig(args.slg_mode, args.slg_layers, args.slg_scale, args.slg_start, args.slg_end)
    settings = SamplerSettings(
        steps=_first(job.steps, args.infer_steps, defaults.get("infer_steps"), preset.sample_steps),
        guidance_scale=_first(job.guidance_scale, args.guidance_scale, defaults.get("guidance_scale"),
                              preset.guide_scale),
        flow_shift=_first(job.flow_shift, args.flow_shift, defaults.get("flow_shift"),
                          preset.shift_for(height, width)),
        seed=_given(job.seed, "the job's seed"), solver=args.sample_solver, cpu_noise=args.cpu_noise,
        cfg_skip_mode=args.cfg_skip_mode, cfg_apply_ratio=args.cfg_apply_ratio, slg=slg)
    cfg_apply_pattern(settings.cfg_skip_mode, settings.steps, settings.cfg_apply_ratio)  # validate now
    negative = _first(job.negative_prompt, args.negative_prompt, defaults.get("negative_prompt"),
                      preset.negative_prompt)
    fps = _first(args.fps, defaults.get("fps"), preset.fps)
    _check_inputs(task, image, end_image, control)
    boundary, guidance_high = _expert_settings(args, preset, settings.guidance_scale, defaults)
    return Resolved(job, task, height, width, frames, settings, negative, fps, image, end_image, control, boundary,
                    guidance_high)


def _expert_settings(args: argparse.Namespace, preset: TaskPreset, guidance: float,
                     defaults: dict) -> tuple[float | None, float | None]:
    """(boundary, high-noise guidance) of a Wan2.2 A14B task: command line > the DiT file's defaults
    (`timestep_boundary`, `guidance_scale_high_noise`) > the task preset; (None, None) for single-DiT tasks."""
    if preset.boundary is None:
        if args.dit_high_noise or args.timestep_boundary is not None or args.guidance_scale_high_noise is not None:
            raise ValueError(f"--dit_high_noise / --timestep_boundary / --guidance_scale_high_noise are for the "
                             f"Wan2.2 A14B tasks (t2v-A14B, i2v-A14B); task is {preset.name}")
        return None, None
    boundary = boundary_fraction(_first(args.timestep_boundary, defaults.get("timestep_boundary"), preset.boundary))
    return boundary, _first(args.guidance_scale_high_noise, defaults.get("guidance_scale_high_noise"),
                            preset.guide_scale_high, guidance)


def _check_inputs(task: str, image, end_image, control) -> None:
    preset = get_task(task)
    kind = "i2v" if preset.takes_image and preset.dit.model_type == "t2v" else preset.dit.model_type
    if cond.takes_first_frame(preset):
        if end_image is not None:
            raise ValueError(f"task {task} takes a start image only (--image_path, the first frame); drop "
                             f"--end_image_path")
        if control is not None:
            raise ValueError(f"--control_path needs a Fun-Control model (t2v-1.3B-FC, t2v-14B-FC, i2v-14B-FC); "
                             f"task is {task}")
        return
    if preset.is_fun_control:
        if control is None:
            raise ValueError(f"task {task} is a Fun-Control model: give a control video with --control_path (--cn)")
    elif control is not None:
        raise ValueError(f"--control_path needs a Fun-Control model (t2v-1.3B-FC, t2v-14B-FC, i2v-14B-FC); "
                         f"task is {task}")
    if kind == "flf2v" and (image is None or end_image is None):
        raise ValueError(f"task {task} needs both --image_path (first frame) and --end_image_path (last frame)")
    if kind == "t2v" and (image is not None or end_image is not None):
        raise ValueError(f"task {task} is text-to-video: --image_path / --end_image_path need an I2V model")
    if kind == "i2v" and not preset.is_fun_control and image is None:
        raise ValueError(f"task {task} is image-to-video: give a start image with --image_path (--i)")


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    fp8 = "fp8_fast" if args.fp8_fast else "fp8_scaled" if args.fp8_scaled else "fp8" if args.fp8 else None
    if args.fp8_scaled and not args.fp8:
        raise ValueError("--fp8_scaled is used together with --fp8")
    multipliers = list(args.lora_multiplier) + [1.0] * (len(args.lora_weight) - len(args.lora_multiplier))
    if len(multipliers) > len(args.lora_weight):
        raise ValueError(f"{len(args.lora_multiplier)} --lora_multiplier values for {len(args.lora_weight)} LoRAs")
    includes = _per_lora(args.include_patterns, len(args.lora_weight), "--include_patterns")
    excludes = _per_lora(args.exclude_patterns, len(args.lora_weight), "--exclude_patterns")
    swap = args.blocks_to_swap
    if swap is not None and swap != "auto":
        swap = int(swap)
    tokenizer = args.tokenizer or (str(Path(args.ckpt_dir) / "google" / "umt5-xxl") if args.ckpt_dir else None)
    vae_dtype = getattr(torch, args.vae_dtype) if args.vae_dtype else None
    high = _loras(args.lora_weight_high_noise, args.lora_multiplier_high_noise, "--lora_multiplier_high_noise")
    dit, dit_high = with_toy_experts(args.task, *expert_paths(args.dit, args.dit_high_noise))
    if high and not dit_high:
        raise ValueError("--lora_weight_high_noise needs the high-noise expert (--dit_high_noise)")
    return ModelSpec(dit=dit, dit_high=dit_high, loras_high=high,
                     offload_inactive=args.offload_inactive_dit, lazy_loading=args.lazy_loading, vae=args.vae,
                     t5=args.t5, clip=args.clip,
                     tokenizer=tokenizer, task=args.task,
                     device=args.device, attn=args.attn_mode, vae_dtype=vae_dtype, vae_cache_cpu=args.vae_cache_cpu,
                     vae_tiling=True if args.vae_tiling else None, fp8=fp8, fp8_t5=args.fp8_t5,
                     blocks_to_swap=swap, pinned_block_swap=args.use_pinned_memory_for_block_swap,
                     compile=args.compile,
                     loras=tuple(zip(args.lora_weight, multipliers, includes, excludes)))


def _loras(paths: list[str], multipliers: list[float], flag: str) -> tuple[tuple[str, float, None, None], ...]:
    """(path, multiplier, no include, no exclude) per LoRA; missing multipliers are 1.0."""
    if len(multipliers) > len(paths):
        raise ValueError(f"{len(multipliers)} {flag} values for {len(paths)} LoRAs")
    full = list(multipliers) + [1.0] * (len(paths) - len(multipliers))
    return tuple((p, m, None, None) for p, m in zip(paths, full))


def check_files_and_outputs(args: argparse.Namespace, spec: ModelSpec) -> None:
    """Up-front checks that need no model: each given checkpoint is of the kind its flag expects, the output
    folder (or merged-model file) can be written, the frame rate is positive."""
    for kind in ("dit", "vae", "t5", "clip"):
        if getattr(spec, kind):
            check_model_file(getattr(spec, kind), kind, f"--{kind}")
    if spec.dit_high:
        check_model_file(spec.dit_high, "dit", "--dit_high_noise")
    for path, *_ in spec.loras:
        check_model_file(path, "lora", "--lora_weight")
    for path, *_ in spec.loras_high:
        check_model_file(path, "lora", "--lora_weight_high_noise")
    if args.fps is not None and args.fps <= 0:
        raise ValueError(f"--fps must be a positive frame rate (e.g. 16), got {args.fps}")
    if args.save_merged_model:
        ensure_writable_file(args.save_merged_model, "--save_merged_model")
    else:
        ensure_writable_dir(args.save_path, "--save_path")


def warn_unused_clip(args: argparse.Namespace, jobs: Sequence[Resolved]) -> None:
    """--clip is read only for jobs with a start image; say so instead of ignoring the file silently."""
    if args.clip and not any(r.image is not None for r in jobs):
        logger.warning("warning: --clip %s is not used: CLIP vision encodes a start image (--image_path / --i), "
                       "which no prompt of this %s run has", args.clip, jobs[0].task if jobs else "")


@dataclass
class RunStatus:
    """Where a run is, for the one-line message when it is interrupted."""

    phase: str = "loading models"
    video: int = 0
    videos: int = 0
    step: int = 0
    steps: int = 0
    written: int = 0
    bar: tqdm | None = None  # the open progress bar, closed before the message
    interrupted: bool = False  # Ctrl-C arrived (set by the SIGINT handler even if a library swallows the exception)

    def describe(self) -> str:
        where = (f"at step {self.step} of {self.steps} (video {self.video} of {self.videos})"
                 if self.phase == "sampling" else f"while {self.phase}")
        saved = "nothing written" if not self.written else f"{self.written} file(s) written before, listed above"
        return f"interrupted {where}, {saved}"


STATUS = RunStatus()


def _on_sigint(signum: int, frame: object) -> None:
    """Remember the interrupt, then raise KeyboardInterrupt as Python's own handler does. C extensions that check for
    signals inside a call (tensor loading) can turn the KeyboardInterrupt into another error, and exceptions raised
    in finalizers are only printed; the flag lets `run` and the step callback still end the run as interrupted."""
    STATUS.interrupted = True
    raise KeyboardInterrupt


def _check_interrupt() -> None:
    if STATUS.interrupted:
        raise KeyboardInterrupt


def _per_lora(patterns: list[str] | None, count: int, flag: str) -> list[str | None]:
    if not patterns:
        return [None] * count
    if len(patterns) != count:
        raise ValueError(f"{flag} takes one regex per LoRA: got {len(patterns)} for {count} LoRA file(s)")
    return list(patterns)


class Progress:
    """tqdm bar per denoising step, fed by the library's callback."""

    def __init__(self, total: int, desc: str, disable: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, disable=disable, leave=False)
        STATUS.bar = self.bar

    def __call__(self, info) -> None:
        _check_interrupt()  # an interrupt that a library swallowed stops the run at the next step
        STATUS.step = info.i + 1
        self.bar.update(1)
        if info.i + 1 == info.total:
            self.bar.close()


def build_conditioning(models: ModelSet, r: Resolved) -> cond.Conditioning:
    preset = get_task(r.task)
    kind = preset.dit.model_type
    if cond.takes_first_frame(preset) and r.image is not None:  # Wan2.2 TI2V: the image as latent frame 0
        return cond.text_image_to_video(models.get("vae"), r.image, r.frames, r.height, r.width,
                                        spatial=preset.vae.space_stride)
    if not preset.takes_image and not preset.is_fun_control:
        return cond.text_to_video(r.height, r.width, r.frames, spatial=preset.vae.space_stride)
    vae = models.get("vae")
    needs_clip = r.image is not None and preset.needs_clip
    clip = models.get("clip") if needs_clip else None
    if preset.is_fun_control:
        control = _given(r.control, "--control_path")
        return cond.fun_control(vae, clip, control, r.frames, r.height, r.width, r.image, r.end_image)
    image = _given(r.image, "--image_path")
    if not preset.needs_clip:  # Wan2.2 i2v-A14B: mask + image latents, no CLIP branch
        return cond.image_to_video(vae, None, image, r.frames, r.height, r.width, end_image=r.end_image)
    clip = _given(clip, "--clip")
    if kind == "flf2v":
        return cond.first_last_to_video(vae, clip, image, _given(r.end_image, "--end_image_path"), r.frames,
                                        r.height, r.width)
    return cond.image_to_video(vae, clip, image, r.frames, r.height, r.width, end_image=r.end_image)


def run_jobs(models: ModelSet, jobs: Sequence[Resolved], args: argparse.Namespace, keep_loaded: bool,
             cache: StepCacheSettings | None = None) -> list[Path]:
    """The phases of a batch, each loading the models it needs and (unless `keep_loaded`) releasing them before the
    next: encode all prompts (T5), build all conditionings (VAE, CLIP), denoise all videos (DiT), decode and save
    (VAE)."""
    embeds = encode_job_prompts(models, jobs, keep_loaded)
    conds = build_job_conditioning(models, jobs, keep_loaded)
    latents = denoise_jobs(models, jobs, conds, embeds, args.quiet, keep_loaded, cache)
    STATUS.phase = "decoding and saving"
    return [path for r, lat in zip(jobs, latents) for path in save_result(models, r, lat, args)]


def encode_job_prompts(models: ModelSet, jobs: Sequence[Resolved], keep_loaded: bool) -> dict[str, torch.Tensor]:
    """Prompt and negative prompt of every job -> its T5 embedding (each distinct text encoded once)."""
    STATUS.phase = "encoding prompts"
    texts = sorted({t for r in jobs for t in (r.job.prompt, r.negative_prompt)})
    embeds = dict(zip(texts, encode_prompts(models.get("t5"), texts)))
    if not keep_loaded:
        models.release("t5")
    return embeds


def build_job_conditioning(models: ModelSet, jobs: Sequence[Resolved], keep_loaded: bool) -> list[cond.Conditioning]:
    conds = [build_conditioning(models, r) for r in jobs]
    if not keep_loaded:
        models.release("clip")
    return conds


def denoise_jobs(models: ModelSet, jobs: Sequence[Resolved], conds: Sequence[cond.Conditioning],
                 embeds: dict[str, torch.Tensor], quiet: bool, keep_loaded: bool,
                 cache: StepCacheSettings | None = None) -> list[torch.Tensor]:
    """One denoising run per job with the DiT, which is loaded once, sized for the largest video (with step
    caching when `cache` is active)."""
    models.size_hint = max(((r.height, r.width, c.frames) for r, c in zip(jobs, conds)),
                           key=lambda s: s[0] * s[1] * s[2])
    latents = []
    for n, (r, c) in enumerate(zip(jobs, conds)):
        start = time.perf_counter()
        STATUS.phase, STATUS.video, STATUS.videos, STATUS.step, STATUS.steps = (
            "sampling", n + 1, len(jobs), 0, r.settings.steps)
        logger.info("sampling video %d/%d: %d steps", n + 1, len(jobs), r.settings.steps)
        model = sampling_model(r, models)
        needs_uncond = (r.settings.guidance_scale != 1.0 or r.settings.slg is not None
                        or (isinstance(model, ExpertSwitch) and r.guidance_high != 1.0))
        progress = Progress(r.settings.steps, f"video {n + 1}/{len(jobs)}", quiet)
        step_cache = job_step_cache(cache, model, r, models.spec)
        wrap = models.predict_wrapper() if isinstance(models, ParallelModelSet) else None
        if wrap is not None and not needs_uncond:
            raise ValueError(f"--cfg_parallel runs the negative-prompt forward on half of the ranks, but video {n + 1}"
                             f" has guidance 1 (no negative-prompt forward): drop --cfg_parallel")
        latents.append(denoise(model, c, [embeds[r.job.prompt]], [embeds[r.negative_prompt]] if needs_uncond else None,
                               r.settings, callback=progress, step_cache=step_cache, wrap_predict=wrap))
        logger.info("denoised %d steps in %.2f s (%s)", r.settings.steps, time.perf_counter() - start,
                    describe(step_cache))
    if not keep_loaded:
        models.release("dit")
        models.release("dit_high")
    return latents


def sampling_model(r: Resolved, models: ModelSet) -> WanModel | ExpertSwitch:
    """The DiT, or for a Wan2.2 A14B task with both experts the `ExpertSwitch` over them (with --lazy_loading,
    each expert is loaded when the sampler first needs it)."""
    if r.boundary is None:
        return models.get("dit")
    if not models.spec.dit_high:
        logger.info("task %s with only --dit: that one expert runs all %d steps (guidance %g); give "
                    "--dit_high_noise for the high-noise expert", r.task, r.settings.steps, r.settings.guidance_scale)
        return models.get("dit")
    return ExpertSwitch(expert_source(models, "dit_high"), expert_source(models, "dit"), r.boundary,
                        _given(r.guidance_high, "high-noise guidance"), r.settings.guidance_scale, models.device,
                        offload=models.spec.offload_inactive)


def expert_source(models: ModelSet, kind: str) -> WanModel | LazyExpert:
    """The expert `kind` ('dit' low noise, 'dit_high'): loaded now, or with --lazy_loading a `LazyExpert` that
    the switch loads (and releases) through the model set."""
    if not models.spec.lazy_loading:
        return models.get(kind)
    return LazyExpert(read_dit_config(models.spec.path(kind)), lambda: models.get(kind),
                      lambda: models.release(kind))


def cache_settings(args: argparse.Namespace, spec: ModelSpec) -> StepCacheSettings:
    """--cache_mode / --cache_threshold / --cache_calibration, with the calibration given or stored beside the DiT;
    without one, each run takes the published one of an official model or computes every step (`cache_for_run`)."""
    mode = args.cache_mode
    threshold = DEFAULT_THRESHOLDS.get(mode, 0.0) if args.cache_threshold is None else args.cache_threshold
    if mode == "none":
        return StepCacheSettings("none", threshold)
    if args.cache_calibration:
        calibration: CacheCalibration | None = CacheCalibration.load(args.cache_calibration)
    else:
        calibration = find_calibration(spec.path("dit"))
    return StepCacheSettings(mode, threshold, calibration)


def job_step_cache(cache: StepCacheSettings | None, model: WanModel | ExpertSwitch, r: Resolved,
                   spec: ModelSpec) -> StepCache | None:
    """The step cache of one video: `cache_for_run` on the DiT's architecture, the task and the video size."""
    if cache is None:
        return None
    dit = spec.path("dit")
    name = dit.name if cache.calibration is not None else f"{dit.name} (no {calibration_path(dit).name})"
    return cache_for_run(cache, model.config, r.height, r.width, get_task(r.task).is_wan22, name)


def save_result(models: ModelSet, r: Resolved, latents: torch.Tensor, args: argparse.Namespace) -> list[Path]:
    if isinstance(models, ParallelModelSet) and not models.writes_outputs:
        return []
    frames = None
    if args.output_type != "latent":
        frames = decode_latents(models.get("vae"), latents, args.trim_tail_frames)[0]
    meta = None if args.no_metadata else {
        "prompt": r.job.prompt, "negative_prompt": r.negative_prompt, "seeds": r.settings.seed, "height": r.height,
        "width": r.width, "video_length": r.frames, "infer_steps": r.settings.steps,
        "guidance_scale": r.settings.guidance_scale, "flow_shift": r.settings.flow_shift, "task": r.task,
        "sample_solver": r.settings.solver, "fps": r.fps}
    paths = save_outputs(args.save_path, output_stem(r.settings.seed), args.output_type, frames=frames,
                         latents=latents, fps=r.fps, metadata=meta)
    for path in paths:
        logger.info("saved %s", path)
        print(path)
    STATUS.written += len(paths)
    return paths


def save_merged_model(spec: ModelSpec, output: str) -> Path:
    """--save_merged_model: the DiT with the LoRAs merged (in its checkpoint dtype, official names), then exit."""
    if not spec.loras:
        raise ValueError("--save_merged_model needs at least one --lora_weight")
    model = load_dit(spec.path("dit"), task=spec.task, attn=spec.attn)
    merge_spec_loras(model, spec)
    path = save_safetensors(model.state_dict(), output, {CONFIG_METADATA_KEY: config_to_json(model.config)})
    print(path)
    return path


def decode_saved(models: ModelSet, args: argparse.Namespace) -> list[Path]:
    """--latent_path: decode saved latents with the VAE and save them as the output type asks."""
    out = []
    for path in args.latent_path:
        latents, meta = load_latent(path)
        frames = decode_latents(models.get("vae"), latents, args.trim_tail_frames)[0]
        fps = int(_first(args.fps, meta.get("fps"), 16))
        kind = "video" if args.output_type in ("latent", "both") else args.output_type
        stem = Path(path).name.removesuffix(".safetensors").removesuffix("_latent")
        for p in save_outputs(args.save_path, stem, kind, frames=frames, latents=None, fps=fps, metadata=None):
            print(p)
            out.append(p)
    return out


def jobs_from_lines(lines: Sequence[str], args: argparse.Namespace, spec: ModelSpec) -> list[Resolved]:
    base = Job(prompt="", negative_prompt=args.negative_prompt, seed=args.seed, image_path=args.image_path,
               end_image_path=args.end_image_path, control_path=args.control_path)
    parsed = [parse_prompt_line(line, base).with_seed() for line in lines]
    task = infer_task(spec, any(j.image_path for j in parsed))
    if spec.vae:
        check_vae_fits(Path(spec.vae), task)
    defaults = sampling_defaults_for(spec)
    return [resolve_job(job, args, task, defaults) for job in parsed]


def vae_latent_channels(path: Path) -> int | None:
    """A VAE file's latent channels from its stored config or the header shape of its post-quant conv (official
    `conv2`, diffusers `post_quant_conv`); None when neither is there."""
    config = stored_config(read_metadata_safe(path), VAEConfig, f"--vae {path.name}")
    if config is not None:
        return config.z_dim
    for key, tensor in peek_shapes(path).items():
        if key.split(".")[-2:] in (["conv2", "weight"], ["post_quant_conv", "weight"]) and "coder" not in key:
            return int(tensor.shape[0])
    return None


def check_vae_fits(path: Path, task: str) -> None:
    """ValueError before any model loads when the VAE's latents are not the ones the task's DiT works on
    (Wan2.2 TI2V-5B: the 48-channel Wan2.2 VAE; every other task: the 16-channel Wan2.1 VAE)."""
    want = get_task(task).vae.z_dim
    got = vae_latent_channels(path) if path.exists() else None
    if got is not None and got != want:
        names = {16: "Wan2.1 VAE (wan_2.1_vae)", 48: "Wan2.2 VAE (wan2.2_vae)"}
        raise ValueError(f"--vae {path.name} has {got} latent channels; task {task} needs the "
                         f"{names.get(want, f'{want}-channel VAE')} with {want}")


def interactive(models: ModelSet, args: argparse.Namespace, spec: ModelSpec, stream=sys.stdin,
                cache: StepCacheSettings | None = None) -> int:
    """Prompts from `stream` until EOF; models stay loaded. Errors in one prompt are reported, not fatal."""
    count = 0
    while True:
        print("prompt> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            print(file=sys.stderr)
            return count
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            run_jobs(models, jobs_from_lines([line], args, spec), args, keep_loaded=True, cache=cache)
            count += 1
        except (ValueError, FileNotFoundError) as exc:
            _check_interrupt()  # Ctrl-C that a library turned into this error ends the session, as in `run`
            print(f"error: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and `run` them; Ctrl-C ends with one line saying where the run was (exit code 130)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    global STATUS
    STATUS = RunStatus()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if in_main_thread else None
    try:
        code = run(args)
        _check_interrupt()
        return code
    except KeyboardInterrupt:
        if STATUS.bar is not None:
            STATUS.bar.close()  # clears its line (leave=False)
        print(STATUS.describe(), file=sys.stderr)
        return 130
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace) -> int:
    """Check the flags and files, then do what they ask: merge and save a DiT, decode saved latents, read prompts
    interactively, or plan the jobs of the given prompts and run them (`run_jobs`)."""
    try:
        spec = spec_from_args(args)
        check_files_and_outputs(args, spec)
        cache = cache_settings(args, spec)  # flag and calibration errors before any model loads
        mesh = setup_parallel(args, spec)
        models = ModelSet(spec) if mesh is None else ParallelModelSet(spec, mesh)  # nothing loads until asked for
        if args.save_merged_model:
            save_merged_model(spec, args.save_merged_model)
        elif args.latent_path:
            decode_saved(models, args)
        elif args.interactive:
            interactive(models, args, spec, cache=cache)
        else:
            jobs = jobs_from_lines(prompt_lines(args), args, spec)
            warn_unused_clip(args, jobs)
            run_jobs(models, jobs, args, keep_loaded=False, cache=cache)
        finish_parallel(mesh)
        return 0
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as exc:
        _check_interrupt()  # the error is what a library made of Ctrl-C: report the interrupt, not the error
        print(f"error: {exc}", file=sys.stderr)
        return 2


def prompt_lines(args: argparse.Namespace) -> list[str]:
    """The prompt lines of a batch run: the --from_file lines, else --prompt."""
    if args.from_file:
        return read_prompt_lines(args.from_file)
    if args.prompt:
        return [args.prompt]
    raise ValueError("give --prompt, --from_file, --interactive or --latent_path")
