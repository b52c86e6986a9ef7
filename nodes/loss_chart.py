"""A training-loss chart drawn with PIL (no plotting library): the raw per-step loss, its moving average, grid
lines with step and loss labels. Used for the trainer node's IMAGE output; the live chart on the node is drawn by
the front end (web/js/wantuner_training.js) from the same (step, loss) points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 26, 31)
GRID = (58, 62, 70)
TEXT = (205, 208, 214)
RAW = (92, 132, 190)  # every step's loss
AVERAGE = (255, 178, 56)  # moving average
MARGINS = (58, 24, 14, 26)  # left, top, right, bottom (pixels)
TICKS = 4


@dataclass(frozen=True)
class Frame:
    """Maps (step, loss) to pixel coordinates of the plot area."""

    left: int
    top: int
    right: int
    bottom: int
    steps: tuple[float, float]
    losses: tuple[float, float]

    def x(self, step: float) -> float:
        lo, hi = self.steps
        return self.left + (step - lo) / (hi - lo) * (self.right - self.left)

    def y(self, loss: float) -> float:
        lo, hi = self.losses
        return self.bottom - (loss - lo) / (hi - lo) * (self.bottom - self.top)


def finite_points(points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """(step, loss) pairs with a finite loss (NaN/inf steps are left out of the chart), in step order."""
    kept = [(float(s), float(v)) for s, v in points if v is not None and math.isfinite(float(v))]
    return sorted(kept)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    sums = np.cumsum(np.asarray(values, dtype=np.float64))
    out = []
    for i in range(len(values)):
        start = max(0, i + 1 - window)
        total = sums[i] - (sums[start - 1] if start else 0.0)
        out.append(float(total / (i + 1 - start)))
    return out


def _span(lo: float, hi: float, pad: float) -> tuple[float, float]:
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        half = max(abs(hi) * 0.5, 1e-3)
        return lo - half, hi + half
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def _frame(points: list[tuple[float, float]], width: int, height: int) -> Frame:
    left, top, right, bottom = MARGINS
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    step_lo, step_hi = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 1.0, steps[0] + 1.0)
    return Frame(left, top, width - right, height - bottom, (step_lo, step_hi), _span(min(losses), max(losses), 0.05))


def _grid(draw: ImageDraw.ImageDraw, frame: Frame, font: ImageFont.ImageFont) -> None:
    for i in range(TICKS + 1):
        loss = frame.losses[0] + (frame.losses[1] - frame.losses[0]) * i / TICKS
        y = frame.y(loss)
        draw.line([(frame.left, y), (frame.right, y)], fill=GRID)
        draw.text((4, y - 6), f"{loss:.3g}", fill=TEXT, font=font)
        step = frame.steps[0] + (frame.steps[1] - frame.steps[0]) * i / TICKS
        x = frame.x(step)
        draw.line([(x, frame.top), (x, frame.bottom)], fill=GRID)
        label = f"{step:.0f}"
        draw.text((min(x - 3 * len(label), frame.right - 6 * len(label)), frame.bottom + 6), label, fill=TEXT,
                  font=font)


def _line(draw: ImageDraw.ImageDraw, frame: Frame, steps: Sequence[float], values: Sequence[float],
          colour: tuple[int, int, int], width: int) -> None:
    xy = [(frame.x(s), frame.y(v)) for s, v in zip(steps, values)]
    if len(xy) == 1:
        x, y = xy[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    else:
        draw.line(xy, fill=colour, width=width, joint="curve")


def render_loss_chart(points: Sequence[Sequence[float]], width: int = 512, height: int = 256,
                      window: int | None = None) -> np.ndarray:
    """The chart of (step, loss) points as an RGB image [height, width, 3] uint8.

    window: moving-average length (default: a twentieth of the points, at least 1). Non-finite losses are skipped;
    with no finite point the chart says so.
    """
    if width < 160 or height < 100:
        raise ValueError(f"the loss chart needs at least 160x100 pixels, got {width}x{height}")
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    kept = finite_points(points)
    if not kept:
        draw.text((MARGINS[0], height // 2 - 6), "no loss values yet", fill=TEXT, font=font)
        return np.asarray(image)
    frame = _frame(kept, width, height)
    _grid(draw, frame, font)
    steps, losses = [s for s, _ in kept], [v for _, v in kept]
    _line(draw, frame, steps, losses, RAW, 1)
    average = moving_average(losses, window or max(1, len(losses) // 20))
    _line(draw, frame, steps, average, AVERAGE, 2)
    title = f"loss: {len(kept)} steps, last {losses[-1]:.4g}, average {average[-1]:.4g}, min {min(losses):.4g}"
    draw.text((MARGINS[0], 6), title, fill=TEXT, font=font)
    return np.asarray(image)


def chart_image(points: Sequence[Sequence[float]], width: int = 512, height: int = 256) -> torch.Tensor:
    """The chart as a ComfyUI IMAGE: [1, height, width, 3] float32 in 0..1."""
    pixels = render_loss_chart(points, width, height)
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
