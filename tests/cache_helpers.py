"""Tiny random encoders saved as checkpoint files, and small datasets, for the cache tests (CPU, fp32)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from media_helpers import write_image, write_text

from tests.test_tokenizer import _CORPUS, _train_spiece
from tests.tiny import randomize_
from wan_core.loading.checkpoint import save_safetensors
from wan_core.models.clip import CLIPVision
from wan_core.models.config import CONFIG_METADATA_KEY, CLIPVisionConfig, T5Config, VAEConfig, config_to_json
from wan_core.models.t5 import UMT5Encoder
from wan_core.models.tokenizer import save_spiece_into
from wan_core.models.vae import WanVAEModel

TINY_VAE = VAEConfig(dim=8)
TINY_T5 = T5Config(vocab_size=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
TINY_CLIP = CLIPVisionConfig(dim=32, num_heads=4, num_layers=3)


@dataclass(frozen=True)
class Models:
    vae: Path
    other_vae: Path  # same architecture, other weights
    t5: Path
    clip: Path


def write_models(folder: Path) -> Models:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, seed in (("vae", 0), ("other_vae", 1)):
        model = randomize_(WanVAEModel(TINY_VAE), seed, scale=0.05)
        paths[name] = save_safetensors(model.state_dict(), folder / f"{name}.safetensors",
                                       {CONFIG_METADATA_KEY: config_to_json(TINY_VAE)})
    t5 = randomize_(UMT5Encoder(TINY_T5), 0, scale=0.5)
    sd = save_spiece_into(dict(t5.state_dict()), _train_spiece(_CORPUS))
    paths["t5"] = save_safetensors(sd, folder / "umt5.safetensors", {CONFIG_METADATA_KEY: config_to_json(TINY_T5)})
    clip = randomize_(CLIPVision(TINY_CLIP), 0)
    sd = dict(clip.state_dict())  # the module omits the last block; a checkpoint file has it (never read)
    last = TINY_CLIP.num_layers - 1
    sd.update({k.replace(f"transformer.{last - 1}.", f"transformer.{last}."): v.clone()
               for k, v in clip.state_dict().items() if f"transformer.{last - 1}." in k})
    paths["clip"] = save_safetensors(sd, folder / "clip_vision_h.safetensors",
                                     {CONFIG_METADATA_KEY: config_to_json(TINY_CLIP)})
    return Models(**paths)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_toml(path: Path, general: dict, *datasets: dict) -> Path:
    lines = ["[general]"] + [f"{k} = {_toml_value(v)}" for k, v in general.items()]
    for dataset in datasets:
        lines += ["", "[[datasets]]"] + [f"{k} = {_toml_value(v)}" for k, v in dataset.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def image_dataset(root: Path, captions: dict[str, str], size: tuple[int, int] = (32, 32), **general) -> Path:
    """PNG images `{stem}.png` (frame i of media_helpers' stripes) with `{stem}.txt` captions; cache in root/cache."""
    images = root / "images"
    for index, (stem, caption) in enumerate(captions.items()):
        write_image(images / f"{stem}.png", size=size, index=index + 1)
        write_text(images / f"{stem}.txt", caption)
    settings = {"resolution": [32, 32], "caption_extension": ".txt", "batch_size": 1, **general}
    return write_toml(root / "dataset.toml", settings,
                      {"image_directory": images, "cache_directory": root / "cache"})


def write_frames(folder: Path, frames: int, size: tuple[int, int], offset: int = 0) -> Path:
    """A frame folder `0000.png`, ...; frame t shows the stripes of number offset + t."""
    for t in range(frames):
        write_image(folder / f"{t:04d}.png", size=size, index=(offset + t) % 64)
    return folder


def frames_dataset(root: Path, clips: dict[str, str], frames: int = 5, controls: bool = False,
                   **dataset) -> Path:
    """Frame-folder videos listed in a JSONL (optionally each with a control frame folder); cache in root/cache."""
    records = []
    for index, (stem, caption) in enumerate(clips.items()):
        clip = write_frames(root / "videos" / stem, frames, (32, 32), offset=7 * index)
        record = {"video_path": str(clip), "caption": caption}
        if controls:
            control = write_frames(root / "controls" / stem, frames, (48, 32), offset=20 + 7 * index)
            record["control_path"] = str(control)
        records.append(json.dumps(record))
    (root / "dataset.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    settings = {"video_jsonl_file": root / "dataset.jsonl", "cache_directory": root / "cache",
                "target_frames": [frames], **dataset}
    return write_toml(root / "dataset.toml", {"resolution": [32, 32], "batch_size": 1}, settings)
