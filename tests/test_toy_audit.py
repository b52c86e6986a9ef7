"""The independent toy audit (training/toy/audit.py): right on ground-truth clips, wrong on broken ones; the toy
builds' stage timing and JSON reports (training/toy/commands.py).

Broken clips are made here with their own simple operations (a box blur, frame repetition, a drifting shift), so
the audit's calls are checked against facts of the edit, not against the audit's own output."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from training.toy import audit
from training.toy.commands import TimedStages, emit_json, run, run_all
from wan_core.toy.world import COLOURS, SHAPES, Combo, all_combos, render_params, sample_params


def _clip(combo: Combo, seed: int, placement: str = "centred") -> tuple[np.ndarray, tuple[float, ...]]:
    params = sample_params(combo, seed=seed, placement=placement)
    return render_params(combo, params), params.background_rgb


def _gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic gaussian blur of [T, H, W, 3] (edge-padded): at sigma 4 px a 16-22 px object becomes a round blob."""
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    x = np.pad(frames.astype(np.float64), ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    rows = sum(k * x[:, :, i : i + w] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + h] for i, k in enumerate(kernel))


@pytest.mark.parametrize("placement", ["centred", "free"])
def test_ground_truth_clips_are_called_right(placement: str) -> None:
    combos = all_combos(colours=COLOURS)
    audits = [audit.audit_clip(_clip(c, 900 + i, placement)[0], c.motion) for i, c in enumerate(combos)]
    figures = audit.summarise(audits, combos)
    for name in ("colour", "shape", "motion", "colour_motion", "still_ok", "smooth", "forward"):
        assert figures[name] == 1.0, (name, figures)
    # The world's motion is uniform: every step is 1/8 of the 8-step path.
    moving = [a for a, c in zip(audits, combos) if c.motion != "still"]
    assert max(a.max_step_share for a in moving) == pytest.approx(1 / 8, abs=0.02)


def test_shape_ratio_of_ground_truth_matches_geometry() -> None:
    for shape in SHAPES:
        ratios = [audit.audit_clip(_clip(Combo("blue", shape, "still"), s)[0], "still").shape_ratio
                  for s in range(10)]
        assert np.median(ratios) == pytest.approx(audit.SHAPE_RATIOS[shape], abs=0.06), shape


def test_blurred_shapes_are_blobs() -> None:
    """Squares and triangles blurred into round blobs must not be called right (a mild blur keeps them)."""
    blobs = mild = 0
    for i, shape in enumerate(("square", "triangle")):
        for seed in range(6):
            frames, _ = _clip(Combo("red", shape, "still"), 40 + 10 * i + seed)
            blobs += audit.audit_clip(_gaussian_blur(frames, 4.0), "still").shape != shape
            mild += audit.audit_clip(_gaussian_blur(frames, 0.7), "still").shape == shape
    assert blobs >= 9 and mild == 12
    blurred = [_gaussian_blur(_clip(Combo("red", "square", "still"), 40 + s)[0], 4.0) for s in range(6)]
    figures = audit.summarise([audit.audit_clip(b, "still") for b in blurred], [Combo("red", "square", "still")] * 6)
    assert sum(figures["shape_calls"].values()) == 6 and figures["shape_calls"].get("square->square", 0) <= 1


def test_softened_shapes_keep_their_template() -> None:
    """A 2 px blur rounds corners and the triangle's apex but leaves the shape a person reads: the template rule keeps
    all three; the area / bounding-box rule calls most of those triangles circles (why it no longer decides)."""
    box_triangles = 0
    for i, shape in enumerate(SHAPES):
        for seed in range(6):
            frames = _clip(Combo("green", shape, "still"), 70 + 10 * i + seed)[0]
            checked = audit.audit_clip(_gaussian_blur(frames, 2.0), "still")
            assert checked.shape == shape, (shape, seed, checked)
            box_triangles += shape == "triangle" and checked.shape_box == "triangle"
    assert box_triangles <= 2


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_template_has_the_shape_area_and_centroid(shape: str) -> None:
    side, centroid = 18.0, (30.3, 33.7)
    template = audit.shape_template(shape, centroid, side, (64, 64))
    # S x S samples per pixel place each edge within 1 / (2S) px: the side within 1 / S, the centroid within 1 / (2S).
    quantum = 1.0 / audit.TEMPLATE_SUPERSAMPLING
    assert template.sum() == pytest.approx(audit.SHAPE_RATIOS[shape] * side * side, rel=2 * quantum / side + 1e-9)
    ys, xs = np.indices(template.shape)
    got = ((template * (xs + 0.5)).sum() / template.sum(), (template * (ys + 0.5)).sum() / template.sum())
    assert got == pytest.approx(centroid, abs=quantum / 2)
    # Its own half-covered mask fits it best, by a clear margin (the other two shapes at most 0.84).
    fits = list(audit.shape_fits(template >= 0.5))
    own = fits.pop(SHAPES.index(shape))
    assert own > 0.9 and own - max(fits) > 0.1


def test_shape_template_refuses_an_unknown_shape() -> None:
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        audit.shape_template("hexagon", (10.0, 10.0), 8.0, (32, 32))


def test_chunked_motion_is_a_jump_and_a_shift_back_is_backwards() -> None:
    combo = Combo("green", "circle", "right")
    frames, _ = _clip(combo, 5)
    # frame 0 alone, then frames 1-4 and 5-8 each showing one frame: two jumps of four steps each.
    chunked = frames[[0, 2, 2, 2, 2, 6, 6, 6, 6]]
    jumpy = audit.audit_clip(chunked, "right")
    assert jumpy.max_step_share > audit.MAX_STEP_SHARE
    backwards = frames[[0, 1, 2, 3, 2, 5, 6, 7, 8]]
    assert audit.audit_clip(backwards, "right").min_step < -audit.BACKWARD_TOL
    assert audit.audit_clip(frames, "right").min_step > 0


def test_drifting_still_object_fails_and_background_noise_counts() -> None:
    frames, background = _clip(Combo("yellow", "square", "still"), 77)
    drift = np.stack([np.roll(f, t // 2, axis=1) for t, f in enumerate(frames)])  # 4 px by the last frame
    checked = audit.audit_clip(drift, "still")
    assert checked.max_drift == pytest.approx(4.0, abs=0.3) and checked.max_drift > audit.STILL_RADIUS
    assert audit.background_mad(frames, frames, background) == 0.0
    noisy = np.clip(frames.astype(np.float64) + 5.0 * np.sign(np.random.default_rng(0).standard_normal(frames.shape)),
                    0, 255)
    assert audit.background_mad(noisy, frames, background) == pytest.approx(5.0, abs=0.01)


def test_empty_frames_have_no_object_and_fail_every_target() -> None:
    frames, _ = _clip(Combo("red", "square", "still"), 3)
    flat = np.broadcast_to(frames[:, :1, :1], frames.shape).copy()
    checked = audit.audit_clip(flat, "still")
    assert not checked.present and checked.shape == "none"
    figures = audit.summarise([checked], [Combo("red", "square", "still")])
    assert figures["still_ok"] == 0.0 and figures["shape"] == 0.0


def test_float_frames_in_unit_range_are_read_like_uint8() -> None:
    frames, _ = _clip(Combo("purple", "triangle", "up"), 12)
    a, b = audit.audit_clip(frames, "up"), audit.audit_clip(frames.astype(np.float32) / 255.0, "up")
    assert (a.colour, a.shape, a.motion) == (b.colour, b.shape, b.motion) == ("purple", "triangle", "up")
    assert a.path == pytest.approx(b.path, abs=1e-4)


def test_check_targets_names_what_is_missed() -> None:
    assert audit.check_targets({"shape": 0.97, "background_mad": 2.0}, audit.VAE_TARGETS) == []
    missed = audit.check_targets({"shape": 0.5, "background_mad": 4.0}, audit.VAE_TARGETS)
    assert [m.split()[0] for m in missed] == ["shape", "background_mad"]
    assert audit.check_targets({}, {"smooth": (0.8, 1.0)})[0].startswith("smooth nan")


def test_audit_does_not_import_the_training_scorer() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(audit))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("score" in (n or "") or "vae_train" in (n or "") or "evaluate" in (n or "") for n in names)


def test_cli_names_a_missing_file_and_a_bad_seed_count(tmp_path, capsys) -> None:
    assert audit.main(["vae", "--vae", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors, which does not exist" in capsys.readouterr().err
    assert audit.main(["vae", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1, got 0" in capsys.readouterr().err


def test_t2v_samples_come_back_per_pair_in_pixel_range() -> None:
    from wan_core.loading.model_set import TOY_FILES, TOY_MODEL_DIR

    combos = [Combo("red", "square", "right"), Combo("blue", "circle", "still")]
    clips = audit.generate_t2v(TOY_MODEL_DIR / TOY_FILES["dit"], TOY_MODEL_DIR / TOY_FILES["vae"],
                               TOY_MODEL_DIR / TOY_FILES["t5"], combos, [1, 2], {"infer_steps": 2})
    assert len(clips) == 2 and all(c.shape == (9, 64, 64, 3) for c in clips)
    assert min(float(c.min()) for c in clips) >= 0.0 and max(float(c.max()) for c in clips) <= 255.0
    assert not np.array_equal(clips[0], clips[1])


@dataclasses.dataclass
class _Build(TimedStages):
    REPORT_NAME = "build_report.json"
    work: Path
    stages: dict = dataclasses.field(default_factory=dict)
    figures: dict = dataclasses.field(default_factory=dict)


def test_timed_stages_record_seconds_and_rewrite_the_report_and_emit_json_writes_what_it_prints(tmp_path,
                                                                                               capsys) -> None:
    build = _Build(tmp_path)
    assert build.timed("double", lambda x: 2 * x, 21) == 42
    build.figures["answer"] = 42
    build.save()
    report = json.loads((tmp_path / "build_report.json").read_text())
    assert list(report["stages"]) == ["double"] and report["stages"]["double"] >= 0.0
    assert report["figures"] == {"answer": 42}
    emit_json({"a": 1.5}, tmp_path / "f.json")
    assert json.loads(capsys.readouterr().out) == {"a": 1.5} == json.loads((tmp_path / "f.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build_report.json", "f.json"]  # no temporary file left


def test_run_all_runs_jobs_at_once_logs_each_and_names_the_failed_log(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ok, bad = tmp_path / "ok.log", tmp_path / "bad.log"
    code = "import os, sys; print('threads', os.environ['OMP_NUM_THREADS']); sys.exit(int(sys.argv[1]))"
    run_all([(["-c", code, "0"], ok), (["-c", code, "0"], bad)])
    assert "threads " in ok.read_text() and "threads " in bad.read_text()
    with pytest.raises(RuntimeError, match=r"exit code 3, see .*bad\.log") as failure:
        run_all([(["-c", code, "0"], ok), (["-c", code, "3"], bad)])
    assert "ok.log" not in str(failure.value)


def test_run_appends_the_command_and_its_output_and_names_the_log_on_failure(tmp_path: Path) -> None:
    log = tmp_path / "stage.log"
    run(["-c", "print('first run')"], log)
    with pytest.raises(RuntimeError, match=r"failed with exit code 4; see .*stage\.log"):
        run(["-c", "import sys; print('second run'); sys.exit(4)"], log)
    text = log.read_text()
    assert text.count("\n$ ") == 2 and text.index("first run") < text.index("second run")
