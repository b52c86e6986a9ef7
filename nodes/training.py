"""Trainer nodes: cache a dataset (VAE latents + umT5 outputs) and train a LoRA inside the ComfyUI process.

- `WanTunerCacheDataset` takes a musubi dataset TOML, or a folder of images/videos with same-named caption files
  (it then writes the TOML into `<folder>/wantuner_cache/`), brings the content-keyed caches of
  `training.cache.store` up
  to date with the loaded VAE (+ CLIP vision for I2V) and umT5, and outputs a dataset handle and a summary.
- `WanTunerTrainLoRA` runs `training.train.train` in-process on that dataset and the DiT loader's file: ComfyUI's
  progress bar, Cancel between steps (files saved so far stay valid: every write is atomic), the loss streamed to
  the node's live chart (web/js/wantuner_training.js), the LoRA written into ComfyUI's `loras` folder. Its first
  output is the new file's name, typed as ComfyUI's list of LoRA files so that it links straight into the LoRA
  loader's `lora_name`; the second is a loss-curve IMAGE.

The node builds a `training.train_config.TrainConfig` and trains the LoRA on the DiT the loader loaded (its dtype,
fp8 and block swap; no second copy of the weights): ComfyUI's models are moved off the GPU, the DiT is put on it,
and the trainer hands it back as it was (same weights, LoRA removed, requires_grad, modes and attention restored),
also when the run is cancelled or fails.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from training.args import ATTENTION_FLAGS, SAVE_FORMATS
from training.cache.latents import cache_latents
from training.cache.store import CacheRunReport
from training.cache.text import cache_text
from training.dataset.items import DatasetScan, bucket_step, ensure_not_empty, scan_dataset_group, summarize
from training.dataset.schema import FRAME_EXTRACTION_MODES, DatasetGroupConfig, load_dataset_config
from training.optim import OptimizerConfig
from training.step import InputSpec
from training.timesteps import SCHEMES, TimestepConfig
from training.train import train
from training.train_config import DataConfig, MemoryConfig, ModelConfig, SaveConfig, ScheduleConfig, TrainConfig
from training.trainable import NetworkConfig, normal_tensors
from wan_core.loading.checkpoint import write_text_atomic
from wan_core.media.io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, list_images, list_videos
from wan_core.models.dit import WanModel
from wan_core.models.ops import FP8_DTYPES
from wan_core.sampling.conditioning import nearest_valid
from wan_core.sampling.experts import boundary_fraction

from . import comfy_adapter as comfy
from .common import CATEGORY, MAX_FRAMES, MAX_SIZE, first_problem, inp, problem
from .loaders import _file_choices
from .loss_chart import chart_image
from .sampler import TASK_DEFAULT, a14b_task
from .types import CLIP_VISION, DIT, T5, VAE, DiTHandle, ModelHandle

logger = logging.getLogger(__name__)

DATASET = "WANTUNER_DATASET"
CACHE_FOLDER = "wantuner_cache"  # inside a dataset folder: the written TOML and the caches
TOML_NAME = "dataset.toml"
OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
# the node's attention choices (training.args flag names) -> wan_core.models.attention backends; SageAttention has no
# backward
ATTENTION = {flag: ATTENTION_FLAGS[flag] for flag in ("sdpa", "flash_attn", "xformers", "flash3")}
NAME_PATTERN = re.compile(r"^[^<>:\"|?*\x00-\x1f]+$")


# ----------------------------------------------------------------------------------------------------------------
# Dataset handle, paths and the folder TOML
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetHandle:
    """A cached dataset: its TOML, what it holds and which extras the latent cache has."""

    config: Path
    items: int
    buckets: tuple[tuple[int, int, int], ...]  # (W, H, frames)
    image_latents: bool  # I2V first-frame latents cached
    clip: bool  # CLIP vision features cached
    control: bool  # Fun-Control control latents cached
    summary: str


@dataclass(frozen=True)
class FolderSettings:
    """How a plain folder becomes a dataset (ignored for a TOML, which carries its own settings)."""

    width: int
    height: int
    frames: int
    frame_extraction: str
    enable_bucket: bool
    num_repeats: int
    batch_size: int
    caption_extension: str


def resolve_dataset_path(text: str) -> Path:
    """A folder or a .toml; relative paths are inside ComfyUI's input folder. Quotes around a pasted path are
    dropped."""
    cleaned = text.strip().strip("\"'")
    if not cleaned:
        raise ValueError("dataset_path is empty: enter a folder of images/videos with caption files, or a dataset "
                         ".toml (relative paths are inside ComfyUI's input folder)")
    path = Path(cleaned).expanduser()
    if not path.is_absolute():
        path = comfy.input_directory() / path
    comfy.confine_data(path, "dataset_path")
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".toml"):
        return path
    if path.is_file():
        raise ValueError(f"dataset_path {path} is a {path.suffix or 'plain'} file; expected a folder of images/videos "
                         "with caption files, or a musubi dataset .toml")
    raise FileNotFoundError(f"dataset_path {text!r}: {path} does not exist (relative paths are inside ComfyUI's input "
                            f"folder {comfy.input_directory()})")


def _quoted(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write (temp file + rename), skipped when the file already holds `text`."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(path, text)


def folder_dataset_toml(folder: Path, settings: FolderSettings) -> Path:
    """Write `<folder>/wantuner_cache/dataset.toml` for the images and videos directly inside `folder` (one
    [[datasets]] table per kind, caches in wantuner_cache/images and wantuner_cache/videos); returns its path."""
    images, videos = list_images(folder), list_videos(folder)
    if not images and not videos:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or videos "
                         f"({', '.join(VIDEO_EXTENSIONS)}) to train on")
    cache = folder / CACHE_FOLDER
    lines = ["# written by the WanTuner Cache Dataset node from the folder's files and the node's settings",
             "[general]", f"resolution = [{settings.width}, {settings.height}]",
             f"caption_extension = {_quoted(settings.caption_extension)}", f"batch_size = {settings.batch_size}",
             f"num_repeats = {settings.num_repeats}", f"enable_bucket = {str(settings.enable_bucket).lower()}"]
    if videos:
        lines += ["", "[[datasets]]", f"video_directory = {_quoted(folder)}",
                  f"cache_directory = {_quoted(cache / 'videos')}", f"target_frames = [{settings.frames}]",
                  f"frame_extraction = {_quoted(settings.frame_extraction)}"]
    if images:
        lines += ["", "[[datasets]]", f"image_directory = {_quoted(folder)}",
                  f"cache_directory = {_quoted(cache / 'images')}"]
    path = cache / TOML_NAME
    _write_if_changed(path, "\n".join(lines) + "\n")
    return path


def _dataset_files(path: Path) -> list[Path]:
    """The files whose change should re-run the cache node: a folder's own files, or a TOML and the files of its
    datasets' folders (JSONL datasets: the JSONL file itself)."""
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    files = [path]
    for cfg in toml_dataset(path).datasets:
        for folder in (cfg.directory, cfg.control_directory):
            if folder and Path(folder).is_dir():
                files += [p for p in Path(folder).iterdir() if p.is_file()]
        if cfg.jsonl_file:
            files.append(Path(cfg.jsonl_file))
    return files


def dataset_state(text: str) -> str:
    """IS_CHANGED value of the cache node: names, sizes and modification times of the dataset's files (the caches
    themselves are keyed on content, so this only decides whether the node runs again)."""
    try:
        files = _dataset_files(resolve_dataset_path(text))
    except (ValueError, FileNotFoundError) as error:
        return f"invalid: {error}"
    stamps = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists())
    return hashlib.sha256(repr(stamps).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------------------------------------------


def confine_dataset(group: DatasetGroupConfig) -> None:
    """Every folder and file a dataset config makes the node read or write (data, control, JSONL and cache
    directories) lies inside ComfyUI's data folders (comfy.data_roots); ValueError naming the first that does not."""
    where = f" in {group.source}" if group.source else ""
    for cfg in group.datasets:
        for key, value in (("directory", cfg.directory), ("control_directory", cfg.control_directory),
                           ("jsonl_file", cfg.jsonl_file), ("cache_directory", cfg.resolved_cache_directory)):
            if value:
                comfy.confine_data(Path(value), f"{cfg.label} {key}{where}:")


def toml_dataset(path: Path) -> DatasetGroupConfig:
    """The parsed, confined config of a dataset TOML."""
    group = load_dataset_config(path)
    confine_dataset(group)
    return group


def checked_dataset_path(text: str) -> Path:
    """resolve_dataset_path, plus (for a TOML) the confinement of every path the TOML names."""
    path = resolve_dataset_path(text)
    if path.is_file():
        toml_dataset(path)
    else:
        comfy.confine_data(path / CACHE_FOLDER, "the cache folder")
    return path


def dataset_group(path: Path, settings: FolderSettings) -> DatasetGroupConfig:
    """The parsed (and confined) dataset config of a TOML, or of the TOML written for a folder."""
    if path.is_dir():
        comfy.confine_data(path / CACHE_FOLDER, "the cache folder")
        return toml_dataset(folder_dataset_toml(path, settings))
    return toml_dataset(path)


def _summary(config: Path, scan: DatasetScan, latents: CacheRunReport, text: CacheRunReport) -> str:
    parts = summarize(scan)
    buckets: dict[tuple[int, int, int], int] = {}
    for part in parts:
        for bucket in part.buckets:
            buckets[bucket.key] = buckets.get(bucket.key, 0) + bucket.items
    drops: dict[str, int] = {}
    for part in parts:
        for reason, count in part.drops.items():
            drops[reason] = drops.get(reason, 0) + count
    lines = [f"{config}: {sum(p.items for p in parts)} items ({sum(p.samples for p in parts)} samples, "
             f"{sum(p.batches for p in parts)} batches per epoch) in {len(buckets)} buckets",
             *(f"  {w}x{h}x{f}: {n} items" for (w, h, f), n in sorted(buckets.items())),
             "dropped: " + (", ".join(f"{n} {reason}" for reason, n in sorted(drops.items())) or "nothing"),
             f"latents: {len(latents.encoded)} encoded, {latents.reused} reused; T5: {len(text.encoded)} encoded, "
             f"{text.reused} reused; {len(latents.removed) + len(text.removed)} stale cache files removed"]
    return "\n".join(lines)


def cache_dataset(group: DatasetGroupConfig, vae: ModelHandle, t5: ModelHandle, clip_vision: ModelHandle | None,
                  node_id: str | None) -> DatasetHandle:
    """Scan the dataset (buckets in the VAE's steps), bring its latent and T5 caches up to date (progress + Cancel per
    encoded entry)."""
    scan = scan_dataset_group(group, bucket_step(vae.model.obj.config.space_stride))
    ensure_not_empty(scan)
    for item in scan.items:  # a JSONL dataset names its media files one by one
        for media in (item.media_path, item.control_path):
            if media is not None:
                comfy.confine_data(media, "dataset file")
    device = str(comfy.compute_device())
    models = [vae.model] + ([clip_vision.model] if clip_vision is not None else [])
    encoders = comfy.ready_together(models)
    progress = comfy.Progress(len(scan.items), node_id, "WanTuner caching latents")
    latents = cache_latents(scan, encoders[0], clip=encoders[1] if clip_vision is not None else None, device=device,
                            progress=progress.step)
    progress = comfy.Progress(len(scan.items), node_id, "WanTuner caching captions")
    text = cache_text(group, t5.model.ready(), device=device, progress=progress.step)
    config = Path(group.source or "")
    buckets = tuple(sorted({item.batch_key for item in scan.items}))
    control = all(item.control_path is not None for item in scan.items)
    return DatasetHandle(config, len(scan.items), buckets, clip_vision is not None, clip_vision is not None, control,
                         _summary(config, scan, latents, text))


def _frames_problem(frames: object) -> str | None:
    if not isinstance(frames, int) or (frames >= 1 and (frames - 1) % 4 == 0):
        return None
    return f"frames must be 4n+1 (1, 5, 9, ..., 81) for the Wan VAE, got {frames}; try {nearest_valid(frames, 4, 1)}"


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    rank: int
    alpha: float
    learning_rate: float
    steps: int
    epochs: int
    optimizer: str
    timestep_sampling: str
    discrete_flow_shift: float
    seed: int
    gradient_checkpointing: bool
    save_every_n_steps: int
    save_format: str
    mixed_precision: str = "auto"
    fp8_base: bool = False
    blocks_to_swap: int = 0
    attention: str = "sdpa"


def lora_target(output_name: str) -> tuple[Path, str]:
    """(folder inside the loras folder, file stem) of `output_name` ("sub/name", ".safetensors" optional)."""
    name = output_name.strip().replace("\\", "/")
    name = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    parts = [p for p in name.split("/") if p]
    if not parts or not NAME_PATTERN.match(name) or name.startswith("/") or any(p in (".", "..") for p in parts):
        raise ValueError(f"output_name {output_name!r} must be a file name inside the loras folder, optionally with "
                         "subfolders (e.g. wantuner/my_lora), without '..', a drive or <>:\"|?*")
    return Path(*parts[:-1]) if len(parts) > 1 else Path(), parts[-1]


def _mixed_precision(choice: str, model: torch.nn.Module) -> str:
    """'auto': bf16 on a GPU (fp16 for an fp16 DiT, which training keeps in its dtype), none on the CPU."""
    if choice != "auto":
        return choice
    if comfy.compute_device().type == "cpu":
        return "no"
    return "fp16" if model.dtype == torch.float16 else "bf16"


def _memory_problem(settings: TrainSettings, dit: DiTHandle) -> str | None:
    """The trainer trains the loaded DiT as it is: fp8 and block swap are the DiT loader's settings."""
    model = dit.model.obj
    if settings.fp8_base and not any(p.dtype in FP8_DTYPES for p in model.parameters()):
        return ("fp8_base is on but the DiT loader loaded the DiT without fp8; the trainer trains the loaded DiT: "
                "choose fp8 on the DiT Loader")
    if settings.blocks_to_swap and dit.model.placer is None:
        return (f"blocks_to_swap is {settings.blocks_to_swap} but the DiT loader loaded the DiT without block swap; "
                "the trainer trains the loaded DiT: set blocks_to_swap on the DiT Loader")
    return None


@dataclass(frozen=True)
class ExpertInputs:
    """The trainer node's Wan2.2 A14B inputs: the loaded high-noise expert, its file and the boundary (-1: the
    task's)."""

    dit: DiTHandle
    path: Path
    boundary: float = TASK_DEFAULT


def _boundary_problem(boundary: object) -> str | None:
    if not isinstance(boundary, (int, float)) or boundary == TASK_DEFAULT:
        return None
    return problem(lambda: boundary_fraction(boundary))  # type: ignore[arg-type]


def check_pair(low: DiTHandle, high: DiTHandle) -> None:
    """Two experts of one A14B task, each straight from its DiT loader."""
    if low.config.out_dim != 16:
        raise ValueError(f"{low.name} is a TI2V-5B DiT, which has no high-noise expert; disconnect high_noise_dit")
    if high.loras:
        raise ValueError("connect the high-noise DiT loader itself to the trainer, not a LoRA loader: LoRAs are "
                         "applied when sampling and are not merged into training")
    if high.config != low.config:
        raise ValueError(f"high_noise_dit {high.name} and dit {low.name} are DiTs of different shapes; connect the "
                         "two experts of one Wan2.2 A14B task (high- and low-noise)")


def train_config(settings: TrainSettings, dit: DiTHandle, dit_path: Path, dataset_config: Path, output_dir: Path,
                 stem: str, experts: ExpertInputs | None = None) -> TrainConfig:
    """The TrainConfig of the node's settings, for a LoRA on the loaded DiT (`dit_path` gives the metadata), or one
    LoRA across a loaded Wan2.2 A14B expert pair (`dit` the low-noise expert; `training.experts`)."""
    s = settings
    for loaded in (dit,) if experts is None else (dit, experts.dit):
        problem_text = _memory_problem(s, loaded)
        if problem_text:
            raise ValueError(problem_text)
    model = ModelConfig(dit=str(dit_path), task=dit.task, attention=ATTENTION[s.attention])
    if experts is not None:
        model = replace(model, task=a14b_task(dit), dit_high_noise=str(experts.path),
                        timestep_boundary=None if experts.boundary == TASK_DEFAULT else float(experts.boundary))
    return TrainConfig(
        model=model,
        data=DataConfig(dataset_config=str(dataset_config), max_data_loader_n_workers=0),
        network=NetworkConfig(rank=s.rank, alpha=float(s.alpha)),
        optimizer=OptimizerConfig(optimizer_type=s.optimizer, learning_rate=float(s.learning_rate)),
        timesteps=TimestepConfig(s.timestep_sampling, discrete_flow_shift=float(s.discrete_flow_shift)),
        schedule=ScheduleConfig(max_train_steps=s.steps, max_train_epochs=s.epochs or None, seed=s.seed),
        memory=MemoryConfig(mixed_precision=_mixed_precision(s.mixed_precision, dit.model.obj),
                            gradient_checkpointing=s.gradient_checkpointing),
        save=SaveConfig(output_dir=str(output_dir), output_name=stem, save_format=s.save_format,
                        save_every_n_steps=s.save_every_n_steps or None))


def check_fits(dit: DiTHandle, dataset: DatasetHandle) -> None:
    """The DiT's inputs are in the cache (I2V: first-frame latents + CLIP; Fun-Control: control latents)."""
    if dit.loras:
        raise ValueError("connect the DiT loader itself to the trainer, not a LoRA loader: LoRAs are applied when "
                         "sampling and are not merged into training")
    needed = set(InputSpec.for_model(dit.config, dit.task).required_keys())
    have = {"latents_image": dataset.image_latents, "clip": dataset.clip, "latents_control": dataset.control}
    missing = sorted(k for k in needed if not have[k])
    if missing:
        hint = ("connect a CLIP vision loader to Cache Dataset" if "clip" in missing else
                "use a dataset TOML with a control_directory (Fun-Control)")
        raise ValueError(f"the DiT {dit.name} needs {', '.join(missing)} in the dataset cache, which has none: {hint}")


@dataclass(frozen=True)
class Trained:
    """What a finished run left: the final file, the (step, loss) history and the wall time."""

    path: Path
    losses: list[tuple[int, float]]
    seconds: float


def _trainable_models(dits: list[DiTHandle]) -> list[WanModel]:
    """The loaded DiTs on the compute device (loaded in one call, so that one cannot offload the other), their
    inference-mode tensors (ComfyUI loads under inference mode) made normal ones over the same memory first; a block
    swap is detached for that and placed again."""
    for dit in dits:
        if any(t.is_inference() for t in [*dit.model.obj.parameters(), *dit.model.obj.buffers()]):
            dit.model.unplace()
            normal_tensors(dit.model.obj)
    return comfy.ready_together([dit.model for dit in dits])


def run_training(config: TrainConfig, dit: DiTHandle, node_id: str | None, total: int,
                 high_noise_dit: DiTHandle | None = None) -> Trained:
    """train(config) on the loaded DiT with progress, Cancel and the live loss stream. ComfyUI's models leave the GPU
    first, then the DiT is put on it (as for sampling) and trained in place; the trainer hands it back unchanged,
    also when the run is cancelled or fails. ComfyUI runs nodes under torch.inference_mode(), so autograd is
    switched back on for the run. The frames of an aborted run are cleared and the allocator cache is emptied.
    With `high_noise_dit` both experts are put on the device and trained as a pair."""
    stream = comfy.LossStream(node_id)
    progress = comfy.Progress(total, node_id, "WanTuner training")

    def on_step(step: int, steps: int, loss: float) -> None:
        stream.add(step, steps, loss)
        progress.step(step, steps)  # raises ComfyUI's InterruptProcessingException on Cancel

    comfy.release_device_memory()
    stream.start(total)
    started = time.monotonic()
    try:
        models = _trainable_models([dit] if high_noise_dit is None else [dit, high_noise_dit])
        with torch.inference_mode(False), torch.enable_grad():
            result = train(config, on_step=on_step, model=models[0],
                           high_noise_model=models[1] if high_noise_dit is not None else None)
    except BaseException as error:
        stream.close("error" if isinstance(error, Exception) else "interrupted")
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        gc.collect()
        comfy.free_cache()
    stream.close("done")
    if result.output is None:
        raise RuntimeError("the trainer wrote no LoRA file")
    return Trained(Path(result.output), list(result.losses), time.monotonic() - started)


def lora_choices() -> list[str]:
    """The LoRA loader's `lora_name` choices, which the trainer's file-name output is typed as (see below)."""
    return _file_choices("loras")


class _LiveLoRAOutput(type):
    """ComfyUI checks a link into a V1 combo input by comparing the source's output type with the combo's current
    list of choices, and the front end turns a list output type into "COMBO". Reading RETURN_TYPES on the class
    gives the current list of LoRA files, so the trainer's file name links into the LoRA loader's `lora_name`."""

    @property
    def RETURN_TYPES(cls) -> tuple:  # noqa: N802 (ComfyUI's name)
        return (lora_choices(), "IMAGE", "STRING")


def _training_summary(name: str, trained: Trained) -> str:
    losses = [v for _, v in trained.losses]
    tail = losses[-10:]
    return (f"{name}: {len(losses)} steps in {trained.seconds:.1f} s; loss {losses[0]:.4g} at step 1, "
            f"{losses[-1]:.4g} at the end (mean of the last {len(tail)}: {sum(tail) / len(tail):.4g})\n"
            f"saved to {trained.path}")


# ----------------------------------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------------------------------


class WanTunerCacheDataset:
    DESCRIPTION = ("Prepares a training dataset: encodes every clip/image with the VAE (+ CLIP vision for I2V) and "
                   "every caption with umT5 into caches that are reused until the media, captions, settings or "
                   "models change.")
    CATEGORY = f"{CATEGORY}/training"
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The cached dataset; connect it to Train LoRA.",
                       "Items, buckets, dropped files (and why) and what was encoded or reused.")
    FUNCTION = "cache"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": inp(VAE, "VAE from the VAE loader (the one the DiT was trained with)."),
                "t5": inp(T5, "umT5 text encoder from the T5 loader."),
                "dataset_path": inp("STRING", "A folder of images and/or videos with same-named caption files "
                                    "(clip.mp4 + clip.txt), or a musubi dataset .toml. Relative paths are inside "
                                    "ComfyUI's input folder.", default="wantuner_dataset"),
                "width": inp("INT", "Folder only: training resolution width (bucket area with bucketing).",
                             default=832, min=32, max=MAX_SIZE, step=16),
                "height": inp("INT", "Folder only: training resolution height.", default=480, min=32,
                              max=MAX_SIZE, step=16),
                "frames": inp("INT", "Folder only: frames per training clip, 4n+1 (e.g. 17, 33, 81); longer videos "
                              "give clips as frame_extraction says, shorter ones are dropped.", default=33, min=1,
                              max=MAX_FRAMES, step=4),
                "frame_extraction": inp(list(FRAME_EXTRACTION_MODES), "Folder only: which clips a video gives: "
                                        "head (the start), chunk (back-to-back), slide, uniform, full."),
                "enable_bucket": inp("BOOLEAN", "Folder only: keep each file's aspect ratio in a bucket of about "
                                     "width x height pixels instead of resizing everything to width x height.",
                                     default=True),
                "num_repeats": inp("INT", "Folder only: how often each item is used per epoch.", default=1, min=1,
                                   max=10000),
                "batch_size": inp("INT", "Folder only: items per training batch (same bucket).", default=1, min=1,
                                  max=64),
                "caption_extension": inp("STRING", "Folder only: extension of the caption files.", default=".txt"),
            },
            "optional": {
                "clip_vision": inp(CLIP_VISION, "CLIP vision loader output; needed to train image-to-video DiTs "
                                   "(caches the first frame's latents and CLIP features)."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, dataset_path: str | None = None, frames: int | None = None) -> bool | str:
        path = None if dataset_path is None else problem(lambda: checked_dataset_path(dataset_path))
        return first_problem(path, _frames_problem(frames))

    @classmethod
    def IS_CHANGED(cls, dataset_path: str, **_: object) -> str:
        return dataset_state(dataset_path)

    def cache(self, vae: ModelHandle, t5: ModelHandle, dataset_path: str, width: int, height: int, frames: int,
              frame_extraction: str, enable_bucket: bool, num_repeats: int, batch_size: int, caption_extension: str,
              clip_vision: ModelHandle | None = None, unique_id: str | None = None) -> dict:
        settings = FolderSettings(width, height, frames, frame_extraction, enable_bucket, num_repeats, batch_size,
                                  caption_extension)
        group = dataset_group(resolve_dataset_path(dataset_path), settings)
        handle = cache_dataset(group, vae, t5, clip_vision, unique_id)
        logger.info("%s", handle.summary)
        return {"ui": {"text": [handle.summary]}, "result": (handle, handle.summary)}


class WanTunerTrainLoRA(metaclass=_LiveLoRAOutput):
    DESCRIPTION = ("Trains a Wan2.1 or Wan2.2 LoRA (one LoRA across an A14B expert pair) on a cached dataset inside "
                   "ComfyUI (flow matching, musubi-compatible) and saves it into models/loras; shows the loss live "
                   "on the node. Cancel stops between steps.")
    CATEGORY = f"{CATEGORY}/training"
    RETURN_NAMES = ("lora_name", "loss_image", "summary")
    OUTPUT_TOOLTIPS = ("File name of the trained LoRA in models/loras; link it to the LoRA loader's lora_name.",
                       "The loss per step (and its moving average) as an image.",
                       "Steps, time, first/last loss and the saved file.")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @property
    def RETURN_TYPES(self) -> tuple:  # noqa: N802 (instances see the same live types as the class)
        return type(self).RETURN_TYPES

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "dit": inp(DIT, "DiT from the DiT loader: a LoRA is trained on this loaded DiT (no second copy; "
                           "its dtype, fp8 and block swap are the loader's) and the DiT is left as it was."),
                "dataset": inp(DATASET, "Cached dataset from Cache Dataset."),
                "output_name": inp("STRING", "LoRA file name inside models/loras (subfolders allowed); an existing "
                                   "file of that name is replaced.", default="wantuner/my_lora"),
                "rank": inp("INT", "LoRA rank (network_dim): capacity of the LoRA; 16-32 is typical.", default=16,
                            min=1, max=1024),
                "alpha": inp("FLOAT", "LoRA alpha: the update is scaled by alpha / rank.", default=16.0, min=0.0,
                             max=1024.0, step=0.5),
                "learning_rate": inp("FLOAT", "Learning rate (2e-4 is a common start for Wan LoRAs with AdamW).",
                                     default=2e-4, min=1e-6, max=1.0, step=1e-6),
                "steps": inp("INT", "Optimizer steps (used when epochs is 0).", default=500, min=1, max=1_000_000),
                "epochs": inp("INT", "Epochs over the dataset; 0 = train for `steps` steps instead.", default=0,
                              min=0, max=100_000),
                "optimizer": inp(list(OPTIMIZERS), "AdamW; AdamW8bit needs bitsandbytes (CUDA), Prodigy needs "
                                 "prodigyopt (set learning_rate to 1 for it)."),
                "timestep_sampling": inp(list(SCHEMES), "How training timesteps are drawn; 'shift' (with "
                                         "discrete_flow_shift) is musubi's recommendation for Wan.",
                                         default="shift"),
                "discrete_flow_shift": inp("FLOAT", "Shift of the 'shift' timestep sampling (musubi examples: 3.0).",
                                           default=3.0, min=0.0, max=100.0, step=0.1),
                # control_after_generate=False: the front end would otherwise add a "randomize" control to any
                # input named seed, and a new seed on every queue would retrain every time
                "seed": inp("INT", "Seed of the LoRA initialisation, noise, timesteps and data order.", default=42,
                            min=0, max=2**31 - 1, control_after_generate=False),
                "gradient_checkpointing": inp("BOOLEAN", "Recompute each block in the backward pass: much less "
                                              "memory, about 30% slower.", default=True),
                "save_every_n_steps": inp("INT", "Also save <name>-stepN files every N steps (0 = only at the end); "
                                          "after a Cancel the last of them is kept.", default=0, min=0,
                                          max=1_000_000),
                "save_format": inp(list(SAVE_FORMATS), "Key layout of the file: musubi (lora_unet_*, also read by "
                                   "ComfyUI) or comfyui (diffusion_model.*.lora_A/lora_B)."),
            },
            "optional": {
                "mixed_precision": inp(list(MIXED_PRECISION), "Training precision; 'auto' is bf16 on a GPU (fp16 for "
                                       "fp16 files) and full precision on the CPU.", default="auto"),
                "fp8_base": inp("BOOLEAN", "Train on fp8 DiT weights (about half the memory): the DiT Loader's "
                                "fp8 setting does it; on here requires it.", default=False),
                "blocks_to_swap": inp("INT", "DiT blocks kept in CPU memory and streamed to the GPU, for 14B "
                                      "models on 24 GB cards: the DiT Loader's blocks_to_swap does it; non-zero "
                                      "here requires it.", default=0, min=0, max=39),
                "attention": inp(list(ATTENTION), "Attention kernel (sdpa always works; the others need their "
                                 "package).", default="sdpa"),
                "high_noise_dit": inp(DIT, "Wan2.2 A14B: the high-noise expert from its own DiT loader; `dit` is "
                                      "then the low-noise expert and one LoRA is trained across both (each batch "
                                      "runs through the expert its timesteps pick). The saved LoRA loads for both "
                                      "experts."),
                "boundary": inp("FLOAT", "Wan2.2 A14B expert boundary: a fraction (0-1) or a timestep (1-1000); "
                                "batches at or above it train the high-noise expert. -1 = the task's (0.875 "
                                "T2V-A14B, 0.9 I2V-A14B).", default=TASK_DEFAULT, min=-1.0, max=1000.0,
                                step=0.001),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, output_name: str | None = None, boundary: float | None = None) -> bool | str:
        return first_problem(None if output_name is None else problem(lambda: lora_target(output_name)),
                             _boundary_problem(boundary))

    def train(self, dit: DiTHandle, dataset: DatasetHandle, output_name: str, rank: int, alpha: float,
              learning_rate: float, steps: int, epochs: int, optimizer: str, timestep_sampling: str,
              discrete_flow_shift: float, seed: int, gradient_checkpointing: bool, save_every_n_steps: int,
              save_format: str, mixed_precision: str = "auto", fp8_base: bool = False, blocks_to_swap: int = 0,
              attention: str = "sdpa", high_noise_dit: DiTHandle | None = None, boundary: float = TASK_DEFAULT,
              unique_id: str | None = None) -> dict:
        check_fits(dit, dataset)
        boundary_text = _boundary_problem(boundary)
        if boundary_text:
            raise ValueError(boundary_text)
        if high_noise_dit is not None:
            check_pair(dit, high_noise_dit)
        settings = TrainSettings(rank, alpha, learning_rate, steps, epochs, optimizer, timestep_sampling,
                                 discrete_flow_shift, seed, gradient_checkpointing, save_every_n_steps, save_format,
                                 mixed_precision, fp8_base, blocks_to_swap, attention)
        folder, stem = lora_target(output_name)
        root = comfy.model_folder("loras")
        comfy.confine(root / folder, [root], f"output_name {output_name!r}:")
        dit_path = comfy.model_path("diffusion_models", dit.name)
        experts = None if high_noise_dit is None else ExpertInputs(
            high_noise_dit, comfy.model_path("diffusion_models", high_noise_dit.name), boundary)
        config = train_config(settings, dit, dit_path, dataset.config, root / folder, stem, experts)
        trained = run_training(config, dit, unique_id, steps if epochs == 0 else 0, high_noise_dit)
        name = trained.path.relative_to(root).as_posix()
        summary = _training_summary(name, trained)
        image = chart_image(trained.losses)
        losses = [[step, loss] for step, loss in trained.losses]
        return {"ui": {"losses": losses, "text": [summary]}, "result": (name, image, summary)}
