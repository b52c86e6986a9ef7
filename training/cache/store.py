"""Latent and T5 caches: musubi-tuner's files and keys, content keys for invalidation, and the reader training uses.

Files, one per entry, in the dataset's `cache_directory` (default: its data directory):

- latents: `{stem}[_{start:05d}-{frames:03d}]_{W:04d}x{H:04d}_wan.safetensors` (W, H = the source size; the frame
  part only for videos) holding `latents_{F}x{h}x{w}_{dtype}` [16, F, h, w] in the VAE dtype (bf16 by default);
  with I2V also `latents_image_{F}x{h}x{w}_{dtype}` [20, F, h, w] (4 mask channels, then the VAE latent of the
  first frame followed by grey frames: the official I2V layout) and, with a CLIP model, `clip_{dtype}` [257, 1280]
  stored in fp16 (musubi names it with the latent dtype and converts the features to fp16); with a control video
  (Fun-Control) `latents_control_{F}x{h}x{w}_{dtype}` [16, F, h, w]. Metadata: architecture=wan, width, height,
  frame_count (videos), format_version=1.0.1.
- T5: `{stem}_wan_te.safetensors` holding `varlen_t5_bfloat16` [L, 4096] (real tokens incl. EOS, not padded);
  metadata architecture, caption1, format_version.
- the empty caption's T5 output (caption dropout, CFG): `wantuner_empty_caption_t5.safetensors`, same layout,
  one per cache directory (musubi's loaders glob `*_wan.safetensors` / `*_wan_te.safetensors`; they never see it).
- `wantuner_media_hashes.json`: the media-content hashes with their file stamps (a fast path, see below).

Every tensor is musubi's; our additions are metadata only, so musubi's loader reads the files unchanged:
`wantuner_key` (the entry's key), `wantuner_entry` (JSON: the parts the key is made of and the encoder settings) and
`wantuner_tensors` (JSON: tensor name -> sha256 of its bytes).

Keys. An entry's key is sha256 over the key version and its parts:
- latents: `media` = sha256 of the media bytes (a frame folder: of every frame file, with its name) and of the
  control media; `item` = the preprocessing: bucket, source size, frame window and the decoded-frame indices
  (which carry `target_frames`, `frame_extraction` and `source_fps`), control frame indices, the resize rule;
  `encoder` = the VAE checkpoint fingerprint, VAE dtype (= stored dtype), VAE tiling rule, the I2V flag, the CLIP
  fingerprint and dtype.
- T5: `caption` = sha256 of the caption text; `encoder` = the T5 checkpoint fingerprint, the tokenizer (sha256 of the
  SentencePiece model and text_len), the compute mode (dtype, fp8) and the stored dtype.
A checkpoint fingerprint is its size plus sha256 of its head (the whole safetensors header) and 16 blocks of 64 KiB
spread over the file (the whole file below 8 MiB); split files and folders include every part. (So an edit of a
large checkpoint that keeps its size and touches none of the sampled bytes goes unnoticed: use --force after
editing weights in place.) A loaded model's identity hashes its tensor names, shapes, dtypes and first/last values.

Media hashes are cached per cache directory with each file's (size, mtime, ctime, inode); a record is trusted only
when the file had not changed for 2 s before it was hashed (git's "racy" rule), otherwise the file is hashed again.

Reuse and invalidation (both cache commands): an entry is reused when its file exists, its stored key equals the
key computed now and its tensors match their stored sha256 checksums (so each run reads every entry once); otherwise
it is encoded again (a corrupt file, or one written without checksums by an older version, with a log line).
`--skip_existing` is accepted for musubi compatibility and means the same (musubi skips by existence alone; here a
stale file is still re-encoded). `--force` re-encodes everything.
Files without a key (written by musubi) are re-encoded. After a run, files of the cache's naming pattern that carry
this project's cache metadata and that no entry of the dataset uses, and temporary files of interrupted runs, are
deleted unless `--keep_cache`; files of that naming pattern without the metadata (a user's `style_wan.safetensors`
LoRA, musubi's caches) are never deleted, and the run reports them (`left_alone`, one log line). Every file is
written to a temporary name and renamed, so an interrupted run leaves no broken file and a re-run continues.

An encoder output with NaN or inf is an error (musubi zeroes it with a warning); nothing is written for that entry.

The reader (`CachedDataset`) rebuilds the items from the dataset config, checks that every latent and T5 entry exists
and that its media and preprocessing parts (and, when given, the encoders) match the current files, that all entries
come from one encoder setting, have tensor checksums and carry what the task needs, verifies every file it reads
against its checksums and for NaN/inf (CacheError naming the file), and yields musubi-style batches of items with
identical (W, H, frames). `open_training_source` wraps it as the training loop's `BatchSource`
(training.dataset.batches).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from training.config_file import add_config_file_argument
from training.dataset.batches import DatasetBatching, TrainItem
from training.dataset.items import (
    DatasetItem,
    DatasetScan,
    bucket_step,
    ensure_not_empty,
    epoch_batches,
    scan_dataset_group,
)
from training.dataset.schema import DatasetConfig, DatasetGroupConfig, load_dataset_config
from wan_core.loading.checkpoint import (
    CheckpointError,
    expand_split_files,
    non_finite_count,
    peek_shapes,
    read_metadata,
    save_safetensors,
    write_text_atomic,
)
from wan_core.media.io import MediaReadError, list_images
from wan_core.media.layouts import latent_space_stride
from wan_core.models.config import CONFIG_METADATA_KEY, WAN21_VAE, T5Config, config_from_json
from wan_core.models.tokenizer import SPIECE_KEY, find_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from training.dataset.batches import DatasetBatching, TrainItem
    from wan_core.models.tokenizer import UMT5Tokenizer

logger = logging.getLogger(__name__)

# what `load_t5` takes as its tokenizer: an instance, a folder with spiece.model, a .model file or model bytes
TokenizerSource: TypeAlias = "UMT5Tokenizer | str | os.PathLike[str] | bytes"

ARCHITECTURE = "wan"
MUSUBI_FORMAT_VERSION = "1.0.1"
KEY_VERSION = 1  # bump when what goes into a key, or how an entry is computed, changes
KEY_METADATA = "wantuner_key"
ENTRY_METADATA = "wantuner_entry"
TENSORS_METADATA = "wantuner_tensors"  # JSON: tensor name -> sha256 of its bytes
LATENT_SUFFIX = f"_{ARCHITECTURE}.safetensors"
TEXT_SUFFIX = f"_{ARCHITECTURE}_te.safetensors"
EMPTY_TEXT_NAME = "wantuner_empty_caption_t5.safetensors"
HASH_INDEX_NAME = "wantuner_media_hashes.json"
RESIZE_RULE = "cover+centre-crop, LANCZOS up / BOX down, sizes rounded half up (wan_core.media.io.resize_to_bucket)"
VAE_TILING_RULE = "auto: tiles of 512 px overlapping 64 px from 720x1280 pixels"
TEXT_DTYPE = torch.bfloat16  # musubi's varlen_t5_bfloat16
CLIP_DTYPE = torch.float16  # musubi stores the CLIP features in fp16
T5_KEY_PREFIX = "varlen_t5_"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                  "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                  "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_LATENT_KEY = re.compile(r"^(latents|latents_image|latents_control)_(\d+)x(\d+)x(\d+)_([a-z0-9_]+)$")
RACY_WINDOW_NS = 2_000_000_000  # a file changed this soon before it was hashed is hashed again
_FULL_HASH_LIMIT = 8 << 20
_SAMPLE_BLOCK = 64 << 10
_SAMPLE_COUNT = 16
_HEAD_BYTES = 1 << 20

Progress = Callable[[int, int], None]  # progress(done, total)


class CacheError(RuntimeError):
    """A cache that cannot be used for training: entries missing, stale, or made with other encoders."""


class EmptyDatasetError(ValueError):
    """The dataset config yields nothing to cache."""


@dataclass
class CacheRunReport:
    """What a caching run did."""

    entries: int = 0  # entries the dataset needs
    encoded: list[Path] = field(default_factory=list)
    reused: int = 0
    removed: list[Path] = field(default_factory=list)
    dropped_files: dict[str, int] = field(default_factory=dict)  # drop reason -> files that give no entry
    left_alone: list[Path] = field(default_factory=list)  # named like cache files but not written by this project


def left_alone_note(report: CacheRunReport) -> str:
    """The summary clause for files named like cache files that a run did not delete ("" when none)."""
    if not report.left_alone:
        return ""
    return (f", {len(report.left_alone)} files named like cache files left alone (not written by this project: "
            f"{', '.join(p.name for p in report.left_alone)})")


class TqdmProgress:
    """A `Progress` callback drawing a tqdm bar (created on the first call, closed when done == total)."""

    def __init__(self, desc: str, unit: str) -> None:
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def cache_parser(command: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of a cache command (`cache-latents`, `cache-text`), starting with `--dataset_config`."""
    parser = argparse.ArgumentParser(prog=f"python -m training {command}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_config", help="dataset TOML (musubi schema); required")
    return parser


def add_cache_run_flags(parser: argparse.ArgumentParser, batch_help: str, workers_help: str) -> None:
    """The flags both cache commands share: batching, workers, what to (re)encode and keep, device, config file."""
    parser.add_argument("--batch_size", type=int, default=None, help=batch_help)
    parser.add_argument("--num_workers", type=int, default=None, help=workers_help)
    parser.add_argument("--skip_existing", action="store_true",
                        help="accepted for musubi compatibility; up-to-date entries are always skipped (keys "
                             "verified)")
    parser.add_argument("--force", action="store_true", help="re-encode every entry")
    parser.add_argument("--keep_cache", action="store_true", help="keep cache files no longer in the dataset")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    add_config_file_argument(parser)


# --------------------------------------------------------------------------------------------------------------------
# dtypes and names


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"cache tensors must be float32, float16 or bfloat16, got {dtype}")
    return _DTYPE_NAMES[dtype]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / 'fp16' / 'float16' / 'fp32' / 'float32' (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        dtype_name(name)
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}; expected one of bfloat16 (bf16), float16 (fp16), float32 (fp32)")
    return _DTYPE_ALIASES[key]


def media_stem(path: Path) -> str:
    """musubi's basename of a media path: the file name without its extension (a frame folder's name likewise)."""
    return path.stem if path.suffix else path.name


def latent_cache_name(item: DatasetItem) -> str:
    width, height = item.original_size
    return f"{item.item_key}_{width:04d}x{height:04d}{LATENT_SUFFIX}"


def text_cache_name(media_path: Path) -> str:
    return f"{media_stem(media_path)}{TEXT_SUFFIX}"


def cache_directory(cfg: DatasetConfig) -> Path:
    """The dataset's cache directory; a JSONL dataset must name one (musubi requires it too)."""
    directory = cfg.resolved_cache_directory
    if directory is None:
        kind = "video" if cfg.is_video else "image"
        raise ValueError(f"{cfg.label}: cache_directory is required with {kind}_jsonl_file (set cache_directory = "
                         "\"...\" in that [[datasets]] table)")
    return Path(directory)


# --------------------------------------------------------------------------------------------------------------------
# Hashing


def digest(value: object) -> str:
    """sha256 of a JSON-serialisable value (keys sorted), hex."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _head_length(path: Path, size: int) -> int:
    """The safetensors header (8 bytes + JSON) for safetensors files, else the first MiB."""
    with open(path, "rb") as f:
        raw = f.read(9)
    if len(raw) == 9 and raw[8:9] == b"{":
        return min(size, 8 + int.from_bytes(raw[:8], "little"))
    return min(size, _HEAD_BYTES)


def _file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    if size <= _FULL_HASH_LIMIT:
        return f"{size}:{sha256_file(path)}"
    h = hashlib.sha256()
    head = _head_length(path, size)
    with open(path, "rb") as f:
        h.update(f.read(head))
        span = size - head - _SAMPLE_BLOCK
        for i in range(_SAMPLE_COUNT):
            f.seek(head + max(span, 0) * i // (_SAMPLE_COUNT - 1))
            h.update(f.read(_SAMPLE_BLOCK))
    return f"{size}:{h.hexdigest()}"


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a checkpoint file, split file or model folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise FileNotFoundError(f"model folder {path} contains no files")
        return digest([[p.relative_to(path).as_posix(), _file_fingerprint(p)] for p in files])
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    parts = expand_split_files(path)
    if len(parts) == 1:
        return _file_fingerprint(path)
    return digest([[p.name, _file_fingerprint(p)] for p in parts])


def module_fingerprint(module: torch.nn.Module) -> str:
    """Identity of an already loaded model: names, shapes, dtypes and the first/last 4096 values of every tensor."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:4096], flat[-4096:]]).cpu().contiguous()
        h.update(f"{name}:{list(tensor.shape)}:{tensor.dtype};".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return f"module:{h.hexdigest()}"


class MediaHasher:
    """sha256 of media contents, with a per-cache-directory index of (size, mtime, ctime, inode) -> hash."""

    def __init__(self, index_path: Path | None = None, racy_window_ns: int = RACY_WINDOW_NS) -> None:
        self.index_path, self.racy_window_ns = index_path, racy_window_ns
        self._old = self._load()
        self._new: dict[str, dict[str, Any]] = {}
        self.files_hashed = 0  # files read in full by this hasher

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.index_path is None or not self.index_path.is_file():
            return {}
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable media hash index %s: %s", self.index_path, error)
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("version") == 1 else None
        return files if isinstance(files, dict) else {}

    def file_hash(self, path: Path) -> str:
        key = str(path.absolute())
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        record = self._new.get(key) or self._old.get(key)
        if (isinstance(record, dict) and record.get("stat") == stamp
                and max(stat.st_mtime_ns, stat.st_ctime_ns) + self.racy_window_ns < record.get("hashed_at", 0)):
            self._new[key] = record
            return record["sha256"]
        hashed_at = time.time_ns()
        sha = sha256_file(path)
        self.files_hashed += 1
        self._new[key] = {"stat": stamp, "sha256": sha, "hashed_at": hashed_at}
        return sha

    def media_hash(self, path: Path) -> str:
        """A media file's sha256; a frame folder's: sha256 over (name, sha256) of each image in it."""
        if path.is_dir():
            files = list_images(path)
            if not files:
                raise MediaReadError(f"frame directory {path} contains no images")
            return digest({"frames": [[f.name, self.file_hash(f)] for f in files]})
        if not path.is_file():
            raise FileNotFoundError(f"media file not found: {path}")
        return self.file_hash(path)

    def save(self) -> None:
        """Write the records used by this hasher (atomically); records of files no longer used are dropped."""
        if self.index_path is None or not self._new or self._new == self._old:
            return
        write_text_atomic(self.index_path, json.dumps({"version": 1, "files": self._new}, sort_keys=True))


# --------------------------------------------------------------------------------------------------------------------
# Encoder settings and entry keys


@dataclass(frozen=True)
class LatentSettings:
    """What, besides the media and the item, decides a latent entry's numbers."""

    vae: str  # checkpoint fingerprint
    dtype: str = "bfloat16"  # VAE compute dtype = stored latent dtype (musubi)
    i2v: bool = False  # latents_image (mask + first-frame latent)
    clip: str | None = None  # CLIP checkpoint fingerprint; None: no clip features
    clip_dtype: str | None = None  # CLIP compute dtype
    vae_tiling: str = VAE_TILING_RULE

    def __post_init__(self) -> None:
        if self.clip is not None and not self.i2v:
            raise ValueError("CLIP features are cached only with I2V latents: set i2v=True (musubi: --clip implies "
                             "--i2v)")

    def part(self) -> str:
        return digest(dataclasses.asdict(self))


@dataclass(frozen=True)
class TextSettings:
    """What, besides the caption, decides a T5 entry's numbers."""

    t5: str  # checkpoint fingerprint
    tokenizer: str  # sha256 of the SentencePiece model + text_len
    compute: str = "bfloat16"  # compute dtype, with the fp8 mode when the weights are stored in fp8
    dtype: str = dtype_name(TEXT_DTYPE)  # stored dtype

    def part(self) -> str:
        return digest(dataclasses.asdict(self))


def entry_key(parts: Mapping[str, str]) -> str:
    return digest({"version": KEY_VERSION, **parts})


def item_part(item: DatasetItem) -> str:
    """The preprocessing of one item: bucket, source size, frame window and indices, control indices, resize rule."""
    return digest({
        "bucket": list(item.bucket), "original_size": list(item.original_size), "is_video": item.is_video,
        "frame_start": item.frame_start, "frame_count": item.frame_count, "frame_indices": list(item.frame_indices),
        "control_frame_indices": None if item.control_frame_indices is None else list(item.control_frame_indices),
        "resize": RESIZE_RULE,
    })


def media_part(item: DatasetItem, hasher: MediaHasher) -> str:
    control = None if item.control_path is None else hasher.media_hash(item.control_path)
    return digest({"media": hasher.media_hash(item.media_path), "control": control})


def caption_part(caption: str) -> str:
    return digest({"caption": caption})


def latent_parts(item: DatasetItem, hasher: MediaHasher, settings: LatentSettings) -> dict[str, str]:
    return {"media": media_part(item, hasher), "item": item_part(item), "encoder": settings.part()}


def text_parts(caption: str, settings: TextSettings) -> dict[str, str]:
    return {"caption": caption_part(caption), "encoder": settings.part()}


def tokenizer_fingerprint(tokenizer: UMT5Tokenizer) -> str:
    """sha256 of a UMT5Tokenizer's SentencePiece model and its text_len."""
    h = hashlib.sha256(tokenizer.model_bytes)
    h.update(f";text_len={tokenizer.text_len}".encode())
    return h.hexdigest()


def resolve_tokenizer(t5_path: str | os.PathLike[str], tokenizer: TokenizerSource | None = None) -> UMT5Tokenizer:
    """The tokenizer `load_t5` would use: `tokenizer` if given (folder, .model file, bytes or instance), else the
    `spiece_model` tensor embedded in the checkpoint, else `google/umt5-xxl` next to it."""
    metadata = read_metadata(t5_path)
    config = config_from_json(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else None
    text_len = config.text_len if isinstance(config, T5Config) else T5Config().text_len
    if tokenizer is not None:
        return load_tokenizer(tokenizer, text_len)
    embedded = None
    if metadata or str(t5_path).endswith(".safetensors"):
        for part in expand_split_files(t5_path):
            with safe_open(str(part), framework="pt") as f:
                keys = [k for k in f.keys() if k == SPIECE_KEY or k.endswith("." + SPIECE_KEY)]
                if keys:
                    embedded = f.get_tensor(keys[0])
                    break
    return find_tokenizer(t5_path, embedded, text_len)


# --------------------------------------------------------------------------------------------------------------------
# Entries on disk


@dataclass(frozen=True)
class EntryInfo:
    """What an existing cache file says about itself."""

    path: Path
    key: str | None  # None: no wantuner key (musubi's file), no tensor checksums (older cache) or unreadable
    parts: dict[str, str]
    settings: dict[str, Any]
    error: str | None = None  # why the file cannot be used as it is (unreadable, inconsistent, older version)
    digests: dict[str, str] = field(default_factory=dict)  # tensor name -> sha256 of its bytes


def read_entry_info(path: Path) -> EntryInfo | None:
    """None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        metadata = read_metadata(path)
    except (CheckpointError, OSError, ValueError) as error:
        return EntryInfo(path, None, {}, {}, error=f"unreadable ({error})")
    key = metadata.get(KEY_METADATA)
    try:
        entry = json.loads(metadata.get(ENTRY_METADATA, "{}"))
    except ValueError:
        entry = {}
    parts = entry.get("parts") if isinstance(entry, dict) else None
    settings = entry.get("settings") if isinstance(entry, dict) else None
    if not isinstance(parts, dict) or not isinstance(settings, dict) or key != entry_key(parts):
        return EntryInfo(path, None, {}, {}, error=None if key is None else "its wantuner metadata is inconsistent")
    digests = _stored_digests(metadata)
    if digests is None:
        return EntryInfo(path, None, {}, {}, error="written without tensor checksums by an older version")
    return EntryInfo(path, key, parts, settings, digests=digests)


def _stored_digests(metadata: Mapping[str, str]) -> dict[str, str] | None:
    try:
        digests = json.loads(metadata.get(TENSORS_METADATA, "null"))
    except ValueError:
        return None
    return digests if isinstance(digests, dict) and digests else None


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (as stored: contiguous, little-endian, on the CPU)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def corruption(path: Path, tensors: Mapping[str, torch.Tensor], digests: Mapping[str, str] | None) -> str | None:
    """Why a cache file's tensors cannot be trusted (checksum mismatch, missing tensor, NaN/inf), or None. Without
    stored checksums (a musubi file read unverified) only finiteness is checked."""
    if digests is not None:
        if sorted(tensors) != sorted(digests):
            return f"its tensors {sorted(tensors)} are not the ones it was written with {sorted(digests)}"
        for name, tensor in tensors.items():
            if tensor_digest(tensor) != digests[name]:
                return f"tensor {name} does not match its sha256 checksum (the file is corrupt)"
    for name, tensor in tensors.items():
        bad = non_finite_count(tensor)
        if bad:
            return f"tensor {name} holds {bad} NaN/inf value(s)"
    return None


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, _stored_digests(f.metadata() or {})
    except (OSError, SafetensorError) as error:
        raise CacheError(f"{path} cannot be read ({error}); re-run the cache command to encode it again") from None


def is_current(path: Path, key: str) -> bool:
    """The file exists, holds the entry `key` and its tensors match their checksums (a corrupt or older file is
    logged and encoded again)."""
    info = read_entry_info(path)
    if info is None:
        return False
    if info.key is None:
        if info.error:
            logger.info("encoding %s again: %s", path, info.error)
        return False
    if info.key != key:
        return False
    try:
        tensors, digests = _read_tensors(path)
        problem = corruption(path, tensors, digests)
    except CacheError as error:
        problem = str(error)
    if problem is not None:
        logger.warning("encoding %s again: %s", path, problem)
    return problem is None


def _our_metadata(kind: str, parts: Mapping[str, str], settings: Mapping[str, Any],
                  **extra: Any) -> dict[str, str]:
    entry = {"version": KEY_VERSION, "kind": kind, "parts": dict(parts), "settings": dict(settings), **extra}
    return {KEY_METADATA: entry_key(parts), ENTRY_METADATA: json.dumps(entry, sort_keys=True, ensure_ascii=False)}


def _check_finite(name: str, tensor: torch.Tensor, path: Path) -> None:
    if not torch.isfinite(tensor).all():
        raise RuntimeError(f"{name} for {path.name} contains NaN or inf: the encoder overflowed (try another dtype, "
                           "e.g. --vae_dtype bfloat16 or float32); nothing was written for this entry")


def _digests_json(tensors: Mapping[str, torch.Tensor]) -> str:
    return json.dumps({name: tensor_digest(tensor) for name, tensor in tensors.items()}, sort_keys=True)


def latent_tensor_names(latents: torch.Tensor) -> dict[str, str]:
    """musubi's tensor names for one entry's latents [16, F, h, w]: kind -> key."""
    _, frames, height, width = latents.shape
    dtype = dtype_name(latents.dtype)
    shape = f"{frames}x{height}x{width}"
    return {"latents": f"latents_{shape}_{dtype}", "latents_image": f"latents_image_{shape}_{dtype}",
            "latents_control": f"latents_control_{shape}_{dtype}", "clip": f"clip_{dtype}"}


def save_latent_entry(path: Path, item: DatasetItem, parts: Mapping[str, str], settings: LatentSettings,
                      latents: torch.Tensor, *, image_latents: torch.Tensor | None = None,
                      clip: torch.Tensor | None = None, control_latents: torch.Tensor | None = None) -> Path:
    """Write one latent cache file atomically. latents / control [16, F, h, w], image [20, F, h, w] (same dtype),
    clip [257, D] (stored in fp16)."""
    names = latent_tensor_names(latents)
    tensors = {names["latents"]: latents}
    if clip is not None:
        tensors[names["clip"]] = clip.to(CLIP_DTYPE)
    if image_latents is not None:
        tensors[names["latents_image"]] = image_latents.to(latents.dtype)
    if control_latents is not None:
        tensors[names["latents_control"]] = control_latents.to(latents.dtype)
    for name, tensor in tensors.items():
        _check_finite(name, tensor, path)
    metadata = {"architecture": ARCHITECTURE, "width": str(item.original_size[0]),
                "height": str(item.original_size[1]), "format_version": MUSUBI_FORMAT_VERSION}
    if item.is_video:
        metadata["frame_count"] = str(item.frame_count)
    metadata.update(_our_metadata("latents", parts, dataclasses.asdict(settings), media=str(item.media_path),
                                  bucket=list(item.bucket), frames=item.frame_count))
    metadata[TENSORS_METADATA] = _digests_json(tensors)
    return save_safetensors(tensors, path, metadata)


def save_text_entry(path: Path, caption: str, parts: Mapping[str, str], settings: TextSettings,
                    embedding: torch.Tensor) -> Path:
    """Write one T5 cache file atomically: embedding [L, dim] -> varlen_t5_bfloat16."""
    if embedding.dim() != 2:
        raise ValueError(f"a T5 embedding must be [L, dim], got {list(embedding.shape)}")
    tensor = embedding.to(TEXT_DTYPE)
    name = f"{T5_KEY_PREFIX}{dtype_name(TEXT_DTYPE)}"
    _check_finite(name, tensor, path)
    metadata = {"architecture": ARCHITECTURE, "caption1": caption, "format_version": MUSUBI_FORMAT_VERSION}
    metadata.update(_our_metadata("t5", parts, dataclasses.asdict(settings)))
    metadata[TENSORS_METADATA] = _digests_json({name: tensor})
    return save_safetensors({name: tensor}, path, metadata)


def load_checked(path: Path, command: str) -> dict[str, torch.Tensor]:
    """A cache file's tensors, verified against their checksums (when stored) and for NaN/inf; CacheError naming
    the file otherwise."""
    tensors, digests = _read_tensors(path)
    problem = corruption(path, tensors, digests)
    if problem is not None:
        raise CacheError(f"{path}: {problem}; refusing to train on it: run `python -m training {command}` to encode "
                         "it again")
    return tensors


def load_latent_entry(path: Path) -> dict[str, torch.Tensor]:
    """A latent cache file -> {"latents", optionally "latents_image", "latents_control", "clip"} (verified)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in load_checked(path, "cache-latents").items():
        match = _LATENT_KEY.match(key)
        if match:
            out[match.group(1)] = tensor
        elif key.startswith("clip_"):
            out["clip"] = tensor
    if "latents" not in out:
        raise CacheError(f"{path} holds no latents_FxHxW_dtype tensor; it is not a Wan latent cache")
    return out


VAE_NAMES = {16: "the Wan2.1 VAE (wan_2.1_vae)", 48: "the Wan2.2 VAE (wan2.2_vae)"}


def vae_name(channels: int) -> str:
    return VAE_NAMES.get(channels, f"a {channels}-channel VAE")


def stored_latent_channels(path: Path) -> int | None:
    """The channel count of a latent cache file's `latents_*` tensor, from its header (None when it has none or
    cannot be read: the cache check reports such files)."""
    try:
        shapes = peek_shapes(path)
    except (CheckpointError, OSError, ValueError):
        return None
    for key, tensor in shapes.items():
        match = _LATENT_KEY.match(key)
        if match and match.group(1) == "latents":
            return int(tensor.shape[0])
    return None


def check_latent_channels(paths: Iterable[Path], channels: int) -> None:
    """CacheError (one line) naming the first existing cache file whose latents do not have `channels` channels:
    latents of one VAE cannot train a DiT made for the other's (Wan2.1: 16, Wan2.2 TI2V-5B: 48)."""
    for path in paths:
        got = stored_latent_channels(path) if path.is_file() else None
        if got is not None and got != channels:
            raise CacheError(f"{path} holds {got}-channel latents of {vae_name(got)}, but the DiT takes {channels}-"
                             f"channel latents: re-run cache-latents with {vae_name(channels)}")


def load_text_entry(path: Path) -> torch.Tensor:
    """A T5 cache file -> [L, dim] (verified)."""
    tensors = load_checked(path, "cache-text")
    for key, tensor in tensors.items():
        if key.startswith(T5_KEY_PREFIX):
            return tensor
    raise CacheError(f"{path} holds no {T5_KEY_PREFIX}* tensor (keys: {sorted(tensors)}); it is not a Wan T5 cache")


# --------------------------------------------------------------------------------------------------------------------
# Which entries a dataset needs


@dataclass(frozen=True)
class LatentEntry:
    item: DatasetItem
    path: Path


@dataclass(frozen=True)
class TextEntry:
    dataset_index: int
    media_path: Path
    caption: str
    path: Path


def latent_entries(scan: DatasetScan) -> list[LatentEntry]:
    """One entry per distinct cache file; two different items that musubi's naming maps to one file is an error."""
    directories = {cfg.index: cache_directory(cfg) for cfg in scan.config.datasets}
    entries: dict[Path, LatentEntry] = {}
    clashes: list[str] = []
    for item in scan.items:
        path = directories[item.dataset_index] / latent_cache_name(item)
        other = entries.get(path)
        if other is None:
            entries[path] = LatentEntry(item, path)
        elif other.item != item:
            clashes.append(f"{other.item.media_path} and {item.media_path} -> {path.name}")
    if clashes:
        raise ValueError("these items would share one latent cache file (musubi names cache files by the media "
                         "file's stem and source size); rename one of each pair:\n  " + "\n  ".join(clashes))
    return list(entries.values())


def unique_text_entries(entries: Iterable[TextEntry]) -> list[TextEntry]:
    """Drop exact duplicates; two media or captions that map to one T5 cache file is an error."""
    unique: dict[Path, TextEntry] = {}
    clashes: list[str] = []
    for entry in entries:
        other = unique.get(entry.path)
        if other is None:
            unique[entry.path] = entry
        elif (other.media_path, other.caption) != (entry.media_path, entry.caption):
            what = "captions" if other.media_path == entry.media_path else "media files"
            clashes.append(f"{other.media_path} and {entry.media_path} (different {what}) -> {entry.path.name}")
    if clashes:
        raise ValueError("these entries would share one T5 cache file (musubi names it by the media file's stem); "
                         "rename one of each pair or give each its own caption:\n  " + "\n  ".join(clashes))
    return list(unique.values())


def text_entries_for_items(scan: DatasetScan) -> list[TextEntry]:
    directories = {cfg.index: cache_directory(cfg) for cfg in scan.config.datasets}
    return unique_text_entries(
        TextEntry(item.dataset_index, item.media_path, item.caption,
                  directories[item.dataset_index] / text_cache_name(item.media_path))
        for item in scan.items)


def _temp_target(name: str) -> str | None:
    """The file a temporary name of `save_safetensors` / `write_text_atomic` stands for (`.{name}.XXXX.tmp`)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    return name[1:-4].rsplit(".", 1)[0]


def written_by_us(path: Path) -> bool:
    """The file carries this project's cache metadata (an unreadable header does not)."""
    try:
        metadata = read_metadata(path)
    except (CheckpointError, OSError, ValueError):
        return False
    return KEY_METADATA in metadata or ENTRY_METADATA in metadata


def remove_stale(directory: Path, expected: set[str],
                 is_ours: Callable[[str], bool]) -> tuple[list[Path], list[Path]]:
    """Delete the cache files in `directory` that `is_ours` names, that carry this project's cache metadata and
    that `expected` does not list, and temporary files of interrupted writes of such names. Files named like cache
    files without that metadata (a user's `style_wan.safetensors` LoRA, musubi's caches) are left alone and
    reported in one log line. Returns (removed, left alone)."""
    if not directory.is_dir():
        return [], []
    removed, left = [], []
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        target = _temp_target(path.name)
        if target is not None:
            stale = is_ours(target) or target == HASH_INDEX_NAME
        elif is_ours(path.name) and path.name not in expected:
            stale = written_by_us(path)
            if not stale:
                left.append(path)
        else:
            stale = False
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in removed:
        logger.info("removed stale cache file %s", path)
    if left:
        logger.warning("left %d file(s) in %s alone: named like cache files but without this project's cache "
                       "metadata, so not written by it: %s", len(left), directory, ", ".join(p.name for p in left))
    return removed, left


def is_latent_cache_name(name: str) -> bool:
    return name.endswith(LATENT_SUFFIX)


def is_text_cache_name(name: str) -> bool:
    return name.endswith(TEXT_SUFFIX) or name == EMPTY_TEXT_NAME


# --------------------------------------------------------------------------------------------------------------------
# The reader


@dataclass(frozen=True)
class _Problem:
    path: Path
    reason: str


def _load_scan(dataset: str | os.PathLike[str] | DatasetGroupConfig | DatasetScan, bucket_step: int) -> DatasetScan:
    if isinstance(dataset, DatasetScan):
        return dataset
    group = dataset if isinstance(dataset, DatasetGroupConfig) else load_dataset_config(dataset)
    return scan_dataset_group(group, bucket_step)


def _fingerprint(model: str | os.PathLike[str] | None) -> str | None:
    return None if model is None else checkpoint_fingerprint(model)


def _short(value: str | None) -> str:
    return "none" if value is None else value.rsplit(":", 1)[-1][:12]


class CachedDataset:
    """Training batches from the caches of a dataset config, checked against the current files.

    dataset: a dataset TOML path, a parsed `DatasetGroupConfig` or a `DatasetScan`.
    need_image / need_clip / need_control: the task needs `latents_image` (I2V), `clip` (Wan2.1 I2V/FLF2V) or
    `latents_control` (Fun-Control); entries cached without them are an error, and only requested extras are loaded.
    caption_dropout_rate: probability that a sample's T5 context is replaced by the empty caption's.
    vae / clip / t5 (+ tokenizer): checkpoint paths; when given, entries made with other weights are an error.
    latent_channels: the DiT's latent channels; cached latents of another VAE (16 vs 48) are an error (one line).
    They also set the bucket step (that VAE's, as cache-latents uses it; the Wan2.1 VAE's when not given).
    Without them, every entry must still come from the same encoders. verify=False checks only that files exist.
    dtype: the dtype of the returned tensors.

    A batch (`load_batch`, `iter_epoch`, `epoch(...)[i]`) is a dict: "latents" [B, 16, F, h, w], "t5" list of
    [L_i, dim], "captions" list[str] ("" where dropped), "caption_dropped" list[bool], "item_keys" list[str]
    (cache-file stems), "bucket" (W, H, frames), and when requested "latents_image" [B, 20, F, h, w], "clip"
    [B, 257, 1280], "latents_control" [B, 16, F, h, w]. Items with identical (W, H, frames) form a batch of the
    dataset's batch_size, each item `num_repeats` times per epoch, order shuffled by `seed + epoch` (musubi).
    """

    def __init__(self, dataset: str | os.PathLike[str] | DatasetGroupConfig | DatasetScan, *,
                 need_image: bool = False, need_clip: bool = False, need_control: bool = False,
                 caption_dropout_rate: float = 0.0, seed: int = 0,
                 vae: str | os.PathLike[str] | None = None, clip: str | os.PathLike[str] | None = None,
                 t5: str | os.PathLike[str] | None = None, tokenizer: TokenizerSource | None = None,
                 dtype: torch.dtype = torch.float32, verify: bool = True,
                 latent_channels: int | None = None) -> None:
        if not 0.0 <= caption_dropout_rate <= 1.0:
            raise ValueError(f"caption_dropout_rate must be in [0, 1], got {caption_dropout_rate}")
        step = bucket_step(latent_space_stride(latent_channels or WAN21_VAE.z_dim))
        self.scan = _load_scan(dataset, step)
        ensure_not_empty(self.scan)
        self.need_image, self.need_clip, self.need_control = need_image or need_clip, need_clip, need_control
        self.caption_dropout_rate, self.seed, self.dtype = caption_dropout_rate, seed, dtype
        self.latent_entries = {e.item: e for e in latent_entries(self.scan)}
        self.text_entries = {(e.dataset_index, e.media_path): e for e in text_entries_for_items(self.scan)}
        self.empty_paths = [cache_directory(cfg) / EMPTY_TEXT_NAME for cfg in self.scan.config.datasets]
        self._empty: torch.Tensor | None = None
        if latent_channels is not None:
            check_latent_channels((e.path for e in self.latent_entries.values()), latent_channels)
        self._check(verify, vae, clip, t5, tokenizer)
        self.num_batches = len(self.epoch_batches(0))

    # -- verification ------------------------------------------------------------------------------------------

    def _check(self, verify: bool, vae: str | os.PathLike[str] | None, clip: str | os.PathLike[str] | None,
               t5: str | os.PathLike[str] | None, tokenizer: TokenizerSource | None) -> None:
        if verify:
            self._raise(self._latent_problems(vae, clip), self._text_problems(t5, tokenizer))
            return
        missing = [_Problem(path, "missing") for path in self._all_paths() if not path.is_file()]
        self._raise([m for m in missing if is_latent_cache_name(m.path.name)],
                    [m for m in missing if not is_latent_cache_name(m.path.name)])

    def _all_paths(self) -> list[Path]:
        paths = [e.path for e in self.latent_entries.values()] + [e.path for e in self.text_entries.values()]
        return paths + (self.empty_paths if self.caption_dropout_rate > 0 else [])

    def _latent_problems(self, vae: str | os.PathLike[str] | None,
                         clip: str | os.PathLike[str] | None) -> list[_Problem]:
        vae_id, clip_id = _fingerprint(vae), _fingerprint(clip)
        hashers = {cfg.index: MediaHasher(cache_directory(cfg) / HASH_INDEX_NAME) for cfg in self.scan.config.datasets}
        problems, encoders = [], {}
        for entry in self.latent_entries.values():
            info = read_entry_info(entry.path)
            reason = _latent_reason(entry, info, hashers[entry.item.dataset_index], self)
            if reason is None:
                settings = info.settings
                if vae_id is not None and settings.get("vae") != vae_id:
                    reason = f"encoded with another VAE ({_short(settings.get('vae'))}, now {_short(vae_id)})"
                elif clip_id is not None and settings.get("clip") != clip_id:
                    reason = f"encoded with another CLIP ({_short(settings.get('clip'))}, now {_short(clip_id)})"
                else:
                    encoders.setdefault(info.parts["encoder"], []).append(entry.path)
            if reason is not None:
                problems.append(_Problem(entry.path, reason))
        for hasher in hashers.values():
            hasher.save()
        return problems + _mixed(encoders, "latent entries were encoded with different VAE/CLIP settings")

    def _text_problems(self, t5: str | os.PathLike[str] | None, tokenizer: TokenizerSource | None) -> list[_Problem]:
        t5_id = _fingerprint(t5)
        tok_id = None if t5 is None else tokenizer_fingerprint(resolve_tokenizer(t5, tokenizer))
        entries = [(e.path, e.caption) for e in self.text_entries.values()]
        entries += [(p, "") for p in self.empty_paths if p.is_file() or self.caption_dropout_rate > 0]
        problems, encoders = [], {}
        for path, caption in entries:
            info = read_entry_info(path)
            reason = _text_reason(info, caption)
            if reason is None and t5_id is not None and info.settings.get("t5") != t5_id:
                reason = f"encoded with another T5 ({_short(info.settings.get('t5'))}, now {_short(t5_id)})"
            if reason is None and tok_id is not None and info.settings.get("tokenizer") != tok_id:
                reason = "encoded with another tokenizer"
            if reason is None:
                encoders.setdefault(info.parts["encoder"], []).append(path)
            else:
                problems.append(_Problem(path, reason))
        return problems + _mixed(encoders, "T5 entries were encoded with different T5 settings")

    def _raise(self, latent: list[_Problem], text: list[_Problem]) -> None:
        if not latent and not text:
            return
        source = self.scan.config.source or "<dataset config>"
        commands = {"latent": f"cache-latents --dataset_config {source} --vae VAE [--i2v] [--clip CLIP]",
                    "T5": f"cache-text --dataset_config {source} --t5 T5"}
        sections = []
        for problems, kind in ((latent, "latent"), (text, "T5")):
            if not problems:
                continue
            lines = [f"  {p.path}: {p.reason}" for p in problems[:20]]
            if len(problems) > 20:
                lines.append(f"  ... and {len(problems) - 20} more")
            sections.append(f"{len(problems)} {kind} cache entries are missing or stale:\n" + "\n".join(lines)
                            + f"\nrun `python -m training {commands[kind]}` (only these entries are encoded again)")
        raise CacheError(f"the caches do not match the dataset config {source}:\n" + "\n".join(sections))

    # -- batches -----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self, epoch: int) -> list[tuple[DatasetItem, ...]]:
        """The items of each batch of `epoch`, in order (musubi: buckets of (W, H, frames), shuffled by seed+epoch)."""
        return epoch_batches(self.scan, self.seed, epoch)

    @property
    def empty_t5(self) -> torch.Tensor:
        """The empty caption's T5 output [L, dim] (written by cache-text into every cache directory)."""
        if self._empty is None:
            path = next((p for p in self.empty_paths if p.is_file()), None)
            if path is None:
                raise CacheError(f"no empty-caption T5 cache ({EMPTY_TEXT_NAME}) in {self.empty_paths[0].parent}; "
                                 "run `python -m training cache-text` for this dataset config")
            self._empty = load_text_entry(path)
        return self._empty.to(self.dtype)

    def load_batch(self, items: Sequence[DatasetItem], *, epoch: int = 0, index: int = 0,
                   extras: str = "requested") -> dict[str, Any]:
        """Load one batch; caption dropout draws are seeded by (seed, epoch, index), so a re-run repeats them.

        extras="requested": latents_image / clip / latents_control as need_* asked (an error when missing);
        "available": each of them that every item of the batch has cached.
        """
        if not items or len({item.batch_key for item in items}) != 1:
            raise ValueError(f"a batch needs items of one (W, H, frames) bucket, got {[i.batch_key for i in items]}")
        rng = random.Random(f"caption-dropout:{self.seed}:{epoch}:{index}")
        dropped = [self.caption_dropout_rate > 0 and rng.random() < self.caption_dropout_rate for _ in items]
        paths = [self.latent_entries[item].path for item in items]
        latents = [load_latent_entry(path) for path in paths]
        batch: dict[str, Any] = {"latents": self._stack(latents, "latents", paths)}
        for name, needed in (("latents_image", self.need_image), ("clip", self.need_clip),
                             ("latents_control", self.need_control)):
            if needed if extras == "requested" else all(name in e for e in latents):
                batch[name] = self._stack(latents, name, paths)
        batch["t5"] = [self.empty_t5 if drop else
                       load_text_entry(self.text_entries[(item.dataset_index, item.media_path)].path).to(self.dtype)
                       for item, drop in zip(items, dropped)]
        batch["captions"] = ["" if drop else item.caption for item, drop in zip(items, dropped)]
        batch["caption_dropped"] = dropped
        batch["item_keys"] = [path.name[: -len(LATENT_SUFFIX)] for path in paths]
        batch["bucket"] = items[0].batch_key
        return batch

    def _stack(self, entries: list[dict[str, torch.Tensor]], name: str, paths: Sequence[Path]) -> torch.Tensor:
        missing = [path for path, entry in zip(paths, entries) if name not in entry]
        if missing:
            flag = {"latents_image": "--i2v", "clip": "--clip", "latents_control": "a control_directory"}[name]
            raise CacheError(f"{missing[0]} has no {name} tensor: re-run cache-latents with {flag}")
        return torch.stack([e[name] for e in entries]).to(self.dtype)

    def iter_epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        for index, items in enumerate(self.epoch_batches(epoch)):
            yield self.load_batch(items, epoch=epoch, index=index)

    def epoch(self, epoch: int) -> EpochBatches:
        """A map-style torch Dataset of this epoch's batches (use with DataLoader(batch_size=None, ...))."""
        return EpochBatches(self, epoch)


class EpochBatches(torch.utils.data.Dataset):
    """Batch i of one epoch of a CachedDataset."""

    def __init__(self, dataset: CachedDataset, epoch: int) -> None:
        self.dataset, self.epoch = dataset, epoch
        self.batches = dataset.epoch_batches(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset.load_batch(self.batches[index], epoch=self.epoch, index=index)


class CacheSource:
    """The training loop's `BatchSource` (training.dataset.batches) over a checked `CachedDataset`: one `TrainItem`
    per latent
    entry (key = the cache file's stem, bucket = (W, H, frames), dataset = its index); `load` returns every extra
    (latents_image, clip, latents_control) that all items of the batch have; `empty_t5` is None when not cached.
    Caption dropout and batch planning are the training loop's."""

    def __init__(self, dataset: CachedDataset) -> None:
        self.dataset = dataset
        self._items: dict[tuple[int, str], DatasetItem] = {}
        self._train_items = []
        for entry in dataset.latent_entries.values():
            key = entry.path.name[: -len(LATENT_SUFFIX)]
            self._items[(entry.item.dataset_index, key)] = entry.item
            self._train_items.append(TrainItem(key, entry.item.batch_key, entry.item.dataset_index))
        self._batching = {cfg.index: DatasetBatching(cfg.batch_size, cfg.num_repeats)
                          for cfg in dataset.scan.config.datasets}
        self.empty_t5 = dataset.empty_t5 if any(p.is_file() for p in dataset.empty_paths) else None

    def items(self) -> list[TrainItem]:
        return list(self._train_items)

    def batching(self, dataset: int) -> DatasetBatching:
        return self._batching[dataset]

    def load(self, items: Sequence[TrainItem]) -> dict[str, Any]:
        return self.dataset.load_batch([self._items[(item.dataset, item.key)] for item in items], extras="available")

    def describe(self, item: TrainItem) -> str:
        """An item's cache files (for error messages)."""
        entry = self._items[(item.dataset, item.key)]
        text = self.dataset.text_entries[(entry.dataset_index, entry.media_path)].path
        return f"{self.dataset.latent_entries[entry].path} (T5 {text.name})"


def open_training_source(dataset: str | os.PathLike[str] | DatasetGroupConfig | DatasetScan,
                         **options: Any) -> CacheSource:
    """`CacheSource(CachedDataset(dataset, **options))`: the caches of a dataset config, checked, for training."""
    return CacheSource(CachedDataset(dataset, **options))


def _latent_reason(entry: LatentEntry, info: EntryInfo | None, hasher: MediaHasher,
                   reader: CachedDataset) -> str | None:
    if info is None:
        return "missing"
    if info.key is None:
        return info.error or "written without a content key (musubi's cache?)"
    try:
        media = media_part(entry.item, hasher)
    except (OSError, MediaReadError) as error:
        return f"its media cannot be read: {error}"
    if info.parts.get("media") != media:
        return f"{entry.item.media_path.name} (or its control) changed since it was cached"
    if info.parts.get("item") != item_part(entry.item):
        return "the preprocessing changed (bucket, frame window, source_fps or control frames)"
    settings = info.settings
    if reader.need_image and not settings.get("i2v"):
        return "cached without --i2v (no latents_image), which this task needs"
    if reader.need_clip and settings.get("clip") is None:
        return "cached without --clip (no CLIP features), which Wan2.1 I2V needs"
    if reader.need_control and entry.item.control_path is None:
        return "the dataset has no control_directory, which Fun-Control needs"
    return None


def _text_reason(info: EntryInfo | None, caption: str) -> str | None:
    if info is None:
        return "missing"
    if info.key is None:
        return info.error or "written without a content key (musubi's cache?)"
    if info.parts.get("caption") != caption_part(caption):
        return "the caption changed since it was cached"
    return None


def _mixed(groups: dict[str, list[Path]], what: str) -> list[_Problem]:
    """When entries come from more than one encoder setting, every entry outside the largest group is a problem."""
    if len(groups) < 2:
        return []
    ordered = sorted(groups.values(), key=len, reverse=True)
    return [_Problem(path, f"{what}; this one differs from the other {len(ordered[0])}")
            for group in ordered[1:] for path in group]
