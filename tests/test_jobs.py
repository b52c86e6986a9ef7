"""musubi's inline prompt syntax (--from_file, --interactive, sample prompts)."""

from __future__ import annotations

import pytest

from wan_core.generate.jobs import Job, parse_prompt_line, read_prompt_lines


def test_spec_examples_parse():
    job = parse_prompt_line("A beautiful sunset over mountains --w 832 --h 480 --f 81 --d 42 --s 20")
    assert (job.prompt, job.width, job.height, job.frames, job.seed, job.steps) == (
        "A beautiful sunset over mountains", 832, 480, 81, 42, 20)
    job = parse_prompt_line("A busy city street at night --w 480 --h 832 --g 7.5 --n low quality, blurry")
    assert job.guidance_scale == 7.5 and job.negative_prompt == "low quality, blurry"
    assert job.frames is None and job.seed is None


def test_all_inline_options_and_defaults():
    base = Job(prompt="", seed=7, steps=30, negative_prompt="base neg")
    job = parse_prompt_line("a cat --l 4 --fs 3.5 --i a.png --ei b.png --cn ctl.mp4 --d 1", base)
    assert (job.guidance_scale, job.flow_shift, job.image_path, job.end_image_path, job.control_path, job.seed) == (
        4.0, 3.5, "a.png", "b.png", "ctl.mp4", 1)
    assert job.steps == 30 and job.negative_prompt == "base neg"  # untouched fields keep the command-line value


def test_bad_lines_fail_clearly():
    with pytest.raises(ValueError, match="unknown inline option --zz"):
        parse_prompt_line("a cat --zz 3")
    with pytest.raises(ValueError, match="--w needs a int value, got 'wide'"):
        parse_prompt_line("a cat --w wide")
    with pytest.raises(ValueError, match="no prompt text"):
        parse_prompt_line("   --w 64")


def test_prompt_file_skips_comments_and_blanks(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\n\na red square moving right --d 1\n  # indented comment\na blue circle\n")
    assert read_prompt_lines(path) == ["a red square moving right --d 1", "a blue circle"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompt_lines(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        read_prompt_lines(tmp_path / "missing.txt")


def test_with_seed_fixes_a_seed_once():
    job = Job(prompt="x").with_seed()
    assert isinstance(job.seed, int) and job.with_seed() is job
