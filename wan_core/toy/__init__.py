"""The synthetic toy world (clip generator, captions, held-out combinations) and its scorer."""

from __future__ import annotations

from wan_core.toy.score import ClipScore, Detection, ScoreSummary, analyze_clip, score_clip, score_many
from wan_core.toy.world import (
    BASE_COLOURS,
    COLOURS,
    FPS,
    HELDOUT,
    MOTIONS,
    PALETTE,
    RESERVED_COLOURS,
    SHAPES,
    Combo,
    all_combos,
    heldout_combos,
    parse_caption,
    render_clip,
    train_combos,
    write_dataset,
)

__all__ = [
    "BASE_COLOURS",
    "COLOURS",
    "FPS",
    "HELDOUT",
    "MOTIONS",
    "PALETTE",
    "RESERVED_COLOURS",
    "SHAPES",
    "ClipScore",
    "Combo",
    "Detection",
    "ScoreSummary",
    "all_combos",
    "analyze_clip",
    "heldout_combos",
    "parse_caption",
    "render_clip",
    "score_clip",
    "score_many",
    "train_combos",
    "write_dataset",
]
