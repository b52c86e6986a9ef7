"""The sampler node: guided flow-matching denoising of a Wan2.1 video latent."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from wan_core.lora.apply import applied_loras
from wan_core.media.layouts import (
    fit_latent_rgb,
    latent_from_comfy,
    latent_preview,
    latent_to_comfy,
    video_size_of_latent,
)
from wan_core.sampling.conditioning import check_conditioning_fits, text_to_video
from wan_core.sampling.guidance import CFG_SKIP_MODES, SLG_MODES, SLGConfig, parse_slg_layers
from wan_core.sampling.pipeline import SamplerSettings
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


def _conditioning(conditioning: WanConditioning | None, latent: dict | None, width: int, height: int,
                  length: int) -> tuple[Conditioning, str]:
    """The wan_core Conditioning and its source: a conditioning node, else the input latent's size, else the
    sampler's own width/height/length (text-to-video)."""
    if conditioning is not None:
        return conditioning.cond, conditioning.kind
    if latent is not None:
        height, width, length = video_size_of_latent(latent["samples"])
    return text_to_video(height, width, length), "text-to-video"


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
def _prepared(dit: DiTHandle) -> Iterator[WanModel]:
    """The DiT on its device with the LoRA chain applied for one run. A block-swapped DiT is placed after the
    LoRAs are applied (so their weights stream with the blocks) and unplaced afterwards."""
    loras = [(s.path, s.strength, s.include, s.exclude) for s in dit.loras]
    self_placed = dit.model.placer is not None and bool(loras)
    if self_placed:
        dit.model.unplace()
    else:
        dit.model.ready()
    with applied_loras(dit.model.obj, loras):
        try:
            yield dit.model.ready()
        finally:
            if self_placed:
                dit.model.unplace()


def _negative(embeds: TextEmbeds, settings: SamplerSettings) -> list | None:
    if settings.guidance_scale == 1.0 and settings.slg is None:
        return None
    if embeds.negative is None:
        raise ValueError(f"guidance_scale {settings.guidance_scale} (or skip-layer guidance) needs a negative prompt;"
                         " enter one in Text Encode or set guidance_scale to 1.0")
    return [embeds.negative]


class WanTunerSampler:
    DESCRIPTION = ("Generates a Wan2.1 video latent: text-to-video, or with a conditioning node image-to-video, "
                   "first-last-frame or Fun-Control; optional input latent for video-to-video.")
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
                "conditioning": inp(CONDITIONING, "Image-to-video, first-last-frame or Fun-Control conditioning; "
                                    "its size and length replace width/height/length."),
                "latent": inp("LATENT", "Input video latent (video-to-video); its size replaces width/height/"
                              "length when no conditioning is connected."),
                "denoise": inp("FLOAT", "With an input latent: how much of it to redo (1.0 = from pure noise).",
                               default=1.0, min=0.01, max=1.0, step=0.01),
                "vae": inp(VAE, "Optional VAE, only for the live step preview in ComfyUI."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width: int | None = None, height: int | None = None, length: int | None = None,
                        slg_mode: str | None = None, slg_layers: str | None = None) -> bool | str:
        layers = None if slg_mode in (None, "none") or slg_layers is None else problem(
            lambda: parse_slg_layers(slg_layers))
        return first_problem(size_problem(width, height, length), layers)

    def sample(self, dit: DiTHandle, text_embeds: TextEmbeds, width: int, height: int, length: int, steps: int,
               guidance_scale: float, shift: float, solver: str, seed: int, noise_on_cpu: bool, cfg_skip_mode: str,
               cfg_apply_ratio: float, slg_mode: str, slg_layers: str, slg_scale: float, slg_start: float,
               slg_end: float, conditioning: WanConditioning | None = None, latent: dict | None = None,
               denoise: float = 1.0, vae: ModelHandle | None = None, unique_id: str | None = None) -> tuple[dict]:
        cond, kind = _conditioning(conditioning, latent, width, height, length)
        check_conditioning_fits(dit.config, cond, kind)
        settings = SamplerSettings(steps=steps, guidance_scale=guidance_scale, flow_shift=shift, seed=seed,
                                   solver=solver, cpu_noise=noise_on_cpu, cfg_skip_mode=cfg_skip_mode,
                                   cfg_apply_ratio=cfg_apply_ratio,
                                   slg=_slg(slg_mode, slg_layers, slg_scale, slg_start, slg_end), denoise=denoise)
        negative = _negative(text_embeds, settings)
        progress = comfy.Progress(steps, unique_id, "WanTuner sampler", _preview(vae))
        init = None if latent is None else latent_from_comfy(latent["samples"], "latent")
        with _prepared(dit) as model:
            latents = run_denoise(model, cond, [text_embeds.positive], negative, settings, init_latents=init,
                                  callback=lambda info: progress.step(info.i + 1, info.total, info.denoised))
        return ({"samples": latent_to_comfy(latents)},)
