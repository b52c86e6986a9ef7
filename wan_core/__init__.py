"""wan_core: a standalone PyTorch implementation of the Wan2.1 model stack (no ComfyUI imports).

Folders: `models/` (architectures, configs, shared layers), `loading/` (files of every layout), `lora/`, `runtime/`
(fp8, block swap, compile), `sampling/` (solvers, guidance, conditioning, pipeline), `generate/` (the CLI),
`media/` (image and video files, frame and latent layouts), `toy/` (the synthetic world of the toy models).

```
from wan_core import load_dit, load_vae, load_t5, load_clip_vision, TASKS
dit = load_dit(path, task=None, dtype=None, device="cpu", attn="sdpa")   # task inferred when None
```
Every loader also takes `config=` (a frozen config dataclass from `wan_core.models.config`) for models whose
architecture is not a preset; files written by this project store their config in the safetensors metadata.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from wan_core.models.config import (
    TASKS,
    CLIPVisionConfig,
    DiTConfig,
    T5Config,
    TaskPreset,
    VAEConfig,
    detect_config,
    get_task,
)

_LAZY = {"load_dit": "models.dit", "WanModel": "models.dit", "load_vae": "models.vae", "WanVAE": "models.vae",
         "load_t5": "models.t5", "T5Encoder": "models.t5", "load_clip_vision": "models.clip",
         "CLIPVision": "models.clip"}

__all__ = ["TASKS", "TaskPreset", "DiTConfig", "VAEConfig", "T5Config", "CLIPVisionConfig", "detect_config",
           "get_task", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'wan_core' has no attribute {name!r}")
