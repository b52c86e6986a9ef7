"""Few-step sampling as the step/CFG-distilled LoRAs (lightx2v, CausVid) expect it: guidance 1 runs one model
forward per step, and the `flowmatch_distill` solver follows LightX2V's published step-distill schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tiny import TINY_DIT_BY_TYPE, randomize_
from wan_core.generate.cli import build_parser
from wan_core.models.dit import WanModel
from wan_core.sampling import solvers as S
from wan_core.sampling.conditioning import Conditioning
from wan_core.sampling.pipeline import SamplerSettings, denoise

EPS32 = torch.finfo(torch.float32).eps


class CountingDiT(nn.Module):
    """A tiny WanModel that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = randomize_(WanModel(TINY_DIT_BY_TYPE["t2v"]), 0).eval()
        self.config = self.inner.config
        self.calls = 0

    def forward(self, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        return self.inner(*args, **kwargs)


def _forwards(steps: int, guidance: float, solver: str) -> int:
    dit = CountingDiT()
    gen = torch.Generator().manual_seed(0)
    context = [torch.randn(5, dit.config.text_dim, generator=gen)]
    negative = [torch.randn(3, dit.config.text_dim, generator=gen)]
    settings = SamplerSettings(steps=steps, guidance_scale=guidance, flow_shift=5.0, seed=1, solver=solver)
    out = denoise(dit, Conditioning(16, 16, 1, 1), context, negative, settings)
    assert bool(torch.isfinite(out).all())
    return dit.calls


def test_guidance_one_runs_one_forward_per_step() -> None:
    assert _forwards(4, 1.0, "flowmatch_distill") == 4
    assert _forwards(50, 5.0, "unipc") == 100


def test_guidance_one_needs_no_negative_prompt() -> None:
    dit = CountingDiT()
    context = [torch.randn(5, dit.config.text_dim)]
    settings = SamplerSettings(steps=4, guidance_scale=1.0, flow_shift=5.0, seed=1, solver="flowmatch_distill")
    denoise(dit, Conditioning(16, 16, 1, 1), context, None, settings)
    assert dit.calls == 4


def _lightx2v_sigmas(step_list: list[int], shift: float) -> list[float]:
    """σ_t = shift·(t/1000) / (1 + (shift − 1)·(t/1000)), the shifted flow grid at each listed timestep."""
    return [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) for t in step_list]


@pytest.mark.parametrize("shift", [5.0, 8.0])
def test_distill_schedule_is_the_published_four_step_schedule(shift: float) -> None:
    assert S.distill_step_list(4) == [1000, 750, 500, 250]
    schedule = S.get_schedule("flowmatch_distill", 4, shift)
    expected = torch.tensor(_lightx2v_sigmas([1000, 750, 500, 250], shift) + [0.0], dtype=torch.float64)
    # the schedule is held in float32, as LightX2V holds it: one rounding of values <= 1, plus the grid's
    # linspace rounding, both within a few float32 ulps
    torch.testing.assert_close(schedule.sigmas, expected, rtol=0, atol=4 * EPS32)
    torch.testing.assert_close(schedule.timesteps, expected[:-1] * 1000, rtol=0, atol=4 * EPS32 * 1000)
    assert schedule.timesteps[0] == 1000.0 and schedule.sigmas[-1] == 0.0
    if shift == 5.0:  # 5·0.75/4, 5·0.5/3, 5·0.25/2
        torch.testing.assert_close(schedule.timesteps[1:], torch.tensor([937.5, 2500 / 3, 625.0], dtype=torch.float64),
                                   rtol=0, atol=4 * EPS32 * 1000)


def test_distill_step_lists_for_other_step_counts() -> None:
    assert S.distill_step_list(1) == [1000]
    assert S.distill_step_list(3) == [1000, 666, 333]
    assert S.distill_step_list(8) == [1000, 875, 750, 625, 500, 375, 250, 125]
    with pytest.raises(ValueError, match="at most 1000 steps"):
        S.distill_step_list(1001)


def test_distill_sampling_is_lightx2v_update() -> None:
    """x0 = x − σ·v, then x = x0 + σ_next·v except after the last step (LightX2V's step-distill scheduler)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.3

    def velocity(x: torch.Tensor, t: torch.Tensor, i: int = 0) -> torch.Tensor:
        return torch.einsum("oc,bcfhw->bofhw", weight, x) * (1 + t.double().item() / 1000)

    x = torch.randn(1, 4, 1, 2, 2, generator=gen, dtype=torch.float64)
    schedule = S.get_schedule("flowmatch_distill", 4, 5.0)
    got = S.sample("flowmatch_distill", velocity, x, schedule)
    ref = x.clone()
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps
    for i in range(4):
        v = velocity(ref, timesteps[i])
        ref = ref - sigmas[i] * v
        if i < 3:
            ref = ref + sigmas[i + 1] * v
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_cli_and_node_offer_the_distill_solver() -> None:
    from nodes.sampler import SOLVERS

    assert "flowmatch_distill" in SOLVERS
    args = build_parser().parse_args(["--task", "t2v-1.3B", "--sample_solver", "flowmatch_distill", "--prompt", "x"])
    assert args.sample_solver == "flowmatch_distill"
