"""The generation glue: text encoding, the guided denoising loop, and decoding. Used by the CLI, the ComfyUI
nodes and sampling during training. Conditioning layouts live in `conditioning.py`, solvers in `solvers.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from wan_core.runtime.step_cache import CalibrationRecorder, Predict, StepCache
from wan_core.sampling.conditioning import Conditioning
from wan_core.sampling.experts import ExpertSwitch
from wan_core.sampling.first_frame import FirstFrame
from wan_core.sampling.guidance import SLGConfig, cfg_apply_pattern, guided_velocity
from wan_core.sampling.solvers import Schedule, StepCallback, StepInfo, VelocityFn, get_schedule, initial_noise, sample

if TYPE_CHECKING:
    from wan_core.models.dit import WanModel

logger = logging.getLogger(__name__)


class TextEncoder(Protocol):
    """What `encode_prompts` needs of a text encoder (`wan_core.models.t5.T5Encoder`): one [L_i, dim] output per
    prompt, trimmed to its tokens."""

    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]: ...


class VideoDecoder(Protocol):
    """What `decode_latents` needs of a VAE (`wan_core.models.vae.WanVAE`): latents [B, 16, F, h, w] -> video
    [B, 3, T, H, W] in [-1, 1]."""

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplerSettings:
    steps: int
    guidance_scale: float
    flow_shift: float
    seed: int
    solver: str = "unipc"
    cpu_noise: bool = False
    cfg_skip_mode: str | None = None
    cfg_apply_ratio: float | None = None
    slg: SLGConfig | None = None
    denoise: float = 1.0  # < 1 starts from `init_latents` part-way down the schedule
    # Run only steps [start_step, end_step) of the schedule (ComfyUI's start/end steps): start_step > 0 continues
    # from `init_latents` as a previous run with end_step = start_step returned them (still noisy, no noise added);
    # end_step < steps returns the latents at that step's noise level. None = the last step.
    start_step: int = 0
    end_step: int | None = None


def start_index(steps: int, denoise: float) -> int:
    """First schedule step when continuing from input latents at `denoise` strength (1.0 = from pure noise)."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise strength must be in (0, 1], got {denoise}")
    return steps - max(1, round(steps * denoise))


def step_range(steps: int, start_step: int, end_step: int | None) -> tuple[int, int]:
    """The steps [first, stop) a run covers of a `steps`-step schedule (ValueError naming the bad value)."""
    stop = steps if end_step is None else min(end_step, steps)
    if start_step < 0 or stop < 1 or start_step >= stop:
        raise ValueError(f"start_step {start_step} and end_step {end_step} leave no step of the {steps}-step schedule "
                         f"to run; expected 0 <= start_step < end_step (end_step is capped at {steps})")
    return start_step, stop


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def denoise(dit: WanModel | ExpertSwitch, cond: Conditioning, context: Sequence[torch.Tensor],
            negative_context: Sequence[torch.Tensor] | None, settings: SamplerSettings, *,
            init_latents: torch.Tensor | None = None, callback: StepCallback | None = None,
            step_cache: StepCache | CalibrationRecorder | None = None,
            wrap_predict: Callable[[Predict], Predict] | None = None) -> torch.Tensor:
    """Run the guided sampler and return the latents [1, C, F_lat, h, w] (float32).

    `dit` is one DiT or an `ExpertSwitch` (Wan2.2 A14B), which picks the expert and its guidance scale per step.
    A conditioning with `first_latent` (Wan2.2 TI2V image-to-video) runs through the `FirstFrame` sampler wrapper:
    the image latent in latent frame 0 with timestep 0 on its tokens.
    `step_cache` (`wan_core.runtime.step_cache`) wraps every model call of the run: skipping calls, or recording a
    calibration (one DiT only: its calibration describes that model). `wrap_predict` wraps the per-branch model
    call last (CFG parallel, `wan_core.parallel`).
    """
    if step_cache is not None and isinstance(dit, ExpertSwitch):
        raise ValueError("step caching (--cache_mode) is calibrated for one DiT; it does not support two Wan2.2 "
                         "experts yet: use --cache_mode none")
    device = dit.device if isinstance(dit, ExpertSwitch) else _model_device(dit)
    schedule = get_schedule(settings.solver, settings.steps, settings.flow_shift)
    first = start_index(settings.steps, settings.denoise)
    schedule = Schedule(schedule.sigmas[first:], schedule.timesteps[first:])
    begin, stop = step_range(schedule.steps, settings.start_step, settings.end_step)
    if begin > 0 and first > 0:
        raise ValueError(f"start_step {begin} continues a previous run's latents; use it with denoise 1.0 (got "
                         f"{settings.denoise})")
    shape = cond.latent_shape(dit.config.out_dim)
    x = _start_latents(shape, settings, schedule, first, init_latents, device)
    first_frame = None if cond.first_latent is None else FirstFrame(cond.first_latent.to(device))
    if first_frame is not None:
        first_frame.check_fits(shape)
    y = None if cond.y is None else cond.y.to(device)
    clip_fea = None if cond.clip_fea is None else cond.clip_fea.to(device)
    contexts = {"cond": [c.to(device) for c in context],
                "uncond": None if negative_context is None else [c.to(device) for c in negative_context]}

    def predict(x: torch.Tensor, t: torch.Tensor, branch: str, skip: tuple[int, ...]) -> torch.Tensor:
        if contexts[branch] is None:
            raise ValueError("guidance needs a negative prompt embedding (negative_context)")
        t = (t.reshape(-1).expand(x.shape[0]) if first_frame is None
             else first_frame.timesteps(t, x, dit.config.patch_size))
        return dit(x, t, contexts[branch], clip_fea=clip_fea, y=y, skip_blocks=skip or None)

    steps = schedule.steps
    pattern = cfg_apply_pattern(settings.cfg_skip_mode, steps, settings.cfg_apply_ratio)
    scales = dit.step_guidance(schedule.timesteps) if isinstance(dit, ExpertSwitch) else settings.guidance_scale
    model: Predict = predict
    if step_cache is not None and not isinstance(dit, ExpertSwitch):
        step_cache.start(dit, stop - begin)
        model = step_cache.wrap_predict(predict)
    if wrap_predict is not None:
        model = wrap_predict(model)
    guided = guided_velocity(model, steps=steps, guidance_scale=scales, cfg_pattern=pattern, slg=settings.slg)

    def from_begin(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:  # i counts from `begin`
        return guided(x, t, i + begin)

    velocity: VelocityFn = from_begin

    if step_cache is not None:
        velocity = step_cache.wrap_velocity(velocity)
    part = Schedule(schedule.sigmas[begin:stop + 1], schedule.timesteps[begin:stop])
    with torch.no_grad():
        if first_frame is not None:
            return first_frame.sample(settings.solver, velocity, x, part, callback=_offset(callback, begin, steps))
        return sample(settings.solver, velocity, x, part, callback=_offset(callback, begin, steps))


def _offset(callback: StepCallback | None, begin: int, steps: int) -> StepCallback | None:
    """The callback with step indices of the whole schedule (a run over steps [begin, stop) reports i + begin)."""
    if callback is None:
        return None

    def report(info: StepInfo) -> None:
        callback(dataclasses.replace(info, i=info.i + begin, total=steps))

    return report


def _start_latents(shape: tuple[int, ...], settings: SamplerSettings, schedule: Schedule, first: int,
                   init_latents: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The run's starting latents: seeded noise, blended with `init_latents` for denoise < 1 (`first`: the
    schedule's first step), or `init_latents` themselves when continuing at start_step > 0."""
    if (first > 0 or settings.start_step > 0) and (init_latents is None or tuple(init_latents.shape) != shape):
        got = None if init_latents is None else list(init_latents.shape)
        raise ValueError(f"denoise < 1 or start_step > 0 needs input latents of shape {list(shape)}, got {got}")
    if settings.start_step > 0:
        return init_latents.to(device, torch.float32)  # type: ignore[union-attr]
    x = initial_noise(shape, settings.seed, device=device, cpu_noise=settings.cpu_noise)
    if first > 0:
        sigma = float(schedule.sigmas[0])
        x = (1.0 - sigma) * init_latents.to(device, torch.float32) + sigma * x  # type: ignore[union-attr]
    return x


def encode_prompts(t5: TextEncoder, prompts: Sequence[str]) -> list[torch.Tensor]:
    """T5 outputs trimmed to each prompt's length, kept on the CPU (the DiT moves them)."""
    with torch.no_grad():
        return [e.cpu() for e in t5.encode(list(prompts))]


def decode_latents(vae: VideoDecoder, latents: torch.Tensor, trim_tail_frames: int = 0) -> torch.Tensor:
    """Latents [B, 16, F, h, w] -> frames [B, T, H, W, 3] float in [0, 1] (ComfyUI IMAGE layout per batch item)."""
    with torch.no_grad():
        video = vae.decode(latents)  # [B, 3, T, H, W] in [-1, 1]
    frames = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu()
    if trim_tail_frames:
        if trim_tail_frames >= frames.shape[1]:
            raise ValueError(f"trim_tail_frames {trim_tail_frames} would remove all {frames.shape[1]} frames")
        frames = frames[:, : frames.shape[1] - trim_tail_frames]
    return frames
