"""Schedules and samplers of wan_core.sampling.solvers against diffusers 0.42.1 and analytic Gaussian flows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from wan_core.sampling import solvers as S

CASES = [(50, 5.0), (40, 3.0), (30, 8.0), (4, 1.0), (50, 3.0), (10, 5.0), (2, 3.0), (1, 5.0)]


# --------------------------------------------------------------------------------------------------- oracles


def official_unipc_sigmas(steps: int, shift: float) -> np.ndarray:
    """Official FlowUniPC grid: sigma_max is the float32 first entry of the training
    grid 1 - linspace(1, 1/1000, 1000)[::-1]; linspace(sigma_max, 0, N + 1)[:-1], then shifted."""
    train = torch.from_numpy(1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()).to(torch.float32)
    base = np.linspace(train[0].item(), train[-1].item(), steps + 1)[:-1]
    return shift * base / (1 + (shift - 1) * base)


def diffusers_unipc(steps: int, shift: float) -> UniPCMultistepScheduler:
    """diffusers' flow UniPC with flow_shift=1 fed the official, already-shifted sigmas as a NumPy array."""
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    sched.set_timesteps(sigmas=official_unipc_sigmas(steps, shift))
    return sched


def diffusers_dpmpp(steps: int, shift: float) -> DPMSolverMultistepScheduler:
    """diffusers' DPM-Solver++ configured as the official FlowDPMSolverMultistepScheduler. diffusers 0.42.1 has no
    sigmas= for this class, so its grid is replaced by the official get_sampling_sigmas grid (written out here)
    with int64-truncated timesteps, as the official set_timesteps(sigmas=...) stores them."""
    sched = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=1.0,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    base = np.linspace(1, 0, steps + 1)[:steps]
    shifted = shift * base / (1 + (shift - 1) * base)
    sched.sigmas = torch.from_numpy(np.append(shifted, 0.0).astype(np.float32))
    sched.timesteps = torch.from_numpy((shifted * 1000).astype(np.int64))
    return sched


def diffusers_euler(steps: int, shift: float) -> FlowMatchEulerDiscreteScheduler:
    """musubi's vanilla grid is torch.linspace(1, 0, N + 1) (float32) shifted; diffusers shifts the same grid."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].numpy())
    return sched


def synthetic_velocity(channels: int = 8, seed: int = 0) -> S.VelocityFn:
    """A deterministic nonlinear velocity field: tanh of a fixed random channel map plus a time-dependent bias."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, channels, generator=g) / channels**0.5  # [C, C]
    bias = torch.randn(channels, generator=g)  # [C]

    def model(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        y = torch.einsum("oc,bcfhw->bofhw", weight.to(x.dtype), x)
        tt = (t / 1000).to(x.dtype).view(-1, 1, 1, 1, 1)
        return torch.tanh(y + bias.to(x.dtype).view(1, -1, 1, 1, 1) * tt) + 0.5 * x

    return model


def run_diffusers(sched, model: S.VelocityFn, x: torch.Tensor) -> torch.Tensor:
    sched.set_begin_index(0)
    for i, t in enumerate(sched.timesteps):
        v = model(x, t.expand(x.shape[0]).to(torch.float32), i)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


def noise(shape=(2, 8, 3, 4, 4), seed=1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("steps,shift", CASES)
def test_unipc_schedule_equals_diffusers_with_official_sigmas(steps, shift):
    ours = S.get_schedule("unipc", steps, shift)
    ref = diffusers_unipc(steps, shift)
    assert ours.sigmas.dtype == torch.float64 and ours.timesteps.dtype == torch.float64
    assert ours.sigmas.shape == (steps + 1,) and ours.timesteps.shape == (steps,)
    assert torch.equal(ours.sigmas, ref.sigmas.double()), (ours.sigmas - ref.sigmas.double()).abs().max()
    assert torch.equal(ours.timesteps, ref.timesteps.double())
    assert ours.sigmas[-1] == 0


def test_unipc_schedule_facts_from_reference():
    """The official grid: first T2V timestep at shift 5 is 999 (σ' = 0.99980); diffusers' default grid differs."""
    sched = S.get_schedule("unipc", 50, 5.0)
    assert sched.timesteps[0] == 999 and abs(sched.sigmas[0].item() - 0.99980) < 5e-6
    assert torch.equal(sched.timesteps, sched.timesteps.floor())
    table = {(50, 5.0): (23, 4.3e-3), (50, 3.0): (10, 2.8e-3), (40, 3.0): (10, 2.7e-3), (30, 8.0): (14, 5.2e-3)}
    for (steps, shift), (equal_ts, max_dsigma) in table.items():
        ours = S.get_schedule("unipc", steps, shift)
        default = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        default.set_timesteps(steps)
        assert int((default.timesteps.double() == ours.timesteps).sum()) == equal_ts
        assert round((default.sigmas.double() - ours.sigmas).abs().max().item(), 4) == max_dsigma


@pytest.mark.parametrize("steps,shift", CASES)
def test_dpmpp_schedule_is_official_get_sampling_sigmas(steps, shift):
    ours = S.get_schedule("dpm++", steps, shift)
    ref = diffusers_dpmpp(steps, shift)
    assert torch.equal(ours.sigmas, ref.sigmas.double())
    assert torch.equal(ours.timesteps, ref.timesteps.double())
    assert ours.sigmas[0] == 1.0 and ours.timesteps[0] == 1000 and ours.sigmas[-1] == 0


@pytest.mark.parametrize("steps,shift", CASES)
def test_euler_schedule_equals_diffusers_flow_match_euler(steps, shift):
    ours = S.get_schedule("euler", steps, shift)
    ref = diffusers_euler(steps, shift)
    assert torch.equal(ours.sigmas, ref.sigmas.double())
    assert torch.equal(ours.timesteps, ref.timesteps.double())
    assert torch.equal(S.get_schedule("vanilla", steps, shift).sigmas, ours.sigmas)


def test_shift_sigmas_formula_and_types():
    base = np.linspace(1, 0, 11)
    for shift in (1.0, 3.0, 5.0, 8.0):
        expected = np.array([shift * s / (1 + (shift - 1) * s) for s in base.tolist()])
        np.testing.assert_array_equal(S.shift_sigmas(base, shift), expected)
        out = S.shift_sigmas(torch.from_numpy(base), shift)
        assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(expected))
    np.testing.assert_array_equal(S.shift_sigmas(base, 1.0), base)


@pytest.mark.parametrize(
    "solver,steps,shift",
    [("ddim", 10, 5.0), ("unipc", 0, 5.0), ("unipc", 2.5, 5.0), ("dpm++", 10, 0.0), ("euler", 10, float("nan"))],
)
def test_get_schedule_rejects_bad_input(solver, steps, shift):
    with pytest.raises(ValueError):
        S.get_schedule(solver, steps, shift)


# --------------------------------------------------------------------------------------------------- trajectories


def _trajectory_diff(solver: str, ref_factory, steps: int, shift: float) -> float:
    model, x = synthetic_velocity(), noise()
    ours = S.sample(solver, model, x, S.get_schedule(solver, steps, shift))
    ref = run_diffusers(ref_factory(steps, shift), model, x)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("steps,shift", CASES)
def test_unipc_trajectory_matches_diffusers(steps, shift):
    diff = _trajectory_diff("unipc", diffusers_unipc, steps, shift)
    print(f"unipc {steps}/{shift}: max |ours - diffusers| = {diff:.3g}")
    assert diff == 0.0


@pytest.mark.parametrize("steps,shift", CASES)
def test_dpmpp_trajectory_matches_diffusers(steps, shift):
    diff = _trajectory_diff("dpm++", diffusers_dpmpp, steps, shift)
    print(f"dpm++ {steps}/{shift}: max |ours - diffusers| = {diff:.3g}")
    assert diff == 0.0


@pytest.mark.parametrize("steps,shift", CASES)
def test_euler_trajectory_matches_diffusers(steps, shift):
    diff = _trajectory_diff("euler", diffusers_euler, steps, shift)
    print(f"euler {steps}/{shift}: max |ours - diffusers| = {diff:.3g}")
    assert diff == 0.0


def test_unipc_intermediate_states_match_diffusers():
    """Every step's model input (x the model sees) equals diffusers' sample at that step."""
    model, x = synthetic_velocity(), noise()
    seen_ours, seen_ref = [], []
    S.sample("unipc", model, x, S.get_schedule("unipc", 12, 5.0), callback=lambda info: seen_ours.append(info.x))

    def recording(xx, t, i):
        seen_ref.append(xx)
        return model(xx, t, i)

    run_diffusers(diffusers_unipc(12, 5.0), recording, x)
    assert len(seen_ours) == len(seen_ref) == 12
    for a, b in zip(seen_ours, seen_ref):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------- analytic Gaussian

MU, STD = 0.7, 0.3  # data x0 ~ N(MU, STD^2) per element


def gaussian_velocity(sigmas: torch.Tensor) -> S.VelocityFn:
    """Exact velocity E[ε − x0 | x_σ] for Gaussian data under x_σ = (1 − σ)·x0 + σ·ε."""

    def model(x, t, i):
        s = sigmas[i].item()
        var = (1 - s) ** 2 * STD**2 + s**2
        return (s - (1 - s) * STD**2) / var * (x - (1 - s) * MU) - MU

    return model


def posterior_mean(x: torch.Tensor, s: float) -> torch.Tensor:
    var = (1 - s) ** 2 * STD**2 + s**2
    return MU + (1 - s) * STD**2 / var * (x - (1 - s) * MU)


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
@pytest.mark.parametrize("sigma", [0.999, 0.5, 0.05])
def test_single_step_to_zero_is_one_euler_step_and_posterior_mean(solver, sigma):
    sigmas = torch.tensor([sigma, 0.0], dtype=torch.float64)
    model = gaussian_velocity(sigmas)
    x = noise(dtype=torch.float64)
    out = S.SAMPLERS[solver](model, x, sigmas)
    t = torch.full((x.shape[0],), sigma * 1000)
    assert torch.equal(out, x - sigma * model(x, t, 0))
    torch.testing.assert_close(out, posterior_mean(x, sigma), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_samplers_converge_to_exact_gaussian_flow(solver):
    """The probability-flow ODE maps x at σ0 to MU + STD·z with z the standardised start; error shrinks with N
    (first order for Euler, faster for the multistep solvers)."""
    z = noise(dtype=torch.float64, seed=3)
    errors = []
    for steps in (10, 40, 160):
        sigmas = torch.from_numpy(np.linspace(0.999 if solver == "unipc" else 1.0, 0.0, steps + 1))
        s0 = sigmas[0].item()
        x = (1 - s0) * MU + ((1 - s0) ** 2 * STD**2 + s0**2) ** 0.5 * z
        out = S.SAMPLERS[solver](gaussian_velocity(sigmas), x, sigmas)
        errors.append((out - (MU + STD * z)).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    if solver == "euler":
        assert 3.5 < errors[1] / errors[2] < 4.5 and errors[2] < 2e-2  # 4x steps, 4x smaller error: first order
    else:
        assert errors[1] / errors[2] > 6 and errors[2] < 2e-3


# --------------------------------------------------------------------------------------------------- behaviour


def test_model_receives_schedule_timesteps_and_callback_reports_each_step():
    schedule = S.get_schedule("unipc", 6, 5.0)
    seen_t, infos = [], []

    def model(x, t, i):
        seen_t.append((t.clone(), i))
        return torch.zeros_like(x)

    x = noise(shape=(3, 2, 1, 2, 2))
    S.sample("unipc", model, x, schedule, callback=infos.append)
    assert [i for _, i in seen_t] == list(range(6))
    for t, i in seen_t:
        assert t.dtype == torch.float32 and t.shape == (3,) and bool((t == schedule.timesteps[i]).all())
    assert [info.i for info in infos] == list(range(6)) and all(info.total == 6 for info in infos)
    assert [info.sigma for info in infos] == schedule.sigmas[:-1].tolist()
    assert [info.t for info in infos] == schedule.timesteps.tolist()
    # zero velocity: denoised equals the input
    assert all(torch.equal(info.x, info.denoised) for info in infos)
    infos.clear()
    S.sample("unipc", model, x, schedule, callback=infos.append, disable=True)
    assert infos == []


def test_default_timesteps_are_sigma_times_1000():
    sigmas = torch.tensor([0.9, 0.4, 0.0], dtype=torch.float64)
    seen = []
    S.sample_euler(lambda x, t, i: (seen.append(t[0].item()), torch.zeros_like(x))[1], noise(), sigmas)
    assert seen == [float(np.float32(900.0)), float(np.float32(400.0))]


def test_low_precision_input_is_integrated_in_float32():
    model, schedule = synthetic_velocity(), S.get_schedule("dpm++", 8, 5.0)
    x = noise().to(torch.bfloat16)
    out = S.sample("dpm++", model, x, schedule)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, S.sample("dpm++", model, x.float(), schedule).to(torch.bfloat16))


def test_vanilla_alias_and_dispatch_errors():
    model, x = synthetic_velocity(), noise()
    sched = S.get_schedule("euler", 5, 3.0)
    assert torch.equal(S.sample("vanilla", model, x, sched), S.sample("euler", model, x, sched))
    assert set(S.SAMPLERS) == {"unipc", "dpm++", "euler", "vanilla", "flowmatch_distill"}
    with pytest.raises(ValueError, match="unknown sample solver"):
        S.sample("heun", model, x, sched)


@pytest.mark.parametrize(
    "sigmas",
    [[0.5], [0.5, 0.6, 0.0], [1.2, 0.0], [0.5, float("nan"), 0.0], [[0.5, 0.0]], [0.5, 0.5, 0.0]],
)
def test_bad_sigmas_rejected(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        S.sample_euler(synthetic_velocity(), noise(), sigmas)


def test_unipc_rejects_sigma_one_and_bad_timesteps_and_bad_model():
    with pytest.raises(ValueError, match="sigmas\\[0\\] < 1"):
        S.sample_unipc(synthetic_velocity(), noise(), [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="timesteps"):
        S.sample_unipc(synthetic_velocity(), noise(), [0.9, 0.5, 0.0], timesteps=[900.0])
    with pytest.raises(RuntimeError, match="expected a tensor of shape"):
        S.sample_dpmpp_2m(lambda x, t, i: x[:, :1], noise(), [0.9, 0.0])


# --------------------------------------------------------------------------------------------------- noise


def test_initial_noise_same_seed_bit_identical_and_seed_sensitive():
    shape = (1, 16, 3, 6, 8)
    a = S.initial_noise(shape, 42, device="cpu")
    b = S.initial_noise(shape, 42, device="cpu")
    assert a.dtype == torch.float32 and a.shape == shape and torch.equal(a, b)
    assert not torch.equal(a, S.initial_noise(shape, 43, device="cpu"))
    c = S.initial_noise(shape, 42, device="cpu", dtype=torch.bfloat16)
    assert c.dtype == torch.bfloat16 and torch.equal(c, a.to(torch.bfloat16))


def test_cpu_noise_matches_comfyui_prepare_noise_and_keeps_global_rng():
    """ComfyUI: generator = torch.manual_seed(seed); torch.randn(size, dtype=float32, generator=generator,
    device='cpu').to(latent dtype). musubi --cpu_noise draws the same way."""
    shape, seed = (1, 16, 5, 4, 6), 123456789
    state = torch.random.get_rng_state()
    ours = S.initial_noise(shape, seed, device="cpu", cpu_noise=True, dtype=torch.float16)
    assert torch.equal(torch.random.get_rng_state(), state)
    generator = torch.manual_seed(seed)
    ref = torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu").to(torch.float16)
    torch.random.set_rng_state(state)
    assert torch.equal(ours, ref)
    # official / musubi layout [C, F, H, W] draws the same stream as ComfyUI's [1, C, F, H, W]
    assert torch.equal(S.initial_noise(shape[1:], seed, device="cpu", cpu_noise=True).half(), ours[0])


@pytest.mark.parametrize("shape,seed", [((1, 16, 0, 4, 4), 1), ((), 1), ((1, 2), -1), ((1, 2), 2**64), ((1, 2), 1.5)])
def test_initial_noise_rejects_bad_input(shape, seed):
    with pytest.raises(ValueError):
        S.initial_noise(shape, seed, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_noise_uses_the_device_generator_and_sampling_matches_cpu():
    shape, seed = (1, 16, 3, 6, 8), 7
    a = S.initial_noise(shape, seed, device="cuda")
    assert a.device.type == "cuda" and torch.equal(a, S.initial_noise(shape, seed, device="cuda"))
    ref = torch.randn(shape, dtype=torch.float32, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
    assert torch.equal(a, ref)
    cpu = S.initial_noise(shape, seed, device="cuda", cpu_noise=True)
    assert cpu.device.type == "cuda" and torch.equal(cpu.cpu(), S.initial_noise(shape, seed, device="cpu"))
    model_cpu = synthetic_velocity(16)
    weight_model = synthetic_velocity(16)

    def model_cuda(x, t, i):
        return weight_model(x.cpu(), t.cpu(), i).to(x.device)

    sched = S.get_schedule("unipc", 20, 5.0)
    out_gpu = S.sample("unipc", model_cuda, cpu, sched)
    out_cpu = S.sample("unipc", model_cpu, cpu.cpu(), sched)
    assert out_gpu.device.type == "cuda"
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=0, atol=1e-5)
