"""Dataset TOML parsing: musubi's documentation examples, resolution of [general] keys, and clear errors."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from pathlib import Path

import pytest

from training.dataset.schema import (
    DatasetGroupConfig,
    ImageDatasetConfig,
    VideoDatasetConfig,
    check_dataset_group,
    load_dataset_config,
    parse_dataset_config,
    round_frames_4n1,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# The TOML examples of kohya-ss/musubi-tuner docs/dataset_config.md (commit 30c658c4, Apache-2.0), stored verbatim
# as data files (ruff would strip their trailing spaces inside a Python string).
EXAMPLES = Path(__file__).parent / "data" / "musubi_dataset_examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.toml"))
COMPLETE = ["00_image_captions", "01_image_jsonl", "02_video_captions", "03_video_jsonl"]


def parse(text: str) -> DatasetGroupConfig:
    return parse_dataset_config(tomllib.loads(text))


def parse_error(text: str) -> str:
    with pytest.raises(ValueError) as info:
        parse(text)
    return str(info.value)


def example(name: str) -> DatasetGroupConfig:
    return parse((EXAMPLES / f"{name}.toml").read_text(encoding="utf-8"))


def test_all_thirteen_documentation_examples_are_present():
    assert len(EXAMPLE_FILES) == 13


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_every_documentation_example_parses_unchanged(path):
    group = parse(path.read_text(encoding="utf-8"))
    assert group.datasets


@pytest.mark.parametrize("name", COMPLETE)
def test_complete_examples_load_from_file_and_pass_the_build_check(name):
    group = load_dataset_config(EXAMPLES / f"{name}.toml")
    assert group.source.endswith(f"{name}.toml")


def test_image_caption_example_values():
    (dataset,) = example("00_image_captions").datasets
    assert isinstance(dataset, ImageDatasetConfig)
    assert dataset.image_directory == "/path/to/image_dir"
    assert dataset.cache_directory == "/path/to/cache_directory"
    assert (dataset.resolution, dataset.caption_extension, dataset.batch_size) == ((960, 544), ".txt", 1)
    assert (dataset.enable_bucket, dataset.bucket_no_upscale, dataset.num_repeats) == (True, False, 1)


def test_video_caption_example_values():
    first, second = example("02_video_captions").datasets
    assert isinstance(first, VideoDatasetConfig) and isinstance(second, VideoDatasetConfig)
    assert first.target_frames == (1, 25, 45)
    assert first.frame_extraction == "head" and first.source_fps == 30.0
    assert first.caption_extension == ".txt" and first.enable_bucket  # from [general]
    assert second.frame_extraction == "full" and second.max_frames == 45
    assert second.target_frames == (1,) and second.source_fps is None  # musubi's defaults


def test_video_jsonl_example_shares_the_jsonl_with_distinct_caches():
    first, second = example("03_video_jsonl").datasets
    assert first.video_jsonl_file == second.video_jsonl_file == "/path/to/metadata.jsonl"
    assert first.resolved_cache_directory != second.resolved_cache_directory
    assert second.target_frames == (1,) and second.frame_stride == 10


def test_specification_example_values():
    image, image_jsonl, video, video_jsonl = example("12_specification").datasets
    assert image.batch_size == 4 and not image.enable_bucket and image.bucket_no_upscale
    assert image.control_directory == "/path/to/control_dir"
    assert image_jsonl.batch_size == 1 and image_jsonl.enable_bucket  # [general] values
    # 79 is not 4N+1 although the example's comment says so; musubi rounds it down to 77 as well.
    assert video.target_frames == (1, 25, 77) and video.frame_sample == 4 and video.max_frames == 129
    assert video_jsonl.target_frames == (1, 77)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("04_image_control_resize", "caption_extension is required with image_directory"),
        ("05_video_control", "caption_extension is required with video_directory"),
        ("06_framepack_window", "no data: set image_directory or image_jsonl_file"),
        ("07_framepack_1f", "no data"),
        ("08_framepack_1f_mc", "no data"),
        ("09_framepack_kisekaeichi", "no data"),
        ("10_qwen_edit_control", "no data"),
        ("11_qwen_edit_control_ja", "no data"),
        ("12_specification", "cache directory '/path/to/cache_directory' is also used by datasets[0]"),
    ],
)
def test_fragment_examples_parse_but_the_build_check_names_what_is_missing(name, reason):
    group = example(name)
    with pytest.raises(ValueError, match=r"datasets\[\d\]: " + re.escape(reason)):
        check_dataset_group(group)


def test_musubi_only_keys_are_kept():
    (dataset,) = example("09_framepack_kisekaeichi").datasets
    assert dataset.fp_1f_clean_indices == (0, 10) and dataset.fp_1f_target_index == 1 and dataset.fp_1f_no_post
    (dataset,) = example("04_image_control_resize").datasets
    assert dataset.control_resolution == (1024, 1024) and dataset.no_resize_control is False


def test_dataset_values_override_general_and_int_resolution_is_square():
    group = parse(
        """
        [general]
        resolution = 512
        batch_size = 2
        caption_extension = ".caption"
        [[datasets]]
        image_directory = "a"
        [[datasets]]
        image_directory = "b"
        resolution = [640, 368]
        batch_size = 3
        num_repeats = 5
        """
    )
    first, second = group.datasets
    assert (first.resolution, first.batch_size, first.num_repeats) == ((512, 512), 2, 1)
    assert (second.resolution, second.batch_size, second.num_repeats) == ((640, 368), 3, 5)
    assert first.caption_extension == second.caption_extension == ".caption"
    assert group.general.resolution == (512, 512) and group.general.enable_bucket is None


def test_defaults_match_musubi():
    (dataset,) = parse('[[datasets]]\nvideo_directory = "v"\ncaption_extension = ".txt"\n').datasets
    assert dataset.resolution == (960, 544)
    assert (dataset.batch_size, dataset.num_repeats, dataset.enable_bucket, dataset.bucket_no_upscale) == (1, 1, False,
                                                                                                         False)
    assert (dataset.target_frames, dataset.frame_extraction, dataset.frame_stride) == ((1,), "head", 1)
    assert (dataset.frame_sample, dataset.max_frames, dataset.source_fps) == (1, 129, None)
    assert dataset.resolved_cache_directory == "v"  # the cache defaults to the data directory


@pytest.mark.parametrize(("frames", "rounded"), [(1, 1), (2, 1), (4, 1), (5, 5), (8, 5), (9, 9), (24, 21), (25, 25),
                                                 (80, 77), (81, 81)])
def test_round_frames_4n1_rounds_down(frames, rounded):
    assert round_frames_4n1(frames) == rounded


def test_round_frames_4n1_rejects_zero():
    with pytest.raises(ValueError, match="at least 1, got 0"):
        round_frames_4n1(0)


def test_target_frames_are_rounded_deduplicated_and_sorted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        (dataset,) = parse('[[datasets]]\nvideo_directory = "v"\ntarget_frames = [80, 24, 1, 25, 26, 45]\n').datasets
    assert dataset.target_frames == (1, 21, 25, 45, 77)
    assert "rounded down to 4N+1: [1, 21, 25, 45, 77]" in caplog.text


def test_source_fps_accepts_an_integer_as_a_float():
    (dataset,) = parse('[[datasets]]\nvideo_directory = "v"\nsource_fps = 30\n').datasets
    assert dataset.source_fps == 30.0 and isinstance(dataset.source_fps, float)


def test_deprecated_key_is_renamed(caplog):
    with caplog.at_level(logging.WARNING):
        (dataset,) = parse('[[datasets]]\nimage_directory = "i"\nflux_kontext_no_resize_control = true\n').datasets
    assert dataset.no_resize_control is True
    assert "use 'no_resize_control'" in caplog.text


def test_configs_are_frozen():
    (dataset,) = example("00_image_captions").datasets
    with pytest.raises(dataclasses.FrozenInstanceError):
        dataset.batch_size = 2


def test_unknown_dataset_key_names_key_index_and_suggestion():
    message = parse_error(
        """
        [[datasets]]
        image_directory = "i"
        [[datasets]]
        video_directory = "v"
        frame_strid = 2
        """
    )
    assert "datasets[1] (video dataset): unknown key 'frame_strid'" in message
    assert "did you mean 'frame_stride'?" in message


def test_video_key_in_image_dataset_explains_how_video_datasets_are_detected():
    message = parse_error('[[datasets]]\nimage_directory = "i"\ntarget_frames = [1]\n')
    assert "datasets[0] (image dataset): unknown key 'target_frames'" in message
    assert "video dataset needs video_directory or video_jsonl_file" in message


def test_dataset_key_in_general_is_rejected():
    message = parse_error('[general]\ntarget_frames = [1]\n[[datasets]]\nvideo_directory = "v"\n')
    assert "[general]: unknown key 'target_frames'" in message
    assert "set it in each [[datasets]] table" in message


def test_every_bad_value_is_reported_in_one_error():
    message = parse_error(
        """
        [general]
        batch_size = "2"
        [[datasets]]
        video_directory = "v"
        enable_bucket = 1
        resolution = [960, 544, 3]
        frame_extraction = "tail"
        source_fps = 0.0
        target_frames = []
        num_repeats = 0
        frame_stride = true
        """
    )
    assert "[general]: batch_size: expected an integer >= 1, got '2' (str)" in message
    assert "enable_bucket: expected true or false, got 1 (int)" in message
    assert "resolution: expected an integer or a [width, height] pair" in message
    assert "frame_extraction: expected one of head, chunk, slide, uniform, full, got 'tail'" in message
    assert "source_fps: expected a number > 0" in message
    assert "target_frames: expected a non-empty list" in message
    assert "num_repeats: expected an integer >= 1, got 0" in message
    assert "frame_stride: expected an integer >= 1, got True (bool)" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('image_jsonl_file = "m.jsonl"', r"datasets\[0\]: cache_directory is required with image_jsonl_file"),
        ('video_jsonl_file = "m.jsonl"', r"datasets\[0\]: cache_directory is required with video_jsonl_file"),
        ('video_directory = "v"\nvideo_jsonl_file = "m.jsonl"\ncache_directory = "c"', "mutually exclusive"),
        ('video_jsonl_file = "m.jsonl"\ncache_directory = "c"\ncontrol_directory = "k"', "give control_path"),
        ('video_directory = "v"\nresolution = [500, 500]', "must be a multiple of 16 on each side"),
        ('video_directory = "v"\nresolution = [16, 16]\nenable_bucket = true', "too small for bucketing"),
        ('image_directory = "i"\nresolution = [8, 512]', "pair of integers >= 16"),
    ],
)
def test_inconsistent_dataset_is_rejected(body, expected):
    with pytest.raises(ValueError, match=expected):
        parse("[[datasets]]\n" + body + "\n")


def test_resolution_need_not_be_a_multiple_of_16_with_bucketing():
    text = '[[datasets]]\nimage_directory = "i"\nresolution = [1000, 500]\nenable_bucket = true\n'
    (dataset,) = parse(text).datasets
    assert dataset.resolution == (1000, 500)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[general]\nresolution = 512\n", "no [[datasets]] table"),
        ('[genral]\n[[datasets]]\nimage_directory = "i"\n', "unknown table 'genral'"),
        ('[[datasets]]\nimage_directory = "i"\n[[dataset]]\nimage_directory = "j"\n', "unknown table 'dataset'"),
    ],
)
def test_bad_top_level_is_rejected(text, expected):
    assert expected in parse_error(text)


def test_two_datasets_sharing_a_directory_need_their_own_cache_directories():
    group = parse('[general]\ncaption_extension = ".txt"\n[[datasets]]\nvideo_directory = "v"\n'
                  '[[datasets]]\nvideo_directory = "v/"\ntarget_frames = [25]\n')
    with pytest.raises(ValueError, match=r"datasets\[1\]: cache directory 'v/' is also used by datasets\[0\]"):
        check_dataset_group(group)
    fixed = parse('[general]\ncaption_extension = ".txt"\n[[datasets]]\nvideo_directory = "v"\n'
                  '[[datasets]]\nvideo_directory = "v"\ncache_directory = "c"\n')
    check_dataset_group(fixed)


def test_load_reports_missing_file_and_invalid_toml(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset config not found"):
        load_dataset_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[datasets]\nimage_directory = 1\n")
    with pytest.raises(ValueError, match=r"bad\.toml is not valid TOML"):
        load_dataset_config(bad)


def test_load_error_names_the_file(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('[[datasets]]\nimage_directory = "i"\nbatch = 2\n')
    with pytest.raises(ValueError, match=r"invalid dataset config in .*x\.toml:\n  datasets\[0\] \(image dataset\): "
                                         r"unknown key 'batch'"):
        load_dataset_config(path)
