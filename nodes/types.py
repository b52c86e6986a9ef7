"""Socket types of the pack and the small typed objects they carry between nodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from wan_core.lora.apply import LoRAReport
from wan_core.models.config import TASKS, WAN22_VAE, DiTConfig
from wan_core.sampling.conditioning import Conditioning

from .comfy_adapter import ManagedModel

DIT = "WANTUNER_DIT"
T5 = "WANTUNER_T5"
VAE = "WANTUNER_VAE"
CLIP_VISION = "WANTUNER_CLIP_VISION"
TEXT_EMBEDS = "WANTUNER_TEXT_EMBEDS"
IMAGE_EMBEDS = "WANTUNER_IMAGE_EMBEDS"
CONDITIONING = "WANTUNER_CONDITIONING"


@dataclass(frozen=True)
class LoRASpec:
    """One LoRA of a chain; applied (unmerged) by the sampler for its run and removed afterwards."""

    name: str
    path: str
    strength: float
    include: str | None
    exclude: str | None
    report: LoRAReport


@dataclass(frozen=True)
class DiTHandle:
    """A loaded DiT (shared, never modified by LoRA nodes) plus the LoRA chain to apply when sampling."""

    model: ManagedModel
    name: str
    task: str | None
    path: str = ""  # the file it was loaded from (its step-cache calibration lies beside it)
    loras: tuple[LoRASpec, ...] = ()

    @property
    def config(self) -> DiTConfig:
        return self.model.obj.config

    @property
    def is_wan22(self) -> bool:
        """A Wan2.2 DiT by its task, or by the official / ComfyUI file name when the task is inferred (the A14B
        experts have the Wan2.1 14B shapes)."""
        if self.task is not None:
            return TASKS[self.task].is_wan22
        return self.config.out_dim == WAN22_VAE.z_dim or "wan2.2" in self.name.lower()


@dataclass(frozen=True)
class ModelHandle:
    """A loaded T5, VAE or CLIP vision model. `cache` holds per-model derived data (e.g. the preview map)."""

    model: ManagedModel
    name: str
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class TextEmbeds:
    """umT5 outputs, each [L_i, text_dim] (trimmed to the prompt's tokens); negative is None when empty."""

    positive: torch.Tensor
    negative: torch.Tensor | None
    prompt: str
    negative_prompt: str


@dataclass(frozen=True)
class ImageEmbeds:
    """CLIP vision features [N, tokens, C] of 1 image (I2V, Fun-Control) or a first/last pair (FLF2V)."""

    features: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class WanConditioning:
    """What a conditioning node prepared for the sampler: the wan_core Conditioning and which node made it."""

    cond: Conditioning
    kind: str  # "image-to-video", "first-last-frame", "Fun-Control", "TI2V image-to-video"
