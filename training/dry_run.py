"""`python -m training dataset --dataset_config X.toml [--dry-run] [--json]`.

Without `--dry-run` the config is parsed and checked, and the resolved datasets are listed. With `--dry-run` every
file is opened before any model is loaded: videos are decoded completely, and the report gives per file the frames
decoded (and kept after `source_fps` resampling), the bucket, the frame windows used and the reason for every drop
(missing or empty caption, unreadable or missing file, too short for a target, missing control); then per dataset
the items per (W, H, frames) bucket, samples and batches per epoch. `--json` prints the same as one JSON object.

Exit codes: 0 ok; 1 the config yields no training items; 2 the config itself is invalid.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from training.dataset.items import (
    DatasetScan,
    FileReport,
    FrameWindow,
    ensure_not_empty,
    scan_dataset_group,
    summarize,
)
from training.dataset.schema import DatasetConfig, DatasetGroupConfig, load_dataset_config

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training dataset", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_config", "--dataset-config", required=True, help="dataset TOML (musubi schema)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="decode every file and report frames, buckets, windows and drops")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# JSON


def _dataset_settings(cfg: DatasetConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "index": cfg.index, "kind": "video" if cfg.is_video else "image",
        "directory": cfg.directory, "jsonl_file": cfg.jsonl_file, "caption_extension": cfg.caption_extension,
        "cache_directory": cfg.resolved_cache_directory, "control_directory": cfg.control_directory,
        "resolution": list(cfg.resolution), "enable_bucket": cfg.enable_bucket,
        "bucket_no_upscale": cfg.bucket_no_upscale, "batch_size": cfg.batch_size, "num_repeats": cfg.num_repeats,
    }
    if cfg.is_video:
        settings.update(target_frames=list(cfg.target_frames), frame_extraction=cfg.frame_extraction,
                        frame_stride=cfg.frame_stride, frame_sample=cfg.frame_sample, max_frames=cfg.max_frames,
                        source_fps=cfg.source_fps)
    return settings


def _window_dict(window: FrameWindow) -> dict[str, Any]:
    return {"start": window.start, "frames": window.count, "frame_indices": list(window.frame_indices),
            "control_frame_indices": None if window.control_indices is None else list(window.control_indices)}


def _file_dict(report: FileReport) -> dict[str, Any]:
    file_drops = [d for d in report.drops if d.target_frames is None]
    return {
        "path": str(report.media_path), "used": report.used, "caption": report.caption,
        "control_path": None if report.control_path is None else str(report.control_path),
        "decoded_frames": report.decoded_frames, "fps": report.fps, "resampled_frames": report.resampled_frames,
        "control_frames": report.control_frames, "size": None if report.size is None else list(report.size),
        "bucket": None if report.bucket is None else list(report.bucket),
        "windows": [_window_dict(w) for w in report.windows],
        "dropped": None if not file_drops else {"reason": file_drops[0].reason.value, "detail": file_drops[0].detail},
        "dropped_windows": [{"target_frames": d.target_frames, "reason": d.reason.value, "detail": d.detail}
                            for d in report.drops if d.target_frames is not None],
    }


def report_dict(scan: DatasetScan) -> dict[str, Any]:
    """The dry-run report as plain JSON-serialisable data."""
    datasets = []
    for cfg, summary in zip(scan.config.datasets, summarize(scan)):
        datasets.append({
            **_dataset_settings(cfg),
            "files": [_file_dict(f) for f in scan.files_of(cfg.index)],
            "buckets": [{"width": b.key[0], "height": b.key[1], "frames": b.key[2], "items": b.items,
                         "samples": b.samples, "batches": b.batches, "partial_batches": b.partial_batches}
                        for b in summary.buckets],
            "file_count": summary.files, "used_files": summary.used_files, "items": summary.items,
            "samples_per_epoch": summary.samples, "batches_per_epoch": summary.batches, "drops": summary.drops,
        })
    return {
        "config": scan.config.source, "datasets": datasets,
        "items": sum(d["items"] for d in datasets), "samples_per_epoch": sum(d["samples_per_epoch"] for d in datasets),
        "batches_per_epoch": sum(d["batches_per_epoch"] for d in datasets),
    }


# --------------------------------------------------------------------------------------------------------------------
# Text


def _size(size: Sequence[int] | None) -> str:
    return "?" if size is None else f"{size[0]}x{size[1]}"


def _dataset_header(cfg: DatasetConfig) -> list[str]:
    kind = "video" if cfg.is_video else "image"
    source = f"{kind}_directory {cfg.directory}" if cfg.directory else f"{kind}_jsonl_file {cfg.jsonl_file}"
    lines = [
        f"datasets[{cfg.index}]: {kind} dataset, {source}",
        f"  cache {cfg.resolved_cache_directory}, captions {'from JSONL' if cfg.jsonl_file else cfg.caption_extension}"
        + (f", control_directory {cfg.control_directory}" if cfg.control_directory else ""),
        f"  resolution {_size(cfg.resolution)}, enable_bucket {cfg.enable_bucket}, "
        f"bucket_no_upscale {cfg.bucket_no_upscale}, batch_size {cfg.batch_size}, num_repeats {cfg.num_repeats}",
    ]
    if cfg.is_video:
        mode = {"slide": f", frame_stride {cfg.frame_stride}", "uniform": f", frame_sample {cfg.frame_sample}",
                "full": f", max_frames {cfg.max_frames}"}.get(cfg.frame_extraction, "")
        targets = "" if cfg.frame_extraction == "full" else f", target_frames {list(cfg.target_frames)}"
        fps = f", source_fps {cfg.source_fps:g} -> 16 fps" if cfg.source_fps else ", all frames used (no source_fps)"
        lines.append(f"  frame_extraction {cfg.frame_extraction}{targets}{mode}{fps}")
    return lines


def _indices_text(indices: Sequence[int]) -> str:
    first, last = indices[0], indices[-1]
    if len(indices) == 1:
        return f"frame {first}"
    if last - first + 1 == len(indices):
        return f"frames {first}-{last}"
    return f"frames {first}-{last} ({len(indices)} of {last - first + 1} kept)"


def _file_lines(report: FileReport, cfg: DatasetConfig) -> list[str]:
    name = report.media_path.name or str(report.media_path)
    file_drops = [d for d in report.drops if d.target_frames is None]
    if report.decoded_frames is None or (file_drops and not report.used):
        drop = file_drops[0]
        decoded = "" if report.decoded_frames is None else f" ({report.decoded_frames} frames decoded)"
        return [f"  {name}: DROPPED {drop.reason.value}{decoded}: {drop.detail}"]
    if cfg.is_video:
        fps = "" if report.fps is None else f" at {report.fps:.2f} fps"
        resampled = "" if cfg.source_fps is None else f", {report.resampled_frames} kept at 16 fps"
        head = f"  {name}: {report.decoded_frames} frames decoded{fps}, {_size(report.size)}{resampled}"
    else:
        head = f"  {name}: image {_size(report.size)}"
    head += f" -> bucket {_size(report.bucket)}"
    if report.control_path is not None:
        head += f"; control {report.control_path.name} ({report.control_frames} frames)"
    lines = [head]
    if cfg.is_video:
        lines += [f"    window start {w.start}, {w.count} frames: {_indices_text(w.frame_indices)}"
                  for w in report.windows]
    lines += [f"    dropped target {d.target_frames}: {d.reason.value}: {d.detail}"
              for d in report.drops if d.target_frames is not None]
    if not report.used:
        lines.append("    DROPPED: no frame window fits")
    return lines


def format_report(scan: DatasetScan) -> str:
    """The dry-run report as readable text."""
    lines = [f"dataset config: {scan.config.source or '(in memory)'}"]
    for cfg, summary in zip(scan.config.datasets, summarize(scan)):
        lines += _dataset_header(cfg)
        for report in scan.files_of(cfg.index):
            lines += _file_lines(report, cfg)
        lines.append(f"  summary: {summary.files} files, {summary.used_files} used; {summary.items} items, "
                     f"{summary.samples} samples per epoch, {summary.batches} batches per epoch")
        for b in summary.buckets:
            partial = " (last one partial)" if b.partial_batches else ""
            lines.append(f"    bucket {b.key[0]}x{b.key[1]}, {b.key[2]} frames: {b.items} items, {b.samples} samples, "
                         f"{b.batches} batches{partial}")
        if summary.drops:
            lines.append("    drops: " + ", ".join(f"{reason} {count}" for reason, count in summary.drops.items()))
    totals = report_dict(scan)
    lines.append(f"total: {totals['items']} items, {totals['samples_per_epoch']} samples per epoch, "
                 f"{totals['batches_per_epoch']} batches per epoch")
    return "\n".join(lines) + "\n"


def format_config(group: DatasetGroupConfig) -> str:
    lines = [f"dataset config: {group.source or '(in memory)'}"]
    for cfg in group.datasets:
        lines += _dataset_header(cfg)
    lines.append("config is valid; run with --dry-run to decode every file")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        group = load_dataset_config(args.dataset_config)
        if not args.dry_run:
            output = json.dumps({"config": group.source, "datasets": [_dataset_settings(c) for c in group.datasets]},
                                indent=2) + "\n" if args.json else format_config(group)
            sys.stdout.write(output)
            return 0
        scan = scan_dataset_group(group)
    except (ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    sys.stdout.write(json.dumps(report_dict(scan), indent=2) + "\n" if args.json else format_report(scan))
    try:
        ensure_not_empty(scan)
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    return 0
