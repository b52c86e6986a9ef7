"""Loader nodes: DiT, umT5, VAE, CLIP vision and the chainable LoRA loader."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from wan_core.loading.model_set import check_dit_file_task
from wan_core.lora.apply import inference_filter, lora_report
from wan_core.models.attention import Backend
from wan_core.models.clip import default_clip_dtype, load_clip_vision
from wan_core.models.config import TASKS
from wan_core.models.dit import load_dit
from wan_core.models.t5 import load_t5
from wan_core.models.vae import load_vae
from wan_core.runtime.compile import compile_blocks
from wan_core.runtime.fp8 import FP8_MODES, fp8_t5
from wan_core.runtime.offload import enable_block_swap, resident_weight_bytes

from . import comfy_adapter as comfy
from .common import CATEGORY, first_problem, inp, problem
from .types import CLIP_VISION, DIT, T5, VAE, DiTHandle, LoRASpec, ModelHandle

logger = logging.getLogger(__name__)

DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION = tuple(b.value for b in Backend)
REPORT_KEYS = 20  # unmatched keys listed in the LoRA report


def _file_choices(folder: str) -> list[str]:
    return comfy.list_models(folder) or [f"(no files in {folder})"]


NODE_TASKS = list(TASKS)
DIT_SLOTS = 2  # loaded DiTs kept: the high- and low-noise experts of a Wan2.2 A14B pair


def _dit_problem(model_name: str | None, task: str | None) -> str | None:
    """The file must exist (naming model_name in VALIDATE_INPUTS turns off ComfyUI's own list check) and, with an
    explicit task, fit it (read from the header only)."""
    if model_name is None:
        return None
    missing = problem(lambda: comfy.model_path("diffusion_models", model_name))
    if missing or task in (None, "auto"):
        return missing
    return problem(lambda: check_dit_file_task(comfy.model_path("diffusion_models", model_name), task))


def _file_state(folder: str, name: str) -> str:
    """IS_CHANGED value: the file's identity, so a replaced file reloads (missing files fail in the loader)."""
    try:
        return repr(comfy.file_key(comfy.model_path(folder, name)))
    except (FileNotFoundError, ValueError):
        return f"missing:{name}"


class WanTunerDiTLoader:
    DESCRIPTION = ("Loads a Wan2.1 or Wan2.2 diffusion transformer (official, ComfyUI or diffusers layout; "
                   "fp16/bf16/fp8). For Wan2.2 A14B load the high- and low-noise experts with two loaders.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("dit",)
    OUTPUT_TOOLTIPS = ("The loaded DiT; connect LoRA loaders or the sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": inp(_file_choices("diffusion_models"), "DiT file from models/diffusion_models "
                              "(e.g. wan2.1_t2v_1.3B_fp16.safetensors, wan2.2_t2v_low_noise_14B_fp16.safetensors, "
                              "wan2.2_ti2v_5B_fp16.safetensors)."),
            "task": inp(["auto", *NODE_TASKS], "Wan task the file must fit; 'auto' infers it from the weights. "
                        "A mismatch is reported before the graph runs."),
            "dtype": inp(list(DTYPES), "Compute dtype; 'default' keeps the file's (bf16 for fp8 files)."),
            "fp8": inp(["none", *FP8_MODES], "Store the block weights in fp8 to halve memory; 'fp8_scaled' "
                       "keeps quality best, 'fp8_fast' needs an RTX 40xx/H100-class GPU."),
            "attention": inp(list(ATTENTION), "Attention kernel; 'sdpa' (PyTorch) always works, others need "
                             "their package installed."),
            "blocks_to_swap": inp("INT", "Transformer blocks kept in CPU memory and streamed to the GPU "
                                  "(0 = off). Lowers VRAM use at some speed cost.", default=0, min=0, max=40),
            "compile": inp("BOOLEAN", "torch.compile each block (slow first run, faster later runs).",
                           default=False),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name: str | None = None, task: str | None = None) -> bool | str:
        return first_problem(_dit_problem(model_name, task))

    @classmethod
    def IS_CHANGED(cls, model_name: str, **_: object) -> str:
        return _file_state("diffusion_models", model_name)

    def load(self, model_name: str, task: str, dtype: str, fp8: str, attention: str, blocks_to_swap: int,
             compile: bool) -> tuple[DiTHandle]:
        path = comfy.model_path("diffusion_models", model_name)
        task_name = None if task == "auto" else task
        key = (comfy.file_key(path), task, dtype, fp8, attention, blocks_to_swap, compile)
        # A replaced DiT is unplaced first, so that a block-swapped one detaches its swapper and unpins its CPU
        # memory now, not whenever the garbage collector frees it.
        model = comfy.cached("dit", key, lambda: _load_dit(path, task_name, dtype, fp8, attention, blocks_to_swap,
                                                           compile), slots=DIT_SLOTS, evict=comfy.ManagedModel.unplace)
        return (DiTHandle(model, model_name, task_name, str(path)),)


def _load_dit(path, task: str | None, dtype: str, fp8: str, attention: str, blocks_to_swap: int,
              compile: bool) -> comfy.ManagedModel:
    device = "cpu" if blocks_to_swap else comfy.load_device()
    model = load_dit(path, task=task, dtype=DTYPES[dtype], device=device, attn=attention,
                     fp8=None if fp8 == "none" else fp8)
    if compile:
        compile_blocks(model)
    if not blocks_to_swap:
        return comfy.ManagedModel(model, model, "dit")

    return comfy.ManagedModel(model, model, "dit", placer=lambda d: enable_block_swap(model, blocks_to_swap, d),
                              reserve_bytes=resident_weight_bytes(model, blocks_to_swap))


class WanTunerT5Loader:
    DESCRIPTION = "Loads the umT5-XXL text encoder (official .pth or ComfyUI umt5_xxl_*.safetensors)."
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (T5,)
    RETURN_NAMES = ("t5",)
    OUTPUT_TOOLTIPS = ("The text encoder; connect it to Text Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": inp(_file_choices("text_encoders"), "umT5 file from models/text_encoders "
                              "(e.g. umt5_xxl_fp16.safetensors or models_t5_umt5-xxl-enc-bf16.pth)."),
            "dtype": inp(list(DTYPES), "Compute dtype; 'default' is bf16 as the official code (fp32 files "
                         "stay fp32)."),
            "fp8": inp("BOOLEAN", "Store the encoder weights in scaled fp8 (about half the memory).",
                       default=False),
            "tokenizer": inp("STRING", "Tokenizer source. Empty: the one embedded in ComfyUI's umt5 files, "
                             "else google/umt5-xxl beside the checkpoint. Or a folder with spiece.model, or "
                             "a .model file.", default=""),
        }}

    @classmethod
    def IS_CHANGED(cls, model_name: str, **_: object) -> str:
        return _file_state("text_encoders", model_name)

    def load(self, model_name: str, dtype: str, fp8: bool, tokenizer: str) -> tuple[ModelHandle]:
        path = comfy.model_path("text_encoders", model_name)
        key = (comfy.file_key(path), dtype, fp8, tokenizer.strip())
        return (comfy.cached("t5", key, lambda: ModelHandle(_load_t5(path, dtype, fp8, tokenizer), model_name)),)


def _load_t5(path, dtype: str, fp8: bool, tokenizer: str) -> comfy.ManagedModel:
    t5 = load_t5(path, tokenizer=tokenizer.strip() or None, dtype=DTYPES[dtype], device=comfy.load_device())
    if fp8:
        fp8_t5(t5)
    return comfy.ManagedModel(t5, t5.model, "t5")


class WanTunerVAELoader:
    DESCRIPTION = ("Loads the Wan2.1 VAE (Wan2.1_VAE.pth or wan_2.1_vae.safetensors; also for the Wan2.2 A14B "
                   "experts) or the Wan2.2 VAE of TI2V-5B (Wan2.2_VAE.pth or wan2.2_vae.safetensors).")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE; connect it to VAE encode/decode and the conditioning nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": inp(_file_choices("vae"), "VAE file from models/vae (e.g. wan_2.1_vae.safetensors, or "
                              "wan2.2_vae.safetensors for TI2V-5B: 48 latent channels, sizes multiples of 32)."),
            "dtype": inp(["fp32", "bf16", "fp16"], "Compute dtype; fp32 as the official pipeline."),
            "cache_on_cpu": inp("BOOLEAN", "Keep the causal feature cache in CPU memory (less VRAM, slower).",
                                default=False),
            "tiling": inp(["auto", "on", "off"], "Process frames in overlapping spatial tiles; 'auto' tiles "
                          "720p and larger."),
        }}

    @classmethod
    def IS_CHANGED(cls, model_name: str, **_: object) -> str:
        return _file_state("vae", model_name)

    def load(self, model_name: str, dtype: str, cache_on_cpu: bool, tiling: str) -> tuple[ModelHandle]:
        path = comfy.model_path("vae", model_name)
        options = {"cache_device": "cpu" if cache_on_cpu else None,
                   "tiling": {"auto": "auto", "on": True, "off": False}[tiling]}
        key = (comfy.file_key(path), dtype, cache_on_cpu, tiling)

        def build() -> ModelHandle:
            vae = load_vae(path, dtype=DTYPES[dtype], device=comfy.load_device(), **options)
            return ModelHandle(comfy.ManagedModel(vae, vae.model, "vae"), model_name)

        return (comfy.cached("vae", key, build),)


class WanTunerCLIPVisionLoader:
    DESCRIPTION = "Loads the CLIP ViT-H/14 vision tower used by the image-to-video models (clip_vision_h)."
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The CLIP vision model; connect it to CLIP Vision Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": inp(_file_choices("clip_vision"), "CLIP vision file from models/clip_vision "
                              "(e.g. clip_vision_h.safetensors)."),
            "dtype": inp(list(DTYPES), "Compute dtype; 'default' is fp16 on a GPU and fp32 on the CPU."),
        }}

    @classmethod
    def IS_CHANGED(cls, model_name: str, **_: object) -> str:
        return _file_state("clip_vision", model_name)

    def load(self, model_name: str, dtype: str) -> tuple[ModelHandle]:
        path = comfy.model_path("clip_vision", model_name)
        chosen = DTYPES[dtype] or default_clip_dtype(comfy.compute_device())
        key = (comfy.file_key(path), dtype)

        def build() -> ModelHandle:
            clip = load_clip_vision(path, dtype=chosen, device=comfy.load_device())
            return ModelHandle(comfy.ManagedModel(clip, clip, "clip_vision"), model_name)

        return (comfy.cached("clip_vision", key, build),)


def _regex_problem(pattern: str | None, what: str) -> str | None:
    if not pattern or not pattern.strip():
        return None
    return problem(lambda: inference_filter(**{what: pattern.strip()}))


def _listing(names: tuple[str, ...]) -> str:
    more = f" ... (+{len(names) - REPORT_KEYS})" if len(names) > REPORT_KEYS else ""
    return ", ".join(names[:REPORT_KEYS]) + more


def _format_report(spec: LoRASpec) -> str:
    report = spec.report
    lines = [f"{spec.name}: {report.matched} modules matched (strength {spec.strength:g}, format {report.format})"]
    if report.filtered:
        lines.append(f"{len(report.filtered)} modules left out by include/exclude: {_listing(report.filtered)}")
    if report.unmatched:
        lines.append(f"{len(report.unmatched)} unmatched keys: {_listing(report.unmatched)}")
    else:
        lines.append("no unmatched keys")
    return "\n".join(lines)


class WanTunerLoRALoader:
    DESCRIPTION = ("Adds a LoRA (musubi/kohya, ComfyUI, diffusers or PEFT keys; LoHa/LoKr) to the DiT, unmerged: "
                   "the strength can change between runs without reloading. Chain several.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (DIT, "STRING")
    RETURN_NAMES = ("dit", "report")
    OUTPUT_TOOLTIPS = ("The DiT with this LoRA added to its chain.",
                       "Matched module count and unmatched keys of this LoRA.")
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "dit": inp(DIT, "DiT from the DiT loader or another LoRA loader."),
            "lora_name": inp(_file_choices("loras"), "LoRA file from models/loras."),
            "strength": inp("FLOAT", "Multiplier of the LoRA (0 disables it, negative inverts it).", default=1.0,
                            min=-10.0, max=10.0, step=0.01),
            "include": inp("STRING", "Regex: only modules whose name (e.g. lora_unet_blocks_9_cross_attn_k) "
                           "matches are used. Empty = all.", default=""),
            "exclude": inp("STRING", "Regex: modules whose name matches are left out (after include). "
                           "Empty = none.", default=""),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, include: str | None = None, exclude: str | None = None) -> bool | str:
        return first_problem(_regex_problem(include, "include"), _regex_problem(exclude, "exclude"))

    def add(self, dit: DiTHandle, lora_name: str, strength: float, include: str, exclude: str) -> dict:
        path = comfy.model_path("loras", lora_name)
        inc, exc = include.strip() or None, exclude.strip() or None
        report = lora_report(dit.model.obj, path, strength, inc, exc)
        spec = LoRASpec(lora_name, str(path), strength, inc, exc, report)
        text = _format_report(spec)
        logger.info("%s", text)
        return {"ui": {"text": [text]}, "result": (replace(dit, loras=(*dit.loras, spec)), text)}
