"""Wan2.2 A14B mixture of experts as a model-like wrapper: the sampler calls it like one DiT and it runs the
high-noise expert for timesteps t >= boundary * 1000 and the low-noise expert below, each with its own guidance
scale. The DiT's forward knows nothing of the experts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from wan_core.sampling.solvers import NUM_TRAIN_TIMESTEPS

if TYPE_CHECKING:
    from wan_core.models.config import DiTConfig
    from wan_core.models.dit import WanModel

logger = logging.getLogger(__name__)

HIGH, LOW = "high", "low"


def boundary_fraction(value: float) -> float:
    """musubi's --timestep_boundary: a fraction in [0, 1] or a timestep in (1, 1000] -> the fraction."""
    value = float(value)
    if 0.0 <= value <= 1.0:
        return value
    if 1.0 < value <= NUM_TRAIN_TIMESTEPS:
        return value / NUM_TRAIN_TIMESTEPS
    raise ValueError(f"timestep boundary must be in [0, 1] or (1, 1000], got {value}")


def expert_for(t: float, boundary: float) -> str:
    """HIGH when the timestep t (0..1000) is at or above boundary * 1000, else LOW."""
    return HIGH if t >= boundary * NUM_TRAIN_TIMESTEPS else LOW


@dataclass(frozen=True)
class LazyExpert:
    """An expert whose weights are read only when the sampler first needs it (musubi's --lazy_loading).

    `config` is known without loading (from the file's header); `load()` returns the model, `release()` frees it.
    """

    config: DiTConfig
    load: Callable[[], WanModel]
    release: Callable[[], None]


class ExpertSwitch:
    """Two DiT experts behind one call: `switch(x, t, context, ...)` runs the expert `t` selects.

    `offload`: only the active expert sits on `device`; the other waits in CPU memory (moved at each switch).
    An expert given as a `LazyExpert` is loaded when first selected; without `offload`, a lazy expert switched away
    from is released (sampling goes from high to low noise, so it is not needed again in this run).
    `used` records, per call, which expert ran (for logs and tests).
    """

    def __init__(self, high: WanModel | LazyExpert, low: WanModel | LazyExpert, boundary: float,
                 guidance_high: float, guidance_low: float, device: torch.device, offload: bool = False) -> None:
        if (high.config.in_dim, high.config.out_dim) != (low.config.in_dim, low.config.out_dim):
            raise ValueError(f"the high-noise expert takes {high.config.in_dim}->{high.config.out_dim} channels but "
                             f"the low-noise expert {low.config.in_dim}->{low.config.out_dim}; give two experts of "
                             f"one task")
        self.sources: dict[str, WanModel | LazyExpert] = {HIGH: high, LOW: low}
        self.experts: dict[str, WanModel] = {name: model for name, model in self.sources.items()
                                             if not isinstance(model, LazyExpert)}  # the loaded ones
        self.boundary = boundary_fraction(boundary)
        self.guidance = {HIGH: float(guidance_high), LOW: float(guidance_low)}
        self.device = device
        self.offload = offload
        self.active: str | None = None
        self.used: list[str] = []

    @property
    def config(self) -> DiTConfig:
        return self.sources[LOW].config

    def pick(self, t: torch.Tensor) -> str:
        """The expert for timestep(s) `t`: the largest t decides (per-token t holds 0 only on known frames)."""
        return expert_for(float(t.max()), self.boundary)

    def step_guidance(self, timesteps: Sequence[float] | torch.Tensor) -> list[float]:
        """The guidance scale of each schedule step: that of the expert its timestep selects."""
        return [self.guidance[expert_for(float(t), self.boundary)] for t in timesteps]

    def _activate(self, name: str) -> WanModel:
        if self.active == name:
            return self.experts[name]
        for other in [other for other in self.experts if other != name]:
            self._park(other)
        if name not in self.experts:
            source = self.sources[name]
            assert isinstance(source, LazyExpert)
            logger.info("loading the %s-noise expert (lazy loading)", name)
            self.experts[name] = source.load()
        if self.offload:
            self.experts[name].to(self.device)
        logger.info("switching to the %s-noise expert", name)
        self.active = name
        return self.experts[name]

    def _park(self, name: str) -> None:
        """The inactive expert `name`: to CPU memory (offload), released (lazy), or left where it is."""
        source = self.sources[name]
        if self.offload:
            self.experts[name].to("cpu")
        elif isinstance(source, LazyExpert):
            del self.experts[name]
            source.release()
            logger.info("released the %s-noise expert (lazy loading)", name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: Any, **kwargs: Any) -> torch.Tensor:
        name = self.pick(t)
        self.used.append(name)
        return self._activate(name)(x, t, context, **kwargs)
