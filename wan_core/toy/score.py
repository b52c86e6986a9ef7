"""Scorer for toy-world clips: find the object by colour, classify its shape, measure its motion.

Works on ground-truth, VAE-decoded or generated frames. Frames are accepted as

    * uint8  [T, H, W, 3] RGB in 0..255, or
    * float  [T, H, W, 3] RGB in [0, 1] (ComfyUI IMAGE layout; values slightly outside are clipped),

or anything ``numpy.asarray`` turns into one of those (e.g. a CPU torch tensor). A single frame [H, W, 3] is
treated as T = 1 (motion is then not measurable).

Method:
    1. Background = per-frame, per-channel median (the object covers < 15 % of the frame).
    2. Each pixel's colour difference to the background is projected on the opponent chroma plane
       (a = R - (G + B) / 2, b = sqrt(3) / 2 * (G - B)); grey cancels, so blending an object colour with a
       neutral grey keeps its hue angle atan2(b, a). Pixels with strong chroma vote for the nearest palette hue
       (weighted by chroma); the winner is the colour.
    3. A soft object mask alpha = projection of the chroma difference on the object's mean chroma vector.
       Per frame, the centroid is an alpha-weighted mean (started at the weighted median, refined inside a
       window); frames with too little object mass get NaN.
    4. Shape from complex moments of alpha around the centroid, E[z^k] with z = dx + i dy: an isotropic blur leaves
       E[z^3] and E[z^4] unchanged, so |E[z^3]| / m2^1.5 (triangle ~0.79, others ~0) and -Re E[z^4] / m2^2
       (square ~0.6, others ~0) stay separable on blurry frames; neither strong means circle.
    5. Background noise: mean absolute RGB deviation (0..255) from the frame's background median over the pixels
       farther than ``NOISE_MARGIN`` px from the object mask (alpha > 0), averaged over frames. A clean toy frame
       measures ~0; residual sampling noise, halos and grid seams raise it.
    6. Motion: least-squares slope of the centroid track times (T - 1) = total displacement. "still" if its
       largest component is below ``STILL_FRACTION`` of the frame width, else the dominant axis and sign
       (y grows downwards, so negative dy is "up").
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from wan_core.toy.world import COLOURS, PALETTE, Combo, parse_caption

logger = logging.getLogger(__name__)

MIN_CHROMA = 0.12  # minimum chroma difference (0..1 scale) of a pixel voting for a colour
RELATIVE_CHROMA = 0.4  # ... and at least this fraction of the clip's 99.5th-percentile chroma
ALPHA_FLOOR = 0.15  # alpha below this (or below NOISE_SIGMAS x the background's alpha noise) is background
NOISE_SIGMAS = 3.5
MIN_MASS_FRACTION = 0.01  # a frame needs object mass >= this fraction of H*W to count as "found"
WINDOW_FRACTION = 0.3  # centroid/moment window radius as a fraction of the frame width
STILL_FRACTION = 0.1  # total displacement below this fraction of the width means "still"
TRIANGLE_F3 = 0.79  # |E[z^3]| / m2^1.5 of a sharp toy triangle
SQUARE_F4 = 0.6  # -Re E[z^4] / m2^2 of a sharp toy square
SHAPE_THRESHOLD = 0.35  # a normalised shape feature below this for both shapes means "circle"
NOISE_MARGIN = 3  # px around the object mask left out of the background-noise measure (its anti-aliased edge)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """Opponent chroma plane [..., 2] of RGB [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([r - (g + b) / 2.0, (math.sqrt(3.0) / 2.0) * (g - b)], axis=-1)


PALETTE_HUES: dict[str, float] = {
    name: float(np.arctan2(*_chroma(np.asarray(PALETTE[name], dtype=np.float64) / 255.0)[::-1])) for name in COLOURS
}

_PALETTE_UNITS = np.array([[math.cos(PALETTE_HUES[n]), math.sin(PALETTE_HUES[n])] for n in COLOURS]).T  # [2, K]


@dataclass(frozen=True)
class Detection:
    """What the scorer found. Fields are None when no coloured object was found."""

    colour: str | None
    shape: str | None
    motion: str | None  # None also when T == 1 (not measurable)
    centroids: np.ndarray = field(compare=False)  # [T, 2] (x, y) in pixels, pixel centres at +0.5; NaN = not found
    confidence: float  # colour vote share x fraction of frames where the object was found, in [0, 1]
    background_noise: float = float("nan")  # mean |RGB - background| (0..255) away from the object (step 5)


@dataclass(frozen=True)
class ClipScore:
    expected: Combo
    detection: Detection
    colour_ok: bool
    shape_ok: bool
    motion_ok: bool | None  # None when motion is not measurable (T == 1)

    @property
    def colour_motion_ok(self) -> bool | None:
        return None if self.motion_ok is None else (self.colour_ok and self.motion_ok)


@dataclass(frozen=True)
class ScoreSummary:
    """Rates in [0, 1] over the scored clips (motion rates over clips where motion is measurable; NaN if none)."""

    n: int
    colour_motion: float
    motion: float
    colour: float
    shape: float
    background_noise: float  # median over the clips of Detection.background_noise (0..255)
    scores: tuple[ClipScore, ...] = field(repr=False)


def as_float_frames(frames: object) -> np.ndarray:
    """Validate and convert frames to float64 [T, H, W, 3] in [0, 1]."""
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or min(array.shape[:3]) < 1:
        raise ValueError(f"frames must be [T, H, W, 3] (or [H, W, 3]) RGB, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"frames must be uint8 (0..255) or float (0..1), got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("frames contain NaN or infinite values")
    if array.min() < -0.5 or array.max() > 1.5:
        raise ValueError(
            f"float frames must lie in [0, 1] (ComfyUI IMAGE), got range [{array.min():.3g}, {array.max():.3g}]"
        )
    return np.clip(array, 0.0, 1.0)


def _nearest_palette(diff: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the palette hue nearest to each chroma difference [..., 2] -> [...]."""
    return (diff @ _PALETTE_UNITS).argmax(axis=-1)  # largest cosine = smallest hue angle


def _vote_colour(diff: np.ndarray, magnitude: np.ndarray) -> tuple[str | None, float]:
    """Chroma-weighted vote of strongly coloured pixels for the nearest palette hue -> (colour, vote share)."""
    threshold = max(MIN_CHROMA, RELATIVE_CHROMA * float(np.quantile(magnitude, 0.995)))
    candidates = magnitude > threshold  # [T, H, W]
    if candidates.sum() < 4:
        return None, 0.0
    labels = _nearest_palette(diff[candidates])  # [N]
    votes = np.bincount(labels, weights=magnitude[candidates], minlength=len(COLOURS))
    best = int(votes.argmax())
    return COLOURS[best], float(votes[best] / votes.sum())


def _object_alpha(diff: np.ndarray, magnitude: np.ndarray, colour: str) -> np.ndarray:
    """Soft object mask [T, H, W] in [0, 1] for the detected colour."""
    own = (_nearest_palette(diff) == COLOURS.index(colour)) & (magnitude > MIN_CHROMA)  # [T, H, W]
    strong = own & (magnitude >= np.quantile(magnitude[own], 0.5))
    direction = diff[strong].mean(axis=0)  # [2] mean chroma vector of the object's interior
    alpha = (diff @ direction) / float(direction @ direction)  # [T, H, W]
    # Noise floor: the background dominates the frame, so the median absolute deviation measures its noise.
    noise = 1.4826 * float(np.median(np.abs(alpha - np.median(alpha))))
    floor = min(max(ALPHA_FLOOR, NOISE_SIGMAS * noise), 0.5)
    return np.clip((alpha - floor) / (1.0 - floor), 0.0, 1.0)


def _median_coordinate(profile: np.ndarray) -> float:
    """Weighted median pixel-centre coordinate of a 1-D mass profile [N]."""
    cumulative = np.cumsum(profile)
    return float(np.searchsorted(cumulative, 0.5 * cumulative[-1])) + 0.5


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(height, dtype=np.float64)[:, None] + 0.5, np.arange(width, dtype=np.float64)[None, :] + 0.5


def _window(alpha: np.ndarray, cx: float, cy: float, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask weights inside the disc of ``radius`` around (cx, cy), cropped to its box: (w, xs, ys)."""
    height, width = alpha.shape
    r0, r1 = max(int(cy - radius), 0), min(int(cy + radius) + 1, height)
    c0, c1 = max(int(cx - radius), 0), min(int(cx + radius) + 1, width)
    ys, xs = _pixel_grid(height, width)  # [H, 1], [1, W] pixel centres
    ys, xs = ys[r0:r1], xs[:, c0:c1]
    inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius * radius  # [h, w]
    return alpha[r0:r1, c0:c1] * inside, xs, ys


def _frame_moments(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Centroid (x, y) and shape features (f3, f4) of one frame's mask [H, W], or None if too little mass."""
    height, width = alpha.shape
    min_mass = MIN_MASS_FRACTION * height * width
    if alpha.sum() < min_mass:
        return None
    cx, cy = _median_coordinate(alpha.sum(axis=0)), _median_coordinate(alpha.sum(axis=1))
    for _ in range(3):
        w, xs, ys = _window(alpha, cx, cy, WINDOW_FRACTION * width)
        mass = w.sum()
        if mass < min_mass:
            return None
        cx, cy = float((w * xs).sum() / mass), float((w * ys).sum() / mass)
    z = (xs - cx) + 1j * (ys - cy)  # [h, w], centred on the centroid of w
    z2 = z * z
    m2 = float((w * (z * z.conj()).real).sum() / mass)
    f3 = abs((w * z2 * z).sum() / mass) / m2**1.5
    f4 = -((w * z2 * z2).sum() / mass).real / m2**2
    return np.array([cx, cy]), np.array([f3, f4])


def _classify_shape(features: np.ndarray) -> str:
    f3, f4 = features[0] / TRIANGLE_F3, features[1] / SQUARE_F4
    if max(f3, f4) < SHAPE_THRESHOLD:
        return "circle"
    return "triangle" if f3 > f4 else "square"


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation of a boolean mask [T, H, W] by `radius` px (no wrap-around at the frame border)."""
    out = mask.copy()
    for axis in (1, 2):
        grown = out.copy()
        size = out.shape[axis]
        for shift in range(1, radius + 1):
            lead = [slice(None)] * 3
            lag = [slice(None)] * 3
            lead[axis], lag[axis] = slice(shift, size), slice(0, size - shift)
            grown[tuple(lead)] |= out[tuple(lag)]
            grown[tuple(lag)] |= out[tuple(lead)]
        out = grown
    return out


def _background_noise(rgb: np.ndarray, background: np.ndarray, alpha: np.ndarray | None) -> float:
    """Step 5: rgb [T, H, W, 3] in [0, 1], background [T, 3], alpha [T, H, W] (None: no object) -> 0..255."""
    deviation = np.abs(rgb - background[:, None, None, :]).mean(axis=-1) * 255.0  # [T, H, W]
    away = np.ones(deviation.shape, dtype=bool) if alpha is None else ~_dilate(alpha > 0.0, NOISE_MARGIN)
    per_frame = [float(d[a].mean()) for d, a in zip(deviation, away) if a.any()]
    return float(np.mean(per_frame)) if per_frame else float("nan")


def _classify_motion(centroids: np.ndarray, width: int) -> str | None:
    """Motion label from the centroid track [T, 2] (NaN rows ignored); None if fewer than 2 valid frames."""
    valid = ~np.isnan(centroids[:, 0])
    if valid.sum() < 2:
        return None
    t = np.arange(len(centroids), dtype=np.float64)[valid]
    slopes = np.polyfit(t, centroids[valid], 1)[0]  # [2] px per frame (x, y)
    dx, dy = slopes * (len(centroids) - 1)
    if max(abs(dx), abs(dy)) < STILL_FRACTION * width:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def analyze_clip(frames: object) -> Detection:
    """Find the object in ``frames`` ([T, H, W, 3] uint8 0..255 or float 0..1) and classify it."""
    rgb = as_float_frames(frames)  # [T, H, W, 3]
    num_frames, _, width, _ = rgb.shape
    background = np.median(rgb.reshape(num_frames, -1, 3), axis=1)  # [T, 3]
    diff = _chroma(rgb) - _chroma(background)[:, None, None, :]  # [T, H, W, 2]
    magnitude = np.linalg.norm(diff, axis=-1)  # [T, H, W]
    nothing = Detection(None, None, None, np.full((num_frames, 2), np.nan), 0.0,
                        _background_noise(rgb, background, None))
    colour, share = _vote_colour(diff, magnitude)
    if colour is None:
        return nothing
    alpha = _object_alpha(diff, magnitude, colour)
    noise = _background_noise(rgb, background, alpha)
    centroids = np.full((num_frames, 2), np.nan)
    features = []
    for t in range(num_frames):
        found = _frame_moments(alpha[t])
        if found is not None:
            centroids[t], feature = found
            features.append(feature)
    if not features:
        return Detection(None, None, None, centroids, 0.0, noise)
    shape = _classify_shape(np.median(np.stack(features), axis=0))
    motion = _classify_motion(centroids, width)
    confidence = share * len(features) / num_frames
    return Detection(colour, shape, motion, centroids, float(confidence), noise)


def score_clip(frames: object, caption: str | Combo) -> ClipScore:
    """Compare the detection in ``frames`` with the combination named by ``caption``."""
    expected = caption if isinstance(caption, Combo) else parse_caption(caption)
    detection = analyze_clip(frames)
    motion_ok = None
    if detection.centroids.shape[0] > 1:
        motion_ok = detection.motion == expected.motion
    return ClipScore(
        expected=expected,
        detection=detection,
        colour_ok=detection.colour == expected.colour,
        shape_ok=detection.shape == expected.shape,
        motion_ok=motion_ok,
    )


def _rate(values: list[bool | None]) -> float:
    measured = [v for v in values if v is not None]
    return float(np.mean(measured)) if measured else float("nan")


def score_many(clips: Sequence[object], captions: Sequence[str | Combo]) -> ScoreSummary:
    """Score each clip against its caption and aggregate the rates."""
    if len(clips) != len(captions):
        raise ValueError(f"got {len(clips)} clips but {len(captions)} captions")
    if not clips:
        raise ValueError("score_many needs at least one clip")
    scores = tuple(score_clip(frames, caption) for frames, caption in zip(clips, captions))
    return ScoreSummary(
        n=len(scores),
        colour_motion=_rate([s.colour_motion_ok for s in scores]),
        motion=_rate([s.motion_ok for s in scores]),
        colour=_rate([s.colour_ok for s in scores]),
        shape=_rate([s.shape_ok for s in scores]),
        background_noise=float(np.nanmedian([s.detection.background_noise for s in scores])),
        scores=scores,
    )
