"""Classifier-free guidance for flow models: musubi's CFG-skip patterns and skip-layer guidance (SLG).

``guided_velocity`` turns a caller-supplied ``predict`` (one DiT forward
for the conditional or the negative-prompt inputs, optionally with some blocks skipped) into the ``VelocityFn`` the
samplers in ``wan_core.sampling.solvers`` consume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from wan_core.sampling.solvers import VelocityFn

logger = logging.getLogger(__name__)

Branch = Literal["cond", "uncond"]
# predict(x [B, C, F, H, W], t [B], branch, skip_blocks) -> velocity [B, C, F, H, W]
PredictFn = Callable[[Tensor, Tensor, Branch, tuple[int, ...]], Tensor]

CFG_SKIP_MODES = ("early", "late", "middle", "early_late", "alternate", "none")
SLG_MODES = ("original", "uncond")


# --------------------------------------------------------------------------------------------------- CFG skipping


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"cfg_apply_ratio must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


def _alternate(steps: int, ratio: float) -> list[bool]:
    """Float64 accumulator as musubi: w += r each step; apply (and w −= 1) when w >= 1."""
    pattern, w = [], 0.0
    for _ in range(steps):
        w += ratio
        apply = w >= 1.0
        if apply:
            w -= 1.0
        pattern.append(apply)
    return pattern


def cfg_apply_pattern(mode: str | None, steps: int, ratio: float | None) -> list[bool]:
    """Which steps apply CFG (True) and which use the conditional prediction alone (False).

    musubi ``--cfg_skip_mode`` / ``--cfg_apply_ratio``: with n steps and apply = int(n·r), ``early`` applies on
    n − apply <= i < n, ``late`` on i < apply, ``early_late`` on start <= i < start + apply with
    start = (n − apply)//2, ``middle`` skips skip = n − apply steps from m0 = (n − skip)//2, ``alternate``
    accumulates r in float64. Mode ``none`` (or None) or ratio None applies CFG on every step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {steps!r}")
    if mode is not None and mode not in CFG_SKIP_MODES:
        raise ValueError(f"unknown cfg_skip_mode {mode!r}; expected one of {list(CFG_SKIP_MODES)}")
    if ratio is not None:
        ratio = _check_ratio(ratio)
    if mode in (None, "none") or ratio is None:
        return [True] * steps
    if mode == "alternate":
        return _alternate(steps, ratio)
    apply = int(steps * ratio)
    if mode == "middle":
        skip = steps - apply
        m0 = (steps - skip) // 2
        return [i < m0 or i >= m0 + skip for i in range(steps)]
    start = {"early": steps - apply, "late": 0, "early_late": (steps - apply) // 2}[mode]
    return [start <= i < start + apply for i in range(steps)]


def pattern_string(pattern: Sequence[bool]) -> str:
    """'A' for a CFG step, 'S' for a skipped one (musubi's log format)."""
    return "".join("A" if a else "S" for a in pattern)


# --------------------------------------------------------------------------------------------------- SLG


def parse_slg_layers(layers: str | Sequence[int]) -> tuple[int, ...]:
    """'4,5,6' (or a sequence of ints) -> (4, 5, 6); block indices must be non-negative integers."""
    if isinstance(layers, str):
        parts = [p.strip() for p in layers.split(",")]
        if not layers.strip() or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"slg_layers must be comma-separated block indices such as '4,5,6', got {layers!r}")
        values = tuple(int(p) for p in parts)
    else:
        values = tuple(layers)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"slg_layers must be a non-empty sequence of ints, got {layers!r}")
    if any(v < 0 for v in values):
        raise ValueError(f"slg_layers must be non-negative block indices, got {values}")
    return values


@dataclass(frozen=True)
class SLGConfig:
    """Skip-layer guidance (musubi ``--slg_mode/--slg_layers/--slg_scale/--slg_start/--slg_end``).

    ``original`` (SD3.5): v = v_u + g·(v_c − v_u) + scale·(v_c − v_skip), three forwards per step.
    ``uncond`` (Wan2GP): v = v_skip + g·(v_c − v_skip), two forwards per step; ``scale`` is ignored.
    The skip pass uses the negative-prompt inputs with ``layers`` skipped. Active on CFG steps with
    int(start·n) <= i < int(end·n).
    """

    mode: Literal["original", "uncond"]
    layers: tuple[int, ...]
    scale: float = 3.0
    start: float = 0.0
    end: float = 0.3

    def __post_init__(self) -> None:
        if self.mode not in SLG_MODES:
            raise ValueError(f"unknown slg_mode {self.mode!r}; expected one of {list(SLG_MODES)}")
        object.__setattr__(self, "layers", parse_slg_layers(self.layers))
        if not math.isfinite(self.scale):
            raise ValueError(f"slg_scale must be finite, got {self.scale!r}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 <= slg_start <= slg_end <= 1, got start={self.start!r} end={self.end!r}")

    def window(self, steps: int) -> tuple[int, int]:
        """Step range [first, stop) where SLG may apply."""
        return int(self.start * steps), int(self.end * steps)

    def active(self, i: int, steps: int) -> bool:
        first, stop = self.window(steps)
        return first <= i < stop


# --------------------------------------------------------------------------------------------------- wrapper


def _guide(v_c: Tensor, v_u: Tensor, scale: float) -> Tensor:
    """v_u + g·(v_c − v_u), in musubi's operation order."""
    return v_u + scale * (v_c - v_u)


def step_scales(guidance_scale: float | Sequence[float], steps: int) -> list[float]:
    """One finite guidance scale per step from a single scale or a per-step sequence."""
    scales = [guidance_scale] * steps if isinstance(guidance_scale, (int, float)) else list(guidance_scale)
    if len(scales) != steps:
        raise ValueError(f"{len(scales)} guidance scales for {steps} steps")
    for g in scales:
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
            raise ValueError(f"guidance_scale must be finite, got {g!r}")
    return [float(g) for g in scales]


def guided_velocity(
    predict: PredictFn,
    *,
    steps: int,
    guidance_scale: float | Sequence[float],
    cfg_pattern: Sequence[bool] | None = None,
    slg: SLGConfig | None = None,
) -> VelocityFn:
    """Compose ``predict`` into a guided ``VelocityFn`` for a run of ``steps`` steps.

    Per step i (passes in musubi's order: cond, uncond, skip):
    - CFG skipped (cfg_pattern[i] False): v = v_c, one forward.
    - SLG ``uncond`` active: v = v_skip + g·(v_c − v_skip).
    - otherwise v = v_u + g·(v_c − v_u), plus scale·(v_c − v_skip) when SLG ``original`` is active.
    guidance_scale == 1 skips the uncond pass (ComfyUI's cfg1 optimisation): v = v_c (+ the SLG ``original`` term).
    ``guidance_scale`` is one scale for every step or one per step (Wan2.2 experts each have their own).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {steps!r}")
    scales = step_scales(guidance_scale, steps)
    pattern = [True] * steps if cfg_pattern is None else [bool(a) for a in cfg_pattern]
    if len(pattern) != steps:
        raise ValueError(f"cfg_pattern has {len(pattern)} entries for {steps} steps")

    def velocity(x: Tensor, t: Tensor, i: int) -> Tensor:
        if not 0 <= i < steps:
            raise ValueError(f"step index {i} outside the {steps} steps this guidance was built for")
        g = scales[i]
        v_c = predict(x, t, "cond", ())
        if not pattern[i]:
            return v_c
        active_slg = slg if slg is not None and slg.active(i, steps) else None
        if active_slg is not None and active_slg.mode == "uncond":
            return v_c if g == 1.0 else _guide(v_c, predict(x, t, "uncond", active_slg.layers), g)
        v = v_c if g == 1.0 else _guide(v_c, predict(x, t, "uncond", ()), g)
        if active_slg is not None:
            v = v + active_slg.scale * (v_c - predict(x, t, "uncond", active_slg.layers))
        return v

    return velocity
