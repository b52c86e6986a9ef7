"""Wan2.2 expert switching: which expert and which guidance scale each sampler step uses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from wan_core.runtime.step_cache import StepCache, StepCacheSettings
from wan_core.sampling import conditioning as cond
from wan_core.sampling.experts import HIGH, LOW, ExpertSwitch, LazyExpert, boundary_fraction
from wan_core.sampling.pipeline import SamplerSettings, denoise
from wan_core.sampling.solvers import StepInfo


class FakeExpert:
    """Velocity = mean of the text context (1 for the prompt, 0 for the negative prompt), so a guided step's
    velocity equals its guidance scale. Records the devices it is moved to."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(in_dim=4, out_dim=4)
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        return self

    def __call__(self, x, t, context, **_):
        return torch.full_like(x, float(context[0].mean()))


def _run(solver: str, steps: int, shift: float, boundary: float, g_high: float = 4.0, g_low: float = 3.0,
         offload: bool = False) -> tuple[ExpertSwitch, list[float]]:
    switch = ExpertSwitch(FakeExpert(), FakeExpert(), boundary, g_high, g_low, torch.device("cpu"), offload)
    velocities: list[float] = []

    def record(info: StepInfo) -> None:
        velocities.append(float(((info.x - info.denoised) / info.sigma).mean()))

    settings = SamplerSettings(steps=steps, guidance_scale=99.0, flow_shift=shift, seed=0, solver=solver)
    denoise(switch, cond.text_to_video(16, 16, 1), [torch.ones(3, 8)], [torch.zeros(3, 8)], settings,
            callback=record)
    return switch, velocities


def _expected_high_steps(solver: str, steps: int, shift: float, boundary: float) -> int:
    """Steps before the switch, from the sigma formula: t >= b*1000 <=> shifted sigma >= b <=> unshifted sigma >=
    b / (s - (s - 1) b); unshifted sigmas are linspace(0.999, 0) (UniPC) or linspace(1, 0) (Euler) over N steps."""
    start = 0.999 if solver == "unipc" else 1.0
    threshold = boundary / (shift - (shift - 1) * boundary)
    sigmas = [start * (1 - i / steps) for i in range(steps)]
    assert all(abs(s - threshold) > 1e-6 for s in sigmas), "grid point on the boundary: pick another case"
    return sum(s >= threshold for s in sigmas)


CASES = [("unipc", 40, 12.0, 0.875), ("unipc", 40, 5.0, 0.9), ("unipc", 20, 3.0, 0.875), ("euler", 10, 5.0, 0.9),
         ("euler", 30, 6.0, 0.875), ("unipc", 7, 1.0, 0.5)]


@pytest.mark.parametrize(("solver", "steps", "shift", "boundary"), CASES)
def test_switch_step_follows_the_boundary_rule(solver, steps, shift, boundary):
    switch, _ = _run(solver, steps, shift, boundary)
    n_high = _expected_high_steps(solver, steps, shift, boundary)
    assert 0 < n_high < steps
    # each step calls the expert twice (prompt, negative prompt); the step's timestep picks it
    assert switch.used == [HIGH] * n_high * 2 + [LOW] * (steps - n_high) * 2  # cond + uncond per step


@pytest.mark.parametrize(("solver", "steps", "shift", "boundary"), [CASES[0], CASES[3]])
def test_each_step_uses_its_experts_guidance_scale(solver, steps, shift, boundary):
    _, velocities = _run(solver, steps, shift, boundary, g_high=4.0, g_low=3.0)
    n_high = _expected_high_steps(solver, steps, shift, boundary)
    assert velocities == pytest.approx([4.0] * n_high + [3.0] * (steps - n_high), rel=1e-5)


def test_offload_keeps_only_the_active_expert_on_the_device():
    high, low = FakeExpert(), FakeExpert()
    switch = ExpertSwitch(high, low, 0.9, 4.0, 3.0, torch.device("cuda"), offload=True)
    x, ctx = torch.zeros(1, 4, 1, 2, 2), [torch.ones(3, 8)]
    switch(x, torch.tensor([950.0]), ctx)
    switch(x, torch.tensor([920.0]), ctx)  # same expert: nothing moves
    assert (high.moves, low.moves) == (["cuda"], ["cpu"])
    switch(x, torch.tensor([899.0]), ctx)
    assert (high.moves, low.moves) == (["cuda", "cpu"], ["cpu", "cuda"])


@pytest.mark.parametrize(("given", "fraction"), [(0.875, 0.875), (875, 0.875), (900.0, 0.9), (1, 1.0), (0, 0.0)])
def test_boundary_accepts_fraction_or_timestep(given, fraction):
    assert boundary_fraction(given) == pytest.approx(fraction)


@pytest.mark.parametrize("bad", [-0.1, 1000.5, float("nan")])
def test_bad_boundary_is_refused(bad):
    with pytest.raises(ValueError, match="timestep boundary must be in"):
        boundary_fraction(bad)


def test_step_caching_refuses_an_expert_pair():
    """A step-cache calibration describes one DiT; with two experts the run stops before sampling."""
    switch = ExpertSwitch(FakeExpert(), FakeExpert(), 0.9, 4.0, 3.0, torch.device("cpu"), False)
    settings = SamplerSettings(steps=4, guidance_scale=3.0, flow_shift=5.0, seed=0, solver="euler")
    cache = StepCache(StepCacheSettings("teacache", 0.1, None))
    with pytest.raises(ValueError, match="does not support two Wan2.2 experts"):
        denoise(switch, cond.text_to_video(16, 16, 1), [torch.ones(3, 8)], [torch.zeros(3, 8)], settings,
                step_cache=cache)
    assert switch.used == []  # nothing ran


class _Loads:
    """LazyExpert sources over FakeExperts that record when each is loaded and released."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.models = {HIGH: FakeExpert(), LOW: FakeExpert()}

    def source(self, name: str) -> LazyExpert:
        def load() -> FakeExpert:
            self.events.append(f"load {name}")
            return self.models[name]

        return LazyExpert(self.models[name].config, load, lambda: self.events.append(f"release {name}"))


@pytest.mark.parametrize("offload", [False, True])
def test_lazy_experts_load_when_first_needed(offload):
    loads = _Loads()
    switch = ExpertSwitch(loads.source(HIGH), loads.source(LOW), 0.9, 4.0, 3.0, torch.device("cuda"), offload)
    assert loads.events == [] and switch.config.out_dim == 4  # the config needs no loading
    x, ctx = torch.zeros(1, 4, 1, 2, 2), [torch.ones(3, 8)]
    for t in (999.0, 950.0):
        switch(x, torch.tensor([t]), ctx)
    assert loads.events == ["load high"]  # the low-noise expert is not read before the switch
    switch(x, torch.tensor([899.0]), ctx)
    switch(x, torch.tensor([500.0]), ctx)
    # offload keeps the high-noise expert in CPU memory; without it, the expert switched away from is freed
    assert loads.events == (["load high", "load low"] if offload else ["load high", "release high", "load low"])
    assert switch.used == [HIGH, HIGH, LOW, LOW]
    if offload:
        assert (loads.models[HIGH].moves, loads.models[LOW].moves) == (["cuda", "cpu"], ["cuda"])
