"""Dataset items from a parsed dataset config: frame windows, buckets, batches, and why anything is dropped.

The rules follow musubi-tuner:

- `source_fps` drops frames to reach 16 fps: frame i is kept when int(sum of 16/source_fps over the frames before
  it) differs from the previous kept value. The sum is accumulated in float64 one frame at a time, as musubi does,
  so the kept frames match musubi exactly (for 30 fps: 0, 2, 4, ..., 14, 16, 17, 19, ...).
- Frame windows (`extract_frame_windows`): head, chunk, slide, uniform, full, on the (resampled) frame sequence.
  A target longer than the video yields no window; here that is reported as a `too_short` drop.
- Buckets (`select_bucket`): steps of the VAE's stride x the DiT's 2x2 patch (`bucket_step`: 16 px for the Wan2.1
  VAE, musubi's, 32 px for the Wan2.2 VAE), candidates from sqrt(area)/2 to sqrt(area) per side in both
  orientations, nearest aspect ratio, `bucket_no_upscale` keeps small images at their size rounded down to the
  step.
  musubi's video caching always buckets (it ignores `enable_bucket`/`bucket_no_upscale`); here images and videos
  both follow the dataset's settings.
- Batches group items by identical (W, H, frames) within a dataset; each item appears `num_repeats` times.

Scanning decodes every video completely, so frame counts are real, not estimated from metadata.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from training.dataset.schema import (
    BUCKET_STEP,
    DatasetConfig,
    DatasetGroupConfig,
    ImageDatasetConfig,
    VideoDatasetConfig,
    check_dataset_group,
    round_frames_4n1,
)
from wan_core.media.io import (
    VIDEO_EXTENSIONS,
    MediaReadError,
    image_size,
    inspect_video,
    list_images,
    list_videos,
)
from wan_core.models.config import PATCH_SIZE

logger = logging.getLogger(__name__)

WAN_FPS = 16.0


class DropReason(str, Enum):
    """Why a file, or one frame window of it, is not used."""

    NO_CAPTION = "no_caption"
    EMPTY_CAPTION = "empty_caption"
    UNREADABLE_CAPTION = "unreadable_caption"
    MISSING_FILE = "missing_file"
    UNREADABLE = "unreadable"
    TOO_SMALL = "too_small"
    TOO_SHORT = "too_short"
    NO_CONTROL = "no_control"
    UNREADABLE_CONTROL = "unreadable_control"


@dataclass(frozen=True)
class Drop:
    reason: DropReason
    detail: str
    target_frames: int | None = None  # set when only the window for this target is dropped


@dataclass(frozen=True)
class FrameWindow:
    """One clip cut from a video: `count` frames from `start` of the (resampled) frame sequence."""

    start: int
    count: int
    frame_indices: tuple[int, ...]  # decoded-frame indices actually used
    control_indices: tuple[int, ...] | None = None  # decoded-frame indices of the control video


@dataclass(frozen=True)
class FileReport:
    """What scanning one media file found; `windows` is empty when the file is dropped."""

    dataset_index: int
    media_path: Path
    caption: str | None = None
    control_path: Path | None = None
    decoded_frames: int | None = None  # None when the file was dropped before decoding
    fps: float | None = None  # the container's frame rate, for information
    resampled_frames: int | None = None  # after source_fps frame dropping (equal to decoded_frames without it)
    size: tuple[int, int] | None = None  # (W, H) of the source
    bucket: tuple[int, int] | None = None  # (W, H)
    control_frames: int | None = None  # decoded frames of the control video
    windows: tuple[FrameWindow, ...] = ()
    drops: tuple[Drop, ...] = ()

    @property
    def used(self) -> bool:
        return bool(self.windows)


@dataclass(frozen=True)
class DatasetItem:
    """One training sample: a media file, its caption, a frame window and the bucket it is resized to."""

    dataset_index: int
    media_path: Path
    caption: str
    frame_start: int  # in the (resampled) frame sequence; 0 for images
    frame_count: int  # 4N+1 for videos, 1 for images
    frame_indices: tuple[int, ...]  # decoded-frame indices to read
    bucket: tuple[int, int]  # (W, H)
    original_size: tuple[int, int]  # (W, H)
    control_path: Path | None = None
    control_frame_indices: tuple[int, ...] | None = None
    is_video: bool = True

    @property
    def batch_key(self) -> tuple[int, int, int]:
        return (*self.bucket, self.frame_count)

    @property
    def item_key(self) -> str:
        """musubi's item name: the stem, plus `_{start:05d}-{frames:03d}` for a video window."""
        stem = self.media_path.stem if self.media_path.suffix else self.media_path.name
        return f"{stem}_{self.frame_start:05d}-{self.frame_count:03d}" if self.is_video else stem


@dataclass(frozen=True)
class DatasetScan:
    """The result of scanning every dataset of a config."""

    config: DatasetGroupConfig
    files: tuple[FileReport, ...]
    items: tuple[DatasetItem, ...]
    bucket_step: int = BUCKET_STEP  # px; bucket sides are multiples of it (datasets with enable_bucket)

    def files_of(self, dataset_index: int) -> tuple[FileReport, ...]:
        return tuple(f for f in self.files if f.dataset_index == dataset_index)

    def items_of(self, dataset_index: int) -> tuple[DatasetItem, ...]:
        return tuple(i for i in self.items if i.dataset_index == dataset_index)


@dataclass(frozen=True)
class BucketSummary:
    key: tuple[int, int, int]  # (W, H, frames)
    items: int
    samples: int  # items x num_repeats
    batches: int
    partial_batches: int  # batches smaller than batch_size (0 or 1)


@dataclass(frozen=True)
class DatasetSummary:
    index: int
    files: int
    used_files: int
    items: int
    samples: int
    batches: int
    buckets: tuple[BucketSummary, ...]
    drops: dict[str, int] = field(default_factory=dict)  # reason -> count (file and window drops)


# --------------------------------------------------------------------------------------------------------------------
# Pure rules


def fps_keep_indices(frame_count: int, source_fps: float, target_fps: float = WAN_FPS) -> list[int]:
    """Decoded-frame indices kept when a `source_fps` video is brought down to `target_fps` (musubi's rule).

    Below `target_fps` every frame is kept; no frame is repeated.
    """
    if source_fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be > 0, got source_fps={source_fps}, target_fps={target_fps}")
    step = target_fps / source_fps
    position, previous, kept = 0.0, -1, []
    for index in range(frame_count):
        target = int(position)
        position += step  # accumulated, not multiplied, to match musubi bit for bit
        if target != previous:
            kept.append(index)
            previous = target
    return kept


def _dedupe(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return list(dict.fromkeys(windows))


def extract_frame_windows(frame_count: int, target_frames: Sequence[int], mode: str = "head", *,
                          frame_stride: int = 1, frame_sample: int = 1,
                          max_frames: int = 129) -> list[tuple[int, int]]:
    """(start, frames) windows of a `frame_count`-frame sequence, as musubi extracts them.

    head: the first N frames per target N. chunk: consecutive N-frame chunks. slide: an N-frame window every
    `frame_stride` frames. uniform: `frame_sample` starts spread with np.linspace(0, count - N, frame_sample, int)
    (numpy's float rounding included; repeated starts are kept once, as musubi's cache files would be). full: all
    frames, capped at `max_frames`, rounded down to 4N+1. Targets longer than the sequence give no window.
    """
    if frame_count <= 0:
        return []
    if mode == "full":
        return [(0, round_frames_4n1(min(frame_count, max_frames)))]
    windows: list[tuple[int, int]] = []
    for n in sorted(target_frames):
        if n > frame_count:
            continue
        if mode == "head":
            windows.append((0, n))
        elif mode == "chunk":
            windows.extend((start, n) for start in range(0, frame_count - n + 1, n))
        elif mode == "slide":
            windows.extend((start, n) for start in range(0, frame_count - n + 1, frame_stride))
        elif mode == "uniform":
            starts = np.linspace(0, frame_count - n, frame_sample, dtype=int)
            windows.extend((int(start), n) for start in starts)
        else:
            raise ValueError(f"frame_extraction must be one of head, chunk, slide, uniform, full; got {mode!r}")
    return _dedupe(windows)


def bucket_step(vae_space_stride: int) -> int:
    """The bucket step in px for a VAE of `vae_space_stride` px per latent cell: the DiT's 2x2 latent patches
    must tile the image (16 for the Wan2.1 VAE, 32 for the Wan2.2 VAE)."""
    return vae_space_stride * PATCH_SIZE[1]


@functools.lru_cache(maxsize=64)
def bucket_resolutions(resolution: tuple[int, int], step: int = BUCKET_STEP) -> tuple[tuple[int, int], ...]:
    """Candidate (W, H) buckets of about the same area as `resolution`, sorted, in `step`-px steps."""
    area = resolution[0] * resolution[1]
    side = math.isqrt(area)
    smallest = side // 2 // step * step
    if smallest < step:
        raise ValueError(f"resolution {resolution} is too small for bucketing: W*H must be at least {(2 * step) ** 2}")
    buckets = set()
    for width in range(smallest, side + step, step):
        height = area // width // step * step
        buckets.update({(width, height), (height, width)})
    return tuple(sorted(buckets))


def select_bucket(size: tuple[int, int], resolution: tuple[int, int], *, enable_bucket: bool,
                  no_upscale: bool = False, step: int = BUCKET_STEP) -> tuple[int, int]:
    """The (W, H) bucket for a source of `size` (W, H).

    Without bucketing every item uses `resolution`. With `no_upscale`, a source whose area is at most the target
    area keeps its size rounded down to `step`. Otherwise the candidate with the nearest aspect ratio wins (the
    first one in sorted order on a tie). Raises ValueError when a side would be smaller than `step`.
    """
    if not enable_bucket:
        return resolution
    width, height = size
    if no_upscale and width * height <= resolution[0] * resolution[1]:
        bucket = (width // step * step, height // step * step)
        if min(bucket) < step:
            raise ValueError(f"{width}x{height} is smaller than {step} px on a side and bucket_no_upscale is set")
        return bucket
    candidates = bucket_resolutions(resolution, step)
    aspect = width / height
    return min(candidates, key=lambda c: abs(c[0] / c[1] - aspect))


# --------------------------------------------------------------------------------------------------------------------
# Listing the files of a dataset


@dataclass(frozen=True)
class _Source:
    media_path: Path
    caption: str | None = None
    control_path: Path | None = None
    drop: Drop | None = None  # a problem found before decoding (caption, control)


def _read_caption(path: Path) -> tuple[str | None, Drop | None]:
    if not path.is_file():
        return None, Drop(DropReason.NO_CAPTION, f"caption file not found: {path}")
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        return None, Drop(DropReason.UNREADABLE_CAPTION, f"cannot read caption {path}: {error}")
    if not caption:
        return None, Drop(DropReason.EMPTY_CAPTION, f"caption file is empty: {path}")
    return caption, None


class _ControlIndex:
    """musubi's control matching, with the control directory listed once: the same file name; for videos then a
    directory named like the stem; then a file with the same stem and a video (or image) extension."""

    def __init__(self, control_dir: Path, is_video: bool) -> None:
        if not control_dir.is_dir():
            raise FileNotFoundError(f"control_directory not found: {control_dir}")
        self.directory, self.is_video = control_dir, is_video
        entries = sorted(control_dir.iterdir())
        self.by_name = {p.name: p for p in entries}
        files = list_videos(control_dir) if is_video else list_images(control_dir)
        if is_video:  # musubi tries the extensions in this order
            files.sort(key=lambda p: VIDEO_EXTENSIONS.index(p.suffix.lower()))
        self.by_stem: dict[str, Path] = {}
        for path in files:
            self.by_stem.setdefault(path.stem, path)

    def find(self, media: Path) -> Path | None:
        if media.name in self.by_name:
            return self.by_name[media.name]
        frames_dir = self.by_name.get(media.stem)
        if self.is_video and frames_dir is not None and frames_dir.is_dir():
            return frames_dir
        return self.by_stem.get(media.stem)


def _directory_sources(cfg: DatasetConfig) -> list[_Source]:
    directory = Path(cfg.directory)
    if not directory.is_dir():
        kind = "video" if cfg.is_video else "image"
        raise FileNotFoundError(f"{cfg.label}: {kind}_directory not found: {directory}")
    try:
        controls = _ControlIndex(Path(cfg.control_directory), cfg.is_video) if cfg.control_directory else None
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{cfg.label}: {error}") from error
    media = list_videos(directory) if cfg.is_video else list_images(directory)
    sources = []
    for path in media:
        caption, drop = _read_caption(path.with_name(path.stem + cfg.caption_extension))
        control = None
        if controls is not None and drop is None:
            control = controls.find(path)
            if control is None:
                drop = Drop(DropReason.NO_CONTROL, f"no control with stem {path.stem!r} in {controls.directory}")
        sources.append(_Source(path, caption, control, drop))
    return sources


def _jsonl_records(path: Path, label: str) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{label}: JSONL file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{label}: {path} line {number} is not valid JSON: {error}") from error
        if not isinstance(record, dict):
            raise ValueError(f"{label}: {path} line {number} must be a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _jsonl_source(record: dict[str, Any], number: int, path_key: str, with_control: bool, where: str) -> _Source:
    media = record.get(path_key, record.get("image_path_0") if path_key == "image_path" else None)
    if not isinstance(media, str) or not media:
        raise ValueError(f"{where} line {number}: {path_key!r} must be a non-empty string, got {media!r}")
    caption = record.get("caption")
    drop = None
    if not isinstance(caption, str):
        drop = Drop(DropReason.NO_CAPTION, f"line {number} has no \"caption\" string")
    elif not caption.strip():
        drop = Drop(DropReason.EMPTY_CAPTION, f"line {number} has an empty caption")
    control = record.get("control_path")
    if with_control and drop is None and not control:
        drop = Drop(DropReason.NO_CONTROL, f"line {number} has no \"control_path\" but other lines do")
    elif control and drop is None and not Path(control).exists():
        drop = Drop(DropReason.NO_CONTROL, f"control_path not found: {control}")
    return _Source(Path(media), caption if drop is None else None, Path(control) if control else None, drop)


def _jsonl_sources(cfg: DatasetConfig) -> list[_Source]:
    path = Path(cfg.jsonl_file)
    records = _jsonl_records(path, cfg.label)
    with_control = any(record.get("control_path") for _, record in records)
    path_key = "video_path" if cfg.is_video else "image_path"
    return [_jsonl_source(r, n, path_key, with_control, f"{cfg.label}: {path}") for n, r in records]


def _list_sources(cfg: DatasetConfig) -> list[_Source]:
    return _directory_sources(cfg) if cfg.directory is not None else _jsonl_sources(cfg)


# --------------------------------------------------------------------------------------------------------------------
# Scanning


def _resample(frame_count: int, cfg: VideoDatasetConfig) -> list[int]:
    if cfg.source_fps is None:
        return list(range(frame_count))
    return fps_keep_indices(frame_count, cfg.source_fps)


def _too_short_drops(kept: int, decoded: int, cfg: VideoDatasetConfig) -> list[Drop]:
    if cfg.frame_extraction == "full":
        return []
    if cfg.source_fps:
        has = f"{kept} remain after dropping frames from {cfg.source_fps:g} to {WAN_FPS:g} fps ({decoded} decoded)"
    else:
        has = f"the video has {decoded}"
    return [Drop(DropReason.TOO_SHORT, f"needs {n} frames, {has}", target_frames=n)
            for n in cfg.target_frames if n > kept]


def _control_indices(start: int, count: int, control_kept: list[int] | None) -> tuple[int, ...] | None:
    """A shorter control repeats its last frame, a longer one is cut (musubi)."""
    if control_kept is None:
        return None
    last = len(control_kept) - 1
    return tuple(control_kept[min(p, last)] for p in range(start, start + count))


def _bucket_or_drop(size: tuple[int, int], cfg: DatasetConfig,
                    step: int) -> tuple[tuple[int, int] | None, Drop | None]:
    try:
        return select_bucket(size, cfg.resolution, enable_bucket=cfg.enable_bucket,
                             no_upscale=cfg.bucket_no_upscale, step=step), None
    except ValueError as error:
        return None, Drop(DropReason.TOO_SMALL, str(error))


def _media_drop(error: Exception, control: bool = False) -> Drop:
    if isinstance(error, FileNotFoundError):
        return Drop(DropReason.NO_CONTROL if control else DropReason.MISSING_FILE, str(error))
    return Drop(DropReason.UNREADABLE_CONTROL if control else DropReason.UNREADABLE, str(error))


def _scan_video(cfg: VideoDatasetConfig, source: _Source, step: int) -> FileReport:
    report = FileReport(cfg.index, source.media_path, source.caption, source.control_path)
    if source.drop is not None:
        return replace(report, drops=(source.drop,))
    try:
        info = inspect_video(source.media_path)
    except (FileNotFoundError, MediaReadError) as error:
        return replace(report, drops=(_media_drop(error),))
    kept = _resample(info.frame_count, cfg)
    bucket, drop = _bucket_or_drop((info.width, info.height), cfg, step)
    report = replace(report, decoded_frames=info.frame_count, fps=info.fps, resampled_frames=len(kept),
                      size=(info.width, info.height), bucket=bucket)
    if drop is not None:
        return replace(report, drops=(drop,))
    control_kept = None
    if source.control_path is not None:
        try:
            control_kept = _resample(inspect_video(source.control_path).frame_count, cfg)
        except (FileNotFoundError, MediaReadError) as error:
            return replace(report, drops=(_media_drop(error, control=True),))
        report = replace(report, control_frames=len(control_kept))
    windows = extract_frame_windows(len(kept), cfg.target_frames, cfg.frame_extraction,
                                    frame_stride=cfg.frame_stride, frame_sample=cfg.frame_sample,
                                    max_frames=cfg.max_frames)
    frame_windows = tuple(
        FrameWindow(start, count, tuple(kept[start : start + count]), _control_indices(start, count, control_kept))
        for start, count in windows
    )
    return replace(report, windows=frame_windows, drops=tuple(_too_short_drops(len(kept), info.frame_count, cfg)))


def _scan_image(cfg: ImageDatasetConfig, source: _Source, step: int) -> FileReport:
    report = FileReport(cfg.index, source.media_path, source.caption, source.control_path)
    if source.drop is not None:
        return replace(report, drops=(source.drop,))
    try:
        size = image_size(source.media_path)
    except (FileNotFoundError, MediaReadError) as error:
        return replace(report, drops=(_media_drop(error),))
    bucket, drop = _bucket_or_drop(size, cfg, step)
    report = replace(report, decoded_frames=1, resampled_frames=1, size=size, bucket=bucket)
    if drop is not None:
        return replace(report, drops=(drop,))
    if source.control_path is not None:
        try:
            image_size(source.control_path)
        except (FileNotFoundError, MediaReadError) as error:
            return replace(report, drops=(_media_drop(error, control=True),))
        report = replace(report, control_frames=1)
    control = (0,) if source.control_path is not None else None
    return replace(report, windows=(FrameWindow(0, 1, (0,), control),))


def _items(report: FileReport, is_video: bool) -> list[DatasetItem]:
    return [
        DatasetItem(
            dataset_index=report.dataset_index, media_path=report.media_path, caption=report.caption,
            frame_start=w.start, frame_count=w.count, frame_indices=w.frame_indices, bucket=report.bucket,
            original_size=report.size, control_path=report.control_path, control_frame_indices=w.control_indices,
            is_video=is_video,
        )
        for w in report.windows
    ]


def scan_dataset(cfg: DatasetConfig, bucket_step: int = BUCKET_STEP) -> list[FileReport]:
    """Scan one dataset: list its files, read captions, decode every video and pick buckets (`bucket_step` px
    steps) and windows."""
    sources = _list_sources(cfg)
    logger.info("%s: scanning %d %s files", cfg.label, len(sources), "video" if cfg.is_video else "image")
    scan = _scan_video if cfg.is_video else _scan_image
    reports = [scan(cfg, source, bucket_step) for source in sources]
    for report in reports:
        for drop in report.drops:
            logger.warning("%s: %s: %s (%s)", cfg.label, report.media_path, drop.reason.value, drop.detail)
    if not any(r.used for r in reports):
        logger.warning("%s: no usable files (%d listed)", cfg.label, len(reports))
    return reports


def scan_dataset_group(group: DatasetGroupConfig, bucket_step: int = BUCKET_STEP) -> DatasetScan:
    """Check the group, then scan every dataset, bucketing in `bucket_step` px steps (see `bucket_step()`; the
    default is the Wan2.1 VAE's). Per-file problems become drops; config problems raise."""
    check_dataset_group(group)
    files = tuple(report for cfg in group.datasets for report in scan_dataset(cfg, bucket_step))
    is_video = {cfg.index: cfg.is_video for cfg in group.datasets}
    items = tuple(item for report in files for item in _items(report, is_video[report.dataset_index]))
    return DatasetScan(config=group, files=files, items=items, bucket_step=bucket_step)


def ensure_not_empty(scan: DatasetScan) -> None:
    """Raise ValueError when no dataset yields a single item, with a count of the drop reasons."""
    if scan.items:
        return
    reasons = Counter(drop.reason.value for report in scan.files for drop in report.drops)
    found = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) or "no media files found"
    source = f" {scan.config.source}" if scan.config.source else ""
    raise ValueError(f"the dataset config{source} yields no training items ({len(scan.files)} files listed; "
                     f"drops: {found})")


# --------------------------------------------------------------------------------------------------------------------
# Batching and summaries


def _bucketed(items: Sequence[DatasetItem], num_repeats: int) -> dict[tuple[int, int, int], list[DatasetItem]]:
    buckets: dict[tuple[int, int, int], list[DatasetItem]] = {}
    for item in items:
        buckets.setdefault(item.batch_key, []).extend([item] * num_repeats)
    return buckets


def _batches(items: Sequence[DatasetItem], batch_size: int, num_repeats: int,
             rng: random.Random | None) -> list[tuple[DatasetItem, ...]]:
    if batch_size < 1 or num_repeats < 1:
        raise ValueError(f"batch_size and num_repeats must be >= 1, got {batch_size} and {num_repeats}")
    buckets = _bucketed(items, num_repeats)
    batches = []
    for key in sorted(buckets):
        bucket = buckets[key]
        if rng is not None:
            rng.shuffle(bucket)
        batches.extend(tuple(bucket[i : i + batch_size]) for i in range(0, len(bucket), batch_size))
    if rng is not None:
        rng.shuffle(batches)
    return batches


def make_batches(items: Sequence[DatasetItem], batch_size: int, num_repeats: int = 1,
                 seed: int | None = None) -> list[tuple[DatasetItem, ...]]:
    """Batches of items with identical (W, H, frames); each item `num_repeats` times; the last batch of a bucket may
    be smaller. Without `seed`, buckets come in sorted order and items in input order; with it, items within each
    bucket and then the batch order are shuffled by `random.Random(seed)`."""
    return _batches(items, batch_size, num_repeats, None if seed is None else random.Random(seed))


def epoch_batches(scan: DatasetScan, seed: int, epoch: int = 0) -> list[tuple[DatasetItem, ...]]:
    """All batches of one epoch over every dataset (each with its own batch_size and num_repeats), shuffled by
    `random.Random(seed + epoch)`, so the order is reproducible and differs per epoch."""
    rng = random.Random(seed + epoch)
    batches = []
    for cfg in scan.config.datasets:
        batches.extend(_batches(scan.items_of(cfg.index), cfg.batch_size, cfg.num_repeats, rng))
    rng.shuffle(batches)
    return batches


def summarize(scan: DatasetScan) -> tuple[DatasetSummary, ...]:
    """Per dataset: files, items, samples per epoch (items x num_repeats), batches, buckets and drop counts."""
    summaries = []
    for cfg in scan.config.datasets:
        files = scan.files_of(cfg.index)
        buckets = _bucketed(scan.items_of(cfg.index), cfg.num_repeats)
        bucket_summaries = tuple(
            BucketSummary(key=key, items=len(samples) // cfg.num_repeats, samples=len(samples),
                          batches=math.ceil(len(samples) / cfg.batch_size),
                          partial_batches=int(len(samples) % cfg.batch_size != 0))
            for key, samples in sorted(buckets.items())
        )
        drops = Counter(drop.reason.value for report in files for drop in report.drops)
        summaries.append(DatasetSummary(
            index=cfg.index, files=len(files), used_files=sum(f.used for f in files),
            items=sum(b.items for b in bucket_summaries), samples=sum(b.samples for b in bucket_summaries),
            batches=sum(b.batches for b in bucket_summaries), buckets=bucket_summaries,
            drops=dict(sorted(drops.items())),
        ))
    return tuple(summaries)
