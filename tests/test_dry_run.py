"""`python -m training dataset --dry-run`: report content (text and JSON), exit codes, the subcommand table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from media_helpers import write_image, write_text, write_video

import training.__main__ as cli
from training import dry_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    """Two datasets: videos with one file per drop reason, and images with 2 repeats."""
    videos = tmp_path / "videos"
    write_video(videos / "good.mp4", 40, size=(48, 64), fps=32)
    write_text(videos / "good.txt", "a red ball bounces")
    write_video(videos / "short.mp4", 6, fps=32)
    write_text(videos / "short.txt", "too short for 9 frames after resampling")
    write_video(videos / "nocaption.mp4", 20)
    write_text(videos / "broken.mp4", "this is not an mp4")
    write_text(videos / "broken.txt", "unreadable")
    write_video(videos / "blank.mp4", 20)
    write_text(videos / "blank.txt", "   ")
    images = tmp_path / "images"
    write_image(images / "one.png", size=(64, 48))
    write_text(images / "one.txt", "an image")
    path = tmp_path / "dataset.toml"
    path.write_text(f"""
[general]
caption_extension = ".txt"
enable_bucket = true
resolution = [64, 48]

[[datasets]]
video_directory = "{videos}"
target_frames = [1, 9, 17, 25]
source_fps = 32.0

[[datasets]]
image_directory = "{images}"
num_repeats = 2
""")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_report_lists_frames_buckets_windows_and_every_drop_reason(config, capsys):
    code, out, _ = run_cli(capsys, "dataset", "--dataset_config", str(config), "--dry-run")
    assert code == 0
    lines = out.splitlines()
    good = next(line for line in lines if line.startswith("  good.mp4"))
    assert good == "  good.mp4: 40 frames decoded at 32.00 fps, 48x64, 20 kept at 16 fps -> bucket 48x64"
    assert "    window start 0, 9 frames: frames 0-16 (9 of 17 kept)" in lines
    assert "    window start 0, 17 frames: frames 0-32 (17 of 33 kept)" in lines
    assert any(line.startswith("    dropped target 25: too_short: needs 25 frames, 20 remain after dropping frames "
                               "from 32 to 16 fps (40 decoded)") for line in lines)
    short = next(line for line in lines if line.startswith("  short.mp4"))
    assert "6 frames decoded" in short and "3 kept at 16 fps" in short
    assert "  nocaption.mp4: DROPPED no_caption: caption file not found:" in out
    assert "  broken.mp4: DROPPED unreadable: cannot decode video" in out
    assert "  blank.mp4: DROPPED empty_caption: caption file is empty" in out
    assert "    drops: empty_caption 1, no_caption 1, too_short 4, unreadable 1" in lines
    assert "  one.png: image 64x48 -> bucket 64x48" in lines
    assert "    bucket 64x48, 1 frames: 1 items, 2 samples, 2 batches" in lines
    assert lines[-1] == "total: 5 items, 6 samples per epoch, 6 batches per epoch"


def test_json_report_is_machine_readable(config, capsys):
    code, out, _ = run_cli(capsys, "dataset", "--dataset_config", str(config), "--dry-run", "--json")
    assert code == 0
    report = json.loads(out)
    videos, images = report["datasets"]
    files = {Path(f["path"]).name: f for f in videos["files"]}
    good = files["good.mp4"]
    assert (good["decoded_frames"], good["resampled_frames"], good["bucket"]) == (40, 20, [48, 64])
    assert [(w["start"], w["frames"]) for w in good["windows"]] == [(0, 1), (0, 9), (0, 17)]
    assert good["windows"][1]["frame_indices"] == list(range(0, 18, 2))
    assert [d["target_frames"] for d in good["dropped_windows"]] == [25]
    assert files["short.mp4"]["used"] and [d["target_frames"] for d in files["short.mp4"]["dropped_windows"]] == [
        9, 17, 25]
    assert {name: f["dropped"]["reason"] for name, f in files.items() if f["dropped"]} == {
        "nocaption.mp4": "no_caption", "broken.mp4": "unreadable", "blank.mp4": "empty_caption"}
    assert files["nocaption.mp4"]["decoded_frames"] is None  # dropped before decoding
    assert videos["drops"] == {"empty_caption": 1, "no_caption": 1, "too_short": 4, "unreadable": 1}
    assert {(b["width"], b["height"], b["frames"]): b["items"] for b in videos["buckets"]} == {
        (48, 64, 1): 1, (48, 64, 9): 1, (48, 64, 17): 1, (64, 48, 1): 1}
    assert (images["items"], images["samples_per_epoch"], images["num_repeats"]) == (1, 2, 2)
    assert (report["items"], report["samples_per_epoch"], report["batches_per_epoch"]) == (5, 6, 6)


def test_empty_dataset_prints_the_report_and_fails(tmp_path, capsys):
    videos = tmp_path / "videos"
    write_video(videos / "a.mp4", 5)
    write_text(videos / "a.txt", "a")
    write_video(videos / "b.mp4", 5)
    path = tmp_path / "d.toml"
    path.write_text(f'[[datasets]]\nvideo_directory = "{videos}"\ncaption_extension = ".txt"\n'
                    "resolution = [64, 48]\ntarget_frames = [9]\n")
    code, out, err = run_cli(capsys, "dataset", "--dataset_config", str(path), "--dry-run")
    assert code == 1
    assert "  b.mp4: DROPPED no_caption" in out and "total: 0 items" in out
    assert "error: the dataset config" in err and "yields no training items" in err
    assert "drops: 1 no_caption, 1 too_short" in err


def test_invalid_config_exits_2_with_the_problem(tmp_path, capsys):
    path = tmp_path / "d.toml"
    path.write_text('[[datasets]]\nvideo_directory = "v"\ntarget_frame = [9]\n')
    code, out, err = run_cli(capsys, "dataset", "--dataset_config", str(path), "--dry-run")
    assert code == 2 and out == ""
    assert "datasets[0] (video dataset): unknown key 'target_frame' for video dataset (did you mean " in err


def test_without_dry_run_only_the_config_is_checked(config, capsys):
    code, out, _ = run_cli(capsys, "dataset", "--dataset_config", str(config))
    assert code == 0
    assert "frame_extraction head, target_frames [1, 9, 17, 25], source_fps 32 -> 16 fps" in out
    assert "decoded" not in out and out.endswith("config is valid; run with --dry-run to decode every file\n")


def test_dry_run_module_main_is_the_dataset_subcommand(config, capsys):
    assert cli.SUBCOMMANDS["dataset"][0] == "training.dry_run"
    assert dry_run.main(["--dataset-config", str(config), "--dry_run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 5


def test_help_lists_subcommands_and_exits_0(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in ("dataset", "cache-latents", "cache-text", "train", "convert-lora"):
        assert f"  {name}" in out


def test_unknown_and_unimplemented_subcommands_exit_2(capsys, monkeypatch):
    code, _, err = run_cli(capsys, "fly")
    assert code == 2 and "unknown subcommand 'fly'" in err
    monkeypatch.setitem(cli.SUBCOMMANDS, "later", ("training._not_written_yet", "a future subcommand"))
    code, _, err = run_cli(capsys, "later", "--x")
    assert code == 2 and err == "python -m training later: not implemented yet\n"
    assert run_cli(capsys)[0] == 2  # no subcommand


def test_python_dash_m_training_help_runs_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "training", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m training {dataset,cache-latents,cache-text,train,convert-lora,init-dit}" in result.stdout
