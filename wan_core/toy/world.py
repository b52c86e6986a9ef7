"""The synthetic "toy world": short 64x64 clips of one coloured shape moving in one direction.

Every clip shows a single object of one colour and one shape on a flat, slightly tinted grey background, moving
left, right, up or down at a constant speed, or staying still. Its caption is generated from the three factors:

    "a {colour} {shape} moving {left|right|up|down}"   or   "a {colour} {shape} staying still"

Conventions:
    * Pixel coordinates are continuous: pixel (row i, column j) covers [j, j+1) x [i, i+1), so its centre is
      (x, y) = (j + 0.5, i + 0.5). "up" means towards row 0 (y decreases), "right" means x increases.
    * Frames are uint8 arrays [T, H, W, 3] (RGB), 16 fps, 9 frames by default (any T >= 1 renders; 4N+1 values
      such as 1, 9 and 17 suit the Wan VAE).
    * Everything random comes from ``numpy.random.default_rng(seed)``; the same seed gives the same clip. The
      draws do not depend on the combination, so one seed gives the same background, size and relative start
      for every colour/shape/motion (paired comparisons).

Design for learnability (a tiny VAE must keep hue): objects are 16-22 px (at 64 px), colours are saturated and
far apart in hue, the background is a mid grey (level 100-160) whose per-clip tint (+-8 per channel) has far less
chroma than any object colour, and edges are anti-aliased (8x8 supersampling).

Factors: colours red, green, blue, yellow form the base world; ``purple`` exists in the palette but is reserved
(never in ``train_combos()``/``heldout_combos()``) for LoRA experiments. ``HELDOUT`` lists 12 of the 60 base
combinations that are kept out of training to test composition; every colour, shape and motion, and every pair of
factor values, still appears in training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wan_core.loading.checkpoint import write_text_atomic

logger = logging.getLogger(__name__)

FPS = 16
DEFAULT_NUM_FRAMES = 9
DEFAULT_SIZE = 64

# Saturated colours, well apart in hue (opponent-plane hue angles: red 0, yellow 52, green 126, blue 223,
# purple 284 degrees; see wan_core.toy.score).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (235, 205, 30),
    "green": (30, 200, 50),
    "blue": (30, 90, 230),
    "purple": (170, 40, 220),
}
BASE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
RESERVED_COLOURS: tuple[str, ...] = ("purple",)  # never in the base training set (LoRA experiments)
COLOURS: tuple[str, ...] = BASE_COLOURS + RESERVED_COLOURS
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
MOTIONS: tuple[str, ...] = ("right", "left", "up", "down", "still")
MOTION_PHRASES: dict[str, str] = {
    "right": "moving right",
    "left": "moving left",
    "up": "moving up",
    "down": "moving down",
    "still": "staying still",
}
# Unit direction (dx, dy) in pixel axes; y grows downwards, so "up" is dy = -1.
MOTION_VECTORS: dict[str, tuple[int, int]] = {
    "right": (1, 0),
    "left": (-1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "still": (0, 0),
}

# Sampling ranges, in pixels of a 64 px frame (scaled linearly for other sizes).
OBJECT_SIZE_RANGE = (16.0, 22.0)  # side of the square, diameter of the circle, base = height of the triangle
SPEED_RANGE = (2.0, 4.0)  # px per frame; capped so the whole path stays inside the frame
POSITION_JITTER = 8.0  # max offset of the path's midpoint from the frame centre, per axis
MARGIN = 2.0  # minimum distance between the object's bounding box and the frame border
BACKGROUND_LEVEL_RANGE = (100.0, 160.0)
BACKGROUND_TINT = 8.0  # +- per channel
COLOUR_GAIN_RANGE = (0.92, 1.05)
COLOUR_OFFSET = 6.0  # +- per channel
SUPERSAMPLING = 8


@dataclass(frozen=True)
class Combo:
    """One colour/shape/motion combination of the world."""

    colour: str
    shape: str
    motion: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("motion", self.motion, MOTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {MOTION_PHRASES[self.motion]}"


def _heldout() -> tuple[Combo, ...]:
    # colour i, shape j -> motion (i + 2j) mod 5: every (colour, shape) pair is held out exactly once and no
    # (colour, motion) or (shape, motion) pair twice, so each pair of factor values keeps >= 2 training combos.
    return tuple(
        Combo(colour, shape, MOTIONS[(i + 2 * j) % len(MOTIONS)])
        for i, colour in enumerate(BASE_COLOURS)
        for j, shape in enumerate(SHAPES)
    )


HELDOUT: tuple[Combo, ...] = _heldout()


def all_combos(
    colours: Sequence[str] = BASE_COLOURS, shapes: Sequence[str] = SHAPES, motions: Sequence[str] = MOTIONS
) -> list[Combo]:
    """Every combination of the given factor values, in a fixed order (colour, then shape, then motion)."""
    return [Combo(c, s, m) for c in colours for s in shapes for m in motions]


def train_combos() -> list[Combo]:
    """The base training set: base colours (no purple), all shapes and motions, minus ``HELDOUT``."""
    held = set(HELDOUT)
    return [combo for combo in all_combos() if combo not in held]


def heldout_combos() -> list[Combo]:
    """The combinations kept out of training for composition tests (12 of 60)."""
    return list(HELDOUT)


def parse_caption(text: str) -> Combo:
    """Inverse of ``Combo.caption`` (case and surrounding/repeated whitespace are ignored)."""
    words = str(text).strip().lower().split()
    expected = "'a <colour> <shape> moving <right|left|up|down>' or 'a <colour> <shape> staying still'"
    if len(words) != 5 or words[0] != "a":
        raise ValueError(f"caption {text!r} is not of the form {expected}")
    phrase = " ".join(words[3:])
    motion = next((m for m, p in MOTION_PHRASES.items() if p == phrase), None)
    if words[1] not in COLOURS or words[2] not in SHAPES or motion is None:
        raise ValueError(
            f"caption {text!r} is not of the form {expected} with colour in {COLOURS} and shape in {SHAPES}"
        )
    return Combo(words[1], words[2], motion)


@dataclass(frozen=True)
class ClipParams:
    """The random draws behind one clip (pixel units of the rendered size)."""

    object_size: float
    speed: float  # px per frame (0 for "still")
    centres: tuple[tuple[float, float], ...]  # bounding-box centre (x, y) per frame
    colour_rgb: tuple[float, float, float]
    background_rgb: tuple[float, float, float]

    def centroids(self, shape: str) -> np.ndarray:
        """True area centroids [T, 2] (x, y): the triangle's sits a third of its half-height below the box centre."""
        offset = self.object_size / 6.0 if shape == "triangle" else 0.0
        return np.asarray(self.centres, dtype=np.float64) + np.array([0.0, offset])


def _check_render_args(num_frames: int, size: int) -> None:
    if int(num_frames) != num_frames or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if int(size) != size or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size!r}")


PLACEMENTS = ("centred", "free")


def sample_params(
    combo: Combo, *, seed: int, num_frames: int = DEFAULT_NUM_FRAMES, size: int = DEFAULT_SIZE,
    placement: str = "centred",
) -> ClipParams:
    """Draw the per-clip parameters of ``combo`` from ``numpy.random.default_rng(seed)``.

    ``placement="centred"`` (the world's clips) puts the path's midpoint within ``POSITION_JITTER`` of the frame
    centre; ``"free"`` places it anywhere inside the frame (the VAE trains on these: it must encode any position)."""
    _check_render_args(num_frames, size)
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
    rng = np.random.default_rng(seed)
    u = rng.random(12)  # fixed number and order of draws, independent of the combination
    scale = size / DEFAULT_SIZE
    obj = (OBJECT_SIZE_RANGE[0] + u[0] * (OBJECT_SIZE_RANGE[1] - OBJECT_SIZE_RANGE[0])) * scale
    lo = MARGIN * scale + obj / 2.0  # allowed range of the centre on each axis
    hi = size - lo
    dx, dy = MOTION_VECTORS[combo.motion]
    steps = num_frames - 1
    speed = 0.0
    if (dx or dy) and steps > 0:
        v_max = (hi - lo) / steps
        v_lo, v_hi = min(SPEED_RANGE[0] * scale, v_max), min(SPEED_RANGE[1] * scale, v_max)
        speed = v_lo + u[1] * (v_hi - v_lo)
    path = speed * steps
    # The path's midpoint sits near the frame centre (+- POSITION_JITTER on each axis, kept inside the frame): the
    # caption then pins the clip down up to small offsets, which a tiny DiT can learn on a CPU in minutes.
    if placement == "free":  # along the motion axis the start leaves room for the whole path
        along = lo + u[2] * (hi - lo - path)
        across = lo + u[3] * (hi - lo)
    else:
        jitter = POSITION_JITTER * scale
        along = float(np.clip(size / 2.0 - path / 2.0 + jitter * (2.0 * u[2] - 1.0), lo, hi - path))
        across = float(np.clip(size / 2.0 + jitter * (2.0 * u[3] - 1.0), lo, hi))
    if dx or dy:
        start_along = along if (dx + dy) > 0 else along + path
    else:
        start_along = along
    x0, y0 = (start_along, across) if dy == 0 else (across, start_along)
    centres = tuple((x0 + dx * speed * t, y0 + dy * speed * t) for t in range(num_frames))
    level = BACKGROUND_LEVEL_RANGE[0] + u[4] * (BACKGROUND_LEVEL_RANGE[1] - BACKGROUND_LEVEL_RANGE[0])
    tint = [float(level + BACKGROUND_TINT * (2.0 * u[5 + k] - 1.0)) for k in range(3)]
    gain = COLOUR_GAIN_RANGE[0] + u[8] * (COLOUR_GAIN_RANGE[1] - COLOUR_GAIN_RANGE[0])
    rgb = [float(np.clip(PALETTE[combo.colour][k] * gain + COLOUR_OFFSET * (2.0 * u[9 + k] - 1.0), 0.0, 255.0))
           for k in range(3)]
    background, colour = (tint[0], tint[1], tint[2]), (rgb[0], rgb[1], rgb[2])
    return ClipParams(float(obj), float(speed), centres, colour, background)


def _inside(shape: str, x: np.ndarray, y: np.ndarray, half: float) -> np.ndarray:
    """Boolean mask of points (x, y) relative to the bounding-box centre that lie inside the shape."""
    if shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if shape == "circle":
        return x * x + y * y <= half * half
    if shape == "triangle":  # isosceles, apex up, base = height = 2 * half
        return (y >= -half) & (y <= half) & (np.abs(x) <= (y + half) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def coverage(shape: str, centre: tuple[float, float], object_size: float, size: int) -> np.ndarray:
    """Anti-aliased coverage [H, W] in [0, 1] of one object (8x8 supersampling inside its bounding box)."""
    cx, cy = centre
    half = object_size / 2.0
    alpha = np.zeros((size, size), dtype=np.float64)
    x0, x1 = max(int(np.floor(cx - half)) - 1, 0), min(int(np.ceil(cx + half)) + 1, size)
    y0, y1 = max(int(np.floor(cy - half)) - 1, 0), min(int(np.ceil(cy + half)) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return alpha
    offsets = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1) - cx  # [(x1-x0)*S]
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1) - cy  # [(y1-y0)*S]
    inside = _inside(shape, xs[None, :], ys[:, None], half)  # [(y1-y0)*S, (x1-x0)*S]
    alpha[y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLING, x1 - x0, SUPERSAMPLING).mean(axis=(1, 3))
    return alpha


def render_params(combo: Combo, params: ClipParams, *, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Render the frames [T, H, W, 3] uint8 described by ``params``."""
    background = np.asarray(params.background_rgb, dtype=np.float64)  # [3]
    colour = np.asarray(params.colour_rgb, dtype=np.float64)  # [3]
    frames = np.empty((len(params.centres), size, size, 3), dtype=np.uint8)
    for t, centre in enumerate(params.centres):
        alpha = coverage(combo.shape, centre, params.object_size, size)[..., None]  # [H, W, 1]
        frames[t] = np.clip(np.rint(background * (1.0 - alpha) + colour * alpha), 0, 255).astype(np.uint8)
    return frames


def render_clip(
    combo: Combo, *, seed: int, num_frames: int = DEFAULT_NUM_FRAMES, size: int = DEFAULT_SIZE
) -> np.ndarray:
    """Render one clip of ``combo``: uint8 [T, H, W, 3] RGB, reproducible from ``seed``."""
    if not isinstance(combo, Combo):
        raise ValueError(f"combo must be a Combo, got {type(combo).__name__}")
    return render_params(combo, sample_params(combo, seed=seed, num_frames=num_frames, size=size), size=size)


# ---------------------------------------------------------------------------------------------------------------
# Dataset writer
# ---------------------------------------------------------------------------------------------------------------

DATASET_FORMATS = ("png_dir", "mp4")


def _temp_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path`` (created with the process umask, unlike tempfile's 0600)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _write_png_dir(path: Path, frames: np.ndarray) -> None:
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        for t, frame in enumerate(frames):
            Image.fromarray(frame, mode="RGB").save(tmp / f"{t:05d}.png")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    import av  # ~0.15 s to import; only the mp4 writer needs it

    tmp = _temp_sibling(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "10"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def dataset_toml(
    *, data_key: str, data_path: Path, cache_directory: Path, size: int, num_frames: int, batch_size: int
) -> str:
    """The musubi-style dataset config text (one [general] table, one [[datasets]] table)."""
    general = {
        "resolution": [size, size],
        "caption_extension": ".txt",
        "batch_size": batch_size,
        "enable_bucket": False,
    }
    dataset = {
        data_key: str(data_path),
        "cache_directory": str(cache_directory),
        "target_frames": [num_frames],
        "frame_extraction": "head",
        "num_repeats": 1,
    }
    lines = ["# toy-world dataset written by wan_core.toy.world.write_dataset", "[general]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in general.items()]
    lines += ["", "[[datasets]]"] + [f"{key} = {_toml_value(value)}" for key, value in dataset.items()]
    return "\n".join(lines) + "\n"


def _check_dataset_args(out_dir: Path, combos: list[Combo], clips_per_combo: int, num_frames: int, fmt: str) -> None:
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"fmt must be one of {DATASET_FORMATS}, got {fmt!r}")
    if not combos or not all(isinstance(c, Combo) for c in combos):
        raise ValueError(f"combos must be a non-empty sequence of Combo, got {combos!r}")
    if int(clips_per_combo) != clips_per_combo or clips_per_combo < 1:
        raise ValueError(f"clips_per_combo must be a positive integer, got {clips_per_combo!r}")
    if int(num_frames) != num_frames or num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4N+1 (1, 5, 9, 17, ...) for a Wan dataset, got {num_frames!r}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"out_dir {out_dir} exists and is not an empty directory")


def write_dataset(
    out_dir: str | os.PathLike[str],
    combos: Iterable[Combo],
    clips_per_combo: int,
    *,
    seed: int,
    num_frames: int = DEFAULT_NUM_FRAMES,
    fmt: str = "png_dir",
    size: int = DEFAULT_SIZE,
    batch_size: int = 1,
) -> list[Path]:
    """Write a musubi-style video dataset of ``clips_per_combo`` clips per combination; return the clip paths.

    Layout under ``out_dir`` (which must be absent or empty):
        videos/NNNNN_<colour>_<shape>_<motion>/00000.png ...   (fmt="png_dir", lossless; preferred for training)
        videos/NNNNN_<colour>_<shape>_<motion>.mp4               (fmt="mp4", H.264 crf 10, 16 fps)
        videos/NNNNN_<colour>_<shape>_<motion>.txt               the caption (same stem)
        dataset.jsonl   {"video_path": <absolute clip path>, "caption": ...} per clip
        dataset.toml    musubi dataset config; cache_directory = out_dir/cache

    musubi's ``video_directory`` only globs video files, while ``video_jsonl_file`` accepts frame directories, so
    the toml names ``video_directory`` for mp4 datasets and ``video_jsonl_file`` for png_dir datasets.
    Clip i uses the i-th seed spawned from ``numpy.random.SeedSequence(seed)``.
    """
    out = Path(out_dir)
    combo_list = list(combos)
    _check_dataset_args(out, combo_list, clips_per_combo, num_frames, fmt)
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    jobs = [combo for combo in combo_list for _ in range(int(clips_per_combo))]
    seeds = [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(len(jobs))]
    paths: list[Path] = []
    records: list[str] = []
    for index, (combo, clip_seed) in enumerate(zip(jobs, seeds)):
        stem = f"{index:05d}_{combo.colour}_{combo.shape}_{combo.motion}"
        frames = render_clip(combo, seed=clip_seed, num_frames=num_frames, size=size)
        path = videos / (stem if fmt == "png_dir" else f"{stem}.mp4")
        (_write_png_dir if fmt == "png_dir" else _write_mp4)(path, frames)
        write_text_atomic(videos / f"{stem}.txt", combo.caption + "\n")
        paths.append(path)
        records.append(json.dumps({"video_path": str(path.resolve()), "caption": combo.caption}))
    write_text_atomic(out / "dataset.jsonl", "\n".join(records) + "\n")
    data_key, data_path = (
        ("video_jsonl_file", out / "dataset.jsonl") if fmt == "png_dir" else ("video_directory", videos)
    )
    toml_text = dataset_toml(
        data_key=data_key,
        data_path=data_path.resolve(),
        cache_directory=(out / "cache").resolve(),
        size=size,
        num_frames=num_frames,
        batch_size=batch_size,
    )
    write_text_atomic(out / "dataset.toml", toml_text)
    logger.info("wrote %d toy-world clips (%s, %d frames) to %s", len(paths), fmt, num_frames, out)
    return paths
