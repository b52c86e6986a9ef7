"""Wan2.2 task presets and telling Wan2.1 from Wan2.2 DiT files by their shapes."""

from __future__ import annotations

import pytest
import torch

from wan_core.models.config import TASKS, WAN22_VAE, detect_config, tasks_matching
from wan_core.models.dit import WanModel, check_task


def _shapes(task: str) -> dict[str, torch.Tensor]:
    """A state dict of `task`'s full-size DiT as meta tensors (shapes only)."""
    return {k: torch.empty(s, device="meta") for k, s in WanModel.expected_shapes(TASKS[task].dit).items()}


def test_wan22_defaults():
    t2v, i2v, ti2v = TASKS["t2v-A14B"], TASKS["i2v-A14B"], TASKS["ti2v-5B"]
    assert (t2v.boundary, t2v.sample_shift, t2v.sample_steps, t2v.guide_scale, t2v.guide_scale_high) == (
        0.875, 12.0, 40, 3.0, 4.0)
    assert (i2v.boundary, i2v.sample_shift, i2v.sample_steps, i2v.guide_scale, i2v.guide_scale_high) == (
        0.9, 5.0, 40, 3.5, 3.5)
    assert (i2v.dit.in_dim, i2v.dit.has_image_input, i2v.needs_clip, i2v.takes_image) == (36, False, False, True)
    assert (ti2v.boundary, ti2v.sample_shift, ti2v.sample_steps, ti2v.guide_scale, ti2v.fps, ti2v.frame_num) == (
        None, 5.0, 50, 5.0, 24, 121)
    assert (704, 1280) in ti2v.sizes and ti2v.vae == WAN22_VAE and (ti2v.dit.in_dim, ti2v.dit.out_dim) == (48, 48)
    assert not TASKS["t2v-14B"].is_wan22 and all(TASKS[n].is_wan22 for n in ("t2v-A14B", "i2v-A14B", "ti2v-5B"))


@pytest.mark.parametrize(("task", "fits"), [("i2v-A14B", ["i2v-A14B"]), ("ti2v-5B", ["ti2v-5B"]),
                                            ("i2v-14B", ["i2v-14B"]), ("t2v-14B-FC", ["t2v-14B-FC", "i2v-14B-FC"]),
                                            ("t2v-A14B", ["t2v-14B", "t2i-14B", "t2v-A14B"])])
def test_detection_tells_wan21_from_wan22(task, fits):
    assert tasks_matching(detect_config(_shapes(task))) == fits


@pytest.mark.parametrize(("task", "file_of", "message"), [
    ("i2v-A14B", "i2v-14B", "cross_attn.k_img.bias' (shape [5120]); the weights fit task i2v-14B"),
    ("i2v-14B", "i2v-A14B", "is missing from the checkpoint; the weights fit task i2v-A14B"),
    ("ti2v-5B", "t2v-14B-FC", "the weights fit task t2v-14B-FC"),
    ("t2v-A14B", "ti2v-5B", "the weights fit task ti2v-5B"),
])
def test_wrong_file_for_a_wan22_task_names_the_task_that_fits(task, file_of, message):
    with pytest.raises(ValueError, match=f"checkpoint does not fit task {task!r}") as err:
        check_task(task, _shapes(file_of))
    assert message in str(err.value)
