"""ComfyUI V1 nodes over `wan_core`. Node ids all start with `WanTuner`; every input has a tooltip.

The node classes need nothing from ComfyUI; `comfy_adapter` holds every ComfyUI-specific call. The trainer nodes
(dataset caching, LoRA training) live in `nodes/training.py`.
"""

from __future__ import annotations

from .comfy_adapter import register_toy_folder
from .conditioning import (
    WanTunerFirstLastFrame,
    WanTunerFunControl,
    WanTunerImageToVideo,
    WanTunerTI2VImageToVideo,
)
from .encode import WanTunerCLIPVisionEncode, WanTunerTextEncode, WanTunerVAEDecode, WanTunerVAEEncode
from .loaders import (
    WanTunerCLIPVisionLoader,
    WanTunerDiTLoader,
    WanTunerLoRALoader,
    WanTunerT5Loader,
    WanTunerVAELoader,
)
from .output import WanTunerSaveVideo
from .sampler import WanTunerSampler
from .training import WanTunerCacheDataset, WanTunerTrainLoRA

_NODES: dict[type, str] = {
    WanTunerDiTLoader: "WanTuner DiT Loader",
    WanTunerT5Loader: "WanTuner T5 Loader",
    WanTunerVAELoader: "WanTuner VAE Loader",
    WanTunerCLIPVisionLoader: "WanTuner CLIP Vision Loader",
    WanTunerLoRALoader: "WanTuner LoRA Loader",
    WanTunerTextEncode: "WanTuner Text Encode",
    WanTunerCLIPVisionEncode: "WanTuner CLIP Vision Encode",
    WanTunerVAEEncode: "WanTuner VAE Encode",
    WanTunerVAEDecode: "WanTuner VAE Decode",
    WanTunerImageToVideo: "WanTuner Image to Video",
    WanTunerFirstLastFrame: "WanTuner First-Last Frame",
    WanTunerFunControl: "WanTuner Fun-Control",
    WanTunerTI2VImageToVideo: "WanTuner TI2V-5B Image to Video",
    WanTunerSampler: "WanTuner Sampler",
    WanTunerSaveVideo: "WanTuner Save Video",
    WanTunerCacheDataset: "WanTuner Cache Dataset",
    WanTunerTrainLoRA: "WanTuner Train LoRA",
}

NODE_CLASS_MAPPINGS: dict[str, type] = {cls.__name__: cls for cls in _NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {cls.__name__: name for cls, name in _NODES.items()}

register_toy_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
