"""musubi-tuner's dataset TOML schema: `[general]` + `[[datasets]]`, parsed into frozen dataclasses.

A `[[datasets]]` table is a video dataset when it has `video_directory` or `video_jsonl_file`, otherwise an image
dataset. The ascendable keys (`resolution`, `caption_extension`, `batch_size`, `num_repeats`, `enable_bucket`,
`bucket_no_upscale`) may sit in `[general]` or in a dataset; the dataset's value wins. Video keys are per dataset.

Validation has two levels:

- `parse_dataset_config` checks every key on its own (name, type, range) and accepts each example of musubi's
  `docs/dataset_config.md` unchanged, including the fragments that show only a few keys of a dataset.
- `check_dataset_group` checks that the group can be built: every dataset names its data, a directory dataset has a
  `caption_extension`, and no two datasets share a cache directory (musubi raises the same error; the cache directory
  defaults to the data directory).

`load_dataset_config` reads a TOML file and runs both.

`target_frames` values are rounded down to the nearest 4N+1 (`(f - 1) // 4 * 4 + 1`, e.g. 24 -> 21, 25 -> 25), then
de-duplicated and sorted, as musubi's `VideoDataset` does; a warning names the rounded values.

Relative paths are kept as written; like musubi they are resolved against the current working directory.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

FRAME_EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")
VAE_FRAME_STRIDE = 4  # the Wan VAE encodes 4N+1 frames
DEFAULT_RESOLUTION = (960, 544)
BUCKET_STEP = 16  # VAE stride 8 x patch size 2
MIN_BUCKET_AREA = (2 * BUCKET_STEP) ** 2  # the smallest candidate side, sqrt(area) / 2, must be >= 16

# Keys that musubi renamed; the old name is accepted with a warning (musubi's `load_user_config`).
DEPRECATED_KEYS = {
    "flux_kontext_no_resize_control": "no_resize_control",
    "qwen_image_edit_no_resize_control": "no_resize_control",
    "qwen_image_edit_control_resolution": "control_resolution",
}

# Keys musubi accepts for other architectures (FramePack, Qwen-Image, FLUX); Wan training ignores them.
_OTHER_ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "multiple_target": False,
    "fp_latent_window_size": 9,
    "fp_1f_clean_indices": None,
    "fp_1f_target_index": None,
    "fp_1f_no_post": False,
    "no_resize_control": False,
    "control_resolution": None,
}


def round_frames_4n1(frames: int) -> int:
    """Round a frame count down to the nearest 4N+1 (musubi's rule): 1 -> 1, 4 -> 1, 5 -> 5, 24 -> 21."""
    if frames < 1:
        raise ValueError(f"a frame count must be at least 1, got {frames}")
    return (frames - 1) // VAE_FRAME_STRIDE * VAE_FRAME_STRIDE + 1


# --------------------------------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(frozen=True)
class GeneralConfig:
    """The `[general]` table: defaults for the ascendable keys; None means "not set"."""

    resolution: tuple[int, int] | None = None
    caption_extension: str | None = None
    batch_size: int | None = None
    num_repeats: int | None = None
    enable_bucket: bool | None = None
    bucket_no_upscale: bool | None = None


@dataclass(frozen=True, kw_only=True)
class _DatasetConfigBase:
    index: int = 0  # position in `[[datasets]]`, used in messages
    resolution: tuple[int, int] = DEFAULT_RESOLUTION  # (W, H)
    caption_extension: str | None = None
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False  # ignored unless enable_bucket
    cache_directory: str | None = None
    control_directory: str | None = None

    @property
    def label(self) -> str:
        return f"datasets[{self.index}]"

    @property
    def directory(self) -> str | None:
        raise NotImplementedError

    @property
    def jsonl_file(self) -> str | None:
        raise NotImplementedError

    @property
    def resolved_cache_directory(self) -> str | None:
        """The cache directory, which defaults to the data directory (musubi); None for a JSONL dataset without one."""
        return self.cache_directory if self.cache_directory is not None else self.directory


@dataclass(frozen=True, kw_only=True)
class ImageDatasetConfig(_DatasetConfigBase):
    """An image dataset (`image_directory` or `image_jsonl_file`)."""

    image_directory: str | None = None
    image_jsonl_file: str | None = None
    # Accepted for musubi compatibility, unused by Wan training:
    multiple_target: bool = False
    fp_latent_window_size: int = 9
    fp_1f_clean_indices: tuple[int, ...] | None = None
    fp_1f_target_index: int | None = None
    fp_1f_no_post: bool = False
    no_resize_control: bool = False
    control_resolution: tuple[int, int] | None = None

    is_video = False

    @property
    def directory(self) -> str | None:
        return self.image_directory

    @property
    def jsonl_file(self) -> str | None:
        return self.image_jsonl_file


@dataclass(frozen=True, kw_only=True)
class VideoDatasetConfig(_DatasetConfigBase):
    """A video dataset (`video_directory` or `video_jsonl_file`); `target_frames` are already 4N+1."""

    video_directory: str | None = None
    video_jsonl_file: str | None = None
    target_frames: tuple[int, ...] = (1,)
    frame_extraction: str = "head"
    frame_stride: int = 1  # slide
    frame_sample: int = 1  # uniform
    max_frames: int = 129  # full
    source_fps: float | None = None  # frames are dropped to reach 16 fps when set
    fp_latent_window_size: int = 9  # FramePack only

    is_video = True

    @property
    def directory(self) -> str | None:
        return self.video_directory

    @property
    def jsonl_file(self) -> str | None:
        return self.video_jsonl_file


DatasetConfig = ImageDatasetConfig | VideoDatasetConfig


@dataclass(frozen=True)
class DatasetGroupConfig:
    """A whole dataset TOML: the `[general]` defaults and the resolved datasets."""

    general: GeneralConfig
    datasets: tuple[DatasetConfig, ...]
    source: str | None = None  # the TOML file it came from, if any


# --------------------------------------------------------------------------------------------------------------------
# Value validators: each takes the raw TOML value and returns the converted one or raises ValueError(expected ...).


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _int(value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer >= {minimum}, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"expected an integer >= {minimum}, got {value}")
    return value


def _positive_int(value: Any) -> int:
    return _int(value, 1)


def _non_negative_int(value: Any) -> int:
    return _int(value, 0)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_describe(value)}")
    return value


def _positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"expected a number > 0 such as 30.0, got {_describe(value)}")
    return float(value)


def _int_list(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of integers, got {_describe(value)}")
    return tuple(_non_negative_int(v) for v in value)


def _resolution(value: Any) -> tuple[int, int]:
    """An int (square) or [W, H], each side >= 16."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"expected an integer or a [width, height] pair, got {_describe(value)}")
    try:
        width, height = (_int(v, BUCKET_STEP) for v in value)
    except ValueError as error:
        raise ValueError(f"expected an integer or a [width, height] pair of integers >= 16, got {value!r}") from error
    return width, height


def _frame_extraction(value: Any) -> str:
    if value not in FRAME_EXTRACTION_MODES:
        raise ValueError(f"expected one of {', '.join(FRAME_EXTRACTION_MODES)}, got {_describe(value)}")
    return value


def _target_frames(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of frame counts such as [1, 25, 45], got {_describe(value)}")
    return tuple(_positive_int(v) for v in value)


Validator = Callable[[Any], Any]

ASCENDABLE_KEYS: dict[str, Validator] = {
    "resolution": _resolution,
    "caption_extension": _string,
    "batch_size": _positive_int,
    "num_repeats": _positive_int,
    "enable_bucket": _bool,
    "bucket_no_upscale": _bool,
}
IMAGE_KEYS: dict[str, Validator] = {
    "image_directory": _string,
    "image_jsonl_file": _string,
    "cache_directory": _string,
    "control_directory": _string,
    "multiple_target": _bool,
    "fp_latent_window_size": _positive_int,
    "fp_1f_clean_indices": _int_list,
    "fp_1f_target_index": _non_negative_int,
    "fp_1f_no_post": _bool,
    "no_resize_control": _bool,
    "control_resolution": _resolution,
}
VIDEO_KEYS: dict[str, Validator] = {
    "video_directory": _string,
    "video_jsonl_file": _string,
    "control_directory": _string,
    "cache_directory": _string,
    "target_frames": _target_frames,
    "frame_extraction": _frame_extraction,
    "frame_stride": _positive_int,
    "frame_sample": _positive_int,
    "max_frames": _positive_int,
    "source_fps": _positive_float,
    "fp_latent_window_size": _positive_int,
}


# --------------------------------------------------------------------------------------------------------------------
# Parsing


class _Problems:
    """Collects every problem of a config so that one error lists them all."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"{where}: {message}")

    def raise_if_any(self, source: str | None) -> None:
        if self.lines:
            origin = f" in {source}" if source else ""
            raise ValueError(f"invalid dataset config{origin}:\n  " + "\n  ".join(self.lines))


def _unknown_key_message(key: str, allowed: Mapping[str, Any], kind: str) -> str:
    hint = difflib.get_close_matches(key, list(allowed), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    if kind == "image dataset" and key in VIDEO_KEYS:
        suggestion = " (a video key: a video dataset needs video_directory or video_jsonl_file)"
    if kind == "[general]" and (key in IMAGE_KEYS or key in VIDEO_KEYS):
        suggestion = " (set it in each [[datasets]] table, not in [general])"
    return f"unknown key {key!r} for {kind}{suggestion}; allowed keys: {', '.join(sorted(allowed))}"


def _validate_table(table: Mapping[str, Any], schema: Mapping[str, Validator], where: str, kind: str,
                    problems: _Problems) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in schema:
            problems.add(where, _unknown_key_message(key, schema, kind))
            continue
        try:
            values[key] = schema[key](raw)
        except ValueError as error:
            problems.add(where, f"{key}: {error}")
    return values


def _rename_deprecated(table: dict[str, Any], where: str) -> dict[str, Any]:
    table = dict(table)
    for old, new in DEPRECATED_KEYS.items():
        if old not in table:
            continue
        value = table.pop(old)
        if new in table:
            logger.warning("%s: deprecated key %r is ignored because %r is set", where, old, new)
        else:
            logger.warning("%s: deprecated key %r; use %r instead", where, old, new)
            table[new] = value
    return table


def _parse_general(raw: Any, problems: _Problems) -> GeneralConfig:
    if raw is None:
        return GeneralConfig()
    if not isinstance(raw, dict):
        problems.add("[general]", f"expected a table, got {_describe(raw)}")
        return GeneralConfig()
    return GeneralConfig(**_validate_table(raw, ASCENDABLE_KEYS, "[general]", "[general]", problems))


def _round_target_frames(frames: tuple[int, ...], where: str) -> tuple[int, ...]:
    rounded = tuple(sorted({round_frames_4n1(f) for f in frames}))
    if rounded != tuple(sorted(set(frames))):
        logger.warning("%s: target_frames %s rounded down to 4N+1: %s", where, list(frames), list(rounded))
    return rounded


def _check_dataset_values(values: dict[str, Any], is_video: bool, where: str, problems: _Problems) -> None:
    """Rules that involve more than one key of one dataset."""
    directory_key, jsonl_key = ("video_directory", "video_jsonl_file") if is_video else ("image_directory",
                                                                                        "image_jsonl_file")
    if directory_key in values and jsonl_key in values:
        problems.add(where, f"{directory_key} and {jsonl_key} are mutually exclusive; set one of them")
    if jsonl_key in values and "cache_directory" not in values:
        problems.add(where, f"cache_directory is required with {jsonl_key}")
    if jsonl_key in values and "control_directory" in values:
        problems.add(where, f"control_directory is not used with {jsonl_key}; give control_path in each JSONL line")


def _resolve_dataset(values: dict[str, Any], general: GeneralConfig, index: int, is_video: bool,
                     problems: _Problems) -> DatasetConfig:
    where = f"datasets[{index}]"
    for key in ASCENDABLE_KEYS:
        if key not in values and getattr(general, key) is not None:
            values[key] = getattr(general, key)
    if "target_frames" in values:
        values["target_frames"] = _round_target_frames(values["target_frames"], where)
    if values.get("frame_extraction") == "chunk" and 1 in values.get("target_frames", (1,)):
        logger.warning("%s: frame_extraction \"chunk\" with 1 in target_frames makes every frame a sample", where)
    resolution = values.get("resolution", DEFAULT_RESOLUTION)
    if not values.get("enable_bucket", False) and any(side % BUCKET_STEP for side in resolution):
        problems.add(where, f"resolution {list(resolution)} must be a multiple of 16 on each side when "
                            "enable_bucket is false (that size is used as is)")
    if values.get("enable_bucket", False) and resolution[0] * resolution[1] < MIN_BUCKET_AREA:
        problems.add(where, f"resolution {list(resolution)} is too small for bucketing: width x height must be at "
                            f"least {MIN_BUCKET_AREA}")
    if not is_video:
        for key, default in _OTHER_ARCHITECTURE_DEFAULTS.items():
            if key in values and values[key] != default:
                logger.warning("%s: %s = %r is accepted for musubi compatibility but unused by Wan training",
                               where, key, values[key])
    cls = VideoDatasetConfig if is_video else ImageDatasetConfig
    return cls(index=index, **values)


def _parse_dataset(raw: Any, index: int, general: GeneralConfig, problems: _Problems) -> DatasetConfig | None:
    where = f"datasets[{index}]"
    if not isinstance(raw, dict):
        problems.add(where, f"expected a table, got {_describe(raw)}")
        return None
    raw = _rename_deprecated(raw, where)
    is_video = "video_directory" in raw or "video_jsonl_file" in raw
    schema = {**ASCENDABLE_KEYS, **(VIDEO_KEYS if is_video else IMAGE_KEYS)}
    kind = "video dataset" if is_video else "image dataset"
    count = len(problems.lines)
    values = _validate_table(raw, schema, f"{where} ({kind})", kind, problems)
    _check_dataset_values(values, is_video, where, problems)
    if len(problems.lines) > count:
        return None
    return _resolve_dataset(values, general, index, is_video, problems)


def parse_dataset_config(data: Mapping[str, Any], source: str | None = None) -> DatasetGroupConfig:
    """Validate a decoded dataset TOML (a dict) key by key and resolve it into a `DatasetGroupConfig`.

    Raises ValueError listing every problem (unknown keys with the dataset index, wrong types, bad values).
    """
    problems = _Problems()
    for key in data:
        if key not in ("general", "datasets"):
            problems.add("top level", f"unknown table {key!r}; a dataset config has [general] and [[datasets]]")
    general = _parse_general(data.get("general"), problems)
    raw_datasets = data.get("datasets")
    datasets: list[DatasetConfig] = []
    if not isinstance(raw_datasets, list) or not raw_datasets:
        problems.add("top level", "no [[datasets]] table; add at least one [[datasets]] with image_directory, "
                                  "image_jsonl_file, video_directory or video_jsonl_file")
    else:
        for index, raw in enumerate(raw_datasets):
            dataset = _parse_dataset(raw, index, general, problems)
            if dataset is not None:
                datasets.append(dataset)
    problems.raise_if_any(source)
    return DatasetGroupConfig(general=general, datasets=tuple(datasets), source=source)


def _normalized(path: str) -> str:
    return os.path.normcase(os.path.abspath(os.path.expanduser(path)))


def check_dataset_group(group: DatasetGroupConfig) -> None:
    """Check that the group can be built; raises ValueError listing every problem.

    Every dataset needs a data source; a directory dataset needs `caption_extension`; cache directories (which
    default to the data directory) must differ between datasets, otherwise cache files would be shared by accident.
    """
    problems = _Problems()
    owners: dict[str, int] = {}
    for dataset in group.datasets:
        kind = "video" if dataset.is_video else "image"
        if dataset.directory is None and dataset.jsonl_file is None:
            problems.add(dataset.label, f"no data: set {kind}_directory or {kind}_jsonl_file")
        if dataset.directory is not None and dataset.caption_extension is None:
            problems.add(dataset.label, f"caption_extension is required with {kind}_directory (e.g. \".txt\"), "
                                        "in the dataset or in [general]")
        cache = dataset.resolved_cache_directory
        if cache is None:
            continue
        key = _normalized(cache)
        if key in owners:
            problems.add(dataset.label, f"cache directory {cache!r} is also used by datasets[{owners[key]}]; each "
                                        "dataset needs its own cache_directory (it defaults to the data directory)")
        else:
            owners[key] = dataset.index
    problems.raise_if_any(group.source)


def load_dataset_config(path: str | os.PathLike[str]) -> DatasetGroupConfig:
    """Read a dataset TOML file, parse it and check that it can be built."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset config not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from error
    group = parse_dataset_config(data, source=str(path))
    check_dataset_group(group)
    return group
