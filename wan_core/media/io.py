"""Media files: reading videos (PyAV), frame directories and images (PIL) for training and generation; writing
mp4 (H.264 yuv420p) and PNG frames. Writes go to a temporary name in the target folder and are renamed.

Frames are uint8 RGB arrays, [T, H, W, 3] for videos and [H, W, 3] for images. Frame counts come from decoding every
frame, never from the container's duration or frame-count metadata, which are often wrong.

`resize_to_bucket` follows musubi's `resize_image_to_bucket`: scale so the image covers the bucket (the larger of
the two scale factors, sizes rounded half up), then crop the centre. Enlarging uses LANCZOS; shrinking uses PIL's
BOX filter, an area average like the OpenCV `INTER_AREA` that musubi uses (OpenCV is not a dependency here).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from wan_core.loading.checkpoint import make_temp, new_file_mode

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif"})
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg")

_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


class MediaReadError(RuntimeError):
    """A media file exists but cannot be decoded (corrupt, truncated, not a video/image, no frames)."""


@dataclass(frozen=True)
class VideoInfo:
    """What decoding a whole video (or frame directory) found."""

    frame_count: int  # frames actually decoded
    width: int
    height: int
    fps: float | None  # the stream's average rate; None for a frame directory or when unknown


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _list_files(directory: str | os.PathLike[str], keep: Callable[[Path], bool]) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory not found: {directory}")
    return sorted(p for p in directory.iterdir() if p.is_file() and keep(p))


def list_images(directory: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside `directory`, sorted by name (extensions matched case-insensitively)."""
    return _list_files(directory, is_image_file)


def list_videos(directory: str | os.PathLike[str]) -> list[Path]:
    """Video files directly inside `directory`, sorted by name."""
    return _list_files(directory, is_video_file)


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"media file not found: {path}")


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except _IMAGE_ERRORS as error:
        raise MediaReadError(f"cannot read image {path}: {error}") from error


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as uint8 RGB, [H, W, 3]."""
    path = Path(path)
    _require_exists(path)
    return np.asarray(_open_image(path))


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(W, H) of an image, after fully decoding it (so a truncated file is reported as unreadable)."""
    path = Path(path)
    _require_exists(path)
    return _open_image(path).size


def _frame_directory_files(path: Path) -> list[Path]:
    files = list_images(path)
    if not files:
        raise MediaReadError(f"frame directory {path} contains no images (extensions: {sorted(IMAGE_EXTENSIONS)})")
    return files


def _inspect_frame_directory(path: Path) -> VideoInfo:
    files = _frame_directory_files(path)
    sizes = {f: _open_image(f).size for f in files}
    first = sizes[files[0]]
    for file, size in sizes.items():
        if size != first:
            raise MediaReadError(f"frame {file} is {size[0]}x{size[1]} but {files[0].name} is {first[0]}x{first[1]}")
    return VideoInfo(frame_count=len(files), width=first[0], height=first[1], fps=None)


def _inspect_video_file(path: Path) -> VideoInfo:
    count, size = 0, (0, 0)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaReadError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                size = (frame.width, frame.height) if count == 0 else size
                count += 1
            rate = stream.average_rate
    except av.error.FFmpegError as error:
        raise MediaReadError(f"cannot decode video {path}: {error}") from error
    if count == 0:
        raise MediaReadError(f"no frames could be decoded from {path}")
    return VideoInfo(frame_count=count, width=size[0], height=size[1], fps=float(rate) if rate else None)


def inspect_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Decode every frame of a video file or frame directory and report the real count and frame size.

    Raises FileNotFoundError when the path does not exist and MediaReadError when it cannot be decoded.
    """
    path = Path(path)
    _require_exists(path)
    return _inspect_frame_directory(path) if path.is_dir() else _inspect_video_file(path)


def _read_video_file(path: Path, wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int]:
    """The wanted frames by index, and how many frames were decoded (decoding stops after the last wanted one)."""
    last = max(wanted) if wanted else None
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaReadError(f"{path} has no video stream")
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                decoded = index + 1
                if wanted is None or index in wanted:
                    frames[index] = frame.to_ndarray(format="rgb24")  # [H, W, 3]
                if last is not None and index >= last:
                    break
    except av.error.FFmpegError as error:
        raise MediaReadError(f"cannot decode video {path}: {error}") from error
    return frames, decoded


def _read_frame_directory(path: Path, wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int]:
    files = _frame_directory_files(path)
    indices = range(len(files)) if wanted is None else sorted(i for i in wanted if i < len(files))
    return {i: np.asarray(_open_image(files[i])) for i in indices}, len(files)


def read_video(path: str | os.PathLike[str], frame_indices: Sequence[int] | None = None) -> np.ndarray:
    """Frames of a video file or frame directory as uint8 RGB, [T, H, W, 3].

    `frame_indices` (decoded-frame indices, any order, repeats allowed) selects frames; None reads all. Decoding
    stops after the last index needed.
    """
    path = Path(path)
    _require_exists(path)
    if frame_indices is not None and (not frame_indices or min(frame_indices) < 0):
        raise ValueError(f"frame_indices for {path} must be non-negative and non-empty, got {list(frame_indices)[:8]}")
    wanted = None if frame_indices is None else set(frame_indices)
    reader = _read_frame_directory if path.is_dir() else _read_video_file
    frames, decoded = reader(path, wanted)
    if decoded == 0:
        raise MediaReadError(f"no frames could be decoded from {path}")
    order = sorted(frames) if frame_indices is None else list(frame_indices)
    missing = sorted({i for i in order if i not in frames})
    if missing:
        raise MediaReadError(f"frame indices {missing[:5]} requested but {path} has only {decoded} frames")
    shapes = {frames[i].shape for i in set(order)}
    if len(shapes) > 1:
        raise MediaReadError(f"frames of {path} differ in size: {sorted(shapes)}")
    return np.stack([frames[i] for i in order])


def resize_to_bucket(image: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 image [H, W, C] to cover `bucket` (W, H), then centre-crop to exactly [bh, bw, C]."""
    height, width = image.shape[:2]
    bucket_width, bucket_height = bucket
    if (width, height) == (bucket_width, bucket_height):
        return image
    scale = max(bucket_width / width, bucket_height / height)
    new_width, new_height = int(width * scale + 0.5), int(height * scale + 0.5)
    resample = Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), resample))
    left, top = (new_width - bucket_width) // 2, (new_height - bucket_height) // 2
    return resized[top : top + bucket_height, left : left + bucket_width]


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, H, W, 3] float in [0, 1] -> uint8 array."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {list(frames.shape)}")
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _temp_path(target: Path, suffix: str) -> Path:
    tmp = make_temp(target, ext=suffix)
    os.chmod(tmp, new_file_mode())
    return tmp


def write_video(frames: torch.Tensor, path: str | Path, fps: int, crf: int | None = None) -> Path:
    """mp4 with libx264 / yuv420p (4 Mbit/s like musubi, or constant quality `crf`). Odd sizes are padded by one
    pixel (yuv420p needs even sides)."""
    path = Path(path)
    data = to_uint8(frames)
    if data.shape[1] % 2 or data.shape[2] % 2:
        data = np.pad(data, ((0, 0), (0, data.shape[1] % 2), (0, data.shape[2] % 2), (0, 0)), mode="edge")
    tmp = _temp_path(path, ".mp4")
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height = data.shape[2], data.shape[1]
            stream.pix_fmt = "yuv420p"
            if crf is None:
                stream.bit_rate = 4_000_000
            else:
                stream.options = {"crf": str(crf)}
            for frame in data:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_png_frames(frames: torch.Tensor, folder: str | Path) -> Path:
    """One PNG per frame (`frame_0000.png`, ...) in `folder`, written to a temporary folder then renamed."""
    folder = Path(folder)
    tmp = make_temp(folder, directory=True)
    try:
        for i, frame in enumerate(to_uint8(frames)):
            Image.fromarray(frame).save(tmp / f"frame_{i:04d}.png")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> [3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [T, 3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
