"""Timestep sampling: each scheme's empirical distribution against its analytic CDF (Kolmogorov-Smirnov), the
discrete `sigma` table exactly, range limits, stratification, loss weights and per-sample seeding."""

from __future__ import annotations

import math

import pytest
import torch

from training.step import StepConfig, draw_sigmas, sample_seeds
from training.timesteps import TimestepConfig, loss_weights, model_timesteps, sample_sigmas

N = 20_000
KS_CRITICAL = 1.95 / math.sqrt(N)  # alpha = 0.001


def _draws(cfg: TimestepConfig, hw: tuple[int, int] = (32, 32), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> torch.Tensor:
        return torch.rand(n, generator=gen, dtype=torch.float64)

    return sample_sigmas(cfg, rand(N), rand, hw)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _logit(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(1e-12, 1 - 1e-12)
    return torch.log(x) - torch.log1p(-x)


def _ks(samples: torch.Tensor, cdf) -> float:
    """sup |ECDF − F| for a continuous F."""
    x, _ = torch.sort(samples.double())
    f = cdf(x)
    n = x.numel()
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


def _discrete_gap(samples: torch.Tensor, grid: torch.Tensor, cdf_at_grid: torch.Tensor) -> float:
    """sup |ECDF − F| over the support points of a discrete distribution (both right-continuous)."""
    ecdf = (samples.double().unsqueeze(0) <= grid.unsqueeze(1) + 1e-9).double().mean(dim=1)
    return float((ecdf - cdf_at_grid).abs().max())


def _sigmoid_normal_cdf(scale: float):
    return lambda x: _phi(_logit(x) / scale)


def _shifted_cdf(shift: float, scale: float = 1.0):
    return lambda x: _phi(_logit(x / (shift - (shift - 1.0) * x)) / scale)


def _logsnr_cdf(mean: float, std: float):
    return lambda x: 1.0 - _phi((-2.0 * _logit(x) - mean) / std)


def _flux_shift(h: int, w: int, x1: float, y1: float, x2: float, y2: float) -> float:
    tokens = (h // 2) * (w // 2)
    return math.exp(y1 + (y2 - y1) / (x2 - x1) * (tokens - x1))


CONTINUOUS = [
    ("uniform", TimestepConfig("uniform"), lambda x: x),
    ("sigmoid", TimestepConfig("sigmoid", sigmoid_scale=1.5), _sigmoid_normal_cdf(1.5)),
    ("shift", TimestepConfig("shift", discrete_flow_shift=3.0), _shifted_cdf(3.0)),
    ("shift_scaled", TimestepConfig("shift", discrete_flow_shift=5.0, sigmoid_scale=0.7), _shifted_cdf(5.0, 0.7)),
    ("flux_shift", TimestepConfig("flux_shift"), _shifted_cdf(_flux_shift(60, 104, 256, 0.5, 4096, 1.15))),
    ("qwen_shift", TimestepConfig("qwen_shift"), _shifted_cdf(_flux_shift(60, 104, 256, 0.5, 8192, 0.9))),
    ("logsnr", TimestepConfig("logsnr", logit_mean=-1.0, logit_std=2.0), _logsnr_cdf(-1.0, 2.0)),
    ("qinglong_flux", TimestepConfig("qinglong_flux", logit_mean=-1.0, logit_std=2.0),
     lambda x: 0.79 * _shifted_cdf(_flux_shift(60, 104, 256, 0.5, 4096, 1.15))(x)
     + 0.11 * _logsnr_cdf(-1.0, 2.0)(x) + 0.10 * _logsnr_cdf(5.36, 1.0)(x)),
    ("qinglong_qwen", TimestepConfig("qinglong_qwen"),
     lambda x: 0.95 * _shifted_cdf(_flux_shift(60, 104, 256, 0.5, 8192, 0.9))(x)
     + 0.05 * _logsnr_cdf(5.36, 1.0)(x)),
]


@pytest.mark.parametrize("name, cfg, cdf", CONTINUOUS, ids=[c[0] for c in CONTINUOUS])
def test_continuous_schemes_match_their_cdf(name: str, cfg: TimestepConfig, cdf) -> None:
    sigmas = _draws(cfg, hw=(60, 104))
    assert sigmas.min() >= 0.0 and sigmas.max() <= 1.0
    assert _ks(sigmas, cdf) < KS_CRITICAL


def test_wrong_shift_is_detected() -> None:
    """The KS check has power: shift 3 samples do not pass as shift 3.5 or as the unshifted sigmoid."""
    sigmas = _draws(TimestepConfig("shift", discrete_flow_shift=3.0))
    assert _ks(sigmas, _shifted_cdf(3.5)) > 3 * KS_CRITICAL
    assert _ks(sigmas, _sigmoid_normal_cdf(1.0)) > 3 * KS_CRITICAL


def test_flow_shift_only_changes_the_shift_scheme() -> None:
    for scheme in ("uniform", "sigmoid", "logsnr", "sigma"):
        assert torch.equal(_draws(TimestepConfig(scheme)), _draws(TimestepConfig(scheme, discrete_flow_shift=3.0)))
    assert not torch.equal(_draws(TimestepConfig("shift")), _draws(TimestepConfig("shift", discrete_flow_shift=3.0)))


def _mode_inverse(y: torch.Tensor, scale: float) -> torch.Tensor:
    """u with 1 − u − s·(cos²(πu/2) − 1 + u) = y (the map is decreasing on [0, 1] for s = 1.29), by bisection."""
    lo, hi = torch.zeros_like(y), torch.ones_like(y)
    for _ in range(60):
        mid = (lo + hi) / 2
        f = 1 - mid - scale * (torch.cos(math.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = torch.where(f > y, mid, lo), torch.where(f > y, hi, mid)
    return (lo + hi) / 2


SIGMA_DENSITIES = [
    ("none", TimestepConfig("sigma"), lambda y: y),
    ("logit_normal", TimestepConfig("sigma", weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.8),
     lambda y: _phi((_logit(y) - 0.5) / 0.8)),
    ("mode", TimestepConfig("sigma", weighting_scheme="mode", mode_scale=1.29), lambda y: 1 - _mode_inverse(y, 1.29)),
]


@pytest.mark.parametrize("name, cfg, u_cdf", SIGMA_DENSITIES, ids=[c[0] for c in SIGMA_DENSITIES])
def test_sigma_scheme_is_the_discrete_table(name: str, cfg: TimestepConfig, u_cdf) -> None:
    """σ = (1000 − ⌊1000·u⌋)/1000: P(σ ≤ k/1000) = P(u ≥ (1000 − k)/1000) = 1 − G((1000 − k)/1000)."""
    sigmas = _draws(cfg)
    steps = sigmas * 1000
    assert torch.allclose(steps, steps.round(), atol=1e-9) and steps.min() >= 1 and steps.max() <= 1000
    k = torch.arange(1, 1001, dtype=torch.float64)
    expected = 1.0 - u_cdf((1000 - k) / 1000)
    assert _discrete_gap(sigmas, k / 1000, expected) < KS_CRITICAL


def test_sigma_scheme_range_is_not_mirrored() -> None:
    """--min_timestep 200 --max_timestep 500: model timesteps are uniform on 201..500 (musubi would give 501..800)."""
    sigmas = _draws(TimestepConfig("sigma", min_timestep=200, max_timestep=500))
    steps = (sigmas * 1000).round()
    assert steps.min() == 201 and steps.max() == 500
    k = torch.arange(201, 501, dtype=torch.float64)
    assert _discrete_gap(steps, k, (k - 200) / 300) < KS_CRITICAL


def test_range_rescale_and_preserved_shape() -> None:
    base = _shifted_cdf(3.0)
    low, high = 0.2, 0.6
    rescaled = _draws(TimestepConfig("shift", discrete_flow_shift=3.0, min_timestep=200, max_timestep=600))
    assert rescaled.min() >= low and rescaled.max() <= high
    assert _ks(rescaled, lambda x: base((x - low) / (high - low))) < KS_CRITICAL
    kept = _draws(TimestepConfig("shift", discrete_flow_shift=3.0, min_timestep=200, max_timestep=600,
                                 preserve_distribution_shape=True))
    assert kept.min() >= low and kept.max() <= high
    f_low, f_high = base(torch.tensor(low, dtype=torch.float64)), base(torch.tensor(high, dtype=torch.float64))
    assert _ks(kept, lambda x: (base(x) - f_low) / (f_high - f_low)) < KS_CRITICAL
    assert _ks(kept, lambda x: base((x - low) / (high - low))) > 3 * KS_CRITICAL  # the two really differ


def test_loss_weights_and_model_timesteps() -> None:
    sigmas = torch.tensor([0.0, 0.0005, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert loss_weights(TimestepConfig(weighting_scheme="none"), sigmas) is None
    assert loss_weights(TimestepConfig(weighting_scheme="logit_normal"), sigmas) is None
    sqrt = loss_weights(TimestepConfig(weighting_scheme="sigma_sqrt"), sigmas)
    torch.testing.assert_close(sqrt, torch.tensor([1e6, 1e6, 16.0, 4.0, 1.0], dtype=torch.float64))
    cosmap = loss_weights(TimestepConfig(weighting_scheme="cosmap"), sigmas)
    torch.testing.assert_close(cosmap, 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    torch.testing.assert_close(model_timesteps(sigmas), sigmas * 1000)


def test_per_sample_seeds_are_independent_uniform_draws() -> None:
    cfg = StepConfig(TimestepConfig("uniform"))
    seeds = [s for step in range(300) for s in sample_seeds(7, step, 0, 0, 10)]
    sigmas = draw_sigmas(cfg, seeds, (8, 8))
    assert len(set(sigmas.tolist())) == len(seeds)
    assert _ks(sigmas, lambda x: x) < 1.95 / math.sqrt(len(seeds))
    assert torch.equal(draw_sigmas(cfg, seeds[:20], (8, 8)), sigmas[:20])  # a function of the seed alone


def test_stratified_buckets_cover_each_bucket_once_per_cycle() -> None:
    cfg = StepConfig(TimestepConfig("uniform", num_timestep_buckets=10), seed=3)
    seeds = sample_seeds(3, 0, 0, 0, 30)
    sigmas = draw_sigmas(cfg, seeds, (8, 8), draw_indices=list(range(30)))
    for cycle in range(3):
        buckets = torch.floor(sigmas[cycle * 10:(cycle + 1) * 10] * 10).long().sort().values
        assert buckets.tolist() == list(range(10))


@pytest.mark.parametrize("kwargs, message", [
    ({"sampling": "cosine"}, "unknown --timestep_sampling"),
    ({"weighting_scheme": "snr"}, "unknown --weighting_scheme"),
    ({"min_timestep": 500, "max_timestep": 500}, "min < max"),
    ({"max_timestep": 1200}, "min < max"),
    ({"discrete_flow_shift": 0.0}, "must be > 0"),
])
def test_bad_timestep_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TimestepConfig(**kwargs)
