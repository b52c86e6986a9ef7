"""The toy VAE's reconstruction loss terms (training/toy/vae_train.py): edge and L1 terms."""

from __future__ import annotations

import pytest
import torch

from training.toy.vae_train import VAETrainConfig, edge_error


def _square_clip() -> torch.Tensor:
    """[1, 3, 5, 16, 16]: a bright 6 px square moving right 1 px per frame on a dark background."""
    video = torch.full((1, 3, 5, 16, 16), -0.5)
    for t in range(5):
        video[:, :, t, 5:11, 2 + t : 8 + t] = 0.5
    return video


def test_edge_error_is_zero_for_a_perfect_copy_and_sees_blur_seams_and_jumps() -> None:
    video = _square_clip()
    assert edge_error(video, video).item() == 0.0
    # A constant offset has the same differences: the edge term ignores it (the pixel terms see it).
    assert edge_error(video + 0.1, video).item() == pytest.approx(0.0, abs=1e-7)
    blurred = torch.nn.functional.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    assert edge_error(blurred, video).item() > 0.01
    jumpy = video[:, :, [0, 2, 2, 4, 4]]  # frames repeated: the object stands, then jumps 2 px
    spatial_only = edge_error(jumpy[:, :, :1], video[:, :, :1]).item()
    assert spatial_only == 0.0 and edge_error(jumpy, video).item() > 0.01


def test_loss_weights_default_to_the_plain_weighted_squared_error() -> None:
    cfg = VAETrainConfig()
    assert cfg.edge_weight == 0.0 and cfg.l1_weight == 0.0
