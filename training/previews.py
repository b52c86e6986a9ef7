"""Sample videos during training from a prompt file in the inline syntax of generation (`wan_core.generate.jobs`).

Before the DiT is loaded (`prepare_samples`): the prompts and negative prompts are encoded with `--t5` (then the
T5 is freed), start images / control videos are turned into conditioning with `--vae` (and `--clip`, then freed);
the VAE stays in CPU memory and visits the device only to decode samples. At each sampling point
(`generate_samples`) the current DiT (+ LoRA, dropout off) denoises every prompt with UniPC, and the frames are
written to `<output_dir>/sample/` (mp4, or png for one frame) and, when given, to TensorBoard. The global RNG
states are restored afterwards, so sampling does not change training.

Defaults follow musubi's sampling during training: 256x256, 1 frame, 20 steps, flow shift 14.5, guidance 5.0
(`--l`/`--g` per line) with the task's negative prompt unless `--n` is given. A prompt without `--d` gets a seed
drawn once from the run's seed, so every sampling point renders it with the same noise. With several processes,
prompt i is rendered by process i mod P.

Wan2.2: a T2V/I2V-A14B expert pair samples through `wan_core.sampling.experts.ExpertSwitch` (the high-noise expert
for timesteps >= the training's boundary, each expert with the shared LoRA patched in; the line's guidance scale for
both experts); TI2V-5B renders text-to-video on the Wan2.2 VAE's 48-channel latents (sizes in multiples of 32 px).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from training.cache.latents import vae_config_of
from training.experts import ExpertPair
from wan_core.generate.jobs import Job, parse_prompt_line, read_prompt_lines
from wan_core.loading.checkpoint import make_temp, new_file_mode
from wan_core.media.io import frames_to_tensor, image_to_tensor, read_image, read_video, to_uint8, write_video
from wan_core.media.layouts import latent_space_stride
from wan_core.models.clip import load_clip_vision
from wan_core.models.config import DEFAULT_NEGATIVE_PROMPT, PATCH_SIZE, DiTConfig, VAEConfig, get_task
from wan_core.models.t5 import load_t5
from wan_core.models.vae import load_vae
from wan_core.runtime.fp8 import fp8_t5
from wan_core.sampling import conditioning as cond
from wan_core.sampling.experts import ExpertSwitch
from wan_core.sampling.pipeline import SamplerSettings, decode_latents, denoise

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from wan_core.models.dit import WanModel
    from wan_core.models.vae import WanVAE

logger = logging.getLogger(__name__)

SAMPLE_DEFAULTS = {"width": 256, "height": 256, "frames": 1, "steps": 20, "flow_shift": 14.5, "guidance_scale": 5.0}
SAMPLE_FPS = 16


@dataclass
class SampleJob:
    index: int
    job: Job
    conditioning: cond.Conditioning
    context: torch.Tensor  # [L, dim]
    negative_context: torch.Tensor | None
    seed: int
    steps: int
    guidance_scale: float
    flow_shift: float


@dataclass(frozen=True)
class SampleSettings:
    """The training flags the previews use (by their CLI names)."""

    sample_prompts: str | None
    vae: str | None
    vae_dtype: str | None
    t5: str | None
    tokenizer: str | None
    fp8_t5: bool
    clip: str | None
    output_dir: str | None
    output_name: str  # the run's file name stem, also the samples'


@dataclass
class SamplePlan:
    jobs: list[SampleJob]
    vae: WanVAE  # kept in CPU memory for decoding
    output_dir: Path
    name: str
    device: torch.device


def _round_size(job: Job, multiple: int) -> tuple[int, int, int]:
    """The job's (H, W, frames): sides rounded down to `multiple` px (the VAE's stride x the DiT's 2x2 patch), frames
    to 4n+1."""
    height = job.height or SAMPLE_DEFAULTS["height"]
    width = job.width or SAMPLE_DEFAULTS["width"]
    frames = job.frames or SAMPLE_DEFAULTS["frames"]
    rounded = (max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple),
               (max(1, frames) - 1) // 4 * 4 + 1)
    if rounded != (height, width, frames):
        logger.warning("sample prompt %r: size %dx%d, %d frames rounded to %dx%d, %d frames (multiples of %d, 4n+1)",
                       job.prompt[:40], width, height, frames, rounded[1], rounded[0], rounded[2], multiple)
    return rounded


def _conditioning(job: Job, task: str | None, dit: DiTConfig, vae: cond.VAELike, clip: cond.CLIPLike | None,
                  size: tuple[int, int, int]) -> cond.Conditioning:
    height, width, frames = size
    if dit.out_dim != 16:  # TI2V-5B on the Wan2.2 VAE's latents
        if job.image_path or job.end_image_path or job.control_path:
            raise ValueError(f"sample prompt {job.prompt[:40]!r}: previews of a {dit.out_dim}-channel (TI2V-5B) DiT "
                             f"are text-to-video; remove --i/--ei/--cn from the line")
        return cond.text_to_video(height, width, frames, spatial=latent_space_stride(dit.out_dim))
    if dit.in_dim == 16:
        return cond.text_to_video(height, width, frames)
    image = image_to_tensor(read_image(job.image_path)) if job.image_path else None
    if dit.in_dim == 48:
        if not job.control_path:
            raise ValueError(f"sample prompt {job.prompt[:40]!r}: a Fun-Control model needs a control video (--cn)")
        control = frames_to_tensor(read_video(job.control_path))
        return cond.fun_control(vae, clip, control, frames, height, width, image)
    if image is None:
        raise ValueError(f"sample prompt {job.prompt[:40]!r}: an I2V model needs a start image (--i)")
    if task and get_task(task).dit.model_type == "flf2v":
        if not job.end_image_path:
            raise ValueError(f"sample prompt {job.prompt[:40]!r}: an FLF2V model needs an end image (--ei)")
        end = image_to_tensor(read_image(job.end_image_path))
        return cond.first_last_to_video(vae, clip, image, end, frames, height, width)
    return cond.image_to_video(vae, clip, image, frames, height, width)


def read_sample_jobs(path: str | Path) -> list[Job]:
    if Path(path).suffix.lower() in (".toml", ".json"):
        raise ValueError(f"--sample_prompts {path}: use a .txt file with one prompt per line and inline options "
                         f"(--w --h --f --d --s --l --fs --n --i --ei --cn)")
    return [parse_prompt_line(line) for line in read_prompt_lines(path)]


def _encode_texts(args: SampleSettings, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    t5 = load_t5(args.t5, tokenizer=args.tokenizer, device=device)
    if args.fp8_t5:
        fp8_t5(t5)
    with torch.no_grad():
        embeds = {text: e.float().cpu() for text, e in zip(texts, t5.encode(texts))}
    del t5
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return embeds


def _check_vae(vae: VAEConfig, dit: DiTConfig) -> None:
    if vae.z_dim != dit.out_dim:
        raise ValueError(f"--vae has {vae.z_dim} latent channels but the DiT samples {dit.out_dim}-channel "
                         f"latents; give the VAE it was trained with (wan_2.1_vae: 16, wan2.2_vae: 48) for "
                         f"--sample_prompts")


def prepare_samples(args: SampleSettings, task: str | None, dit: DiTConfig, device: torch.device, seed: int,
                    rank: int, world: int) -> SamplePlan:
    """Encode the prompts and conditioning of this process's share of the prompt file for a DiT of config `dit`
    (one DiT or one expert of a Wan2.2 pair)."""
    jobs = read_sample_jobs(args.sample_prompts)
    in_dim = dit.in_dim
    if in_dim == 36 and not args.clip and not (task and get_task(task).is_wan22):
        raise ValueError("--sample_prompts for an I2V model needs --clip (the CLIP vision model for the start images)")
    _check_vae(vae_config_of(args.vae), dit)
    negative_default = get_task(task).negative_prompt if task else DEFAULT_NEGATIVE_PROMPT
    seeds = random.Random(seed).sample(range(2**31), len(jobs))
    mine = [(i, job) for i, job in enumerate(jobs) if i % world == rank]
    negatives = [job.negative_prompt if job.negative_prompt is not None else negative_default for _, job in mine]
    embeds = _encode_texts(args, sorted({j.prompt for _, j in mine} | set(negatives)), device) if mine else {}
    vae_dtype = getattr(torch, args.vae_dtype) if args.vae_dtype else None
    vae = load_vae(args.vae, dtype=vae_dtype, device=device)
    multiple = latent_space_stride(dit.out_dim) * PATCH_SIZE[1]
    clip = None
    if args.clip and any(job.image_path for _, job in mine):
        clip = load_clip_vision(args.clip, device=device)
    sample_jobs = []
    for (index, job), negative in zip(mine, negatives):
        size = _round_size(job, multiple)
        guidance = job.guidance_scale if job.guidance_scale is not None else SAMPLE_DEFAULTS["guidance_scale"]
        sample_jobs.append(SampleJob(
            index, job, _conditioning(job, task, dit, vae, clip, size), embeds[job.prompt],
            embeds[negative] if guidance != 1.0 else None, job.seed if job.seed is not None else seeds[index],
            job.steps or SAMPLE_DEFAULTS["steps"], guidance,
            job.flow_shift if job.flow_shift is not None else SAMPLE_DEFAULTS["flow_shift"]))
    del clip
    vae.to("cpu")  # moved to the device only while decoding samples
    if device.type == "cuda":
        torch.cuda.empty_cache()
    logger.info("prepared %d sample prompt(s) of %d", len(sample_jobs), len(jobs))
    return SamplePlan(sample_jobs, vae, Path(args.output_dir) / "sample", args.output_name, device)


def _frames_for_log(frames: torch.Tensor, limit: int = 8) -> torch.Tensor:
    """[T, H, W, 3] -> at most `limit` evenly spaced frames."""
    if frames.shape[0] <= limit:
        return frames
    index = torch.linspace(0, frames.shape[0] - 1, limit).round().long()
    return frames[index]


def _save(frames: torch.Tensor, path: Path) -> Path:
    if frames.shape[0] > 1:
        return write_video(frames, path.with_suffix(".mp4"), SAMPLE_FPS)
    out = path.with_suffix(".png")
    tmp = make_temp(out, ext=".png")  # PIL picks the format from the name
    try:
        Image.fromarray(to_uint8(frames)[0]).save(tmp)
        os.chmod(tmp, new_file_mode())
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _sampler_model(dit: WanModel | ExpertPair, guidance_scale: float) -> WanModel | ExpertSwitch:
    """One DiT as it is; an expert pair as the `ExpertSwitch` of generation, at the training's boundary, with
    `guidance_scale` for both experts and the pair's offloading (only the active expert on the device)."""
    if not isinstance(dit, ExpertPair):
        return dit
    return ExpertSwitch(dit.high, dit.low, dit.boundary, guidance_scale, guidance_scale, dit.device, dit.offload)


def generate_samples(plan: SamplePlan, dit: WanModel | ExpertPair, step: int, epoch: int | None,
                     autocast: Callable[[], AbstractContextManager[object]],
                     writer: SummaryWriter | None = None) -> list[Path]:
    """Render every job of `plan` with the current weights (one DiT, or a Wan2.2 expert pair); returns the written
    files. An offloading expert pair gets its active expert back on the device afterwards."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    suffix = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    paths = []
    try:
        for job in plan.jobs:
            settings = SamplerSettings(steps=job.steps, guidance_scale=job.guidance_scale,
                                       flow_shift=job.flow_shift, seed=job.seed)
            negative = None if job.negative_context is None else [job.negative_context]
            with torch.no_grad(), autocast():
                latents = denoise(_sampler_model(dit, job.guidance_scale), job.conditioning, [job.context],
                                  negative, settings)
            plan.vae.to(plan.device)
            frames = decode_latents(plan.vae, latents.float())[0]  # [T, H, W, 3]
            plan.vae.to("cpu")
            path = plan.output_dir / f"{plan.name}_{suffix}_{job.index:02d}_{stamp}_{job.seed}"
            paths.append(_save(frames, path))
            if writer is not None:
                writer.add_images(f"sample/{job.index:02d}", _frames_for_log(frames), step, dataformats="NHWC")
            logger.info("sample %d at step %d: %s", job.index, step, paths[-1])
    finally:
        if isinstance(dit, ExpertPair):
            dit.place()
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return paths
