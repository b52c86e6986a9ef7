"""Toy world: generator geometry, held-out design, captions, scorer accuracy (clean and degraded), dataset writer."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from wan_core.toy import score as toy_score
from wan_core.toy import world
from wan_core.toy.score import analyze_clip, score_clip, score_many
from wan_core.toy.world import (
    BASE_COLOURS,
    COLOURS,
    MOTIONS,
    SHAPES,
    Combo,
    all_combos,
    heldout_combos,
    parse_caption,
    render_clip,
    sample_params,
    train_combos,
    write_dataset,
)

EVERY_COMBO = all_combos(colours=COLOURS)  # 75, purple included
SHAPE_AREA = {"square": 1.0, "circle": math.pi / 4.0, "triangle": 0.5}  # fraction of the bounding box


# ---------------------------------------------------------------------------------------------------------------
# helpers: an independent degradation model (what a weak VAE or a blurry generator does to frames)
# ---------------------------------------------------------------------------------------------------------------


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of [T, H, W, 3] with edge padding."""
    radius = int(math.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    padded = np.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    height, width = x.shape[1:3]
    rows = sum(k * padded[:, :, i : i + width] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + height] for i, k in enumerate(kernel))


def _hue_rotation(degrees: float) -> np.ndarray:
    """Rotation [3, 3] about the grey axis (1, 1, 1): a pure hue shift."""
    a = math.radians(degrees)
    u = np.ones(3) / math.sqrt(3.0)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * cross @ cross


def _degrade(
    frames: np.ndarray,
    rng: np.random.Generator,
    *,
    blur: float,
    noise: float,
    hue: float,
    brightness: float,
    desaturate: float,
) -> np.ndarray:
    x = _gaussian_blur(frames.astype(np.float32) / 255.0, blur)
    x = x @ _hue_rotation(rng.uniform(-hue, hue)).T.astype(np.float32)
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * (1.0 - desaturate)
    x = x * rng.uniform(1.0 - brightness, 1.0 + brightness) + noise * rng.standard_normal(x.shape, np.float32)
    return np.clip(x, 0.0, 1.0, dtype=np.float32)  # ComfyUI IMAGE layout [T, H, W, 3] float in [0, 1]


def _rates(clips: list[np.ndarray], combos: list[Combo]) -> dict[str, float]:
    summary = score_many(clips, [c.caption for c in combos])
    return {
        "colour_motion": summary.colour_motion,
        "motion": summary.motion,
        "colour": summary.colour,
        "shape": summary.shape,
    }


# ---------------------------------------------------------------------------------------------------------------
# factors, captions, held-out design
# ---------------------------------------------------------------------------------------------------------------


def test_captions_and_factors():
    assert Combo("red", "square", "right").caption == "a red square moving right"
    assert Combo("blue", "circle", "still").caption == "a blue circle staying still"
    assert Combo("yellow", "triangle", "up").caption == "a yellow triangle moving up"
    assert set(BASE_COLOURS) >= {"red", "green", "blue", "yellow"} and "purple" in COLOURS
    assert "purple" not in BASE_COLOURS and {"square", "circle"} <= set(SHAPES)
    assert set(MOTIONS) == {"left", "right", "up", "down", "still"}
    assert len({c.caption for c in EVERY_COMBO}) == len(EVERY_COMBO)
    with pytest.raises(ValueError, match="colour"):
        Combo("pink", "square", "right")
    with pytest.raises(ValueError, match="motion"):
        Combo("red", "square", "diagonal")


def test_parse_caption_round_trip_and_errors():
    for combo in EVERY_COMBO:
        assert parse_caption(combo.caption) == combo
    assert parse_caption("  A Red  Square moving RIGHT\n") == Combo("red", "square", "right")
    bad = [
        "",
        "a pink square moving right",
        "a red hexagon moving right",
        "a red square moving diagonally",
        "red square moving right",
        "a red square staying",
        "a red square moving right fast",
        "a red square still",
    ]
    for text in bad:
        with pytest.raises(ValueError, match="caption"):
            parse_caption(text)


def test_heldout_disjoint_covering_and_compositional():
    train, held = train_combos(), heldout_combos()
    assert train_combos() == train and heldout_combos() == held  # deterministic
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(all_combos()) and len(all_combos()) == 60
    assert len(held) == 12  # 20 %
    assert all(c.colour in BASE_COLOURS for c in train + held)  # purple is reserved
    for index, values in enumerate((BASE_COLOURS, SHAPES, MOTIONS)):
        assert {astuple_(c)[index] for c in train} == set(values)
    # Every pair of factor values of a held-out combination is seen in training at least twice.
    for combo in held:
        for i, j in itertools.combinations(range(3), 2):
            pair = (astuple_(combo)[i], astuple_(combo)[j])
            seen = sum((astuple_(c)[i], astuple_(c)[j]) == pair for c in train)
            assert seen >= 2, (combo, pair, seen)


def astuple_(combo: Combo) -> tuple[str, str, str]:
    return combo.colour, combo.shape, combo.motion


def test_palette_colours_are_distinct_and_background_is_not():
    hues = sorted(toy_score.PALETTE_HUES.values())
    gaps = np.diff(hues + [hues[0] + 2 * math.pi])
    assert math.degrees(gaps.min()) > 45.0, np.degrees(gaps)
    for name, rgb in world.PALETTE.items():
        assert max(rgb) - min(rgb) >= 150, name  # saturated
    for seed in range(50):
        bg = np.array(sample_params(EVERY_COMBO[seed], seed=seed).background_rgb)
        assert 90.0 <= bg.min() and bg.max() <= 170.0 and bg.max() - bg.min() <= 16.0


# ---------------------------------------------------------------------------------------------------------------
# renderer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 9, 17])
def test_render_shape_dtype_determinism(num_frames):
    combo = Combo("green", "triangle", "left")
    clip = render_clip(combo, seed=123, num_frames=num_frames)
    assert clip.shape == (num_frames, 64, 64, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, render_clip(combo, seed=123, num_frames=num_frames))
    assert not np.array_equal(clip, render_clip(combo, seed=124, num_frames=num_frames))
    assert render_clip(combo, seed=123, num_frames=num_frames, size=128).shape == (num_frames, 128, 128, 3)


def test_render_errors():
    with pytest.raises(ValueError, match="num_frames"):
        render_clip(Combo("red", "square", "up"), seed=0, num_frames=0)
    with pytest.raises(ValueError, match="size"):
        render_clip(Combo("red", "square", "up"), seed=0, size=16)
    with pytest.raises(ValueError, match="Combo"):
        render_clip("a red square moving up", seed=0)


@pytest.mark.parametrize("num_frames", [9, 17])
def test_render_geometry_from_pixels(num_frames):
    """Measured from the pixels: object area, size/speed ranges, direction, and a clean 2 px border."""
    for index, combo in enumerate(EVERY_COMBO):
        seed = 7919 * index + num_frames
        clip = render_clip(combo, seed=seed, num_frames=num_frames).astype(np.float64)
        params = sample_params(combo, seed=seed, num_frames=num_frames)
        bg, fg = clip[0, 0, 0], np.array(params.colour_rgb)  # the rendered (rounded) background pixel
        np.testing.assert_array_equal(bg, np.rint(params.background_rgb))
        assert 16.0 <= params.object_size <= 22.0
        border = np.concatenate(
            [
                clip[:, :2].reshape(num_frames, -1, 3),
                clip[:, -2:].reshape(num_frames, -1, 3),
                clip[:, :, :2].reshape(num_frames, -1, 3),
                clip[:, :, -2:].reshape(num_frames, -1, 3),
            ],
            axis=1,
        )
        np.testing.assert_array_equal(border, np.broadcast_to(bg, border.shape))
        alpha = ((clip - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))  # [T, H, W] coverage
        area = alpha.sum(axis=(1, 2))
        expected_area = SHAPE_AREA[combo.shape] * params.object_size**2
        # supersampling puts each edge on a 1/8 px grid: at most half a step times the perimeter (< 4 x size)
        np.testing.assert_allclose(area, expected_area, atol=4 * params.object_size * 0.5 / world.SUPERSAMPLING)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        centroid = np.stack([(alpha * xs).sum((1, 2)), (alpha * ys).sum((1, 2))], axis=1) / area[:, None]
        np.testing.assert_allclose(centroid, params.centroids(combo.shape), atol=0.1)
        step = np.diff(centroid, axis=0)  # [T-1, 2] px per frame
        direction = np.array(world.MOTION_VECTORS[combo.motion], dtype=np.float64)
        if combo.motion == "still":
            np.testing.assert_allclose(step, 0.0, atol=1e-9)
        else:
            along = step @ direction
            v_max = min(4.0, (64 - 2 * world.MARGIN - params.object_size) / (num_frames - 1))  # path fits inside
            assert np.all(along > 1.9) and np.all(along < v_max + 0.1), (along, v_max)
            np.testing.assert_allclose(step - along[:, None] * direction, 0.0, atol=0.1)


# ---------------------------------------------------------------------------------------------------------------
# scorer
# ---------------------------------------------------------------------------------------------------------------


def test_scorer_on_ground_truth_clips():
    clips, combos = [], []
    for index, combo in enumerate(EVERY_COMBO):
        for k in range(2):
            clips.append(render_clip(combo, seed=1000 * k + index))
            combos.append(combo)
        clips.append(render_clip(combo, seed=5000 + index, num_frames=17))
        combos.append(combo)
    rates = _rates(clips, combos)  # 225 clips; measured: all 1.0 (also on 600 clips with 8 seeds per combo)
    assert rates["colour_motion"] >= 0.98 and rates["motion"] >= 0.98 and rates["colour"] >= 0.98, rates
    assert rates["shape"] >= 0.98, rates


def test_scorer_centroids_track_truth():
    for index, combo in enumerate(EVERY_COMBO[::3]):
        params = sample_params(combo, seed=index)
        detection = analyze_clip(world.render_params(combo, params))
        np.testing.assert_allclose(detection.centroids, params.centroids(combo.shape), atol=0.3)
        assert detection.confidence > 0.95


def test_scorer_on_degraded_clips():
    """Blur sigma 1.2 px, noise sd 0.03, hue +-10 deg, brightness +-10 %, 25 % desaturation (a weak VAE)."""
    rng = np.random.default_rng(0)
    clips, combos = [], []
    for index, combo in enumerate(EVERY_COMBO):
        for k in range(2):
            clip = render_clip(combo, seed=77 + 100 * k + index)
            clips.append(_degrade(clip, rng, blur=1.2, noise=0.03, hue=10.0, brightness=0.1, desaturate=0.25))
            combos.append(combo)
    rates = _rates(clips, combos)  # 150 clips; measured: all 1.0
    assert rates["colour_motion"] >= 0.98 and rates["shape"] >= 0.95, rates


def test_scorer_can_fail():
    clip = render_clip(Combo("red", "square", "right"), seed=3)
    result = score_clip(clip, "a blue triangle moving left")
    assert not result.colour_ok and not result.shape_ok and result.motion_ok is False
    assert result.colour_motion_ok is False
    assert score_clip(clip, "a red square staying still").colour_motion_ok is False
    assert score_clip(clip, Combo("red", "square", "right")).colour_motion_ok is True
    grey = np.full((9, 64, 64, 3), 128, dtype=np.uint8)
    detection = analyze_clip(grey)
    assert detection.colour is None and detection.motion is None and detection.confidence == 0.0
    assert np.isnan(detection.centroids).all()
    assert score_clip(grey, "a red square moving right").colour_motion_ok is False


def test_scorer_background_noise_is_zero_on_clean_clips_and_measures_added_noise():
    """Step 5 of the scorer: ground-truth frames are flat away from the object; Gaussian noise of sd s (0..1 scale)
    gives E|N(0, s)| = s sqrt(2 / pi) x 255 per channel. Allowed 5 %: the per-frame median background of a frame
    that also holds the object sits a little off the true level (about 1 % here), and the mean over ~25,000 values
    has a relative spread of about 0.5 %."""
    clean = [analyze_clip(render_clip(c, seed=i)).background_noise for i, c in enumerate(EVERY_COMBO[::5])]
    assert max(clean) < 0.5, clean
    rng = np.random.default_rng(0)
    clip = render_clip(Combo("red", "square", "right"), seed=1).astype(np.float64) / 255.0
    for sd in (0.01, 0.02, 0.05):
        expected = sd * math.sqrt(2.0 / math.pi) * 255.0
        noisy = analyze_clip(np.clip(clip + rng.normal(0.0, sd, clip.shape), 0.0, 1.0))
        assert noisy.colour == "red" and noisy.background_noise == pytest.approx(expected, rel=0.05), sd
    grey = analyze_clip(np.full((9, 64, 64, 3), 0.5) + rng.normal(0.0, 0.02, (9, 64, 64, 3)))
    expected = 0.02 * math.sqrt(2.0 / math.pi) * 255.0
    assert grey.colour is None and grey.background_noise == pytest.approx(expected, rel=0.05)
    noisy_clip = np.clip(clip + rng.normal(0.0, 0.05, clip.shape), 0.0, 1.0)
    summary = score_many([clip, noisy_clip], ["a red square moving right"] * 2)
    per_clip = [s.detection.background_noise for s in summary.scores]
    assert summary.background_noise == pytest.approx(np.median(per_clip))


def test_scorer_input_layouts_and_errors():
    combo = Combo("yellow", "circle", "down")
    clip = render_clip(combo, seed=11)
    as_uint8, as_float = analyze_clip(clip), analyze_clip(clip.astype(np.float32) / 255.0)
    assert (as_uint8.colour, as_uint8.shape, as_uint8.motion) == ("yellow", "circle", "down")
    assert (as_float.colour, as_float.shape, as_float.motion) == ("yellow", "circle", "down")
    np.testing.assert_allclose(as_float.centroids, as_uint8.centroids, atol=1e-4)
    single = score_clip(clip[0], combo)  # [H, W, 3] = one frame: motion not measurable
    assert single.colour_ok and single.shape_ok and single.motion_ok is None and single.colour_motion_ok is None
    with pytest.raises(ValueError, match="shape"):
        analyze_clip(clip[..., :2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        analyze_clip(clip.astype(np.float32))
    with pytest.raises(ValueError, match="dtype"):
        analyze_clip(clip.astype(np.int16))
    with pytest.raises(ValueError, match="caption"):
        score_clip(clip, "a yellow blob")


def test_score_many_aggregates():
    combos = [
        Combo("red", "square", "right"),
        Combo("green", "circle", "up"),
        Combo("blue", "triangle", "still"),
        Combo("yellow", "square", "left"),
    ]
    clips = [render_clip(c, seed=i) for i, c in enumerate(combos)]
    captions = [c.caption for c in combos]
    captions[1] = "a green circle moving down"  # wrong motion
    captions[2] = "a red triangle staying still"  # wrong colour
    captions[3] = "a yellow circle moving left"  # wrong shape
    summary = score_many(clips, captions)
    assert summary.n == 4 and len(summary.scores) == 4
    assert summary.colour_motion == 0.5 and summary.motion == 0.75 and summary.colour == 0.75
    assert summary.shape == 0.75
    with pytest.raises(ValueError, match="captions"):
        score_many(clips, captions[:2])


# ---------------------------------------------------------------------------------------------------------------
# dataset writer
# ---------------------------------------------------------------------------------------------------------------


def _read_png_dir(path: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(path.glob("*.png"))])


def test_write_dataset_png_dir(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    combos = [Combo("red", "square", "right"), Combo("blue", "circle", "still")]
    paths = write_dataset(tmp_path / "ds", combos, 2, seed=5, num_frames=9)
    assert len(paths) == 4 and all(p.is_dir() and p.parent == tmp_path / "ds" / "videos" for p in paths)
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(5).spawn(4)]  # documented derivation
    for path, combo, seed in zip(paths, [combos[0]] * 2 + [combos[1]] * 2, seeds):
        np.testing.assert_array_equal(_read_png_dir(path), render_clip(combo, seed=seed, num_frames=9))
        assert path.with_suffix(".txt").read_text().strip() == combo.caption
    records = [json.loads(line) for line in (tmp_path / "ds" / "dataset.jsonl").read_text().splitlines()]
    assert [Path(r["video_path"]) for r in records] == [p.resolve() for p in paths]
    config = tomllib.loads((tmp_path / "ds" / "dataset.toml").read_text())
    general, (dataset,) = config["general"], config["datasets"]
    assert general["resolution"] == [64, 64] and general["caption_extension"] == ".txt"
    assert general["batch_size"] == 1
    assert dataset["video_jsonl_file"] == str((tmp_path / "ds" / "dataset.jsonl").resolve())
    assert dataset["target_frames"] == [9] and dataset["frame_extraction"] == "head"
    assert dataset["cache_directory"] == str((tmp_path / "ds" / "cache").resolve())
    again = write_dataset(tmp_path / "again", combos, 2, seed=5)
    for first, second in zip(paths, again):
        np.testing.assert_array_equal(_read_png_dir(first), _read_png_dir(second))
    assert not list((tmp_path / "ds").rglob(".*.tmp"))


def test_write_dataset_mp4_and_purple_only(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    combos = all_combos(colours=("purple",), shapes=("square", "circle"), motions=("right", "up"))
    paths = write_dataset(tmp_path / "ds", combos, 1, seed=9, num_frames=17, fmt="mp4")
    assert [p.suffix for p in paths] == [".mp4"] * 4
    clips = []
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.average_rate == world.FPS
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == 17 and frames[0].shape == (64, 64, 3)
        clips.append(np.stack(frames))
    assert [parse_caption(p.with_suffix(".txt").read_text()) for p in paths] == combos
    rates = _rates(clips, combos)  # lossy H.264 frames still score
    assert rates["colour_motion"] == 1.0 and rates["shape"] == 1.0, rates
    config = tomllib.loads((tmp_path / "ds" / "dataset.toml").read_text())
    assert config["datasets"][0]["video_directory"] == str((tmp_path / "ds" / "videos").resolve())
    assert config["datasets"][0]["target_frames"] == [17]


def test_write_dataset_errors(tmp_path):
    combos = [Combo("red", "square", "right")]
    with pytest.raises(ValueError, match="fmt"):
        write_dataset(tmp_path / "a", combos, 1, seed=0, fmt="gif")
    with pytest.raises(ValueError, match="4N\\+1"):
        write_dataset(tmp_path / "a", combos, 1, seed=0, num_frames=8)
    with pytest.raises(ValueError, match="clips_per_combo"):
        write_dataset(tmp_path / "a", combos, 0, seed=0)
    with pytest.raises(ValueError, match="combos"):
        write_dataset(tmp_path / "a", [], 1, seed=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        write_dataset(tmp_path / "b", combos, 1, seed=0)


def test_centred_placement_keeps_the_path_midpoint_near_the_centre_and_free_placement_spreads() -> None:
    centred, free = [], []
    for seed in range(200):
        combo = world.Combo("red", "square", world.MOTIONS[seed % len(world.MOTIONS)])
        for placement, out in (("centred", centred), ("free", free)):
            params = world.sample_params(combo, seed=seed, placement=placement)
            centres = np.asarray(params.centres)
            out.append((centres[0] + centres[-1]) / 2.0)
            half = params.object_size / 2.0
            assert centres.min() >= half + world.MARGIN - 1e-9 and centres.max() <= 64 - half - world.MARGIN + 1e-9
    centred_offset = np.abs(np.asarray(centred) - 32.0)
    assert centred_offset.max() <= world.POSITION_JITTER + 1e-9
    assert np.abs(np.asarray(free) - 32.0).max() > 2 * world.POSITION_JITTER  # free paths reach the borders
    with pytest.raises(ValueError, match="unknown placement 'corner'"):
        world.sample_params(world.Combo("red", "square", "up"), seed=0, placement="corner")
