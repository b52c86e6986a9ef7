"""Reading and writing checkpoints: safetensors (memory-mapped, split files), `.pth` (weights_only), prefixes,
meta-device construction and strict loading with readable reports, and atomic writes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
M = TypeVar("M", bound=torch.nn.Module)

# Prefixes seen on Wan checkpoints (ComfyUI's unet_prefix_from_state_dict accepts the same family).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "net.", "model.")
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.safetensors$")
# A sharded model folder (official Wan2.2 expert folders, diffusers `transformer/`): the shards and an index json
# whose `weight_map` names the shard of every tensor.
INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, corrupt, or of an unknown layout."""


class NonFiniteError(CheckpointError):
    """Tensors holding NaN or inf values where finite numbers are required (weights being loaded or saved)."""


# fp8 formats have no isfinite or sum kernel: their NaN/inf encodings are found from the stored bytes. e4m3fn has
# no inf and NaN is S.1111.111 (bytes 0x7F, 0xFF); e5m2 has inf and NaN with the exponent all ones (S.11111.xx, bytes
# 0x7C-0x7F and 0xFC-0xFF); the fnuz formats have one NaN, 0x80. dtype -> (mask, bits): byte & mask == bits.
_FP8_NON_FINITE = {torch.float8_e4m3fn: (0x7F, 0x7F), torch.float8_e5m2: (0x7C, 0x7C),
                   torch.float8_e4m3fnuz: (0xFF, 0x80), torch.float8_e5m2fnuz: (0xFF, 0x80)}
_FINITE_CHUNK = 1 << 26  # elements per exact isfinite pass, so the boolean mask stays at most 64 MiB


def _may_hold_non_finite(values: torch.Tensor) -> bool:
    """A one-reduction filter: False guarantees every value is finite. A float sum is NaN/inf whenever a value is
    (it can also overflow for finite values, which the exact count then clears); fp8 non-finite bytes are the
    largest signed (0x7F, or 0x7C.. for e5m2) or unsigned (0xFF, or 0xFC..) bytes, or 0x80 (fnuz)."""
    pattern = _FP8_NON_FINITE.get(values.dtype)
    if pattern is None:
        return not bool(torch.isfinite(values.sum()))
    if pattern[0] == 0xFF:
        return int(values.view(torch.int8).min()) == -128
    return int(values.view(torch.int8).max()) >= pattern[1] or int(values.view(torch.uint8).max()) >= 0x80 | pattern[1]


def _finite_mask(values: torch.Tensor) -> torch.Tensor:
    pattern = _FP8_NON_FINITE.get(values.dtype)
    if pattern is None:
        return torch.isfinite(values)
    mask, bits = pattern
    return (values.view(torch.uint8) & mask) != bits


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many NaN/inf values `tensor` holds (0 for integer tensors): one reduction when there are none, else an
    exact count in chunks of 64 Mi elements."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    flat = tensor.detach().reshape(-1)
    if not _may_hold_non_finite(flat):
        return 0
    count = 0
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        finite = _finite_mask(flat[start: start + _FINITE_CHUNK])
        count += int(finite.numel() - finite.sum())
    return count


def require_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming `what` and the first tensor that holds NaN or inf values."""
    for key, tensor in tensors.items():
        bad = non_finite_count(tensor)
        if bad:
            raise NonFiniteError(f"{what}: tensor {key!r} holds {bad} NaN/inf value(s) of {tensor.numel()}; "
                                 "refusing to use non-finite weights (a corrupt file or a diverged training run)")


def _index_shards(index: Path) -> list[Path]:
    """The shard files an index json names (in name order; each must exist)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a safetensors index (a json with a 'weight_map'): {exc}") from None
    parts = [index.parent / name for name in names]
    missing = [p.name for p in parts if not p.is_file()]
    if missing or not parts:
        raise FileNotFoundError(f"sharded checkpoint {index.parent} is incomplete: missing "
                                f"{', '.join(missing) or 'every shard (empty weight_map)'}")
    return parts


def expand_split_files(path: str | os.PathLike) -> list[Path]:
    """`x-00001-of-00003.safetensors` -> all three parts (each must exist); `x.safetensors.index.json` -> the shards
    it names; other paths -> [path]."""
    path = Path(path)
    if path.name.endswith(INDEX_SUFFIX):
        return _index_shards(path)
    match = _SPLIT_RE.match(path.name)
    if not match:
        return [path]
    total = int(match["total"])
    parts = [path.with_name(f"{match['stem']}-{i:05d}-of-{total:05d}.safetensors") for i in range(1, total + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise FileNotFoundError(f"split checkpoint {path.name} is incomplete: missing {', '.join(missing)}")
    return parts


def _check_safetensors_header(path: Path) -> dict:
    """Validate the header and the declared data size, so truncated files fail with a clear message."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{path} is not a valid safetensors file (header length {header_len}, "
                                  f"file size {size}); the file is corrupt or truncated")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {exc}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path} is truncated: its header declares {8 + header_len + end} bytes but the file "
                              f"has {size}; download it again")
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (first part of a split file); {} for `.pth`."""
    path = expand_split_files(_existing(path))[0]
    if not _is_safetensors(path):
        return {}
    return dict(_check_safetensors_header(path).get("__metadata__") or {})


def _existing(path: str | os.PathLike) -> Path:
    """The checkpoint file `path` names: the file itself, or for a sharded model folder its index json."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():
        indexes = sorted(path.glob("*" + INDEX_SUFFIX))
        if len(indexes) == 1:
            return indexes[0]
        found = f"{len(indexes)} index files" if indexes else f"no *{INDEX_SUFFIX}"
        raise CheckpointError(f"{path} is a directory with {found}; pass the path of a .safetensors or .pth file, "
                              f"or a sharded model folder (safetensors shards and one *{INDEX_SUFFIX})")
    return path


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors" or path.name.endswith(INDEX_SUFFIX) or _looks_like_safetensors(path)


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def peek_shapes(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Key -> meta tensor of the stored shape and dtype, without reading any data (safetensors headers; `.pth`
    files are memory-mapped)."""
    path = _existing(path)
    if _is_safetensors(path):
        dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                  "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
        out = {}
        for part in expand_split_files(path):
            for key, info in _check_safetensors_header(part).items():
                if key != "__metadata__":
                    out[key] = torch.empty(info["shape"], dtype=dtypes.get(info["dtype"], torch.uint8), device="meta")
        return out
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in _load_pth(path, "cpu", None).items()}


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu",
                    keys: Callable[[str], bool] | None = None) -> StateDict:
    """Load tensors from a `.safetensors` (memory-mapped; split files and sharded folders expanded) or
    `.pth`/`.pt`/`.bin` file.

    `keys` optionally filters which tensors are read (others are never touched, which matters for mmap).
    """
    path = _existing(path)
    if _is_safetensors(path):
        out: StateDict = {}
        for part in expand_split_files(path):
            _check_safetensors_header(part)
            with safe_open(str(part), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if keys is None or keys(key):
                        out[key] = f.get_tensor(key)
        return out
    return _load_pth(path, device, keys)


def _load_pth(path: Path, device: str | torch.device, keys: Callable[[str], bool] | None) -> StateDict:
    def load(mmap: bool) -> object:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)

    try:
        try:
            data = load(mmap=True)
        except RuntimeError as exc:  # old (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            data = load(mmap=False)
    except Exception as exc:  # pickle, zip and weights_only refusals, garbage files
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint (loaded with weights_only=True): "
                              f"{type(exc).__name__}: {exc}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(data, dict) and wrapper in data and isinstance(data[wrapper], dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return {k: v for k, v in data.items() if keys is None or keys(k)}


def strip_prefix(sd: Mapping[str, torch.Tensor], sentinel: str,
                 prefixes: Iterable[str] = KNOWN_PREFIXES) -> StateDict:
    """Remove the first known prefix under which `sentinel` is found (e.g. `model.diffusion_model.`)."""
    if sentinel in sd:
        return dict(sd)
    for prefix in prefixes:
        if prefix + sentinel in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def build_on_meta(factory: Callable[[], M]) -> M:
    """Construct a module without allocating or initialising its parameters."""
    with torch.device("meta"):
        return factory()


def load_into(model: M, sd: Mapping[str, torch.Tensor], *, what: str = "model", strict: bool = True) -> M:
    """`load_state_dict(assign=True)` with a readable report of missing / unexpected / mis-shaped keys; tensors
    with NaN or inf values are refused (NonFiniteError naming the key).

    Buffers that are not in the state dict (computed ones such as RoPE tables) must be re-materialised by the
    caller; parameters are taken as they are (no copy), so peak memory stays about one copy of the weights.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in expected
             if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{what}: key {k!r} has shape {list(got)} but the model expects {list(want)}"
                              + (f" (and {len(wrong) - 1} more mismatches)" if len(wrong) > 1 else ""))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{what}: the checkpoint does not match the architecture: "
                              f"{_preview('missing', missing)}{_preview('unexpected', unexpected)}")
    require_finite(sd, what)
    model.load_state_dict(dict(sd), strict=False, assign=True)
    return model


def _preview(label: str, keys: list[str], n: int = 5) -> str:
    if not keys:
        return ""
    more = f" ... (+{len(keys) - n})" if len(keys) > n else ""
    return f"{len(keys)} {label} key(s): {', '.join(keys[:n])}{more}; "


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import (os.umask can only be read by setting it)


def new_file_mode() -> int:
    """The mode an ordinary new file gets (0o666 minus the umask): temp files from mkstemp are 0o600 and keep that
    mode through the rename unless it is set."""
    return 0o666 & ~_UMASK


# ----------------------------------------------------------------------------------------------------------------
# Temporary files of atomic writes, and their leftovers
# ----------------------------------------------------------------------------------------------------------------

# Every atomic write here and in wan_core.media.io / training writes `.{name}.XXXXXXXX.tmp[.ext]` next to its target
# (XXXXXXXX: tempfile's random part; `.ext` kept where a writer picks the format from the name), then renames it.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(?:\.[A-Za-z0-9]+)?$")
STALE_TEMP_SECONDS = 600.0  # a temporary file untouched this long belongs to no running writer
_CLEANED: set[str] = set()  # folders already cleaned by this process


def temp_target(name: str) -> str | None:
    """The file name a temporary name of ours stands for, or None when `name` is not one."""
    match = _TEMP_NAME.match(name)
    return match["target"] if match else None


def clean_stale_temps(folder: str | os.PathLike, min_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove the leftovers of interrupted atomic writes in `folder` (a killed process cannot remove them): files
    and folders named like our temporary files and not modified for `min_age` seconds, so that a concurrent
    writer's file stays. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - min_age
    removed = []
    for path in sorted(folder.iterdir()):
        try:
            if temp_target(path.name) is None or path.is_symlink() or path.stat().st_mtime > cutoff:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as error:  # gone meanwhile, or not ours to remove
            logger.debug("left %s: %s", path, error)
            continue
        removed.append(path)
        logger.info("removed the leftover of an interrupted write: %s", path)
    return removed


def clean_stale_temps_once(folder: str | os.PathLike) -> list[Path]:
    """clean_stale_temps, at most once per folder per process."""
    key = os.path.realpath(folder)
    if key in _CLEANED:
        return []
    _CLEANED.add(key)
    return clean_stale_temps(folder)


def make_temp(target: str | os.PathLike, ext: str = "", directory: bool = False) -> Path:
    """A new empty temporary file (or folder) for `target`, in its folder (created if missing), named
    `.{target name}.XXXXXXXX.tmp{ext}`; stale leftovers in that folder are cleaned first (once per process)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps_once(target.parent)
    prefix, suffix = f".{target.name}.", f".tmp{ext}"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to a temporary file in the same folder, then rename; the file gets the ordinary mode."""
    path = Path(path)
    tmp = make_temp(path)
    try:
        os.chmod(tmp, new_file_mode())
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write atomically: a temporary file in the same folder, then rename (an interrupted run leaves no file)."""
    path = Path(path)
    tmp = make_temp(path)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, new_file_mode())  # after save_file, which may recreate the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------------------------
# Output folders
# ----------------------------------------------------------------------------------------------------------------


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create folder `path` if missing and prove it writable (a temporary file is created and removed); ValueError
    naming `what` when it is a file, lies under a file, cannot be created or cannot be written. Run it before
    loading models, so a bad output folder fails in seconds instead of after the work."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"lies under the file {blocker}"
        raise ValueError(f"{what} {path} {where}; expected a folder (it is created when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "no write permission")
        make_temp(path / "write-test").unlink()
    except OSError as error:
        raise ValueError(f"{what} {path} is not writable ({error.strerror or error})") from None
    return path


def ensure_writable_file(path: str | os.PathLike, what: str) -> Path:
    """`path` can be written as a file: not an existing folder, and its folder passes ensure_writable_dir."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; expected a file name")
    ensure_writable_dir(path.parent, f"{what} {path}: its folder")
    return path
