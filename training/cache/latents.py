"""`python -m training cache-latents`: encode a dataset's media into musubi-compatible latent caches.

Flags follow musubi's `wan_cache_latents.py`: --dataset_config, --vae, --vae_dtype (default bfloat16; the latents
are stored in this dtype), --vae_cache_cpu, --clip (implies --i2v), --i2v, --batch_size (default: each dataset's),
--num_workers (media decoding threads), --skip_existing, --keep_cache, --device, --debug_mode. Ours: --force
(re-encode every entry), --task (checks that the cache fits a task: I2V tasks need --clip, Fun-Control a
control_directory), --config_file.

Entries whose key (media content, preprocessing, VAE/CLIP identity and settings; see training.cache.store) matches the
existing file are reused; everything else is encoded, and files no longer part of the dataset are deleted unless
--keep_cache. --skip_existing is accepted and changes nothing: keys are always verified.

Exit codes: 0 done; 1 nothing to cache (every file dropped) or an encoding error; 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import numpy as np
import torch

from training import dry_run
from training.cache.store import (
    HASH_INDEX_NAME,
    CacheRunReport,
    LatentEntry,
    LatentSettings,
    MediaHasher,
    Progress,
    TqdmProgress,
    add_cache_run_flags,
    cache_directory,
    cache_parser,
    checkpoint_fingerprint,
    dtype_name,
    entry_key,
    is_current,
    is_latent_cache_name,
    latent_entries,
    latent_parts,
    left_alone_note,
    module_fingerprint,
    parse_dtype,
    remove_stale,
    save_latent_entry,
    vae_name,
)
from training.config_file import parse_args
from training.dataset.items import DatasetItem, DatasetScan, bucket_step, ensure_not_empty, scan_dataset_group
from training.dataset.schema import DatasetGroupConfig, load_dataset_config
from wan_core.loading.checkpoint import peek_shapes, read_metadata
from wan_core.media.io import MediaReadError, frames_to_tensor, read_image, read_video, resize_to_bucket
from wan_core.models.clip import default_clip_dtype, load_clip_vision
from wan_core.models.config import WAN21_VAE, VAEConfig, get_task, stored_config
from wan_core.models.vae import detect_vae_config, load_vae, official_vae_state_dict
from wan_core.sampling.conditioning import frame_mask

if TYPE_CHECKING:
    from wan_core.models.clip import CLIPVision
    from wan_core.models.vae import WanVAE

T = TypeVar("T")
VAESource: TypeAlias = "str | os.PathLike[str] | WanVAE"  # a checkpoint path or a loaded VAE
CLIPSource: TypeAlias = "str | os.PathLike[str] | CLIPVision"  # a checkpoint path or a loaded CLIP vision model

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Reading media


def load_pixels(item: DatasetItem) -> tuple[np.ndarray, np.ndarray | None]:
    """An item's frames and control frames, resized to its bucket: uint8 [T, H, W, 3] each (control or None)."""
    def read(path: Path, indices: Sequence[int] | None) -> np.ndarray:
        frames = read_video(path, indices) if item.is_video else read_image(path)[None]
        return np.stack([resize_to_bucket(frame, item.bucket) for frame in frames])

    frames = read(item.media_path, item.frame_indices)
    if len(frames) != item.frame_count:
        raise MediaReadError(f"{item.media_path}: read {len(frames)} frames, the item needs {item.frame_count}")
    control = None
    if item.control_path is not None:
        control = read(item.control_path, item.control_frame_indices)
    return frames, control


def _video_batch(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [T, H, W, 3] per item -> [B, 3, T, H, W] in [-1, 1], contiguous (the VAE's convolutions round
    differently for other memory layouts)."""
    return torch.stack([frames_to_tensor(f) for f in frames]).permute(0, 2, 1, 3, 4).contiguous()


def _prefetch(items: Sequence[DatasetItem], workers: int,
              load: Callable[[DatasetItem], T]) -> Iterator[tuple[DatasetItem, T]]:
    """(item, load(item)) in order, with up to 2 x workers loads running ahead in threads."""
    if workers <= 0:
        for item in items:
            yield item, load(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[tuple[DatasetItem, Future[T]]] = []
        queue = iter(items)
        for item in queue:
            pending.append((item, pool.submit(load, item)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            item, future = pending.pop(0)
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield item, future.result()


# --------------------------------------------------------------------------------------------------------------------
# Encoding


class LatentEncoder:
    """Encodes batches of items into cache entries (musubi's `encode_and_save_batch` semantics)."""

    def __init__(self, vae: WanVAE, clip: CLIPVision | None, settings: LatentSettings) -> None:
        self.vae, self.clip, self.settings = vae, clip, settings
        self.dtype = parse_dtype(settings.dtype)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video).cpu().to(self.dtype)  # [B, 16, F, h, w]

    def encode(self, pixels: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> dict[str, torch.Tensor | None]:
        """(frames, control frames) per item of one bucket -> {"latents", "latents_image", "clip",
        "latents_control"}, each batched over the items (or None)."""
        video = _video_batch([p[0] for p in pixels])  # [B, 3, T, H, W]
        out: dict[str, torch.Tensor | None] = {"latents": self._encode(video), "latents_image": None, "clip": None,
                                               "latents_control": None}
        if self.settings.i2v:
            batch, _, frames, height, width = video.shape
            first = video[:, :, :1]
            padded = torch.cat([first, first.new_zeros(batch, 3, frames - 1, height, width)], dim=2)
            mask = frame_mask(frames, height, width, known=(0,)).to(self.dtype)  # [4, F_lat, h, w]
            out["latents_image"] = torch.cat([mask.expand(batch, *mask.shape), self._encode(padded)], dim=1)
            if self.clip is not None:
                out["clip"] = self.clip.encode(first[:, :, 0]).cpu()  # [B, 257, 1280]
        if pixels[0][1] is not None:
            out["latents_control"] = self._encode(_video_batch([p[1] for p in pixels]))
        return out

    def encode_entries(self, pending: list[LatentEntry], scan: DatasetScan, keys: dict[Path, dict[str, str]],
                       report: CacheRunReport, *, batch_size: int | None, num_workers: int,
                       progress: Progress | None) -> None:
        """Encode and save `pending` in batches of one size (media decoded by `num_workers` threads ahead)."""
        batches = _batches(pending, scan, batch_size)
        loaded = _prefetch([e.item for batch in batches for e in batch], num_workers, load_pixels)
        done = 0
        for batch in batches:
            outputs = self.encode([next(loaded)[1] for _ in batch])
            for i, entry in enumerate(batch):
                extra = {name: None if value is None else value[i] for name, value in outputs.items()}
                save_latent_entry(entry.path, entry.item, keys[entry.path], self.settings, extra.pop("latents"),
                                  image_latents=extra["latents_image"], clip=extra["clip"],
                                  control_latents=extra["latents_control"])
                report.encoded.append(entry.path)
                done += 1
                if progress is not None:
                    progress(done, len(pending))


def _batches(entries: Sequence[LatentEntry], scan: DatasetScan,
             batch_size: int | None) -> list[list[LatentEntry]]:
    """Pending entries grouped by dataset and (W, H, frames), `batch_size` (or the dataset's) at a time."""
    sizes = {cfg.index: batch_size or cfg.batch_size for cfg in scan.config.datasets}
    groups: dict[tuple[int, tuple[int, int, int]], list[LatentEntry]] = {}
    for entry in entries:
        groups.setdefault((entry.item.dataset_index, entry.item.batch_key), []).append(entry)
    batches = []
    for (index, _), group in sorted(groups.items()):
        size = sizes[index]
        batches.extend(group[i : i + size] for i in range(0, len(group), size))
    return batches


def _dropped_files(scan: DatasetScan) -> dict[str, int]:
    counts = Counter(report.drops[0].reason.value for report in scan.files if not report.used and report.drops)
    return dict(sorted(counts.items()))


def _resolve_scan(dataset: str | os.PathLike[str] | DatasetGroupConfig | DatasetScan, step: int) -> DatasetScan:
    """A given scan as it is (`check_vae_inputs` refuses buckets off the VAE's steps); else a scan in `step` px."""
    if isinstance(dataset, DatasetScan):
        return dataset
    group = dataset if isinstance(dataset, DatasetGroupConfig) else load_dataset_config(dataset)
    return scan_dataset_group(group, step)


def _load_vae(vae: VAESource, dtype: torch.dtype, device: str, cache_cpu: bool) -> WanVAE:
    """A path is loaded; a loaded VAE is used as it is (its device, dtype and cache device)."""
    if isinstance(vae, (str, os.PathLike)):
        return load_vae(vae, dtype=dtype, device=device, cache_device="cpu" if cache_cpu else None)
    return vae


def _load_clip(clip: CLIPSource, device: str) -> CLIPVision:
    return load_clip_vision(clip, device=device) if isinstance(clip, (str, os.PathLike)) else clip


def _clip_dtype(clip: CLIPSource | None, device: str) -> str | None:
    if clip is None:
        return None
    if isinstance(clip, (str, os.PathLike)):
        return dtype_name(default_clip_dtype(device))
    return dtype_name(clip.dtype)


def _identity(model: VAESource | CLIPSource) -> str:
    if isinstance(model, (str, os.PathLike)):
        return checkpoint_fingerprint(model)
    module = getattr(model, "model", model)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"expected a checkpoint path or a loaded model, got {type(model).__name__}")
    return module_fingerprint(module)


def vae_config_of(vae: VAESource) -> VAEConfig:
    """The architecture of a VAE checkpoint (its stored config, else its header shapes; no weights read) or of a
    loaded VAE."""
    if not isinstance(vae, (str, os.PathLike)):
        return vae.config
    path = Path(vae)
    stored = stored_config(read_metadata(path), VAEConfig, f"VAE {path.name}")
    return stored or detect_vae_config(official_vae_state_dict(peek_shapes(path), f"VAE {path.name}"))


def check_vae_inputs(scan: DatasetScan, vae: VAEConfig, i2v: bool) -> None:
    """ValueError (before anything is hashed or encoded) when the buckets do not give the DiT whole 2x2 latent
    patches (sides multiples of VAE stride x 2: 16 px for the Wan2.1 VAE, 32 px for the Wan2.2 VAE), or when I2V
    latents (4 mask + 16 image channels, the Wan2.1 layout) are asked of the Wan2.2 VAE."""
    if i2v and vae.z_dim != WAN21_VAE.z_dim:
        raise ValueError(f"--i2v/--clip cache Wan2.1-style image latents (4 mask + 16 channels), but "
                         f"{vae_name(vae.z_dim)} has {vae.z_dim} channels (TI2V-5B trains text-to-video here): "
                         f"cache without --i2v and --clip")
    step = bucket_step(vae.space_stride)
    bad = [item for item in scan.items if item.bucket[0] % step or item.bucket[1] % step]
    if bad:
        sizes = sorted({f"{item.bucket[0]}x{item.bucket[1]}" for item in bad})
        raise ValueError(f"{len(bad)} items resize to buckets that are not multiples of {step} px on each side "
                         f"(e.g. {bad[0].media_path} -> {sizes[0]}; all: {', '.join(sizes[:8])}): "
                         f"{vae_name(vae.z_dim)} (stride {vae.space_stride}) with the DiT's 2x2 patches needs "
                         f"multiples of {step}; set the dataset's resolution to multiples of {step}, or "
                         f"enable_bucket = true (buckets then follow the VAE)")


def cache_latents(dataset: str | os.PathLike[str] | DatasetGroupConfig | DatasetScan, vae: VAESource, *,
                  clip: CLIPSource | None = None, i2v: bool = False, vae_dtype: str | torch.dtype = torch.bfloat16,
                  device: str = "cpu", vae_cache_cpu: bool = False, batch_size: int | None = None,
                  num_workers: int = 2, force: bool = False, keep_cache: bool = False,
                  progress: Progress | None = None) -> CacheRunReport:
    """Bring a dataset's latent caches up to date; returns what was encoded, reused and removed.

    vae / clip: checkpoint paths (loaded on `device` only when something must be encoded, the VAE in `vae_dtype`)
    or a loaded `WanVAE` / `CLIPVision`, used as they are (the latents are stored in the loaded VAE's dtype and
    `vae_dtype` is ignored). clip implies i2v. Raises ValueError for an empty dataset or colliding cache names,
    FileNotFoundError for missing checkpoints, MediaReadError when a file fails to decode.
    """
    dtype = parse_dtype(vae_dtype) if isinstance(vae, (str, os.PathLike)) else vae.dtype
    i2v = i2v or clip is not None
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vae_config = vae_config_of(vae)
    scan = _resolve_scan(dataset, bucket_step(vae_config.space_stride))
    ensure_not_empty(scan)
    check_vae_inputs(scan, vae_config, i2v)
    entries = latent_entries(scan)
    settings = LatentSettings(vae=_identity(vae), dtype=dtype_name(dtype), i2v=i2v,
                              clip=None if clip is None else _identity(clip), clip_dtype=_clip_dtype(clip, device))
    report = CacheRunReport(entries=len(entries), dropped_files=_dropped_files(scan))
    hashers = {cfg.index: MediaHasher(cache_directory(cfg) / HASH_INDEX_NAME) for cfg in scan.config.datasets}
    keys, pending = {}, []
    for entry in entries:
        parts = latent_parts(entry.item, hashers[entry.item.dataset_index], settings)
        keys[entry.path] = parts
        if not force and is_current(entry.path, entry_key(parts)):
            report.reused += 1
        else:
            pending.append(entry)
    for hasher in hashers.values():
        hasher.save()
    logger.info("latent cache: %d entries, %d up to date, %d to encode", len(entries), report.reused, len(pending))
    if pending:
        encoder = LatentEncoder(_load_vae(vae, dtype, device, vae_cache_cpu),
                                None if clip is None else _load_clip(clip, device), settings)
        encoder.encode_entries(pending, scan, keys, report, batch_size=batch_size, num_workers=num_workers,
                               progress=progress)
    if not keep_cache:
        for cfg in scan.config.datasets:
            expected = {e.path.name for e in entries if e.item.dataset_index == cfg.index}
            removed, left = remove_stale(cache_directory(cfg), expected, is_latent_cache_name)
            report.removed += removed
            report.left_alone += left
    return report


# --------------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = cache_parser("cache-latents", __doc__)
    parser.add_argument("--vae", help="VAE checkpoint (.safetensors or .pth): the Wan2.1 VAE, or the Wan2.2 VAE for "
                                      "ti2v-5B (bucket sides multiples of 32 px); required")
    parser.add_argument("--vae_dtype", default="bfloat16", type=str,
                        help="VAE compute dtype, also the stored latent dtype (default bfloat16)")
    parser.add_argument("--vae_cache_cpu", action="store_true", help="keep the VAE's causal cache on the CPU")
    parser.add_argument("--clip", help="CLIP vision checkpoint; caches CLIP features of the first frame, implies "
                                       "--i2v; needed for Wan2.1 I2V")
    parser.add_argument("--i2v", action="store_true", help="also cache the I2V image latents (mask + first frame)")
    parser.add_argument("--task", help="optional: check the cache fits this task (i2v-14B needs --clip, *-FC a "
                                       "control_directory, ti2v-5B the Wan2.2 VAE); i2v-A14B caches the image "
                                       "latents without CLIP")
    add_cache_run_flags(parser, batch_help="items per VAE call (default: the dataset's)",
                        workers_help="threads decoding media (default: CPU count - 1)")
    parser.add_argument("--debug_mode", choices=("image", "console", "video"), default=None,
                        help="not supported: prints the dataset dry-run report instead and encodes nothing")
    return parser


def _check_task(name: str, clip: str | None, scan: DatasetScan, vae: VAEConfig) -> bool:
    """Raise ValueError when the cache would not fit task `name`; returns whether the task needs I2V latents (with
    CLIP features for Wan2.1 I2V; Wan2.2 i2v-A14B takes the image latents alone)."""
    task = get_task(name)
    if vae.z_dim != task.vae.z_dim:
        raise ValueError(f"--vae is {vae_name(vae.z_dim)} with {vae.z_dim} latent channels; task {task.name} needs "
                         f"{vae_name(task.vae.z_dim)} with {task.vae.z_dim}")
    if task.needs_clip and not clip:
        raise ValueError(f"task {task.name} needs CLIP features in the latent cache: pass --clip "
                         "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors)")
    without_control = [item.media_path for item in scan.items if item.control_path is None]
    if task.is_fun_control and without_control:
        raise ValueError(f"task {task.name} trains on control videos, but {len(without_control)} items have none "
                         f"(e.g. {without_control[0]}); set control_directory (or control_path in the JSONL)")
    return task.needs_clip or (task.takes_image and not task.is_fun_control)


def _summary(report: CacheRunReport) -> str:
    dropped = "".join(f", {count} files dropped ({reason})" for reason, count in report.dropped_files.items())
    hint = " (see the warnings above, or python -m training dataset --dry-run)" if dropped else ""
    return (f"latent cache: {report.entries} entries: {len(report.encoded)} encoded, {report.reused} reused, "
            f"{len(report.removed)} stale files removed{left_alone_note(report)}{dropped}{hint}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv, required=("dataset_config",))
    if args.debug_mode is not None:
        sys.stderr.write(f"--debug_mode {args.debug_mode} is not supported; showing the dataset dry-run report "
                         "(python -m training dataset --dry-run) instead; nothing is encoded\n")
        return dry_run.main(["--dataset_config", args.dataset_config, "--dry-run"])
    if not args.vae:
        parser.error("the following arguments are required (on the command line or in --config_file): --vae")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = args.num_workers if args.num_workers is not None else max(1, (os.cpu_count() or 2) - 1)
    try:
        vae_config = vae_config_of(args.vae)
        scan = scan_dataset_group(load_dataset_config(args.dataset_config), bucket_step(vae_config.space_stride))
    except (ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    try:
        ensure_not_empty(scan)
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    try:
        i2v = args.i2v or (args.task is not None and _check_task(args.task, args.clip, scan, vae_config))
        if i2v and not args.clip:
            logger.warning("--i2v without --clip: the cache gets image latents but no CLIP features; Wan2.1 I2V "
                           "(i2v-14B, flf2v-14B, i2v-14B-FC) needs --clip, only Wan2.2-style I2V trains without it")
        report = cache_latents(scan, args.vae, clip=args.clip, i2v=i2v, vae_dtype=args.vae_dtype,
                               device=device, vae_cache_cpu=args.vae_cache_cpu, batch_size=args.batch_size,
                               num_workers=workers, force=args.force, keep_cache=args.keep_cache,
                               progress=TqdmProgress("cache-latents", "item"))
    except (ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    except (MediaReadError, RuntimeError) as error:
        sys.stderr.write(f"error: {error}\nentries written so far are kept; run the same command again to "
                         "continue\n")
        return 1
    sys.stdout.write(_summary(report))
    return 0
