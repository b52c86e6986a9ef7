"""Frame extraction, fps resampling, bucketing, media reading, dataset scanning and batching."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from media_helpers import frame_id, write_frames_dir, write_image, write_text, write_video
from PIL import Image

from training.dataset.items import (
    DatasetItem,
    DropReason,
    bucket_resolutions,
    ensure_not_empty,
    epoch_batches,
    extract_frame_windows,
    fps_keep_indices,
    make_batches,
    scan_dataset_group,
    select_bucket,
    summarize,
)
from training.dataset.schema import DatasetGroupConfig, parse_dataset_config
from wan_core.media.io import MediaReadError, inspect_video, read_image, read_video, resize_to_bucket

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# ---------------------------------------------------------------------------------------------------------------------
# Frame extraction: the 40-frame diagram of musubi's docs/dataset_config.md ("frame_extraction Options"), as data.
# x = a frame of the window, o = not used.

DIAGRAM = {
    ("head", (1, 13, 25), ()): [
        "xooooooooooooooooooooooooooooooooooooooo",
        "xxxxxxxxxxxxxooooooooooooooooooooooooooo",
        "xxxxxxxxxxxxxxxxxxxxxxxxxooooooooooooooo",
    ],
    ("chunk", (13, 25), ()): [
        "xxxxxxxxxxxxxooooooooooooooooooooooooooo",
        "oooooooooooooxxxxxxxxxxxxxoooooooooooooo",
        "ooooooooooooooooooooooooooxxxxxxxxxxxxxo",
        "xxxxxxxxxxxxxxxxxxxxxxxxxooooooooooooooo",
    ],
    ("slide", (1, 13, 25), (("frame_stride", 10),)): [
        "xooooooooooooooooooooooooooooooooooooooo",
        "ooooooooooxooooooooooooooooooooooooooooo",
        "ooooooooooooooooooooxooooooooooooooooooo",
        "ooooooooooooooooooooooooooooooxooooooooo",
        "xxxxxxxxxxxxxooooooooooooooooooooooooooo",
        "ooooooooooxxxxxxxxxxxxxooooooooooooooooo",
        "ooooooooooooooooooooxxxxxxxxxxxxxooooooo",
        "xxxxxxxxxxxxxxxxxxxxxxxxxooooooooooooooo",
        "ooooooooooxxxxxxxxxxxxxxxxxxxxxxxxxooooo",
    ],
    ("uniform", (1, 13, 25), (("frame_sample", 4),)): [
        "xooooooooooooooooooooooooooooooooooooooo",
        "oooooooooooooxoooooooooooooooooooooooooo",
        # The hand-drawn diagram puts this sample at frame 25; musubi's code, np.linspace(0, 39, 4, dtype=int),
        # gives 26 (= 39 * 2 / 3 exactly), so the row is shifted by one here.
        "ooooooooooooooooooooooooooxooooooooooooo",
        "ooooooooooooooooooooooooooooooooooooooox",
        "xxxxxxxxxxxxxooooooooooooooooooooooooooo",
        "oooooooooxxxxxxxxxxxxxoooooooooooooooooo",
        "ooooooooooooooooooxxxxxxxxxxxxxooooooooo",
        "oooooooooooooooooooooooooooxxxxxxxxxxxxx",
        "xxxxxxxxxxxxxxxxxxxxxxxxxooooooooooooooo",
        "oooooxxxxxxxxxxxxxxxxxxxxxxxxxoooooooooo",
        "ooooooooooxxxxxxxxxxxxxxxxxxxxxxxxxooooo",
        "oooooooooooooooxxxxxxxxxxxxxxxxxxxxxxxxx",
    ],
}


def diagram_windows(rows: list[str]) -> list[tuple[int, int]]:
    return [(row.index("x"), row.count("x")) for row in rows]


@pytest.mark.parametrize(("mode", "targets", "options"), list(DIAGRAM), ids=lambda v: str(v))
def test_extraction_modes_match_the_documented_40_frame_diagram(mode, targets, options):
    windows = extract_frame_windows(40, targets, mode, **dict(options))
    assert windows == diagram_windows(DIAGRAM[(mode, targets, options)])


# The documentation's "full, max_frames = 31" example shows 20, 25, 35 frames -> 17, 25, 31. But 31 is not 4N+1, and
# musubi's code since "full" was added (89a66b5) computes (min(35, 31) - 1) // 4 * 4 + 1 = 29; this follows the code.
@pytest.mark.parametrize(("frames", "max_frames", "expected"), [(20, 31, 17), (25, 31, 25), (35, 31, 29),
                                                                (35, 33, 33), (200, 129, 129), (3, 129, 1)])
def test_full_mode_caps_at_max_frames_then_rounds_down_to_4n1(frames, max_frames, expected):
    assert extract_frame_windows(frames, (1,), "full", max_frames=max_frames) == [(0, expected)]


def test_chunk_with_target_1_takes_every_frame():  # the documentation's warning
    assert extract_frame_windows(40, (1,), "chunk") == [(i, 1) for i in range(40)]


def test_uniform_with_one_sample_is_head():
    assert extract_frame_windows(40, (1, 13, 25), "uniform", frame_sample=1) == extract_frame_windows(
        40, (1, 13, 25), "head")


def test_targets_longer_than_the_video_give_no_window():
    for mode in ("head", "chunk", "slide", "uniform"):
        assert extract_frame_windows(20, (25, 45), mode, frame_stride=3, frame_sample=3) == []
    assert extract_frame_windows(0, (1,), "full") == []


def test_uniform_repeated_starts_are_kept_once():
    # np.linspace(0, 1, 4, dtype=int) = [0, 0, 0, 1]; musubi would write the same cache file for the repeats.
    assert extract_frame_windows(14, (13,), "uniform", frame_sample=4) == [(0, 13), (1, 13)]


# ---------------------------------------------------------------------------------------------------------------------
# source_fps


def test_fps_keep_every_other_frame_at_double_rate():
    assert fps_keep_indices(40, 32.0) == list(range(0, 40, 2))
    assert fps_keep_indices(40, 64.0) == list(range(0, 40, 4))


def test_fps_keep_everything_at_or_below_16():
    assert fps_keep_indices(30, 16.0) == list(range(30))
    assert fps_keep_indices(30, 8.0) == list(range(30))


def test_fps_30_matches_musubi_float_accumulation():
    # musubi's load_video adds 16/30 per frame in float64; after 15 additions the sum is 7.999..., not 8, so frame 16
    # (not 15) is the ninth frame kept. Values from running musubi's loop by hand, independent of this code.
    assert fps_keep_indices(30, 30.0) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 17, 19, 21, 23, 25, 27, 29]


def test_fps_rejects_non_positive_rates():
    with pytest.raises(ValueError, match="source_fps=0"):
        fps_keep_indices(10, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Buckets

RESOLUTION = (960, 544)


def test_bucket_candidates_follow_the_rule():
    buckets = bucket_resolutions(RESOLUTION)
    area = 960 * 544
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= area for w, h in buckets)
    assert (960, 544) in buckets and (544, 960) in buckets
    widths = sorted({min(w, h) for w, h in buckets})
    assert widths[0] == 352  # int(sqrt(522240)) // 2 = 361, rounded down to 16
    assert max(min(w, h) for w, h in buckets) == 720  # short sides stop at sqrt(area) = 722
    assert list(buckets) == sorted(buckets)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((1280, 720), (960, 544)),  # 16:9; 960/544 = 1.765 is the nearest candidate
        ((720, 1280), (544, 960)),
        ((512, 512), (720, 720)),  # 522240 // 720 = 725 -> 720
        ((640, 480), (832, 624)),  # 522240 // 624 = 836 -> 832, exactly 4:3
        ((1920, 1080), (960, 544)),
    ],
)
def test_nearest_aspect_ratio_bucket(size, bucket):
    assert select_bucket(size, RESOLUTION, enable_bucket=True) == bucket


def test_bucket_no_upscale_keeps_small_sources_rounded_to_16():
    assert select_bucket((320, 240), RESOLUTION, enable_bucket=True, no_upscale=True) == (320, 240)
    assert select_bucket((330, 250), RESOLUTION, enable_bucket=True, no_upscale=True) == (320, 240)
    assert select_bucket((1920, 1080), RESOLUTION, enable_bucket=True, no_upscale=True) == (960, 544)
    with pytest.raises(ValueError, match="smaller than 16 px"):
        select_bucket((10, 200), RESOLUTION, enable_bucket=True, no_upscale=True)


def test_without_bucketing_everything_uses_the_resolution():
    assert select_bucket((1920, 1080), RESOLUTION, enable_bucket=False, no_upscale=True) == RESOLUTION
    assert select_bucket((320, 240), RESOLUTION, enable_bucket=False, no_upscale=True) == RESOLUTION


# ---------------------------------------------------------------------------------------------------------------------
# Resizing


def test_resize_identity_returns_the_input():
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert resize_to_bucket(image, (64, 48)) is image


def test_resize_shrinks_by_area_average_and_crops_the_centre():
    # 2x2 blocks of one value: an area-average 2x downscale returns the block values exactly.
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # [H, W, 3]
    image = blocks.repeat(2, axis=0).repeat(2, axis=1)  # [48, 64, 3]
    # bucket 32x16: scale = max(32/64, 16/48) = 0.5 -> 32x24, then rows (24 - 16) // 2 = 4 .. 20 are kept
    out = resize_to_bucket(image, (32, 16))
    np.testing.assert_array_equal(out, blocks[4:20])


def test_resize_enlarges_to_cover_then_crops():
    image = np.full((30, 40, 3), 77, np.uint8)
    out = resize_to_bucket(image, (96, 48))  # scale = max(2.4, 1.6) = 2.4 -> 96x72, crop rows 12..60
    assert out.shape == (48, 96, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, 77)


# ---------------------------------------------------------------------------------------------------------------------
# Media reading


def test_video_frame_count_is_decoded_and_frames_are_the_right_ones(tmp_path):
    path = write_video(tmp_path / "v.mp4", 37, size=(64, 48), fps=24)
    info = inspect_video(path)
    assert (info.frame_count, info.width, info.height) == (37, 64, 48)
    assert info.fps == pytest.approx(24.0)
    frames = read_video(path)  # [T, H, W, 3]
    assert frames.shape == (37, 48, 64, 3) and frames.dtype == np.uint8
    assert [frame_id(f) for f in frames] == list(range(37))
    picked = read_video(path, [30, 2, 2, 11])
    assert [frame_id(f) for f in picked] == [30, 2, 2, 11]


def test_frame_directory_reads_like_a_video(tmp_path):
    directory = write_frames_dir(tmp_path / "clip", 9, size=(32, 16))
    assert inspect_video(directory).frame_count == 9
    frames = read_video(directory, [8, 0])
    assert frames.shape == (2, 16, 32, 3)
    assert [frame_id(f) for f in frames] == [8, 0]


def test_unreadable_and_missing_media_give_clear_errors(tmp_path):
    bad = write_text(tmp_path / "bad.mp4", "not a video")
    with pytest.raises(MediaReadError, match=r"cannot decode video .*bad\.mp4"):
        inspect_video(bad)
    with pytest.raises(FileNotFoundError, match="media file not found"):
        read_video(tmp_path / "none.mp4")
    broken = write_text(tmp_path / "broken.png", "not an image")
    with pytest.raises(MediaReadError, match=r"cannot read image .*broken\.png"):
        read_image(broken)
    short = write_video(tmp_path / "short.mp4", 5)
    with pytest.raises(MediaReadError, match=r"frame indices \[7\] requested but .* has only 5 frames"):
        read_video(short, [1, 7])


def test_frame_directory_with_mixed_sizes_is_unreadable(tmp_path):
    directory = write_frames_dir(tmp_path / "clip", 3, size=(32, 16))
    write_image(directory / "0003.png", size=(16, 16))
    with pytest.raises(MediaReadError, match="0003.png is 16x16"):
        inspect_video(directory)


def test_read_image_is_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (20, 10), 100).save(path)
    image = read_image(path)
    assert image.shape == (10, 20, 3)
    np.testing.assert_array_equal(image, 100)


# ---------------------------------------------------------------------------------------------------------------------
# Scanning datasets


def group(datasets: list[str], general: str = "") -> DatasetGroupConfig:
    return parse_dataset_config(tomllib.loads(general + "\n" + "\n".join(datasets)))


def video_dataset(directory: Path, extra: str = "") -> str:
    head = f'[[datasets]]\nvideo_directory = "{directory}"\ncaption_extension = ".txt"\n'
    return head + "resolution = [64, 48]\n" + extra


def test_video_directory_scan_reports_frames_buckets_windows_and_drops(tmp_path):
    videos = tmp_path / "videos"
    write_video(videos / "long.mp4", 30, size=(96, 48))
    write_text(videos / "long.txt", "  a red ball  \n")
    write_video(videos / "short.mp4", 10)
    write_text(videos / "short.txt", "a short clip")
    write_video(videos / "nocap.mp4", 10)
    write_text(videos / "bad.mp4", "garbage")
    write_text(videos / "bad.txt", "caption")
    write_video(videos / "empty.mp4", 10)
    write_text(videos / "empty.txt", " \n")
    scan = scan_dataset_group(group([video_dataset(videos, "target_frames = [1, 13]\nenable_bucket = true\n")]))
    reports = {r.media_path.name: r for r in scan.files}
    long = reports["long.mp4"]
    assert long.decoded_frames == 30 and long.size == (96, 48) and long.caption == "a red ball"
    assert long.bucket == select_bucket((96, 48), (64, 48), enable_bucket=True)
    assert [(w.start, w.count) for w in long.windows] == [(0, 1), (0, 13)]
    assert long.windows[1].frame_indices == tuple(range(13))
    short = reports["short.mp4"]
    assert [(w.start, w.count) for w in short.windows] == [(0, 1)]
    assert [(d.reason, d.target_frames) for d in short.drops] == [(DropReason.TOO_SHORT, 13)]
    assert "needs 13 frames, the video has 10" in short.drops[0].detail
    assert reports["nocap.mp4"].drops[0].reason == DropReason.NO_CAPTION and not reports["nocap.mp4"].used
    assert reports["bad.mp4"].drops[0].reason == DropReason.UNREADABLE
    assert reports["empty.mp4"].drops[0].reason == DropReason.EMPTY_CAPTION
    assert sorted((i.media_path.name, i.batch_key) for i in scan.items) == [
        ("long.mp4", (*long.bucket, 1)), ("long.mp4", (*long.bucket, 13)), ("short.mp4", (64, 48, 1))]


def test_source_fps_drops_frames_to_16fps_end_to_end(tmp_path):
    videos = tmp_path / "videos"
    write_video(videos / "fast.mp4", 40, fps=32)
    write_text(videos / "fast.txt", "fast")
    scan = scan_dataset_group(group([video_dataset(videos, "target_frames = [9, 25]\nsource_fps = 32.0\n")]))
    (report,) = scan.files
    assert (report.decoded_frames, report.resampled_frames) == (40, 20)
    assert [d.target_frames for d in report.drops] == [25]
    assert "20 remain after dropping frames from 32 to 16 fps (40 decoded)" in report.drops[0].detail
    (item,) = scan.items
    assert item.frame_indices == (0, 2, 4, 6, 8, 10, 12, 14, 16)
    frames = read_video(item.media_path, item.frame_indices)
    assert [frame_id(f) for f in frames] == list(item.frame_indices)


def test_control_videos_pair_by_stem_and_repeat_their_last_frame(tmp_path):
    videos, controls = tmp_path / "videos", tmp_path / "controls"
    for name in ("a", "b", "c", "d"):
        write_video(videos / f"{name}.mp4", 17)
        write_text(videos / f"{name}.txt", name)
    write_video(controls / "a.mov", 13)  # another extension, shorter
    write_frames_dir(controls / "b", 17)  # a directory of frames
    write_video(controls / "d.mov", 17)
    write_video(controls / "d.mkv", 17)  # musubi tries .mkv before .mov
    extra = f'control_directory = "{controls}"\ntarget_frames = [17]\n'
    scan = scan_dataset_group(group([video_dataset(videos, extra)]))
    reports = {r.media_path.stem: r for r in scan.files}
    a = reports["a"]
    assert a.control_path == controls / "a.mov" and a.control_frames == 13
    assert a.windows[0].control_indices == (*range(13), 12, 12, 12, 12)
    assert reports["b"].control_path == controls / "b" and reports["b"].windows[0].control_indices == tuple(range(17))
    assert reports["c"].drops[0].reason == DropReason.NO_CONTROL
    assert {i.media_path.stem: i.control_path for i in scan.items} == {
        "a": controls / "a.mov", "b": controls / "b", "d": controls / "d.mkv"}


def test_jsonl_control_paths(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", 9)
    control = write_video(tmp_path / "control.mp4", 9)
    lines = [{"video_path": str(clip), "control_path": str(control), "caption": "with control"},
             {"video_path": str(clip), "caption": "without"},
             {"video_path": str(clip), "control_path": str(tmp_path / "gone.mp4"), "caption": "gone"}]
    jsonl = write_text(tmp_path / "meta.jsonl", "\n".join(json.dumps(line) for line in lines))
    dataset = f'[[datasets]]\nvideo_jsonl_file = "{jsonl}"\ncache_directory = "{tmp_path / "c"}"\n' \
              "resolution = [64, 48]\ntarget_frames = [9]\n"
    scan = scan_dataset_group(group([dataset]))
    assert [r.drops[0].reason if r.drops else None for r in scan.files] == [None, DropReason.NO_CONTROL,
                                                                           DropReason.NO_CONTROL]
    (item,) = scan.items
    assert item.control_path == control and item.control_frame_indices == tuple(range(9))


def test_image_directory_scan(tmp_path):
    images = tmp_path / "images"
    write_image(images / "wide.png", size=(128, 64))
    write_text(images / "wide.txt", "wide")
    write_image(images / "tall.jpg", size=(64, 128))
    write_text(images / "tall.txt", "tall")
    write_image(images / "nocap.png")
    dataset = f'[[datasets]]\nimage_directory = "{images}"\ncaption_extension = ".txt"\nresolution = 64\n' \
              "enable_bucket = true\n"
    scan = scan_dataset_group(group([dataset]))
    items = {i.media_path.name: i for i in scan.items}
    assert set(items) == {"wide.png", "tall.jpg"}
    assert items["wide.png"].bucket == select_bucket((128, 64), (64, 64), enable_bucket=True)
    assert items["tall.jpg"].batch_key == (*select_bucket((64, 128), (64, 64), enable_bucket=True), 1)
    assert not items["wide.png"].is_video and items["wide.png"].item_key == "wide"
    assert [r.drops[0].reason for r in scan.files if not r.used] == [DropReason.NO_CAPTION]


def test_jsonl_datasets(tmp_path):
    clip = write_video(tmp_path / "media" / "clip.mp4", 9)
    frames = write_frames_dir(tmp_path / "media" / "frames", 5)
    lines = [
        {"video_path": str(clip), "caption": "a clip"},
        {"video_path": str(frames), "caption": "frames"},
        {"video_path": str(tmp_path / "gone.mp4"), "caption": "gone"},
        {"video_path": str(clip)},
        {"video_path": str(clip), "caption": ""},
    ]
    jsonl = write_text(tmp_path / "meta.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    dataset = f'[[datasets]]\nvideo_jsonl_file = "{jsonl}"\ncache_directory = "{tmp_path / "cache"}"\n' \
              "resolution = [64, 48]\ntarget_frames = [5]\n"
    scan = scan_dataset_group(group([dataset]))
    assert [r.drops[0].reason if r.drops else None for r in scan.files] == [
        None, None, DropReason.MISSING_FILE, DropReason.NO_CAPTION, DropReason.EMPTY_CAPTION]
    expected = [(clip, "a clip", 5), (frames, "frames", 5)]
    assert [(i.media_path, i.caption, i.frame_count) for i in scan.items] == expected


def test_malformed_jsonl_line_is_a_config_error(tmp_path):
    jsonl = write_text(tmp_path / "meta.jsonl", '{"image_path": "a.png", "caption": "a"}\n{oops}\n')
    dataset = f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "{tmp_path}"\n'
    with pytest.raises(ValueError, match=r"meta\.jsonl line 2 is not valid JSON"):
        scan_dataset_group(group([dataset]))


def test_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"datasets\[0\]: video_directory not found"):
        scan_dataset_group(group([video_dataset(tmp_path / "nowhere")]))


def test_empty_dataset_error_counts_the_drop_reasons(tmp_path):
    videos = tmp_path / "videos"
    write_video(videos / "a.mp4", 5)
    write_text(videos / "a.txt", "a")
    write_video(videos / "b.mp4", 5)
    scan = scan_dataset_group(group([video_dataset(videos, "target_frames = [9]\n")]))
    with pytest.raises(ValueError, match=r"yields no training items \(2 files listed; drops: 1 no_caption, "
                                         r"1 too_short\)"):
        ensure_not_empty(scan)


# ---------------------------------------------------------------------------------------------------------------------
# Batching


def item(name: str, bucket: tuple[int, int], frames: int, dataset_index: int = 0) -> DatasetItem:
    return DatasetItem(dataset_index=dataset_index, media_path=Path(name), caption=name, frame_start=0,
                       frame_count=frames, frame_indices=tuple(range(frames)), bucket=bucket, original_size=bucket)


ITEMS = [item("a", (64, 48), 5), item("b", (64, 48), 5), item("c", (64, 48), 9), item("d", (48, 64), 5),
         item("e", (64, 48), 5)]


def test_batches_group_identical_width_height_frames_with_repeats():
    batches = make_batches(ITEMS, batch_size=2, num_repeats=2)
    assert all(len({i.batch_key for i in batch}) == 1 for batch in batches)
    assert Counter(i.media_path.name for batch in batches for i in batch) == dict.fromkeys("abcde", 2)
    # unshuffled: buckets in sorted key order, items in input order, the last batch of a bucket may be partial
    assert [[i.media_path.name for i in b] for b in batches] == [
        ["d", "d"], ["a", "a"], ["b", "b"], ["e", "e"], ["c", "c"]]
    assert [len(b) for b in make_batches(ITEMS, batch_size=2)] == [1, 2, 1, 1]


def test_seeded_shuffle_is_reproducible_and_depends_on_the_seed():
    names = [[[i.media_path.name for i in b] for b in make_batches(ITEMS, 2, 3, seed=s)] for s in (1, 1, 2)]
    assert names[0] == names[1] and names[0] != names[2]
    assert all(len({i.batch_key for i in b}) == 1 for b in make_batches(ITEMS, 2, 3, seed=7))


def test_epoch_batches_cover_every_dataset_and_change_per_epoch(tmp_path):
    images = tmp_path / "images"
    for k in range(6):
        write_image(images / f"{k}.png", size=(64, 48) if k % 2 else (48, 64))
        write_text(images / f"{k}.txt", f"image {k}")
    videos = tmp_path / "videos"
    write_video(videos / "v.mp4", 20)
    write_text(videos / "v.txt", "video")
    datasets = [
        f'[[datasets]]\nimage_directory = "{images}"\ncaption_extension = ".txt"\nresolution = [64, 48]\n'
        "enable_bucket = true\nbatch_size = 2\nnum_repeats = 2\n",
        video_dataset(videos, 'frame_extraction = "slide"\ntarget_frames = [5]\nframe_stride = 5\n'),
    ]
    scan = scan_dataset_group(group(datasets))
    first, again, other = epoch_batches(scan, seed=3, epoch=0), epoch_batches(scan, seed=3), epoch_batches(scan, 3, 1)
    assert first == again and first != other
    assert sum(len(b) for b in first) == 6 * 2 + 4
    summary_image, summary_video = summarize(scan)
    assert (summary_image.items, summary_image.samples, summary_image.batches) == (6, 12, 6)
    assert (summary_video.items, summary_video.samples, summary_video.batches) == (4, 4, 4)
    assert len(first) == summary_image.batches + summary_video.batches
