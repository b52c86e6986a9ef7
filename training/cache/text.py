"""`python -m training cache-text`: encode a dataset's captions with umT5 into musubi-compatible T5 caches.

Flags follow musubi's `wan_cache_text_encoder_outputs.py`: --dataset_config, --t5, --fp8_t5, --batch_size (default:
each dataset's), --device, --skip_existing, --keep_cache; also --tokenizer (a folder with spiece.model or a .model
file, when the T5 file embeds none and no google/umt5-xxl folder sits next to it), --force (re-encode every entry)
and --config_file.

One entry per media file with a caption (`{stem}_wan_te.safetensors`), plus the empty caption's entry in every
cache directory (`wantuner_empty_caption_t5.safetensors`, for caption dropout). Entries whose key (caption text,
T5 and tokenizer identity, dtype/fp8) matches the existing file are reused, so editing one caption re-encodes
exactly that caption; files no longer part of the dataset are deleted unless --keep_cache. Captions are read
without decoding any video.

Exit codes: 0 done; 1 no captioned media at all or an encoding error; 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import torch

from training.cache.store import (
    EMPTY_TEXT_NAME,
    CacheRunReport,
    EmptyDatasetError,
    Progress,
    TextEntry,
    TextSettings,
    TokenizerSource,
    TqdmProgress,
    add_cache_run_flags,
    cache_directory,
    cache_parser,
    checkpoint_fingerprint,
    dtype_name,
    entry_key,
    is_current,
    is_text_cache_name,
    left_alone_note,
    module_fingerprint,
    remove_stale,
    resolve_tokenizer,
    save_text_entry,
    text_cache_name,
    text_parts,
    tokenizer_fingerprint,
    unique_text_entries,
)
from training.config_file import parse_args
from training.dataset.items import _list_sources
from training.dataset.schema import DatasetGroupConfig, check_dataset_group, load_dataset_config
from wan_core.loading.checkpoint import peek_shapes
from wan_core.models.t5 import load_t5
from wan_core.runtime.fp8 import fp8_t5

if TYPE_CHECKING:
    from wan_core.models.t5 import T5Encoder
    from wan_core.models.tokenizer import UMT5Tokenizer

T5Source: TypeAlias = "str | os.PathLike[str] | T5Encoder"  # a checkpoint path or a loaded encoder

logger = logging.getLogger(__name__)

FP8_T5_MODE = "fp8_scaled"


def caption_entries(group: DatasetGroupConfig) -> tuple[list[TextEntry], dict[str, int]]:
    """The T5 entries of every captioned media file (no decoding), and the count of media without a usable caption
    by reason. The empty caption's entries are not included."""
    check_dataset_group(group)
    entries, dropped = [], Counter()
    for cfg in group.datasets:
        directory = cache_directory(cfg)
        for source in _list_sources(cfg):
            if source.caption is None:
                reason = source.drop.reason.value if source.drop is not None else "no_caption"
                logger.warning("%s: %s: %s (%s)", cfg.label, source.media_path, reason,
                               source.drop.detail if source.drop is not None else "no caption")
                dropped[reason] += 1
                continue
            entries.append(TextEntry(cfg.index, source.media_path, source.caption,
                                     directory / text_cache_name(source.media_path)))
    return unique_text_entries(entries), dict(sorted(dropped.items()))


def _empty_entries(group: DatasetGroupConfig) -> list[TextEntry]:
    return [TextEntry(cfg.index, Path(""), "", cache_directory(cfg) / EMPTY_TEXT_NAME) for cfg in group.datasets]


def text_settings(t5: T5Source, tokenizer: TokenizerSource | None, fp8: bool) -> tuple[TextSettings, UMT5Tokenizer]:
    """(settings, the tokenizer to encode with) for a T5 checkpoint path or a loaded `T5Encoder` (used as it is:
    its own tokenizer, dtype and weights; `fp8` applies to paths only)."""
    if isinstance(t5, (str, os.PathLike)):
        tok = resolve_tokenizer(t5, tokenizer)
        return TextSettings(t5=checkpoint_fingerprint(t5), tokenizer=tokenizer_fingerprint(tok),
                            compute=_compute_name(t5) + (f"+{FP8_T5_MODE}" if fp8 else "")), tok
    tok = t5.tokenizer
    return TextSettings(t5=module_fingerprint(t5.model), tokenizer=tokenizer_fingerprint(tok),
                        compute=dtype_name(t5.dtype)), tok


def _compute_name(t5_path: str | os.PathLike[str]) -> str:
    """load_t5's default compute dtype: bf16, except that fp32 files stay fp32."""
    dtypes = {t.dtype for t in peek_shapes(t5_path).values() if t.is_floating_point()}
    return "float32" if dtypes == {torch.float32} else "bfloat16"


def _load_t5(t5: T5Source, tokenizer: TokenizerSource | None, device: str, fp8: bool, batch_size: int) -> T5Encoder:
    if not isinstance(t5, (str, os.PathLike)):
        return t5

    encoder = load_t5(t5, tokenizer=tokenizer, device=device, batch_size=batch_size)
    if fp8:
        fp8_t5(encoder, FP8_T5_MODE)
    return encoder


def cache_text(dataset: str | os.PathLike[str] | DatasetGroupConfig, t5: T5Source, *,
               tokenizer: TokenizerSource | None = None,
               fp8_t5: bool = False, device: str = "cpu", batch_size: int | None = None, force: bool = False,
               keep_cache: bool = False, progress: Progress | None = None) -> CacheRunReport:
    """Bring a dataset's T5 caches up to date; returns what was encoded, reused and removed.

    t5: a checkpoint path (loaded on `device` only when something must be encoded) or a loaded
    `wan_core.models.t5.T5Encoder`, used as it is (its device, dtype and tokenizer; `tokenizer` and `fp8_t5` are
    ignored).
    Raises ValueError when no media file has a caption or two entries collide, FileNotFoundError for missing files.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    group = dataset if isinstance(dataset, DatasetGroupConfig) else load_dataset_config(dataset)
    entries, dropped = caption_entries(group)
    if not entries:
        found = ", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "no media files found"
        raise EmptyDatasetError(f"the dataset config {group.source or ''} has no captioned media ({found})")
    entries += _empty_entries(group)
    settings, tok = text_settings(t5, tokenizer, fp8_t5)
    report = CacheRunReport(entries=len(entries), dropped_files=dropped)
    parts = {e.path: text_parts(e.caption, settings) for e in entries}
    pending = [e for e in entries if force or not is_current(e.path, entry_key(parts[e.path]))]
    report.reused = len(entries) - len(pending)
    logger.info("T5 cache: %d entries, %d up to date, %d to encode", len(entries), report.reused, len(pending))
    if pending:
        size = batch_size or max(cfg.batch_size for cfg in group.datasets)
        encoder = _load_t5(t5, tok, device, fp8_t5, size)
        for start in range(0, len(pending), size):
            chunk = pending[start : start + size]
            for entry, embedding in zip(chunk, encoder.encode([e.caption for e in chunk])):
                save_text_entry(entry.path, entry.caption, parts[entry.path], settings, embedding.cpu())
                report.encoded.append(entry.path)
            if progress is not None:
                progress(len(report.encoded), len(pending))
    if not keep_cache:
        for cfg in group.datasets:
            expected = {e.path.name for e in entries if e.dataset_index == cfg.index}
            removed, left = remove_stale(cache_directory(cfg), expected, is_text_cache_name)
            report.removed += removed
            report.left_alone += left
    return report


# --------------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = cache_parser("cache-text", __doc__)
    parser.add_argument("--t5", help="umT5 checkpoint (models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors); "
                                     "required")
    parser.add_argument("--tokenizer", default=None, help="folder with spiece.model, or a SentencePiece .model file")
    parser.add_argument("--fp8_t5", action="store_true", help="store the T5 weights in fp8 (less memory)")
    add_cache_run_flags(parser, batch_help="captions per T5 call (default: the dataset's)",
                        workers_help="accepted for musubi compatibility; captions are read without decoding any media")
    return parser


def _summary(report: CacheRunReport) -> str:
    dropped = "".join(f", {n} files without a caption ({reason})" for reason, n in report.dropped_files.items())
    return (f"T5 cache: {report.entries} entries (including the empty caption): {len(report.encoded)} encoded, "
            f"{report.reused} reused, {len(report.removed)} stale files removed{left_alone_note(report)}{dropped}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv, required=("dataset_config", "t5"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        report = cache_text(args.dataset_config, args.t5, tokenizer=args.tokenizer, fp8_t5=args.fp8_t5,
                            device=device, batch_size=args.batch_size, force=args.force, keep_cache=args.keep_cache,
                            progress=TqdmProgress("cache-text", "caption"))
    except EmptyDatasetError as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    except (ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    except RuntimeError as error:
        sys.stderr.write(f"error: {error}\nentries written so far are kept; run the same command again to "
                         "continue\n")
        return 1
    sys.stdout.write(_summary(report))
    return 0
