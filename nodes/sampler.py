"""The sampler node: guided flow-matching denoising of a Wan video latent (Wan2.1; Wan2.2 with one DiT or a pair of
A14B experts; part of the schedule with start/end steps)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wan_core.loading.model_set import sampling_defaults
from wan_core.lora.apply import applied_loras
from wan_core.media.layouts import (
    fit_latent_rgb,
    latent_from_comfy,
    latent_preview,
    latent_space_stride,
    latent_to_comfy,
    video_size_of_latent,
)
from wan_core.models.config import TASKS, WAN22_VAE
from wan_core.runtime.step_cache import (
    CACHE_MODES,
    DEFAULT_THRESHOLDS,
    StepCache,
    StepCacheSettings,
    cache_for_run,
    describe,
    find_calibration,
)
from wan_core.sampling.conditioning import check_conditioning_fits, text_to_video
from wan_core.sampling.experts import ExpertSwitch
from wan_core.sampling.guidance import CFG_SKIP_MODES, SLG_MODES, SLGConfig, parse_slg_layers
from wan_core.sampling.pipeline import SamplerSettings, step_range
from wan_core.sampling.pipeline import denoise as run_denoise
from wan_core.sampling.solvers import SAMPLERS

from . import comfy_adapter as comfy
from .common import CATEGORY, first_problem, inp, problem, size_inputs, size_problem
from .types import CONDITIONING, DIT, TEXT_EMBEDS, VAE, DiTHandle, ModelHandle, TextEmbeds, WanConditioning

if TYPE_CHECKING:
    from wan_core.models.dit import WanModel
    from wan_core.sampling.conditioning import Conditioning

logger = logging.getLogger(__name__)

SOLVERS = tuple(name for name in SAMPLERS if name != "vanilla")  # "vanilla" is an alias of euler
TASK_DEFAULT = -1.0  # boundary / high-noise guidance widgets: take the A14B task's value
LAST_STEP = 10000  # end_step default: the whole schedule (as ComfyUI's KSamplerAdvanced)
HANDOVER = "wantuner_handover"  # LATENT key of a partial run: the exact latents and where the schedule stopped


def _conditioning(conditioning: WanConditioning | None, latent: dict | None, width: int, height: int,
                  length: int, channels: int) -> tuple[Conditioning, str]:
    """The wan_core Conditioning and its source: a conditioning node, else the input latent's size, else the
    sampler's own width/height/length (text-to-video; the DiT's latent channels tell the VAE's stride)."""
    if conditioning is not None:
        return conditioning.cond, conditioning.kind
    if latent is not None:
        height, width, length = video_size_of_latent(latent["samples"])
    return text_to_video(height, width, length, spatial=latent_space_stride(channels)), "text-to-video"


def _slg(mode: str, layers: str, scale: float, start: float, end: float) -> SLGConfig | None:
    return None if mode == "none" else SLGConfig(mode, layers, scale, start, end)


def _preview(vae: ModelHandle | None):
    """A per-step preview function (latent -> RGB uint8 image), or None without a VAE or with previews off."""
    if vae is None or not comfy.previews_enabled():
        return None
    if "latent_rgb" not in vae.cache:  # fitted before the DiT is loaded, so it never displaces the DiT
        vae.cache["latent_rgb"] = fit_latent_rgb(vae.model.ready())
    rgb = vae.cache["latent_rgb"]
    return lambda latents, max_size: latent_preview(latents, rgb, max_size)


@contextmanager
def _prepared(dits: Sequence[DiTHandle]) -> Iterator[list[WanModel]]:
    """The DiTs on their device with their LoRA chains applied for one run (ComfyUI loads them together, so that
    loading one cannot offload the other). A block-swapped DiT is placed after the LoRAs are applied (so their
    weights stream with the blocks) and unplaced afterwards."""
    unique = _distinct_models(dits)
    chains = [[(s.path, s.strength, s.include, s.exclude) for s in dit.loras] for dit in unique]
    self_placed = [dit.model.placer is not None and bool(loras) for dit, loras in zip(unique, chains)]
    for dit, own in zip(unique, self_placed):
        if own:
            dit.model.unplace()
    comfy.ready_together([dit.model for dit, own in zip(unique, self_placed) if not own])
    with ExitStack() as stack:
        for dit, loras in zip(unique, chains):
            stack.enter_context(applied_loras(dit.model.obj, loras))
        try:
            placed = {id(dit.model): obj for dit, obj in zip(unique, comfy.ready_together([d.model for d in unique]))}
            yield [placed[id(dit.model)] for dit in dits]
        finally:
            for dit, own in zip(unique, self_placed):
                if own:
                    dit.model.unplace()


def _distinct_models(dits: Sequence[DiTHandle]) -> list[DiTHandle]:
    """One handle per loaded model. Two handles of one model (the same file loaded twice) must carry the same LoRA
    chain: the chain is applied to the shared weights."""
    unique: dict[int, DiTHandle] = {}
    for dit in dits:
        seen = unique.setdefault(id(dit.model), dit)
        if seen.loras != dit.loras:
            raise ValueError(f"the high- and low-noise DiTs are one loaded model ({dit.name}) with different LoRA "
                             "chains; load two different expert files, or give both the same LoRAs")
    return list(unique.values())


def _negative(embeds: TextEmbeds, settings: SamplerSettings, guidance_high: float | None) -> list | None:
    if settings.guidance_scale == 1.0 and settings.slg is None and guidance_high in (None, 1.0):
        return None
    if embeds.negative is None:
        raise ValueError(f"guidance_scale {settings.guidance_scale} (or skip-layer guidance) needs a negative prompt;"
                         " enter one in Text Encode or set guidance_scale to 1.0")
    return [embeds.negative]


class WanTunerSampler:
    DESCRIPTION = ("Generates a Wan video latent: text-to-video, or with a conditioning node image-to-video, "
                   "first-last-frame or Fun-Control; optional input latent for video-to-video. Wan2.2 A14B: connect "
                   "the high-noise expert too (it runs the steps above the boundary), or chain two samplers with "
                   "end_step / start_step as ComfyUI's own Wan2.2 workflows do.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The generated video latent; decode it with VAE Decode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "dit": inp(DIT, "The DiT from the DiT loader (or LoRA loader)."),
                "text_embeds": inp(TEXT_EMBEDS, "Prompt embeddings from Text Encode."),
                **size_inputs(),
                "steps": inp("INT", "Denoising steps (official: 50 for T2V, 40 for I2V).", default=30, min=1,
                             max=1000),
                "guidance_scale": inp("FLOAT", "Classifier-free guidance scale; 1.0 turns guidance off (one model "
                                      "pass per step).", default=5.0, min=0.0, max=30.0, step=0.1),
                "shift": inp("FLOAT", "Flow shift of the schedule (official: 5.0; 3.0 for 480p I2V).", default=5.0,
                             min=0.0, max=100.0, step=0.1),
                "solver": inp(SOLVERS, "Sampler: unipc (official default), dpm++ (2M), euler, or flowmatch_distill "
                                      "(the few-step distilled LoRAs' schedule: e.g. 4 steps, shift 5-8, cfg 1)."),
                "seed": inp("INT", "Noise seed.", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                            control_after_generate=True),
                "noise_on_cpu": inp("BOOLEAN", "Draw the noise on the CPU (same noise on any GPU, like ComfyUI's "
                                    "samplers) instead of on the model's device (official).", default=False),
                "cfg_skip_mode": inp(CFG_SKIP_MODES, "Steps that skip guidance to save time (musubi "
                                     "--cfg_skip_mode); 'none' guides every step."),
                "cfg_apply_ratio": inp("FLOAT", "Share of steps that keep guidance when cfg_skip_mode is not "
                                       "'none'.", default=0.5, min=0.0, max=1.0, step=0.01),
                "slg_mode": inp(["none", *SLG_MODES], "Skip-layer guidance: 'original' (SD3.5, an extra pass) or "
                                "'uncond' (skip blocks in the negative pass); 'none' is off."),
                "slg_layers": inp("STRING", "Comma-separated DiT block indices to skip for SLG, e.g. 9 or 4,5,6.",
                                  default="9"),
                "slg_scale": inp("FLOAT", "SLG strength ('original' mode).", default=3.0, min=0.0, max=30.0,
                                 step=0.1),
                "slg_start": inp("FLOAT", "SLG starts at this fraction of the steps.", default=0.0, min=0.0,
                                 max=1.0, step=0.01),
                "slg_end": inp("FLOAT", "SLG ends at this fraction of the steps.", default=0.3, min=0.0, max=1.0,
                               step=0.01),
            },
            "optional": {
                "conditioning": inp(CONDITIONING, "Image-to-video, first-last-frame, Fun-Control or TI2V-5B "
                                    "image-to-video conditioning; its size and length replace width/height/length."),
                "latent": inp("LATENT", "Input video latent (video-to-video); its size replaces width/height/"
                              "length when no conditioning is connected."),
                "denoise": inp("FLOAT", "With an input latent: how much of it to redo (1.0 = from pure noise).",
                               default=1.0, min=0.01, max=1.0, step=0.01),
                "vae": inp(VAE, "Optional VAE, only for the live step preview in ComfyUI."),
                "high_noise_dit": inp(DIT, "Wan2.2 A14B: the high-noise expert (with its own LoRA loaders); `dit` is "
                                      "then the low-noise expert. It runs the steps whose timestep is at or above "
                                      "the boundary."),
                "boundary": inp("FLOAT", "Wan2.2 A14B expert boundary: a fraction (0-1) or a timestep (1-1000); -1 "
                                "= the one stored in the low-noise expert's file (the toy pair's), else the task's "
                                "(0.875 T2V-A14B, 0.9 I2V-A14B).", default=TASK_DEFAULT, min=-1.0,
                                max=1000.0, step=0.001),
                "guidance_scale_high_noise": inp("FLOAT", "Guidance scale of the high-noise expert (guidance_scale "
                                                 "is the low-noise one's); -1 = the one stored in the low-noise "
                                                 "expert's file, else the task's (4.0 T2V-A14B, 3.5 I2V-A14B).",
                                                 default=TASK_DEFAULT, min=-1.0, max=30.0, step=0.1),
                "start_step": inp("INT", "First step of the schedule to run. > 0 continues the still-noisy latent "
                                  "of a sampler whose end_step is this step (no noise is added; seed unused).",
                                  default=0, min=0, max=LAST_STEP),
                "end_step": inp("INT", "Stop before this step and return the still-noisy latent, for a second "
                                "sampler to continue from it (start_step); >= steps runs to the end.",
                                default=LAST_STEP, min=1, max=LAST_STEP),
                "cache_mode": inp(CACHE_MODES, "Step caching: skip model passes whose result barely changes "
                                  "(TeaCache / MagCache), calibrated by the <dit>.stepcache.json beside the DiT "
                                  "(python -m wan_core.calibrate_cache), else the published TeaCache coefficients "
                                  "of the official Wan2.1 T2V / I2V models; 'none' computes every step."),
                "cache_threshold": inp("FLOAT", "Step-caching threshold: higher skips more; 0 = the mode's default "
                                       f"(teacache {DEFAULT_THRESHOLDS['teacache']}, magcache "
                                       f"{DEFAULT_THRESHOLDS['magcache']}).", default=0.0, min=0.0, max=10.0,
                                       step=0.005),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width: int | None = None, height: int | None = None, length: int | None = None,
                        slg_mode: str | None = None, slg_layers: str | None = None, steps: int | None = None,
                        start_step: int | None = None, end_step: int | None = None,
                        boundary: float | None = None) -> bool | str:
        layers = None if slg_mode in (None, "none") or slg_layers is None else problem(
            lambda: parse_slg_layers(slg_layers))
        return first_problem(size_problem(width, height, length), layers, _steps_problem(steps, start_step, end_step),
                             _boundary_problem(boundary))

    def sample(self, dit: DiTHandle, text_embeds: TextEmbeds, width: int, height: int, length: int, steps: int,
               guidance_scale: float, shift: float, solver: str, seed: int, noise_on_cpu: bool, cfg_skip_mode: str,
               cfg_apply_ratio: float, slg_mode: str, slg_layers: str, slg_scale: float, slg_start: float,
               slg_end: float, conditioning: WanConditioning | None = None, latent: dict | None = None,
               denoise: float = 1.0, vae: ModelHandle | None = None, high_noise_dit: DiTHandle | None = None,
               boundary: float = TASK_DEFAULT, guidance_scale_high_noise: float = TASK_DEFAULT, start_step: int = 0,
               end_step: int = LAST_STEP, cache_mode: str = "none", cache_threshold: float = 0.0,
               unique_id: str | None = None) -> tuple[dict]:
        cond, kind = _conditioning(conditioning, latent, width, height, length, dit.config.out_dim)
        _check_fits(dit, cond, kind)
        experts = None if high_noise_dit is None else _expert_settings(dit, high_noise_dit, boundary,
                                                                        guidance_scale_high_noise)
        settings = SamplerSettings(steps=steps, guidance_scale=guidance_scale, flow_shift=shift, seed=seed,
                                   solver=solver, cpu_noise=noise_on_cpu, cfg_skip_mode=cfg_skip_mode,
                                   cfg_apply_ratio=cfg_apply_ratio,
                                   slg=_slg(slg_mode, slg_layers, slg_scale, slg_start, slg_end), denoise=denoise,
                                   start_step=start_step, end_step=None if end_step >= steps else end_step)
        negative = _negative(text_embeds, settings, None if experts is None else experts[1])
        init = _input_latents(latent, settings)
        step_cache = _step_cache(cache_mode, cache_threshold, dit, cond, experts is not None)
        progress = comfy.Progress(steps, unique_id, "WanTuner sampler", _preview(vae))
        with _prepared([dit] if high_noise_dit is None else [high_noise_dit, dit]) as models:
            model = models[0] if experts is None else ExpertSwitch(models[0], models[1], *experts, guidance_scale,
                                                                    device=comfy.compute_device())
            latents = run_denoise(model, cond, [text_embeds.positive], negative, settings, init_latents=init,
                                  callback=lambda info: progress.step(info.i + 1, info.total, info.denoised),
                                  step_cache=step_cache)
        if step_cache is not None:
            logger.info("%s", describe(step_cache))
        return (_output_latent(latents, settings),)


def _check_fits(dit: DiTHandle, cond: Conditioning, kind: str) -> None:
    check_conditioning_fits(dit.config, cond, kind)
    if kind == "image-to-video" and dit.config.has_image_input and cond.clip_fea is None:
        raise ValueError(f"{dit.name} has a CLIP image branch (Wan2.1 I2V): connect CLIP Vision Encode to the "
                         "image-to-video node's image_embeds")


def _steps_problem(steps: object, start_step: object, end_step: object) -> str | None:
    if not all(isinstance(v, int) for v in (steps, start_step, end_step)):
        return None
    return problem(lambda: step_range(steps, start_step, end_step))  # type: ignore[arg-type]


def _boundary_problem(boundary: object) -> str | None:
    if not isinstance(boundary, (int, float)) or boundary == TASK_DEFAULT or 0.0 < boundary <= 1000.0:
        return None
    return f"boundary must be -1 (the task's), a fraction in (0, 1] or a timestep in (1, 1000], got {boundary}"


def a14b_task(dit: DiTHandle) -> str:
    """The Wan2.2 A14B task of an expert: the loader's task when it names one, else by the input channels (mask
    and image latents without a CLIP branch: I2V-A14B)."""
    if dit.task is not None and TASKS[dit.task].boundary is not None:
        return dit.task
    config = dit.config
    return "i2v-A14B" if config.in_dim == config.out_dim + 20 and not config.has_image_input else "t2v-A14B"


def _expert_settings(low: DiTHandle, high: DiTHandle, boundary: float, guidance_high: float) -> tuple[float, float]:
    """(boundary, high-noise guidance) of an expert pair, -1 replaced by the value stored in the low-noise expert's
    file (`wantuner_sampling`: timestep_boundary, guidance_scale_high_noise), else by the task's."""
    if low.config.out_dim == WAN22_VAE.z_dim:
        raise ValueError(f"{low.name} is a TI2V-5B DiT, which has no high-noise expert; disconnect high_noise_dit")
    preset = TASKS[a14b_task(low)]
    stored = sampling_defaults(Path(low.path)) if low.path else {}
    chosen = (stored.get("timestep_boundary", preset.boundary) if boundary == TASK_DEFAULT else boundary,
              stored.get("guidance_scale_high_noise", preset.guide_scale_high) if guidance_high == TASK_DEFAULT
              else guidance_high)
    logger.info("%s experts: high-noise %s above boundary %g (guidance %g), low-noise %s below", preset.name,
                high.name, chosen[0], chosen[1], low.name)
    return chosen  # type: ignore[return-value]


def _input_latents(latent: dict | None, settings: SamplerSettings) -> Any:
    """The input latent, normalised. A partial run's output continues exactly (its own latents, not the LATENT's
    float32 round trip), and only at the step where it stopped on the same schedule."""
    if latent is None:
        return None
    handover = latent.get(HANDOVER)
    if settings.start_step > 0 and handover is not None and handover["samples"] is latent["samples"]:
        here = (settings.start_step, settings.steps, settings.solver, settings.flow_shift)
        there = (handover["step"], handover["steps"], handover["solver"], handover["shift"])
        if here != there:
            raise ValueError("the input latent stopped at step {} of a {}-step {} schedule with shift {} but this "
                             "sampler starts at step {} of a {}-step {} schedule with shift {}; make start_step, "
                             "steps, solver and shift match the first sampler's".format(*there, *here))
        return handover["latents"]
    return latent_from_comfy(latent["samples"], "latent")


def _output_latent(latents: Any, settings: SamplerSettings) -> dict:
    """The LATENT; a partial run (end_step before the last step) also carries its exact latents for a
    continuing sampler."""
    samples = latent_to_comfy(latents)
    if settings.end_step is None:
        return {"samples": samples}
    handover = {"samples": samples, "latents": latents.cpu(), "step": settings.end_step, "steps": settings.steps,
                "solver": settings.solver, "shift": settings.flow_shift}
    return {"samples": samples, HANDOVER: handover}


def _step_cache(mode: str, threshold: float, dit: DiTHandle, cond: Conditioning, experts: bool) -> StepCache | None:
    """The run's step cache (None with mode 'none' or without a calibration that drives the mode)."""
    if mode == "none":
        return None
    if experts:
        raise ValueError("step caching is calibrated for one DiT, not a pair of experts: set cache_mode to 'none', "
                         "or run each expert in its own sampler (end_step / start_step) with its own cache")
    stored = find_calibration(dit.path) if dit.path else None
    settings = StepCacheSettings(mode, threshold or DEFAULT_THRESHOLDS[mode], stored)
    return cache_for_run(settings, dit.config, cond.height, cond.width, dit.is_wan22, dit.name)
