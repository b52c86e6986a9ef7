"""CFG-skip patterns, skip-layer guidance and the guided velocity wrapper of wan_core.sampling.guidance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from wan_core.sampling import guidance as G
from wan_core.sampling import solvers as S

# --------------------------------------------------------------------------------------------------- CFG patterns

SPEC_TABLE_10_06 = {  # musubi's CFG-skip patterns, n = 10, r = 0.6
    "early": "SSSSAAAAAA",
    "late": "AAAAAASSSS",
    "middle": "AAASSSSAAA",
    "early_late": "SSAAAAAASS",
    "alternate": "SASASAASAS",
}


@pytest.mark.parametrize("mode,expected", sorted(SPEC_TABLE_10_06.items()))
def test_spec_table_rows(mode, expected):
    assert G.pattern_string(G.cfg_apply_pattern(mode, 10, 0.6)) == expected


def reference_pattern(mode: str, n: int, r: float) -> str:
    """musubi's CFG-skip rule, written independently: build the string of A/S directly."""
    k = int(n * r)  # steps with CFG
    if mode == "early":
        return "S" * (n - k) + "A" * k
    if mode == "late":
        return "A" * k + "S" * (n - k)
    if mode == "early_late":
        lead = (n - k) // 2
        return "S" * lead + "A" * k + "S" * (n - k - lead)
    if mode == "middle":
        head = k // 2  # (n - skip) // 2 with skip = n - k
        return "A" * head + "S" * (n - k) + "A" * (k - head)
    if mode == "alternate":
        out, acc = [], np.float64(0.0)
        for _ in range(n):
            acc = np.float64(acc + np.float64(r))
            out.append("A" if acc >= 1.0 else "S")
            acc = acc - 1.0 if acc >= 1.0 else acc
        return "".join(out)
    raise AssertionError(mode)


RATIOS = [0.0, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.7, 0.75, 0.8, 0.9, 1.0]


@pytest.mark.parametrize("mode", sorted(SPEC_TABLE_10_06))
def test_patterns_follow_the_rule_for_many_lengths_and_ratios(mode):
    for n, r in itertools.product(range(1, 61), RATIOS):
        got = G.pattern_string(G.cfg_apply_pattern(mode, n, r))
        assert got == reference_pattern(mode, n, r), (mode, n, r)


def test_alternate_float_accumulation_skips_step_5_at_ratio_06():
    """musubi's float accumulation: at the 5th step (index 4) the accumulator is 0.9999999999999999 < 1, so it is
    skipped, where exact arithmetic (0.6 + 0.6 − 1 + 0.6 + 0.6 − 1 + 0.6 = 1) would apply CFG."""
    pattern = G.cfg_apply_pattern("alternate", 10, 0.6)
    assert pattern[3] is True and pattern[4] is False and pattern[5] is True
    assert G.cfg_apply_pattern("alternate", 4, 0.5) == [False, True, False, True]


def test_no_skipping_unless_mode_and_ratio_are_both_given():
    assert G.cfg_apply_pattern("none", 7, 0.5) == [True] * 7
    assert G.cfg_apply_pattern(None, 7, 0.5) == [True] * 7
    assert G.cfg_apply_pattern("early", 7, None) == [True] * 7
    assert G.cfg_apply_pattern("early", 10, 1.0) == [True] * 10
    assert G.cfg_apply_pattern("late", 10, 0.0) == [False] * 10


@pytest.mark.parametrize(
    "mode,steps,ratio,match",
    [
        ("sometimes", 10, 0.5, "unknown cfg_skip_mode"),
        ("early", 10, 1.5, "cfg_apply_ratio"),
        ("late", 10, -0.1, "cfg_apply_ratio"),
        ("late", 0, 0.5, "steps"),
    ],
)
def test_cfg_pattern_errors(mode, steps, ratio, match):
    with pytest.raises(ValueError, match=match):
        G.cfg_apply_pattern(mode, steps, ratio)


# --------------------------------------------------------------------------------------------------- SLG config


def test_parse_slg_layers():
    assert G.parse_slg_layers("4,5,6") == (4, 5, 6)
    assert G.parse_slg_layers(" 9, 10 ") == (9, 10)
    assert G.parse_slg_layers([3]) == (3,)
    for bad in ("", "4,,5", "a,b", "4,-1", [], [1.5]):
        with pytest.raises(ValueError, match="slg_layers"):
            G.parse_slg_layers(bad)


def test_slg_window_uses_int_of_ratio_times_steps():
    slg = G.SLGConfig(mode="original", layers="9,10", start=0.1, end=0.35)
    assert slg.layers == (9, 10)
    assert slg.window(20) == (2, 7)
    assert [i for i in range(20) if slg.active(i, 20)] == [2, 3, 4, 5, 6]
    default = G.SLGConfig(mode="uncond", layers=(4,))
    assert (default.scale, default.start, default.end) == (3.0, 0.0, 0.3)
    assert [i for i in range(10) if default.active(i, 10)] == [0, 1, 2]


@pytest.mark.parametrize("kwargs", [{"mode": "both"}, {"start": 0.5, "end": 0.2}, {"end": 1.5}, {"layers": ""}])
def test_slg_config_errors(kwargs):
    args = {"mode": "original", "layers": (1,), **kwargs}
    with pytest.raises(ValueError):
        G.SLGConfig(**args)


# --------------------------------------------------------------------------------------------------- guided velocity


class RecordingPredict:
    """Test double for the caller's predict: a distinct deterministic output per (branch, skip set), and a log."""

    def __init__(self):
        self.calls: list[tuple[int, str, tuple[int, ...]]] = []
        self.step = -1

    def output(self, x, branch, skip):
        k = 1.0 if branch == "cond" else -2.0
        return torch.sin(x * k + 0.1 * sum(skip) + 0.37 * len(skip)) + (0.5 if branch == "cond" else 0.0)

    def __call__(self, x, t, branch, skip_blocks):
        self.calls.append((int(t[0].item()), branch, tuple(skip_blocks)))
        return self.output(x, branch, tuple(skip_blocks))


def _x():
    return torch.randn(2, 4, 1, 3, 3, generator=torch.Generator().manual_seed(0))


def test_plain_cfg_formula_and_two_passes():
    pred, x, t = RecordingPredict(), _x(), torch.full((2,), 999.0)
    v = G.guided_velocity(pred, steps=3, guidance_scale=5.0)(x, t, 0)
    c, u = pred.output(x, "cond", ()), pred.output(x, "uncond", ())
    assert torch.equal(v, u + 5.0 * (c - u))
    assert pred.calls == [(999, "cond", ()), (999, "uncond", ())]


def test_skipped_cfg_steps_use_cond_only():
    pred, x = RecordingPredict(), _x()
    pattern = G.cfg_apply_pattern("early", 10, 0.6)
    fn = G.guided_velocity(pred, steps=10, guidance_scale=6.0, cfg_pattern=pattern)
    for i in range(10):
        pred.calls.clear()
        v = fn(x, torch.full((2,), float(i)), i)
        if pattern[i]:
            assert [b for _, b, _ in pred.calls] == ["cond", "uncond"]
        else:
            assert pred.calls == [(i, "cond", ())] and torch.equal(v, pred.output(x, "cond", ()))


def test_guidance_scale_one_skips_uncond_pass():
    pred, x = RecordingPredict(), _x()
    v = G.guided_velocity(pred, steps=2, guidance_scale=1.0)(x, torch.zeros(2), 1)
    assert [b for _, b, _ in pred.calls] == ["cond"] and torch.equal(v, pred.output(x, "cond", ()))


def test_slg_original_formula_window_and_passes():
    pred, x = RecordingPredict(), _x()
    slg = G.SLGConfig(mode="original", layers=(4, 5, 6), scale=2.5, start=0.2, end=0.5)
    pattern = G.cfg_apply_pattern("alternate", 10, 0.5)  # CFG on odd steps
    fn = G.guided_velocity(pred, steps=10, guidance_scale=5.0, cfg_pattern=pattern, slg=slg)
    c, u, sk = pred.output(x, "cond", ()), pred.output(x, "uncond", ()), pred.output(x, "uncond", (4, 5, 6))
    for i in range(10):
        pred.calls.clear()
        v = fn(x, torch.full((2,), float(i)), i)
        branches = [(b, s) for _, b, s in pred.calls]
        if not pattern[i]:
            assert branches == [("cond", ())]
        elif 2 <= i < 5:  # window int(0.2*10)=2 .. int(0.5*10)=5, only on CFG steps (3)
            assert branches == [("cond", ()), ("uncond", ()), ("uncond", (4, 5, 6))]
            assert torch.equal(v, (u + 5.0 * (c - u)) + 2.5 * (c - sk))
        else:
            assert branches == [("cond", ()), ("uncond", ())]
            assert torch.equal(v, u + 5.0 * (c - u))


def test_slg_uncond_replaces_uncond_pass_and_ignores_scale():
    pred, x = RecordingPredict(), _x()
    slg = G.SLGConfig(mode="uncond", layers=(9, 10), scale=100.0, start=0.0, end=0.3)
    fn = G.guided_velocity(pred, steps=10, guidance_scale=4.0, slg=slg)
    c, u, sk = pred.output(x, "cond", ()), pred.output(x, "uncond", ()), pred.output(x, "uncond", (9, 10))
    for i in range(10):
        pred.calls.clear()
        v = fn(x, torch.full((2,), float(i)), i)
        branches = [(b, s) for _, b, s in pred.calls]
        if i < 3:
            assert branches == [("cond", ()), ("uncond", (9, 10))]
            assert torch.equal(v, sk + 4.0 * (c - sk))
        else:
            assert branches == [("cond", ()), ("uncond", ())]
            assert torch.equal(v, u + 4.0 * (c - u))


def test_slg_original_with_cfg_one_keeps_skip_term():
    pred, x = RecordingPredict(), _x()
    slg = G.SLGConfig(mode="original", layers=(1,), scale=3.0)
    v = G.guided_velocity(pred, steps=10, guidance_scale=1.0, slg=slg)(x, torch.zeros(2), 0)
    c, sk = pred.output(x, "cond", ()), pred.output(x, "uncond", (1,))
    assert [(b, s) for _, b, s in pred.calls] == [("cond", ()), ("uncond", (1,))]
    assert torch.equal(v, c + 3.0 * (c - sk))


def test_guided_velocity_errors():
    pred = RecordingPredict()
    with pytest.raises(ValueError, match="cfg_pattern"):
        G.guided_velocity(pred, steps=4, guidance_scale=5.0, cfg_pattern=[True] * 3)
    with pytest.raises(ValueError, match="guidance_scale"):
        G.guided_velocity(pred, steps=4, guidance_scale=float("inf"))
    fn = G.guided_velocity(pred, steps=4, guidance_scale=5.0)
    with pytest.raises(ValueError, match="step index 4"):
        fn(_x(), torch.zeros(2), 4)


def test_guided_velocity_drives_a_sampler():
    """The wrapper plugs into the samplers; with g = 1 and no SLG the run equals sampling the cond model alone."""
    pred = RecordingPredict()
    schedule = S.get_schedule("unipc", 6, 5.0)
    fn = G.guided_velocity(pred, steps=6, guidance_scale=1.0)
    x = _x()
    out = S.sample("unipc", fn, x, schedule)
    ref = S.sample("unipc", lambda xx, t, i: pred.output(xx, "cond", ()), x, schedule)
    assert torch.equal(out, ref)
    assert [t for t, _, _ in pred.calls] == [int(t) for t in schedule.timesteps.tolist()]
