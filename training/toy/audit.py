"""An independent look at toy clips: does the picture match the caption the way a person would judge it?

`python -m training.toy.audit vae [--models DIR | --vae FILE]`  ground-truth clips through the VAE (encode + decode)
`python -m training.toy.audit t2v [--models DIR | --dit FILE]`  T2V samples of every base combination

This scorer has its own rules and shares no code with `wan_core.toy.score` or with any training loss; it only uses
the world's definitions (palette, shapes, motions) and renderer for ground truth.

Per frame, the background colour is the median of the frame's outer 2 px ring (the world keeps every object 2 px
away from the border). Each pixel is unmixed linearly between the background and the object colour (the median of
the pixels farther than half the largest distance from the background): its coverage is the projection of
(pixel - background) on (object - background), clipped to [0, 1] and kept only inside the object's bounding box
(pixels covered at least half, grown by 2 px).

* shape: the object mask (coverage >= 0.5) is laid over a template of each shape (square; circle; isosceles
  triangle, apex up, base = height) centred on the mask's centroid and sized to the mask's area (x 0.95 / 1 / 1.05);
  the template with the largest intersection over union, averaged over the frames, names the shape. A square whose
  corners are rounded is still closer to the square than to the circle; a blur that turns the object into a round
  blob (a 4 px gaussian on the world's 16-22 px objects) makes every template a circle.
* shape_box (the first rule, still reported): the mask's area over its bounding-box area (square 1.0, circle pi/4,
  triangle 0.5), median over frames, nearest class (split points 0.64 / 0.89). Ground-truth clips measure 0.99-1.0,
  0.72-0.83 and 0.50-0.59; it calls a square with rounded corners or a triangle with a rounded apex a circle.
* colour: the nearest palette colour (RGB distance) to the object colour.
* track: coverage-weighted centroids per frame. Motion: "still" when the start-to-end displacement is under
  `STILL_PATH` px, else the axis and sign of the larger displacement component.
* "staying still" holds when every centroid is within `STILL_RADIUS` px of the first; a moving clip is "smooth"
  when its largest step along the caption's direction is at most `MAX_STEP_SHARE` of the whole path, and "forward"
  when no step goes backwards by more than `BACKWARD_TOL` px.
* VAE only: the background's mean absolute deviation (0..255 levels) from the ground truth's flat background colour,
  outside the ground-truth object grown by 2 px.

Seeds (`AUDIT_SEED_BASE`) are ones no recipe stage uses.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.toy.commands import emit_json
from wan_core.loading.checkpoint import load_state_dict, read_metadata, save_safetensors
from wan_core.loading.model_set import TOY_FILES, TOY_MODEL_DIR, sampling_defaults
from wan_core.models.dit import load_dit
from wan_core.models.t5 import load_t5
from wan_core.models.vae import load_vae
from wan_core.sampling.conditioning import text_to_video
from wan_core.sampling.pipeline import SamplerSettings, decode_latents, denoise, encode_prompts
from wan_core.toy.world import (
    COLOURS,
    HELDOUT,
    MOTION_VECTORS,
    PALETTE,
    SHAPES,
    Combo,
    all_combos,
    render_params,
    sample_params,
)

logger = logging.getLogger(__name__)

AUDIT_SEED_BASE = 13_000_000  # T2V noise seeds and ground-truth clip seeds; no recipe stage uses these
RING = 2  # px of the frame border that are background in every world clip
SHAPE_RATIOS = {"square": 1.0, "circle": float(np.pi / 4.0), "triangle": 0.5}  # area / bounding-box area
TEMPLATE_SIZES = (0.95, 1.0, 1.05)  # template sides tried, relative to the side whose area equals the mask's
TEMPLATE_SUPERSAMPLING = 4  # per axis, for the templates' anti-aliased edges
MIN_CONTRAST = 30.0  # 0..255 RGB distance below which a frame holds no object
STILL_PATH = 6.0  # px: the world's slowest motion travels 16 px over 9 frames
STILL_RADIUS = 3.0
MAX_STEP_SHARE = 0.4
BACKWARD_TOL = 1.0
BACKGROUND_MAD = 3.0  # 0..255 levels

# The toy-world design the targets apply to: the recipe stamps it into the VAE and T2V DiT files it builds; files
# without the stamp (or with a lower one) predate these targets.
DESIGN_METADATA_KEY = "wantuner_toy_design"
DESIGN_VERSION = 2

# Targets: field of the figures -> (lowest, highest) allowed value
VAE_TARGETS = {"shape": (0.95, 1.0), "background_mad": (0.0, BACKGROUND_MAD)}
T2V_TARGETS = {"shape": (0.8, 1.0), "still_ok": (0.9, 1.0), "smooth": (0.8, 1.0), "forward": (0.8, 1.0),
               "colour_motion": (0.95, 1.0), "heldout_colour_motion": (0.95, 1.0)}


def design_version(path: str | Path) -> int:
    """The toy design a file was built for (`DESIGN_METADATA_KEY`; 1 when the file has no stamp)."""
    value = read_metadata(path).get(DESIGN_METADATA_KEY, "1")
    if not value.isdigit():
        raise ValueError(f"{path}: {DESIGN_METADATA_KEY} is {value!r}; expected a whole number")
    return int(value)


def stamp_design(path: str | Path) -> None:
    """Mark `path` (a safetensors file) as built for `DESIGN_VERSION`, keeping its tensors and other metadata."""
    meta = read_metadata(path) | {DESIGN_METADATA_KEY: str(DESIGN_VERSION)}
    save_safetensors(dict(load_state_dict(path)), path, meta)


# ----------------------------------------------------------------------------------------------------------------
# Per-frame measurement
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameView:
    present: bool
    colour_rgb: tuple[float, float, float]
    centroid: tuple[float, float]  # (x, y) in pixel units, pixel (i, j) centred at (j + 0.5, i + 0.5)
    ratio: float  # object mask area / its bounding-box area
    fits: tuple[float, ...]  # intersection over union of the mask with each shape's template, in `SHAPES` order


def ring_background(frame: np.ndarray) -> np.ndarray:
    """Median RGB [3] of the frame's outer `RING` px (frame [H, W, 3] in 0..255)."""
    h, w = frame.shape[:2]
    ring = np.ones((h, w), dtype=bool)
    ring[RING : h - RING, RING : w - RING] = False
    return np.median(frame[ring], axis=0)


def _bbox(mask: np.ndarray, grow: int) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (slice(max(rows[0] - grow, 0), min(rows[-1] + grow + 1, h)),
            slice(max(cols[0] - grow, 0), min(cols[-1] + grow + 1, w)))


def coverage_map(frame: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(coverage [H, W] in [0, 1], object RGB [3]) of one frame, or None when no object stands out."""
    diff = frame - background  # [H, W, 3]
    dist = np.sqrt((diff * diff).sum(axis=-1))
    peak = float(dist.max())
    if peak < MIN_CONTRAST:
        return None
    core = dist > 0.5 * peak
    colour = np.median(frame[core], axis=0)
    axis = colour - background
    cover = np.clip((diff @ axis) / float(axis @ axis), 0.0, 1.0)
    rows, cols = _bbox(cover >= 0.5 if (cover >= 0.5).any() else core, 2)
    kept = np.zeros_like(cover)
    kept[rows, cols] = cover[rows, cols]
    return kept, colour


def shape_template(shape: str, centroid: tuple[float, float], side: float, size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased coverage [H, W] of `shape` with bounding-box side `side` whose area centroid is `centroid`
    (x, y). The triangle is isosceles, apex up, base = height = side: its centroid is side / 6 below the box centre."""
    h, w = size
    offsets = (np.arange(TEMPLATE_SUPERSAMPLING) + 0.5) / TEMPLATE_SUPERSAMPLING
    box_y = centroid[1] - (side / 6.0 if shape == "triangle" else 0.0)
    x = ((np.arange(w)[:, None] + offsets).reshape(-1) - centroid[0])[None, :]  # [1, W*S]
    y = ((np.arange(h)[:, None] + offsets).reshape(-1) - box_y)[:, None]  # [H*S, 1]
    half = side / 2.0
    if shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "circle":
        inside = x * x + y * y <= half * half
    elif shape == "triangle":
        inside = (y >= -half) & (y <= half) & (np.abs(x) <= (y + half) / 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    s = TEMPLATE_SUPERSAMPLING
    return inside.reshape(h, s, w, s).mean(axis=(1, 3))


def shape_fits(mask: np.ndarray) -> tuple[float, ...]:
    """Best intersection over union of a boolean mask [H, W] with each shape's template (`SHAPES` order)."""
    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    fits = []
    for shape in SHAPES:
        side = np.sqrt(area / SHAPE_RATIOS[shape])
        best = 0.0
        for scale in TEMPLATE_SIZES:
            template = shape_template(shape, centroid, scale * side, mask.shape)
            best = max(best, float(np.minimum(mask, template).sum() / np.maximum(mask, template).sum()))
        fits.append(best)
    return tuple(fits)


def view_frame(frame: np.ndarray) -> FrameView:
    """Measure one frame [H, W, 3] (0..255 float)."""
    background = ring_background(frame)
    found = coverage_map(frame, background)
    if found is None:
        return FrameView(False, (0.0, 0.0, 0.0), (float("nan"), float("nan")), float("nan"), ())
    cover, colour = found
    area = float(cover.sum())
    ys, xs = np.indices(cover.shape)
    centroid = (float((cover * (xs + 0.5)).sum() / area), float((cover * (ys + 0.5)).sum() / area))
    mask = cover >= 0.5
    box = float(mask.any(axis=0).sum() * mask.any(axis=1).sum())
    rgb = (float(colour[0]), float(colour[1]), float(colour[2]))
    fits = shape_fits(mask) if mask.any() else tuple(0.0 for _ in SHAPES)
    return FrameView(True, rgb, centroid, float(mask.sum()) / box if box else float("nan"), fits)


def classify_shape(ratio: float) -> str:
    """The first shape rule: the class whose area / bounding-box ratio is nearest."""
    return min(SHAPE_RATIOS, key=lambda s: abs(SHAPE_RATIOS[s] - ratio)) if np.isfinite(ratio) else "none"


def classify_colour(rgb: Sequence[float]) -> str:
    return min(COLOURS, key=lambda c: float(np.linalg.norm(np.subtract(PALETTE[c], rgb))))


# ----------------------------------------------------------------------------------------------------------------
# Per-clip judgement
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipAudit:
    present: bool
    colour: str
    shape: str  # the template rule
    motion: str
    shape_ratio: float
    shape_box: str  # the area / bounding-box rule on the median ratio
    max_drift: float  # px, largest distance of a centroid from the first
    path: float  # px along the caption's direction, first to last frame
    max_step_share: float  # largest step along the caption's direction / path
    min_step: float  # px, most negative step along the caption's direction


def _motion_of(track: np.ndarray) -> str:
    dx, dy = track[-1] - track[0]
    if np.hypot(dx, dy) < STILL_PATH:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def audit_clip(frames: np.ndarray, expected_motion: str) -> ClipAudit:
    """Judge one clip [T, H, W, 3] (uint8 0..255 or float 0..1) against the caption's motion direction."""
    pixels = np.asarray(frames, dtype=np.float64)
    if pixels.max() <= 1.0 + 1e-6 and np.asarray(frames).dtype != np.uint8:
        pixels = pixels * 255.0
    views = [view_frame(f) for f in pixels]
    if not all(v.present for v in views):
        return ClipAudit(False, "none", "none", "none", float("nan"), "none", float("inf"), 0.0, 1.0, -float("inf"))
    track = np.array([v.centroid for v in views])  # [T, 2]
    ratio = float(np.median([v.ratio for v in views]))
    shape = SHAPES[int(np.argmax(np.mean([v.fits for v in views], axis=0)))]
    colour = classify_colour(np.median([v.colour_rgb for v in views], axis=0))
    drift = float(np.max(np.linalg.norm(track - track[0], axis=1)))
    direction = np.asarray(MOTION_VECTORS[expected_motion], dtype=np.float64)
    steps = np.diff(track, axis=0) @ direction if direction.any() else np.zeros(len(track) - 1)
    path = float(steps.sum())
    share = float(steps.max() / path) if path > 0 else 1.0
    return ClipAudit(True, colour, shape, _motion_of(track), ratio, classify_shape(ratio), drift, path, share,
                     float(steps.min()) if len(steps) else 0.0)


def background_mad(recon: np.ndarray, truth: np.ndarray, background_rgb: Sequence[float]) -> float:
    """Mean |recon - background| (0..255) over pixels outside the true object grown by 2 px ([T, H, W, 3] 0..255)."""
    flat = np.rint(np.asarray(background_rgb, dtype=np.float64))  # the rendered (uint8) background
    obj = np.abs(truth.astype(np.float64) - flat).max(axis=-1) > 0  # [T, H, W]
    grown = obj.copy()
    for axis in (1, 2):
        for shift in (-2, -1, 1, 2):
            grown |= np.roll(obj, shift, axis=axis)
    outside = ~grown
    return float(np.abs(recon.astype(np.float64) - flat)[outside].mean())


# ----------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------


def _rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def summarise(audits: Sequence[ClipAudit], combos: Sequence[Combo]) -> dict[str, object]:
    """Rates over clips: colour, shape (template rule), shape_box (area / box rule), motion, colour_motion, still_ok
    (still captions), smooth and forward (moving captions); medians of the step share and the still drift; n;
    shape_calls and shape_box_calls ('true->called': count)."""
    pairs = list(zip(audits, combos))
    moving = [(a, c) for a, c in pairs if c.motion != "still"]
    still = [(a, c) for a, c in pairs if c.motion == "still"]
    return {
        "n": len(pairs),
        "colour": _rate([a.colour == c.colour for a, c in pairs]),
        "shape": _rate([a.shape == c.shape for a, c in pairs]),
        "shape_box": _rate([a.shape_box == c.shape for a, c in pairs]),
        "motion": _rate([a.motion == c.motion for a, c in pairs]),
        "colour_motion": _rate([a.colour == c.colour and a.motion == c.motion for a, c in pairs]),
        "still_ok": _rate([a.present and a.max_drift <= STILL_RADIUS for a, _ in still]),
        "smooth": _rate([a.present and a.path > 0 and a.max_step_share <= MAX_STEP_SHARE for a, _ in moving]),
        "forward": _rate([a.present and a.min_step >= -BACKWARD_TOL for a, _ in moving]),
        "median_step_share": float(np.median([a.max_step_share for a, _ in moving])) if moving else float("nan"),
        "median_still_drift": float(np.median([a.max_drift for a, _ in still])) if still else float("nan"),
        "shape_calls": {f"{c.shape}->{a.shape}": sum(1 for b, d in pairs if (d.shape, b.shape) == (c.shape, a.shape))
                        for a, c in pairs},
        "shape_box_calls": {f"{c.shape}->{a.shape_box}": sum(1 for b, d in pairs
                                                            if (d.shape, b.shape_box) == (c.shape, a.shape_box))
                            for a, c in pairs},
    }


def check_targets(figures: dict[str, object], targets: dict[str, tuple[float, float]]) -> list[str]:
    """The targets `figures` misses, as 'name value not in [low, high]' lines (a missing figure misses)."""
    missed = []
    for name, (low, high) in targets.items():
        value = float(figures.get(name, float("nan")))
        if not low <= value <= high:
            missed.append(f"{name} {value:.4f} not in [{low}, {high}]")
    return missed


# ----------------------------------------------------------------------------------------------------------------
# VAE and T2V audits
# ----------------------------------------------------------------------------------------------------------------


def ground_truth(seeds: int = 2, placement: str = "centred") -> tuple[list[np.ndarray], list[Combo], list[tuple]]:
    """Every combination (purple included) x `seeds` clips with audit seeds: (clips, combos, background colours)."""
    clips, combos, backgrounds = [], [], []
    for i, combo in enumerate(all_combos(colours=COLOURS)):
        for k in range(seeds):
            params = sample_params(combo, seed=AUDIT_SEED_BASE + 500_000 + 10 * i + k, placement=placement)
            clips.append(render_params(combo, params))
            combos.append(combo)
            backgrounds.append(params.background_rgb)
    return clips, combos, backgrounds


def audit_vae(vae: object, seeds: int = 2, placement: str = "centred", batch: int = 10) -> dict[str, object]:
    """Encode + decode ground-truth clips with `vae` (`WanVAE`); audit figures plus the background MAD."""
    clips, combos, backgrounds = ground_truth(seeds, placement)
    recon = []
    for i in range(0, len(clips), batch):
        video = torch.from_numpy(np.stack(clips[i : i + batch])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        with torch.no_grad():
            out = vae.decode(vae.encode(video)).clamp(-1, 1)
        recon += list(((out + 1.0) * 127.5).permute(0, 2, 3, 4, 1).numpy())
    audits = [audit_clip(r, c.motion) for r, c in zip(recon, combos)]
    mads = [background_mad(r, t, b) for r, t, b in zip(recon, clips, backgrounds)]
    figures = summarise(audits, combos)
    figures.update(background_mad=float(np.mean(mads)), background_mad_max=float(np.max(mads)),
                   background_ok=_rate([m <= BACKGROUND_MAD for m in mads]))
    return figures


def generate_t2v(dit_path: Path, vae_path: Path, t5_path: Path, combos: Sequence[Combo], seeds: Sequence[int],
                 overrides: dict[str, float] | None = None) -> list[np.ndarray]:
    """T2V samples (uint8-range float [T, H, W, 3]) with the DiT file's stored sampling defaults, updated with
    `overrides` (keys of the `wantuner_sampling` metadata: infer_steps, guidance_scale, flow_shift)."""


    meta = sampling_defaults(dit_path) | dict(overrides or {})
    return sample_t2v(load_dit(dit_path, dtype=torch.float32), load_vae(vae_path), load_t5(t5_path), meta, combos,
                      seeds)


def sample_t2v(dit: object, vae: object, t5: object, meta: dict, combos: Sequence[Combo],
               seeds: Sequence[int]) -> list[np.ndarray]:
    """T2V samples (uint8-range float [T, H, W, 3]) of loaded models with the settings `meta` (the keys of the
    `wantuner_sampling` metadata); `dit` is one DiT or a `wan_core.sampling.experts.ExpertSwitch`."""


    negative = str(meta.get("negative_prompt", ""))
    prompts = sorted({c.caption for c in combos} | {negative})
    embeds = dict(zip(prompts, encode_prompts(t5, prompts)))
    height, width = meta.get("video_size", (64, 64))
    cond = text_to_video(int(height), int(width), int(meta.get("video_length", 9)))
    guidance = float(meta.get("guidance_scale", 5.0))
    latents = []
    for combo, seed in zip(combos, seeds):
        settings = SamplerSettings(steps=int(meta.get("infer_steps", 20)), guidance_scale=guidance,
                                   flow_shift=float(meta.get("flow_shift", 3.0)), seed=int(seed),
                                   solver=str(meta.get("sample_solver", "unipc")))
        latents.append(denoise(dit, cond, [embeds[combo.caption]], [embeds[negative]] if guidance != 1.0 else None,
                               settings))
    batches = [decode_latents(vae, torch.cat(latents[i : i + 16])) for i in range(0, len(latents), 16)]
    return [clip.numpy() * 255.0 for batch in batches for clip in batch]


def audit_models(dit: object, vae: object, t5: object, meta: dict, seeds: int = 2) -> dict[str, object]:
    """`audit_t2v` of loaded models with the settings `meta` (`dit`: one DiT or an expert switch)."""
    combos, noise = audit_jobs(seeds)
    return _audit_figures(sample_t2v(dit, vae, t5, meta, combos, noise), combos)


def audit_jobs(seeds: int) -> tuple[list[Combo], list[int]]:
    """Every base combination x `seeds`, with their noise seeds."""
    combos = [c for c in all_combos() for _ in range(seeds)]
    return combos, [AUDIT_SEED_BASE + 100 * (i // seeds) + i % seeds for i in range(len(combos))]


def _audit_figures(clips: Sequence[np.ndarray], combos: Sequence[Combo]) -> dict[str, object]:
    audits = [audit_clip(clip, c.motion) for clip, c in zip(clips, combos)]
    figures = summarise(audits, combos)
    held = [(a, c) for a, c in zip(audits, combos) if c in set(HELDOUT)]
    figures.update({f"heldout_{k}": v for k, v in summarise(*zip(*held)).items()})
    return figures


def audit_t2v(dit_path: Path, vae_path: Path, t5_path: Path, seeds: int = 2,
              overrides: dict[str, float] | None = None) -> dict[str, object]:
    """Every base combination x `seeds` noise seeds; figures overall and on the held-out combinations."""
    combos, noise = audit_jobs(seeds)
    return _audit_figures(generate_t2v(dit_path, vae_path, t5_path, combos, noise, overrides), combos)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.toy.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("vae", "t2v"))
    p.add_argument("--models", default=None, help="toy model folder (default: wan_core/toy_models)")
    p.add_argument("--vae", default=None, help="VAE file (default: the folder's)")
    p.add_argument("--dit", default=None, help="T2V DiT file (default: the folder's)")
    p.add_argument("--seeds", type=int, default=2, help="clips (vae) or noise seeds (t2v) per combination")
    p.add_argument("--placement", choices=("centred", "free"), default="centred", help="vae: ground-truth paths")
    p.add_argument("--steps", type=int, default=None, help="t2v: sampling steps (default: the DiT file's)")
    p.add_argument("--guidance", type=float, default=None, help="t2v: guidance scale (default: the DiT file's)")
    p.add_argument("--shift", type=float, default=None, help="t2v: flow shift (default: the DiT file's)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    folder = Path(args.models) if args.models else TOY_MODEL_DIR
    vae_path = Path(args.vae) if args.vae else folder / TOY_FILES["vae"]
    dit_path = Path(args.dit) if args.dit else folder / TOY_FILES["dit"]
    needed = [vae_path] + ([dit_path, folder / TOY_FILES["t5"]] if args.what == "t2v" else [])
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        sys.stderr.write(f"error: {args.what} audit needs {', '.join(missing)}, which does not exist\n")
        return 2
    if args.seeds < 1:
        sys.stderr.write(f"error: --seeds must be >= 1, got {args.seeds}\n")
        return 2
    start = time.perf_counter()
    if args.what == "vae":
        figures, targets = audit_vae(load_vae(vae_path), args.seeds, args.placement), VAE_TARGETS
    else:
        overrides = {k: v for k, v in (("infer_steps", args.steps), ("guidance_scale", args.guidance),
                                       ("flow_shift", args.shift)) if v is not None}
        figures = audit_t2v(dit_path, vae_path, folder / TOY_FILES["t5"], args.seeds, overrides)
        targets = T2V_TARGETS
    figures = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    figures.update(seconds=round(time.perf_counter() - start, 1), missed=check_targets(figures, targets))
    emit_json(figures, args.json)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())

