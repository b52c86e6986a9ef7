"""Flow-matching samplers for Wan2.1 as pure functions of (model, x, sigmas).

Conventions: x_σ = (1 − σ)·x0 + σ·ε, the model predicts the velocity
v ≈ ε − x0, the denoised estimate is x0 = x − σ·v and the model receives the timestep t = σ·1000 (truncated to an
integer where the official code truncates).

The schedules reproduce the official Wan2.1 grids bit for bit (``get_schedule``); the samplers reproduce the
official ``FlowUniPCMultistepScheduler`` (UniPC bh2, order 2, predict-x0, lower-order final step), the official
``FlowDPMSolverMultistepScheduler`` (DPM-Solver++ 2M, midpoint, first-order final step) and musubi's
``FlowMatchDiscreteScheduler`` (Euler), including their float32 scalar arithmetic, without any scheduler object.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000

# model(x [B, C, F, H, W], t [B] float32 timesteps in [0, 1000], step_index) -> velocity [B, C, F, H, W]
VelocityFn = Callable[[Tensor, Tensor, int], Tensor]

# The official FlowUniPC scheduler is built with shift=1 from the training grid 1 − linspace(1, 1/1000, 1000), held
# in float32, and reads sigma_max = sigmas[0].item(): the float32 value of 0.999 (0.9990000128746033).
UNIPC_SIGMA_MAX = float(torch.tensor(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32))


@dataclass(frozen=True)
class Schedule:
    """A sampling schedule: what the solver steps over and what the model is told."""

    sigmas: Tensor  # [N+1] float64, strictly decreasing, last is 0
    timesteps: Tensor  # [N] float64 model timesteps (integer-valued where the official code truncates)

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


@dataclass
class StepInfo:
    """Progress of one sampler step, passed to ``callback(info)``."""

    i: int  # 0-based step index
    total: int  # number of steps
    sigma: float  # noise level the model saw
    t: float  # timestep the model saw
    x: Tensor  # [B, C, F, H, W] the model input of this step
    denoised: Tensor  # [B, C, F, H, W] x0 estimate x − σ·v of this step


StepCallback = Callable[[StepInfo], None]


# --------------------------------------------------------------------------------------------------- schedules


@overload
def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor: ...
@overload
def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray: ...
def shift_sigmas(sigmas: Tensor | np.ndarray, shift: float) -> Tensor | np.ndarray:
    """σ' = s·σ / (1 + (s − 1)·σ), computed in the input's dtype (Tensor or ndarray in, same type out)."""
    shift = _check_shift(shift)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_shift(shift: float) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"flow shift must be a finite number > 0, got {shift!r}")
    return float(shift)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"number of sampling steps must be an integer >= 1, got {steps!r}")
    return steps


def _truncated_schedule(shifted: np.ndarray) -> Schedule:
    """Official set_timesteps: int64-truncated float64 timesteps, float32 sigmas with a final 0 appended."""
    timesteps = (shifted * NUM_TRAIN_TIMESTEPS).astype(np.int64)  # [N]
    sigmas = np.concatenate([shifted, [0.0]]).astype(np.float32)  # [N+1]
    return Schedule(
        sigmas=torch.from_numpy(sigmas.astype(np.float64)),
        timesteps=torch.from_numpy(timesteps.astype(np.float64)),
    )


def unipc_schedule(steps: int, shift: float) -> Schedule:
    """Official FlowUniPC grid: shift(linspace(0.999, 0, N + 1)[:-1]), int64-truncated timesteps, final σ = 0."""
    steps, shift = _check_steps(steps), _check_shift(shift)
    base = np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1]  # [N] float64
    return _truncated_schedule(shift_sigmas(base, shift))


def dpmpp_schedule(steps: int, shift: float) -> Schedule:
    """Official FlowDPM++ grid (get_sampling_sigmas): shift(linspace(1, 0, N + 1)[:N]), starting at σ = 1, t = 1000.

    The official code passes these through ``set_timesteps(sigmas=...)`` of a scheduler built with shift=1, so they
    are not shifted again; the timesteps are σ·1000 truncated to int64 and the solver uses the float32 sigmas.
    """
    steps, shift = _check_steps(steps), _check_shift(shift)
    base = np.linspace(1.0, 0.0, steps + 1)[:steps]  # [N] float64
    return _truncated_schedule(shift_sigmas(base, shift))


def euler_schedule(steps: int, shift: float) -> Schedule:
    """musubi's FlowMatchDiscreteScheduler grid: shift(torch.linspace(1, 0, N + 1)) and t = σ·1000, all float32."""
    steps, shift = _check_steps(steps), _check_shift(shift)
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32), shift)  # [N+1] float32
    timesteps = sigmas[:-1] * NUM_TRAIN_TIMESTEPS  # [N] float32
    return Schedule(sigmas=sigmas.double(), timesteps=timesteps.double())


def distill_step_list(steps: int) -> list[int]:
    """The denoising steps of the step-distilled (few-step) models: int(1000 − i·1000/N), e.g. [1000, 750, 500,
    250] for 4 steps (LightX2V's `denoising_step_list`)."""
    steps = _check_steps(steps)
    if steps > NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"flowmatch_distill takes at most {NUM_TRAIN_TIMESTEPS} steps, got {steps}")
    return [int(NUM_TRAIN_TIMESTEPS - i * NUM_TRAIN_TIMESTEPS / steps) for i in range(steps)]


def distill_schedule(steps: int, shift: float) -> Schedule:
    """LightX2V's step-distill grid (CausVid / lightx2v few-step LoRAs): the float32 training grid
    shift(linspace(1, 0, 1001)[:-1]) read at index 1000 − t for t in `distill_step_list(steps)`, model timesteps
    σ·1000 (float32), final σ = 0. Sampled with Euler: x ← x + (σ_next − σ)·v, i.e. x0 = x − σ·v re-noised to
    σ_next along the same velocity."""
    shift = _check_shift(shift)
    grid = shift_sigmas(torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float32)[:-1], shift)
    picked = grid[[NUM_TRAIN_TIMESTEPS - t for t in distill_step_list(steps)]]  # [N] float32
    sigmas = torch.cat([picked, picked.new_zeros(1)])
    return Schedule(sigmas=sigmas.double(), timesteps=(picked * NUM_TRAIN_TIMESTEPS).double())


SCHEDULES: dict[str, Callable[[int, float], Schedule]] = {
    "unipc": unipc_schedule,
    "dpm++": dpmpp_schedule,
    "euler": euler_schedule,
    "vanilla": euler_schedule,
    "flowmatch_distill": distill_schedule,
}


def get_schedule(solver: str, steps: int, shift: float) -> Schedule:
    """The schedule of ``solver`` (unipc, dpm++, euler / vanilla: the official ones; flowmatch_distill: the
    few-step distilled models') for ``steps`` steps at flow ``shift``."""
    if solver not in SCHEDULES:
        raise ValueError(f"unknown sample solver {solver!r}; expected one of {sorted(SCHEDULES)}")
    schedule = SCHEDULES[solver](steps, shift)
    logger.debug("%s schedule, %d steps, shift %s: timesteps %s", solver, steps, shift, schedule.timesteps.tolist())
    return schedule


# --------------------------------------------------------------------------------------------------- helpers


def _check_sigmas(sigmas: Tensor | Sequence[float]) -> Tensor:
    sig = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if sig.ndim != 1 or sig.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 values, got shape {tuple(sig.shape)}")
    if not bool(torch.isfinite(sig).all()) or float(sig.min()) < 0 or float(sig.max()) > 1:
        raise ValueError(f"sigmas must lie in [0, 1], got {sig.tolist()}")
    if not bool((sig[1:] < sig[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing, got {sig.tolist()}")
    return sig


@dataclass
class _Run:
    """Per-call state shared by the samplers: working tensors and the scalar sigma grid in the working precision."""

    x: Tensor  # [B, C, F, H, W] in the working dtype
    sig: Tensor  # [N+1] scalar grid, CPU, float32 (float64 when x is float64)
    t: list[float]  # [N] model timesteps
    out_dtype: torch.dtype
    callback: StepCallback | None

    @property
    def steps(self) -> int:
        return len(self.t)

    def s(self, i: int) -> float:
        return self.sig[i].item()

    def lam(self, i: int) -> Tensor:
        """Half log-SNR λ = log(α) − log(σ) with α = 1 − σ, as 0-dim tensor in the scalar precision."""
        return torch.log(1 - self.sig[i]) - torch.log(self.sig[i])

    def velocity(self, model: VelocityFn, x: Tensor, i: int) -> Tensor:
        t = torch.full((x.shape[0],), self.t[i], dtype=torch.float32, device=x.device)  # [B]
        v = model(x, t, i)
        if not isinstance(v, Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            want = tuple(x.shape)
            raise RuntimeError(f"velocity model returned {got} at step {i}; expected a tensor of shape {want}")
        return v.to(x.dtype)

    def report(self, i: int, x: Tensor, denoised: Tensor) -> None:
        if self.callback is not None:
            self.callback(StepInfo(i, self.steps, self.s(i), self.t[i], x, denoised))


def _start(
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    timesteps: Tensor | Sequence[float] | None,
    callback: StepCallback | None,
    disable: bool,
) -> _Run:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
    sig64 = _check_sigmas(sigmas)
    n = sig64.shape[0] - 1
    if timesteps is None:
        t = (sig64[:-1] * NUM_TRAIN_TIMESTEPS).tolist()
    else:
        t = torch.as_tensor(timesteps, dtype=torch.float64).flatten().tolist()
        if len(t) != n:
            raise ValueError(f"got {len(t)} timesteps for {n + 1} sigmas; expected {n} (one per step)")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _Run(
        x=x.to(work),
        sig=sig64.to(work),
        t=t,
        out_dtype=x.dtype,
        callback=None if disable else callback,
    )


# --------------------------------------------------------------------------------------------------- Euler


@torch.no_grad()
def sample_euler(
    model: VelocityFn,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    timesteps: Tensor | Sequence[float] | None = None,
    callback: StepCallback | None = None,
    disable: bool = False,
) -> Tensor:
    """First-order Euler integration of the flow ODE dx/dσ = v (Lipman et al. 2023, "Flow Matching for Generative
    Modeling", arXiv:2210.02747): x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i.

    Matches musubi's ``FlowMatchDiscreteScheduler`` (``--sample_solver vanilla``) and diffusers'
    ``FlowMatchEulerDiscreteScheduler``: dt is formed in the scalar precision (float32 unless x is float64).

    x: [B, C, F, H, W] initial noise at sigmas[0]; sigmas: [N+1] strictly decreasing; timesteps: [N] model timesteps
    (default σ·1000). Returns x at sigmas[-1] in x's dtype.
    """
    run = _start(x, sigmas, timesteps, callback, disable)
    x = run.x
    for i in range(run.steps):
        v = run.velocity(model, x, i)
        run.report(i, x, x - run.s(i) * v)
        dt = (run.sig[i + 1] - run.sig[i]).item()
        x = x + v * dt
    return x.to(run.out_dtype)


# --------------------------------------------------------------------------------------------------- DPM-Solver++ 2M


def _dpm_first_order(run: _Run, i: int, x: Tensor, m0: Tensor) -> Tensor:
    """DPM-Solver++(1) (= DDIM) from σ_i to σ_{i+1} with data prediction m0."""
    h = run.lam(i + 1) - run.lam(i)
    alpha_t = 1 - run.sig[i + 1]
    c_x = (run.sig[i + 1] / run.sig[i]).item()
    c_m = (alpha_t * (torch.exp(-h) - 1.0)).item()
    return c_x * x - c_m * m0


def _dpm_second_order(run: _Run, i: int, x: Tensor, m0: Tensor, m1: Tensor) -> Tensor:
    """Multistep DPM-Solver++(2M), midpoint form, from σ_i to σ_{i+1} with data predictions m0 (step i), m1 (i − 1)."""
    h = run.lam(i + 1) - run.lam(i)
    h_0 = run.lam(i) - run.lam(i - 1)
    r0 = h_0 / h
    alpha_t = 1 - run.sig[i + 1]
    phi = alpha_t * (torch.exp(-h) - 1.0)
    d1 = (1.0 / r0).item() * (m0 - m1)
    c_x = (run.sig[i + 1] / run.sig[i]).item()
    return c_x * x - phi.item() * m0 - (0.5 * phi).item() * d1


@torch.no_grad()
def sample_dpmpp_2m(
    model: VelocityFn,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    timesteps: Tensor | Sequence[float] | None = None,
    callback: StepCallback | None = None,
    disable: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) on the data prediction x0 = x − σ·v (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
    Sampling of Diffusion Probabilistic Models", arXiv:2211.01095), with α = 1 − σ and λ = log(α/σ).

    Configured as the official ``FlowDPMSolverMultistepScheduler`` (solver_order 2, dpmsolver++, midpoint,
    final_sigmas_type zero): the first step and the final step are first order, every other step second order.
    Scalars are float32 (float64 when x is float64) as in the official code; σ = 1 (λ = −∞) is handled the same way.

    x: [B, C, F, H, W] initial noise at sigmas[0]; sigmas: [N+1]; timesteps: [N] (default σ·1000).
    """
    run = _start(x, sigmas, timesteps, callback, disable)
    x, prev_m = run.x, None
    for i in range(run.steps):
        v = run.velocity(model, x, i)
        m0 = x - run.s(i) * v
        run.report(i, x, m0)
        if prev_m is None or i == run.steps - 1:
            x = _dpm_first_order(run, i, x, m0)
        else:
            x = _dpm_second_order(run, i, x, m0, prev_m)
        prev_m = m0
    return x.to(run.out_dtype)


# --------------------------------------------------------------------------------------------------- UniPC bh2


def _bh2_terms(h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For predict-x0 UniPC (hh = −h): h·φ1 = expm1(hh), B(h) = expm1(hh) (bh2) and the right-hand sides
    b_1 = (φ1/hh − 1)/B(h), b_2 = 2·((φ1/hh − 1)/hh − 1/2)/B(h) of the order-2 corrector system."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    g1 = h_phi_1 / hh - 1
    g2 = g1 / hh - 1 / 2
    return h_phi_1, b_h, g1 * 1 / b_h, g2 * 2 / b_h


def _unipc_base(run: _Run, s: int, t: int, x: Tensor, m0: Tensor) -> tuple[Tensor, Tensor, float]:
    """Shared first-order part from σ_s to σ_t: returns (x_t_, h, α_t·B(h))."""
    h = run.lam(t) - run.lam(s)
    alpha_t = 1 - run.sig[t]
    h_phi_1, b_h, _, _ = _bh2_terms(h)
    c_x = (run.sig[t] / run.sig[s]).item()
    x_t = c_x * x - (alpha_t * h_phi_1).item() * m0
    return x_t, h, (alpha_t * b_h).item()


def _uni_p(run: _Run, i: int, x: Tensor, hist: list[Tensor], order: int) -> Tensor:
    """UniP-``order`` predictor from σ_i to σ_{i+1}; hist[-1] = x0 of step i, hist[-2] = x0 of step i − 1."""
    m0 = hist[-1]
    x_t, h, c_b = _unipc_base(run, i, i + 1, x, m0)
    if order == 1:
        return x_t
    rk = ((run.lam(i - 1) - run.lam(i)) / h).item()
    d1 = (hist[-2] - m0) / rk
    return x_t - c_b * (0.5 * d1)  # order 2 uses rho_p = 1/2


def _uni_c(run: _Run, i: int, x_prev: Tensor, model_t: Tensor, hist: list[Tensor], order: int) -> Tensor:
    """UniC-``order`` corrector of the sample at σ_i, restarted from x_prev at σ_{i−1} with the new x0 ``model_t``;
    hist[-1] = x0 of step i − 1, hist[-2] = x0 of step i − 2."""
    m0 = hist[-1]
    x_t, h, c_b = _unipc_base(run, i - 1, i, x_prev, m0)
    d1_t = model_t - m0
    if order == 1:
        return x_t - c_b * (0.5 * d1_t)  # rho_c = 1/2
    rk = (run.lam(i - 2) - run.lam(i - 1)) / h
    _, _, b1, b2 = _bh2_terms(h)
    r = torch.stack([torch.stack([torch.ones_like(rk), torch.ones_like(rk)]), torch.stack([rk, torch.ones_like(rk)])])
    rhos = torch.linalg.solve(r, torch.stack([b1, b2]))  # [2]
    d1 = (hist[-2] - m0) / rk.item()
    corr = rhos[0].item() * d1
    return x_t - c_b * (corr + rhos[1].item() * d1_t)


@torch.no_grad()
def sample_unipc(
    model: VelocityFn,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    timesteps: Tensor | Sequence[float] | None = None,
    callback: StepCallback | None = None,
    disable: bool = False,
) -> Tensor:
    """UniPC with the B(h) = e^h − 1 variant ("bh2"), order 2, on the data prediction x0 = x − σ·v (Zhao et al. 2023,
    "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", arXiv:2302.04867).

    Configured as the official ``FlowUniPCMultistepScheduler`` (solver_order 2, bh2, predict_x0, lower_order_final,
    final σ = 0): step i predicts with order min(2, i + 1, N − i); from step 1 on, the new x0 first corrects the
    sample (UniC, order of the previous predictor) and the predictor (UniP) then continues from the corrected sample.
    The model always sees the uncorrected prediction. Scalars are float32 (float64 when x is float64).

    x: [B, C, F, H, W] initial noise at sigmas[0] (< 1: λ(1) = −∞ breaks the corrector); sigmas: [N+1];
    timesteps: [N] (default σ·1000; the official grid truncates them to integers).
    """
    run = _start(x, sigmas, timesteps, callback, disable)
    if run.s(0) >= 1.0:
        raise ValueError(f"UniPC needs sigmas[0] < 1 (the official grid starts at {UNIPC_SIGMA_MAX}), got {run.s(0)}")
    x, hist = run.x, list[Tensor]()
    x_prev, prev_order = x, 0
    for i in range(run.steps):
        v = run.velocity(model, x, i)
        m = x - run.s(i) * v
        run.report(i, x, m)
        if i > 0:
            x = _uni_c(run, i, x_prev, m, hist, prev_order)
        hist = (hist + [m])[-2:]
        order = min(2, i + 1, run.steps - i)
        x_prev, prev_order = x, order
        x = _uni_p(run, i, x, hist, order)
    return x.to(run.out_dtype)


# --------------------------------------------------------------------------------------------------- dispatch

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "unipc": sample_unipc,
    "dpm++": sample_dpmpp_2m,
    "euler": sample_euler,
    "vanilla": sample_euler,
    "flowmatch_distill": sample_euler,  # over distill_schedule
}


def sample(
    solver: str,
    model: VelocityFn,
    x: Tensor,
    schedule: Schedule,
    callback: StepCallback | None = None,
    disable: bool = False,
) -> Tensor:
    """Run ``SAMPLERS[solver]`` over ``schedule`` (its sigmas and model timesteps). x: [B, C, F, H, W] noise."""
    if solver not in SAMPLERS:
        raise ValueError(f"unknown sample solver {solver!r}; expected one of {sorted(SAMPLERS)}")
    fn = SAMPLERS[solver]
    return fn(model, x, schedule.sigmas, timesteps=schedule.timesteps, callback=callback, disable=disable)


# --------------------------------------------------------------------------------------------------- noise


def initial_noise(
    shape: Sequence[int],
    seed: int,
    *,
    device: torch.device | str,
    cpu_noise: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal float32 noise from a generator seeded with ``seed``, returned in ``dtype`` on ``device``.

    Default (official Wan2.1 / musubi): drawn on ``device`` from ``torch.Generator(device).manual_seed(seed)``.
    ``cpu_noise`` (ComfyUI ``comfy.sample.prepare_noise`` / musubi ``--cpu_noise``): drawn on the CPU, as
    ``torch.manual_seed(seed)`` followed by ``torch.randn(shape, dtype=float32, generator=..., device="cpu")``,
    then cast to ``dtype`` and moved to ``device``. A private CPU generator gives the same stream without touching
    the global RNG state.
    """
    shape = tuple(shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"noise shape must be a non-empty sequence of positive ints, got {shape!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    device = torch.device(device)
    gen_device = torch.device("cpu") if cpu_noise else device
    generator = torch.Generator(device=gen_device)
    generator.manual_seed(seed)
    noise = torch.randn(shape, dtype=torch.float32, generator=generator, device=gen_device)
    return noise.to(device=device, dtype=dtype)
