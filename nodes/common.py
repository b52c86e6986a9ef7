"""Small helpers for declaring node inputs and validating them (no tensor math)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from wan_core.sampling.conditioning import validate_video_size

CATEGORY = "WanTuner"
MAX_SIZE = 4096
MAX_FRAMES = 1025


def inp(kind: str | Sequence[str], tooltip: str, **options: Any) -> tuple:
    """One input declaration `(TYPE or [choices], {"tooltip": ..., **options})`."""
    return (list(kind) if not isinstance(kind, str) else kind, {"tooltip": tooltip, **options})


def size_inputs(default_width: int = 832, default_height: int = 480, default_frames: int = 81) -> dict[str, tuple]:
    return {
        "width": inp("INT", "Video width in pixels; a multiple of 16.", default=default_width, min=16,
                     max=MAX_SIZE, step=16),
        "height": inp("INT", "Video height in pixels; a multiple of 16.", default=default_height, min=16,
                      max=MAX_SIZE, step=16),
        "length": inp("INT", "Number of frames: 4n+1 (1, 5, 9, ..., 81).", default=default_frames, min=1,
                      max=MAX_FRAMES, step=4),
    }


def problem(check: Callable[[], object]) -> str | None:
    """Run a check that raises ValueError/FileNotFoundError; return its message (None when it passes)."""
    try:
        check()
    except (ValueError, FileNotFoundError) as exc:
        return str(exc)
    return None


def size_problem(width: object, height: object, length: object) -> str | None:
    """VALIDATE_INPUTS helper; linked (not constant) inputs arrive as None and are checked at run time."""
    if not all(isinstance(v, int) for v in (width, height, length)):
        return None
    return problem(lambda: validate_video_size(height, width, length))


def first_problem(*messages: str | None) -> bool | str:
    """True when every check passed, else the first message (ComfyUI shows it under the node)."""
    return next((m for m in messages if m), True)
