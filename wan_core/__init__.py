"""wan_core: a standalone PyTorch implementation of the Wan2.1 model stack (no ComfyUI imports).

```
from wan_core import load_dit, load_vae, load_t5, load_clip_vision, TASKS
dit = load_dit(path, task=None, dtype=None, device="cpu", attn="sdpa")   # task inferred when None
```
Every loader also takes `config=` (a frozen config dataclass from `wan_core.config`) for models whose
architecture is not a preset; files written by this project store their config in the safetensors metadata.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import TASKS, CLIPVisionConfig, DiTConfig, T5Config, TaskPreset, VAEConfig, detect_config, get_task

_LAZY = {"load_dit": "model", "WanModel": "model", "load_vae": "vae", "WanVAE": "vae", "load_t5": "t5",
         "T5Encoder": "t5", "load_clip_vision": "clip", "CLIPVision": "clip"}

__all__ = ["TASKS", "TaskPreset", "DiTConfig", "VAEConfig", "T5Config", "CLIPVisionConfig", "detect_config",
           "get_task", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'wan_core' has no attribute {name!r}")
