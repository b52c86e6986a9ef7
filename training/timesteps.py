"""Timestep (noise level) sampling and loss weighting for flow-matching training.

Convention: σ ∈ [0, 1] is the noise level, noisy = (1 − σ)·x0 + σ·ε, the model gets timestep = 1000·σ and
predicts the velocity ε − x0. With z ~ N(0, 1) and U ~ U(0, 1):

- `uniform`: σ = U
- `sigmoid`: σ = sigmoid(sigmoid_scale·z)
- `shift`: σ = shift_k(sigmoid(sigmoid_scale·z)), k = `--discrete_flow_shift`, shift_k(t) = k·t / (1 + (k − 1)·t)
- `flux_shift`, `flux2_shift`, `qwen_shift`, `krea2_shift`: as `shift` with k = exp(μ), μ linear in the latent
  token count (see `resolution_shift`)
- `logsnr`: σ = sigmoid(−λ/2), λ ~ N(logit_mean, logit_std)
- `qinglong_flux` / `qinglong_qwen`: per sample 79 % / 95 % the flux / qwen shift, 11 % / 0 % `logsnr`, and
  10 % / 5 % logsnr with λ ~ N(5.36, 1)
- `sigma` (musubi's default): the discrete table σ = (1000 − i)/1000, i = ⌊u·(t_max − t_min) + 1000 − t_max⌋,
  with u drawn by `--weighting_scheme`: `logit_normal` sigmoid(N(logit_mean, logit_std)), `mode`
  1 − U − mode_scale·(cos²(πU/2) − 1 + U), otherwise U

Every normal draw is made from a uniform through the inverse CDF √2·erfinv(2u − 1) (u clamped to [1e-7, 1 − 1e-7]),
so `--num_timestep_buckets` can stratify the uniform of any scheme.

`--discrete_flow_shift` only changes the `shift` scheme. That is musubi's behaviour (its
scheduler applies the shift in `set_timesteps`, which training never calls) and it is kept on purpose: a LoRA
trained with `--timestep_sampling sigma --discrete_flow_shift 3` here gets the same noise levels as with musubi.

Deliberate differences from musubi (documented, not accidental):
- the model timestep is 1000·σ for every scheme, as at inference; musubi adds 1 for the non-`sigma` schemes;
- `--min_timestep/--max_timestep` bound the model timestep for every scheme; musubi's `sigma` scheme indexes its
  descending table with [t_min, t_max), which selects timesteps in (1000 − t_max, 1000 − t_min] (the mirrored
  range). Without the flags both agree;
- the loss weights use the sampled σ itself (σ_sqrt: σ⁻², σ clamped to ≥ 0.001, the smallest table entry;
  cosmap: 2 / (π·(1 − 2σ + 2σ²))); musubi looks σ up in its table from the (shifted-by-one) timestep.

Outside `sigma`, σ is rescaled into [t_min, t_max]/1000 linearly, or with `--preserve_distribution_shape` re-drawn
(rejection sampling, at most 1000 rounds, then the linear rescale with a warning).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wan_core.sampling.solvers import NUM_TRAIN_TIMESTEPS

logger = logging.getLogger(__name__)

SCHEMES = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "flux2_shift", "qwen_shift", "krea2_shift", "logsnr",
           "qinglong_flux", "qinglong_qwen")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
_PPF_EPS = 1e-7
_MAX_REJECTION_ROUNDS = 1000
_QINGLONG_LOGSNR2 = (5.36, 1.0)  # mean, std of the second logsnr component
# (x1, y1, x2, y2) of μ's line through the token-count points, and whether the count is (h//2)·(w//2) or h·w.
_RESOLUTION_SHIFTS: dict[str, tuple[tuple[float, float, float, float], bool]] = {
    "flux_shift": ((256, 0.5, 4096, 1.15), True),
    "flux2_shift": ((256, 0.5, 4096, 1.15), False),
    "qwen_shift": ((256, 0.5, 8192, 0.9), True),
    "krea2_shift": ((256, 0.5, 6400, 1.15), True),
    "qinglong_flux": ((256, 0.5, 4096, 1.15), True),
    "qinglong_qwen": ((256, 0.5, 8192, 0.9), True),
}

Uniforms = Callable[[int], torch.Tensor]  # n -> n float64 draws from U(0, 1)


@dataclass(frozen=True)
class TimestepConfig:
    """What `--timestep_sampling` and its companion flags describe (musubi names and defaults)."""

    sampling: str = "sigma"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: int | None = None
    max_timestep: int | None = None
    preserve_distribution_shape: bool = False
    num_timestep_buckets: int | None = None

    def __post_init__(self) -> None:
        if self.sampling not in SCHEMES:
            raise ValueError(f"unknown --timestep_sampling {self.sampling!r}; expected one of {', '.join(SCHEMES)}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"unknown --weighting_scheme {self.weighting_scheme!r}; expected one of "
                             f"{', '.join(WEIGHTING_SCHEMES)}")
        if not 0 <= self.t_min < self.t_max <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"--min_timestep/--max_timestep must satisfy 0 <= min < max <= 1000, got "
                             f"{self.min_timestep} / {self.max_timestep}")
        if self.discrete_flow_shift <= 0 or self.sigmoid_scale <= 0 or self.logit_std <= 0:
            raise ValueError(f"--discrete_flow_shift, --sigmoid_scale and --logit_std must be > 0, got "
                             f"{self.discrete_flow_shift}, {self.sigmoid_scale}, {self.logit_std}")
        if self.num_timestep_buckets is not None and self.num_timestep_buckets < 1:
            raise ValueError(f"--num_timestep_buckets must be >= 1, got {self.num_timestep_buckets}")
        if self.discrete_flow_shift != 1.0 and self.sampling != "shift":
            logger.warning("--discrete_flow_shift %g has no effect with --timestep_sampling %s (as in musubi); use "
                           "--timestep_sampling shift to train on shifted timesteps", self.discrete_flow_shift,
                           self.sampling)

    @property
    def t_min(self) -> int:
        return 0 if self.min_timestep is None else self.min_timestep

    @property
    def t_max(self) -> int:
        return NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TimestepConfig:
        return cls(args.timestep_sampling, args.discrete_flow_shift, args.sigmoid_scale, args.weighting_scheme,
                   args.logit_mean, args.logit_std, args.mode_scale, args.min_timestep, args.max_timestep,
                   args.preserve_distribution_shape, args.num_timestep_buckets)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (float64, vectorised over samples)
# ----------------------------------------------------------------------------------------------------------------

def normal_ppf(u: torch.Tensor) -> torch.Tensor:
    """Standard normal quantile of u (clamped to [1e-7, 1 − 1e-7])."""
    u = u.clamp(_PPF_EPS, 1.0 - _PPF_EPS)
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """shift_k(t) = k·t / (1 + (k − 1)·t)."""
    return t * shift / (1.0 + (shift - 1.0) * t)


def resolution_shift(scheme: str, latent_hw: tuple[int, int]) -> float:
    """exp(μ) for the resolution-dependent schemes; μ is linear in the latent token count (extrapolated)."""
    (x1, y1, x2, y2), packed = _RESOLUTION_SHIFTS[scheme]
    h, w = latent_hw
    tokens = (h // 2) * (w // 2) if packed else h * w
    slope = (y2 - y1) / (x2 - x1)
    return math.exp(slope * tokens + (y1 - slope * x1))


def _logsnr_t(u: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return torch.sigmoid(-(mean + std * normal_ppf(u)) / 2.0)


def _shifted_sigmoid_t(u: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    return shift_sigma(torch.sigmoid(scale * normal_ppf(u)), shift)


def continuous_t(cfg: TimestepConfig, u: torch.Tensor, rand: Uniforms, latent_hw: tuple[int, int]) -> torch.Tensor:
    """σ in [0, 1] for the continuous schemes from the main uniforms `u` [N] (qinglong draws its mix from `rand`)."""
    scheme = cfg.sampling
    if scheme == "uniform":
        return u
    if scheme == "sigmoid":
        return torch.sigmoid(cfg.sigmoid_scale * normal_ppf(u))
    if scheme == "shift":
        return _shifted_sigmoid_t(u, cfg.sigmoid_scale, cfg.discrete_flow_shift)
    if scheme == "logsnr":
        return _logsnr_t(u, cfg.logit_mean, cfg.logit_std)
    shifted = _shifted_sigmoid_t(u, cfg.sigmoid_scale, resolution_shift(scheme, latent_hw))
    if not scheme.startswith("qinglong"):
        return shifted
    choice = rand(u.shape[0])
    mid = 0.79 if scheme == "qinglong_flux" else 0.95
    t = torch.where(choice < mid, shifted, _logsnr_t(u, *_QINGLONG_LOGSNR2))
    if scheme == "qinglong_flux":
        t = torch.where((choice >= 0.79) & (choice < 0.9), _logsnr_t(u, cfg.logit_mean, cfg.logit_std), t)
    return t


def density_u(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    """The `sigma` scheme's draw in [0, 1] as shaped by `--weighting_scheme` (SD3's density)."""
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal_ppf(u))
    if cfg.weighting_scheme == "mode":
        return 1.0 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def discrete_sigma(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    """The `sigma` scheme: σ = (1000 − i)/1000, i = ⌊u·(t_max − t_min) + 1000 − t_max⌋, so 1000·σ ∈ (t_min, t_max]."""
    index = torch.floor(density_u(cfg, u) * (cfg.t_max - cfg.t_min) + (NUM_TRAIN_TIMESTEPS - cfg.t_max))
    index = index.clamp(NUM_TRAIN_TIMESTEPS - cfg.t_max, NUM_TRAIN_TIMESTEPS - cfg.t_min - 1)
    return (NUM_TRAIN_TIMESTEPS - index) / NUM_TRAIN_TIMESTEPS


def _restricted(cfg: TimestepConfig, u: torch.Tensor, rand: Uniforms, latent_hw: tuple[int, int]) -> torch.Tensor:
    low, high = cfg.t_min / NUM_TRAIN_TIMESTEPS, cfg.t_max / NUM_TRAIN_TIMESTEPS
    t = continuous_t(cfg, u, rand, latent_hw)
    if not cfg.preserve_distribution_shape:
        return t * (high - low) + low
    if low == 0.0 and high == 1.0:
        return t
    inside = (t >= low) & (t <= high)
    for _ in range(_MAX_REJECTION_ROUNDS):
        if bool(inside.all()):
            return t
        missing = int((~inside).sum())
        redrawn = continuous_t(cfg, rand(missing), rand, latent_hw)
        t = t.clone()
        t[~inside] = redrawn
        inside = (t >= low) & (t <= high)
    logger.warning("could not draw timesteps inside [%d, %d] in %d rounds; rescaling linearly instead", cfg.t_min,
                   cfg.t_max, _MAX_REJECTION_ROUNDS)
    return torch.where(inside, t, t * (high - low) + low)


def sample_sigmas(cfg: TimestepConfig, u: torch.Tensor, rand: Uniforms, latent_hw: tuple[int, int]) -> torch.Tensor:
    """σ [N] (float64) for N samples from their main uniforms `u` [N]; extra draws come from `rand`."""
    if cfg.sampling == "sigma":
        return discrete_sigma(cfg, u)
    return _restricted(cfg, u, rand, latent_hw)


def model_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The DiT's timestep input: 1000·σ (as at inference)."""
    return sigmas * NUM_TRAIN_TIMESTEPS


def loss_weights(cfg: TimestepConfig, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights [N] for `sigma_sqrt` (σ⁻²) and `cosmap`; None for the other schemes."""
    if cfg.weighting_scheme == "sigma_sqrt":
        return sigmas.clamp_min(1.0 / NUM_TRAIN_TIMESTEPS) ** -2.0
    if cfg.weighting_scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    return None


def stratified_uniform(num_buckets: int, draw_index: int, seed: int, v: float) -> float:
    """`--num_timestep_buckets`: draw `draw_index` takes bucket perm[draw_index % N] of a seeded permutation per
    cycle of N draws, and `v` ∈ [0, 1) places it inside the bucket. Stateless, so resuming needs no pool."""
    cycle, position = divmod(draw_index, num_buckets)
    gen = torch.Generator().manual_seed(mix_seed(seed, "timestep_buckets", cycle))
    bucket = int(torch.randperm(num_buckets, generator=gen)[position])
    return (bucket + v) / num_buckets


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of ints/strings (blake2b), for per-sample generators."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
