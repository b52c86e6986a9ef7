"""Saving generation results: mp4 (H.264, yuv420p), PNG frames and latents with their settings in metadata.

Every file is written under a temporary name and renamed, so an interrupted run leaves no broken file. Names
carry a timestamp and the seed: `{YYYYmmdd-HHMMSS-mmm}_{seed}.mp4`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wan_core.loading.checkpoint import load_state_dict, read_metadata, save_safetensors
from wan_core.media.io import write_png_frames, write_video

OUTPUT_TYPES = ("video", "images", "latent", "both", "latent_images")
LATENT_KEY = "latent"


def output_stem(seed: int | None) -> str:
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}_{seed}"


def save_latent(latents: torch.Tensor, path: Path, metadata: Mapping[str, Any] | None) -> Path:
    meta = None if metadata is None else {k: json.dumps(v) if not isinstance(v, str) else v
                                          for k, v in metadata.items()}
    return save_safetensors({LATENT_KEY: latents.float().cpu()}, path, meta)


def load_latent(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """A latent file written by `save_latent` (or musubi): the tensor [B, 16, F, h, w] and its decoded metadata."""
    tensors = load_state_dict(path)
    if LATENT_KEY not in tensors:
        raise ValueError(f"{path} holds no '{LATENT_KEY}' tensor (keys: {', '.join(list(tensors)[:5])})")
    latent = tensors[LATENT_KEY]
    if latent.dim() == 4:
        latent = latent[None]
    meta = {}
    for key, value in read_metadata(path).items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return latent, meta


def save_outputs(save_dir: str | Path, stem: str, output_type: str, *, frames: torch.Tensor | None,
                 latents: torch.Tensor | None, fps: int, metadata: Mapping[str, Any] | None) -> list[Path]:
    """Write what `output_type` asks for. frames: [T, H, W, 3] float in [0, 1]; latents [1, 16, F, h, w]."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
    save_dir = Path(save_dir)
    written: list[Path] = []
    if output_type in ("latent", "both", "latent_images") and latents is not None:
        written.append(save_latent(latents, save_dir / f"{stem}_latent.safetensors", metadata))
    if output_type in ("video", "both") and frames is not None:
        written.append(write_video(frames, save_dir / f"{stem}.mp4", fps))
    if output_type in ("images", "latent_images") and frames is not None:
        written.append(write_png_frames(frames, save_dir / stem))
    return written
