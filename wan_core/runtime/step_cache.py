"""Step caching: skip DiT forwards whose output would barely differ from the previous step's, reusing that output.

A wrapper around the sampler's per-branch prediction (`predict(x, t, branch, skip_blocks)`), not a branch inside
the model's forward. Each CFG branch (and each skip-layer pass) keeps its own cache, since guidance calls the model
once per branch per step. The first and the last step are always computed; a skipped call returns the branch's last
computed velocity.

- ``teacache``: per call, the relative L1 change of the timestep modulation (the DiT's ``time_projection`` output,
  which every block receives) since the branch's previous step is rescaled by a calibrated polynomial (an estimate
  of the relative L1 change of the velocity) and accumulated; the call is skipped while the sum stays below the
  threshold, and a computed call resets the sum.
- ``magcache``: per skipped step the calibrated magnitude ratio |v_i| / |v_{i-1}| of that step multiplies a running
  ratio, and |1 - running ratio| is accumulated as the error; the call is skipped while the error stays below the
  threshold and at most ``max_skips`` steps in a row are skipped.

The calibration (``CacheCalibration``) comes from uncached runs (`python -m wan_core.calibrate_cache`), stored as a
small JSON file beside the DiT (``<dit stem>.stepcache.json``). Without one, the official Wan2.1 T2V 1.3B / 14B
and I2V 14B models fall back to the published TeaCache coefficients for the timestep modulation
(``published_calibration``; TeaCache only, no MagCache ratios); ``cache_for_run`` makes that choice, for the CLI
and the sampler node alike, and logs it. A threshold of 0 (or mode ``none``) computes every call, so the result is
exactly the uncached one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from torch import Tensor

from wan_core.models.config import TASKS, DiTConfig
from wan_core.models.dit import WanModel, sinusoidal_embedding

logger = logging.getLogger(__name__)

CACHE_MODES = ("none", "teacache", "magcache")
CALIBRATION_FORMAT = "wantuner-step-cache"
CALIBRATION_VERSION = 1
CALIBRATION_SUFFIX = ".stepcache.json"
TEACACHE_DEGREE = 4
DEFAULT_THRESHOLDS = {"teacache": 0.15, "magcache": 0.02}  # measured on the toy world (README, Generating)
UNCALIBRATED = "uncalibrated: run `python -m wan_core.calibrate_cache --dit <file>`; computing every step"

# predict(x, t, branch, skip_blocks) -> velocity, as in wan_core.sampling.guidance.PredictFn
Predict = Callable[[Tensor, Tensor, str, tuple[int, ...]], Tensor]
Velocity = Callable[[Tensor, Tensor, int], Tensor]


# --------------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class CacheCalibration:
    """Per-model calibration. ``teacache_coefficients``: numpy.polyfit order (highest power first), mapping the
    relative L1 change of the timestep modulation to that of the velocity. ``magcache_ratios``: per branch, the mean
    per-position ratio of velocity norms |v_i| / |v_{i-1}| at each of ``steps`` steps (entry 0 is 1.0); other step
    counts interpolate over the fraction of the run."""

    steps: int
    teacache_coefficients: tuple[float, ...]
    magcache_ratios: dict[str, tuple[float, ...]]
    source: str = ""

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ValueError(f"a calibration needs at least 2 steps, got {self.steps}")
        if not self.teacache_coefficients or not all(math.isfinite(c) for c in self.teacache_coefficients):
            raise ValueError(f"teacache coefficients must be finite numbers, got {self.teacache_coefficients}")
        for branch, ratios in self.magcache_ratios.items():
            if len(ratios) != self.steps or not all(math.isfinite(r) and r > 0 for r in ratios):
                raise ValueError(f"magcache ratios of branch {branch!r} must be {self.steps} positive numbers, "
                                 f"got {list(ratios)}")

    def supports(self, mode: str) -> bool:
        """Whether this calibration drives `mode` (a TeaCache-only calibration has no MagCache ratios)."""
        return mode != "magcache" or bool(self.magcache_ratios)

    def rescale(self, change: float) -> float:
        """Estimated relative velocity change for a relative modulation change (never negative)."""
        return max(0.0, float(np.polyval(self.teacache_coefficients, change)))

    def ratio(self, branch: str, i: int, steps: int) -> float:
        """Magnitude ratio of step i of a `steps`-step run (the cond ratios stand in for a branch not calibrated)."""
        ratios = self.magcache_ratios.get(branch) or self.magcache_ratios.get("cond")
        if ratios is None:
            return 1.0
        if steps == self.steps:
            return ratios[i]
        grid = np.linspace(0.0, 1.0, self.steps)
        return float(np.interp(i / max(steps - 1, 1), grid, ratios))

    def to_json(self) -> str:
        return json.dumps({"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "steps": self.steps,
                           "source": self.source,
                           "teacache": {"coefficients": list(self.teacache_coefficients)},
                           "magcache": {"ratios": {k: list(v) for k, v in self.magcache_ratios.items()}}}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "calibration") -> CacheCalibration:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"{where} is not a step-cache calibration (expected format {CALIBRATION_FORMAT!r})")
        if data.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"{where} has version {data.get('version')!r}; expected {CALIBRATION_VERSION}")
        try:
            return cls(steps=int(data["steps"]), source=str(data.get("source", "")),
                       teacache_coefficients=tuple(float(c) for c in data["teacache"]["coefficients"]),
                       magcache_ratios={k: tuple(float(r) for r in v) for k, v in data["magcache"]["ratios"].items()})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where} lacks or misshapes a field of a step-cache calibration: {exc!r}") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CacheCalibration:
        return cls.from_json(Path(path).read_text(), where=str(path))


def calibration_path(dit_path: str | Path) -> Path:
    """Where the calibration of a DiT file lives: beside it, ``<stem>.stepcache.json``."""
    dit_path = Path(dit_path)
    return dit_path.with_name(dit_path.name.split(".")[0] + CALIBRATION_SUFFIX)


def find_calibration(dit_path: str | Path) -> CacheCalibration | None:
    """The calibration stored beside the DiT, or None."""
    path = calibration_path(dit_path)
    return CacheCalibration.load(path) if path.is_file() else None


# Published TeaCache polynomials (highest power first) of the official Wan2.1 models, for the relative change of the
# timestep modulation (time_projection output) as measured here. I2V has one per resolution: 480p (832x480 area and
# below) and 720p. Keys: (official task, "480p" / "720p" for I2V, else "").
PUBLISHED_TEACACHE: dict[tuple[str, str], tuple[float, ...]] = {
    ("t2v-1.3B", ""): (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    ("t2v-14B", ""): (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    ("i2v-14B", "480p"): (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    ("i2v-14B", "720p"): (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}
PUBLISHED_STEPS = 50  # the official sampling steps the coefficients were fitted on
AREA_480P = 832 * 480


def _official_task(config: DiTConfig) -> str | None:
    """The official Wan2.1 task whose architecture `config` has, or None."""
    return next((task for task, _ in PUBLISHED_TEACACHE if TASKS[task].dit == config), None)


def published_calibration(config: DiTConfig, height: int, width: int, wan22: bool = False) -> CacheCalibration | None:
    """The published TeaCache calibration of an official Wan2.1 T2V 1.3B / 14B or I2V 14B DiT (I2V: by the video
    area, 480p up to 832x480, else 720p); None for any other model. `wan22`: the DiT is a Wan2.2 A14B expert, which
    has the T2V-14B architecture but other weights (no published coefficients)."""
    task = None if wan22 else _official_task(config)
    if task is None:
        return None
    resolution = ("480p" if height * width <= AREA_480P else "720p") if task.startswith("i2v") else ""
    return CacheCalibration(steps=PUBLISHED_STEPS, teacache_coefficients=PUBLISHED_TEACACHE[(task, resolution)],
                            magcache_ratios={}, source=f"published TeaCache coefficients of Wan2.1 {task}"
                            + (f" {resolution}" if resolution else ""))


def resolve_calibration(dit_path: str | Path | None, config: DiTConfig, height: int, width: int,
                        wan22: bool = False) -> CacheCalibration | None:
    """The calibration stored beside the DiT file, else the published one of an official model, else None."""
    stored = None if dit_path is None else find_calibration(dit_path)
    return stored if stored is not None else published_calibration(config, height, width, wan22)


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class StepCacheSettings:
    mode: str = "none"
    threshold: float = 0.0
    calibration: CacheCalibration | None = None
    max_skips: int = 3  # magcache: most steps skipped in a row

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ValueError(f"unknown cache_mode {self.mode!r}; expected one of {list(CACHE_MODES)}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"cache_threshold must be a finite number >= 0, got {self.threshold!r}")
        if self.max_skips < 1:
            raise ValueError(f"max_skips must be >= 1, got {self.max_skips}")

    @property
    def active(self) -> bool:
        return (self.mode != "none" and self.threshold > 0 and self.calibration is not None
                and self.calibration.supports(self.mode))


# --------------------------------------------------------------------------------------------------- the cache


def time_modulation(dit: WanModel) -> Callable[[Tensor], Tensor]:
    """t -> the DiT's timestep modulation [B, 6·dim] (float32), what TeaCache measures between steps."""

    def modulation(t: Tensor) -> Tensor:
        device = next(dit.time_embedding.parameters()).device
        e = dit.time_embedding(sinusoidal_embedding(dit.config.freq_dim, t.reshape(-1).to(device)).float())
        return dit.time_projection(e).float()

    return modulation


def relative_l1(new: Tensor, old: Tensor) -> float:
    return float((new.float() - old.float()).abs().mean() / old.float().abs().mean().clamp_min(1e-12))


def magnitude_ratio(new: Tensor, old: Tensor) -> float:
    """Mean over positions of |new| / |old|, norms over the channel dimension of [B, C, F, H, W]."""
    return float((new.float().norm(dim=1) / old.float().norm(dim=1).clamp_min(1e-12)).mean())


@dataclass
class _Branch:
    """One branch's state: last modulation, last computed velocity, what has accumulated since."""

    modulation: Tensor | None = None
    output: Tensor | None = None
    change: float = 0.0  # teacache: accumulated rescaled change
    ratio: float = 1.0  # magcache: running magnitude ratio
    error: float = 0.0  # magcache: accumulated |1 - ratio|
    skipped: int = 0  # steps skipped in a row


@dataclass
class StepCache:
    """Stateful per-run cache. `start` before a run; `wrap_predict` and `wrap_velocity` install it around the
    sampler's functions. ``computed`` / ``skipped`` count model calls over the run."""

    settings: StepCacheSettings
    computed: int = 0
    skipped: int = 0
    _steps: int = 0
    _step: int = 0
    _modulation: Callable[[Tensor], Tensor] | None = None
    _branches: dict[tuple[str, tuple[int, ...]], _Branch] = field(default_factory=dict)

    def start(self, dit: WanModel, steps: int) -> None:
        self._steps, self._step, self._branches = steps, 0, {}
        self.computed = self.skipped = 0
        self._modulation = time_modulation(dit)

    def wrap_velocity(self, velocity: Velocity) -> Velocity:
        def tracked(x: Tensor, t: Tensor, i: int) -> Tensor:
            self._step = i
            return velocity(x, t, i)

        return tracked

    def wrap_predict(self, predict: Predict) -> Predict:
        if not self.settings.active:
            return predict

        def cached(x: Tensor, t: Tensor, branch: str, skip: tuple[int, ...]) -> Tensor:
            state = self._branches.setdefault((branch, skip), _Branch())
            if self._skip(state, t, branch) and state.output is not None:
                self.skipped += 1
                return state.output * state.ratio if self.settings.mode == "magcache" else state.output
            self.computed += 1
            state.output = predict(x, t, branch, skip)
            state.change, state.ratio, state.error, state.skipped = 0.0, 1.0, 0.0, 0
            return state.output

        return cached

    def _skip(self, state: _Branch, t: Tensor, branch: str) -> bool:
        assert self._modulation is not None and self.settings.calibration is not None
        cal, i = self.settings.calibration, self._step
        modulation = self._modulation(t)
        previous, state.modulation = state.modulation, modulation
        if i == 0 or i >= self._steps - 1 or previous is None or state.output is None:
            return False
        if self.settings.mode == "teacache":
            state.change += cal.rescale(relative_l1(modulation, previous))
            skip = state.change < self.settings.threshold
        else:
            state.ratio *= cal.ratio(branch, i, self._steps)
            state.error += abs(1.0 - state.ratio)
            skip = state.error < self.settings.threshold and state.skipped < self.settings.max_skips
        state.skipped = state.skipped + 1 if skip else 0
        return skip


def cache_for_run(settings: StepCacheSettings, config: DiTConfig, height: int, width: int, wan22: bool = False,
                  name: str = "the DiT") -> StepCache | None:
    """The step cache of one run of DiT `config` at height x width, or None (every step computed).

    `settings` carries the calibration given by the user or stored beside the DiT; without one, an official Wan2.1
    model gets the published TeaCache coefficients (`published_calibration`; `wan22`: the DiT is a Wan2.2 model).
    Logs which calibration drives the cache, or warns that none drives the mode; mode 'none' and threshold 0 (every
    step computed by request) log nothing."""
    if settings.mode == "none" or settings.threshold == 0:
        return None
    if settings.calibration is None:
        settings = replace(settings, calibration=published_calibration(config, height, width, wan22))
    calibration = settings.calibration
    if calibration is None or not settings.active:
        logger.warning("%s: %s%s", name, UNCALIBRATED, " (no MagCache ratios)" if calibration else "")
        return None
    logger.info("step cache %s, threshold %g, calibration: %s", settings.mode, settings.threshold,
                calibration.source or "beside the DiT")
    return StepCache(settings)


# --------------------------------------------------------------------------------------------------- recording


@dataclass
class CalibrationRecorder:
    """Computes every call (wrap it like a StepCache) and records, per branch and step, the modulation change, the
    velocity change and the magnitude ratio to the previous step."""

    points: list[tuple[float, float]] = field(default_factory=list)  # (modulation change, velocity change)
    ratios: dict[str, list[list[float]]] = field(default_factory=dict)  # branch -> runs -> per-step ratios
    _step: int = 0
    _modulation: Callable[[Tensor], Tensor] | None = None
    _last: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def start(self, dit: WanModel, steps: int) -> None:
        self._step, self._last = 0, {}
        self._modulation = time_modulation(dit)
        for runs in self.ratios.values():
            runs.append([])

    def wrap_velocity(self, velocity: Velocity) -> Velocity:
        def tracked(x: Tensor, t: Tensor, i: int) -> Tensor:
            self._step = i
            return velocity(x, t, i)

        return tracked

    def wrap_predict(self, predict: Predict) -> Predict:
        def recorded(x: Tensor, t: Tensor, branch: str, skip: tuple[int, ...]) -> Tensor:
            out = predict(x, t, branch, skip)
            if not skip:
                self._record(branch, t, out)
            return out

        return recorded

    def _record(self, branch: str, t: Tensor, out: Tensor) -> None:
        assert self._modulation is not None
        modulation = self._modulation(t)
        runs = self.ratios.setdefault(branch, [[]])
        previous = self._last.get(branch)
        if previous is None:
            runs[-1].append(1.0)
        else:
            self.points.append((relative_l1(modulation, previous[0]), relative_l1(out, previous[1])))
            runs[-1].append(magnitude_ratio(out, previous[1]))
        self._last[branch] = (modulation, out)

    def fit(self, steps: int, source: str = "") -> CacheCalibration:
        """Polynomial fit for TeaCache, per-step mean ratios for MagCache (branches with one call every step)."""
        if len(self.points) <= TEACACHE_DEGREE:
            raise ValueError(f"calibration needs more than {TEACACHE_DEGREE} step pairs, got {len(self.points)}")
        x, y = np.array(self.points).T
        coefficients = tuple(float(c) for c in np.polyfit(x, y, TEACACHE_DEGREE))
        ratios = {branch: tuple(float(r) for r in np.mean([run for run in runs if len(run) == steps], axis=0))
                  for branch, runs in self.ratios.items() if any(len(run) == steps for run in runs)}
        return CacheCalibration(steps=steps, teacache_coefficients=coefficients, magcache_ratios=ratios,
                                source=source)


def describe(cache: StepCache | None) -> str:
    if cache is None or not cache.settings.active:
        return "step cache off"
    total = cache.computed + cache.skipped
    return f"step cache {cache.settings.mode}: skipped {cache.skipped} of {total} model calls"
