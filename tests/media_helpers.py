"""Tiny generated media for dataset tests: mp4 files (PyAV, mpeg4), PNG frames and images (PIL).

Frame i of a generated video shows i in binary as black/white vertical stripes, so tests can tell which source frames
a reader returned even after lossy compression.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

BITS = 6  # frames 0..63 can be told apart


def solid_frame(index: int, size: tuple[int, int]) -> np.ndarray:
    """A frame [H, W, 3] of BITS vertical stripes, white for a set bit of `index` (lowest bit on the left)."""
    width, height = size
    frame = np.full((height, width, 3), 16, np.uint8)
    stripe = width // BITS
    for bit in range(BITS):
        if index >> bit & 1:
            frame[:, bit * stripe : (bit + 1) * stripe] = 235
    return frame


def frame_id(frame: np.ndarray) -> int:
    """The index encoded by `solid_frame`, read back from a decoded frame [H, W, 3] (centre of each stripe)."""
    stripe = frame.shape[1] // BITS
    centres = [frame[:, bit * stripe + stripe // 2].mean() for bit in range(BITS)]
    return sum(1 << bit for bit, value in enumerate(centres) if value > 128)


def write_video(path: Path, frames: int, size: tuple[int, int] = (64, 48), fps: int = 16) -> Path:
    """An mp4 of `frames` frames of `size` (W, H) at `fps`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(solid_frame(index, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frames_dir(directory: Path, frames: int, size: tuple[int, int] = (64, 48)) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(frames):
        Image.fromarray(solid_frame(index, size)).save(directory / f"{index:04d}.png")
    return directory


def write_image(path: Path, size: tuple[int, int] = (64, 48), index: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(solid_frame(index, size)).save(path)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
