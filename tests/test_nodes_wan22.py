"""Wan2.2 through the nodes on tiny random files under the official names: loaders, the expert pair in one sampler
and as two chained samplers (start/end steps), LoRA chains per expert, TI2V-5B with the Wan2.2 VAE, step caching."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS as N
from nodes import comfy_adapter as adapter
from nodes.sampler import HANDOVER
from tests import tiny_model_set as tms
from wan_core.loading.checkpoint import load_state_dict, read_metadata, save_safetensors
from wan_core.loading.model_set import SAMPLING_METADATA_KEY
from wan_core.lora.apply import applied_loras
from wan_core.media.layouts import image_to_wan, latent_to_comfy
from wan_core.runtime.step_cache import CALIBRATION_FORMAT, CALIBRATION_VERSION, calibration_path
from wan_core.sampling.conditioning import first_frame_size, text_image_to_video, text_to_video
from wan_core.sampling.experts import ExpertSwitch, expert_for
from wan_core.sampling.pipeline import SamplerSettings, denoise
from wan_core.sampling.solvers import get_schedule

T2V_HIGH, T2V_LOW = "wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors"
I2V_HIGH, I2V_LOW = "wan2.2_i2v_high_noise_14B_fp16.safetensors", "wan2.2_i2v_low_noise_14B_fp16.safetensors"
TI2V, VAE22 = "wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors"
LORA = tms.LORA[1]
SAMPLER = {"width": 32, "height": 32, "length": 5, "steps": 6, "guidance_scale": 3.0, "shift": 12.0,
           "solver": "euler", "seed": 7, "noise_on_cpu": False, "cfg_skip_mode": "none", "cfg_apply_ratio": 0.5,
           "slg_mode": "none", "slg_layers": "1", "slg_scale": 3.0, "slg_start": 0.0, "slg_end": 0.3}


def run(node_id: str, **inputs):
    cls = N[node_id]
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nodes22")
    tms.write_model_set(root / "models")
    tms.write_wan22_files(root / "models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(adapter.MODELS_DIR_ENV, str(root / "models"))
        mp.setenv(adapter.OUTPUT_DIR_ENV, str(root / "output"))
        adapter.clear_cache()
        yield root
        adapter.clear_cache()


def dit(name: str, task: str = "auto"):
    return run("WanTunerDiTLoader", model_name=name, task=task, dtype="default", fp8="none", attention="sdpa",
               blocks_to_swap=0, compile=False)[0]


def vae(name: str):
    return run("WanTunerVAELoader", model_name=name, dtype="fp32", cache_on_cpu=False, tiling="auto")[0]


def embeds():
    t5 = run("WanTunerT5Loader", model_name="umt5_xxl_fp16.safetensors", dtype="default", fp8=False, tokenizer="")[0]
    return run("WanTunerTextEncode", t5=t5, prompt="a red square moving right", negative_prompt="blurry")[0]


def sample(model, text, **overrides) -> dict:
    return run("WanTunerSampler", dit=model, text_embeds=text, **{**SAMPLER, **overrides})[0]


def lora(model, strength: float = 1.0):
    return run("WanTunerLoRALoader", dit=model, lora_name=LORA, strength=strength, include="", exclude="")[0]


def switch_step(steps: int, shift: float, boundary: float) -> int:
    """The first step the low-noise expert runs (the boundary rule on the schedule's timesteps)."""
    timesteps = get_schedule("euler", steps, shift).timesteps.tolist()
    return next(i for i, t in enumerate(timesteps) if expert_for(t, boundary) == "low")


# ----------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------


def test_loaders_take_the_wan22_files_and_tasks(models: Path) -> None:
    tasks = N["WanTunerDiTLoader"].INPUT_TYPES()["required"]["task"][0]
    assert {"t2v-A14B", "i2v-A14B", "ti2v-5B"} <= set(tasks)
    assert dit(TI2V).config.out_dim == 48 and dit(I2V_LOW, task="i2v-A14B").config.in_dim == 36
    assert vae(VAE22).model.obj.z_dim == 48
    problem = N["WanTunerDiTLoader"].VALIDATE_INPUTS(model_name=TI2V, task="t2v-14B")
    assert isinstance(problem, str) and "task 't2v-14B' needs" in problem and "tasks that fit: ti2v-5B" in problem


def test_two_dit_loaders_keep_both_experts_loaded(models: Path) -> None:
    """A pair of experts stays cached across queued prompts (the loader cache keeps two DiTs)."""
    high, low = dit(T2V_HIGH), dit(T2V_LOW)
    assert dit(T2V_HIGH).model is high.model and dit(T2V_LOW).model is low.model
    assert high.model is not low.model


# ----------------------------------------------------------------------------------------------------------------
# Sampling with two experts
# ----------------------------------------------------------------------------------------------------------------


def test_sampler_with_a_high_noise_dit_runs_the_expert_switch(models: Path) -> None:
    high, low, text = dit(T2V_HIGH), dit(T2V_LOW), embeds()
    got = sample(low, text, high_noise_dit=high)["samples"]
    switch = ExpertSwitch(high.model.obj, low.model.obj, 0.875, 4.0, 3.0, torch.device("cpu"))
    settings = SamplerSettings(steps=6, guidance_scale=3.0, flow_shift=12.0, seed=7, solver="euler")
    direct = denoise(switch, text_to_video(32, 32, 5), [text.positive], [text.negative], settings)
    assert torch.equal(got, latent_to_comfy(direct))
    assert switch.used.count("high") == 2 * switch_step(6, 12.0, 0.875) > 0 and "low" in switch.used
    alone = sample(low, text)["samples"]
    assert (got - alone).abs().max() > 1e-3


def test_sampler_takes_the_boundary_and_high_noise_guidance_stored_in_the_low_noise_expert(models: Path) -> None:
    """-1 (the default) means the low-noise expert file's `wantuner_sampling` values (the toy pair stores its own
    boundary), else the task's; given values win."""
    folder = models / "models" / "diffusion_models"
    stored = {"timestep_boundary": 0.95, "guidance_scale_high_noise": 2.5}  # 3 of the 6 steps at shift 12
    meta = read_metadata(folder / T2V_LOW) | {SAMPLING_METADATA_KEY: json.dumps(stored)}
    save_safetensors(dict(load_state_dict(folder / T2V_LOW)), folder / "low_with_defaults.safetensors", meta)
    high, low, text = dit(T2V_HIGH), dit("low_with_defaults.safetensors"), embeds()
    settings = SamplerSettings(steps=6, guidance_scale=3.0, flow_shift=12.0, seed=7, solver="euler")
    for inputs, boundary, guidance_high in (({}, 0.95, 2.5), ({"boundary": 0.9, "guidance_scale_high_noise": 4.0},
                                                             0.9, 4.0)):
        got = sample(low, text, high_noise_dit=high, **inputs)["samples"]
        switch = ExpertSwitch(high.model.obj, low.model.obj, boundary, guidance_high, 3.0, torch.device("cpu"))
        direct = denoise(switch, text_to_video(32, 32, 5), [text.positive], [text.negative], settings)
        assert torch.equal(got, latent_to_comfy(direct)), inputs
        assert switch.used.count("high") == 2 * switch_step(6, 12.0, boundary) > 0 and "low" in switch.used


@pytest.mark.parametrize("solver", ["euler", "flowmatch_distill"])
def test_two_chained_samplers_equal_one_sampler_with_both_experts(models: Path, solver: str) -> None:
    """ComfyUI's pattern: the high-noise sampler stops at the switch step and hands its noisy latent to the
    low-noise sampler. With a one-step solver this is the single two-expert run, bit for bit."""
    high, low, text = dit(T2V_HIGH), dit(T2V_LOW), embeds()
    steps, shift, boundary = 8, 12.0, 0.875
    k = switch_step(steps, shift, boundary) if solver == "euler" else 3
    if solver != "euler":
        timesteps = get_schedule(solver, steps, shift).timesteps.tolist()
        boundary = (timesteps[k - 1] + timesteps[k]) / 2000  # the switch falls between steps k-1 and k
    both = sample(low, text, high_noise_dit=high, steps=steps, shift=shift, solver=solver, boundary=boundary,
                  guidance_scale_high_noise=4.0)
    first = sample(high, text, steps=steps, shift=shift, solver=solver, guidance_scale=4.0, end_step=k)
    assert HANDOVER in first and 0 < k < steps
    second = sample(low, text, steps=steps, shift=shift, solver=solver, latent=first, start_step=k, seed=999)
    assert torch.equal(second["samples"], both["samples"])
    assert HANDOVER not in second and HANDOVER not in both


def test_a_continuing_sampler_must_start_where_the_first_stopped(models: Path) -> None:
    high, low, text = dit(T2V_HIGH), dit(T2V_LOW), embeds()
    first = sample(high, text, end_step=3)
    with pytest.raises(ValueError, match=r"stopped at step 3 of a 6-step euler schedule with shift 12.0 but this "
                                         r"sampler starts at step 2"):
        sample(low, text, latent=first, start_step=2)
    check = N["WanTunerSampler"].VALIDATE_INPUTS
    assert "leave no step" in check(steps=6, start_step=4, end_step=4)
    assert "boundary must be" in check(boundary=0.0)
    assert check(steps=6, start_step=0, end_step=10000, boundary=-1.0) is True


def test_lora_chains_are_per_expert(models: Path) -> None:
    high, low, text = dit(T2V_HIGH), dit(T2V_LOW), embeds()
    lora_path = str(models / "models" / "loras" / LORA)
    got = sample(low, text, high_noise_dit=lora(high, 0.8))["samples"]
    settings = SamplerSettings(steps=6, guidance_scale=3.0, flow_shift=12.0, seed=7, solver="euler")
    with applied_loras(high.model.obj, [(lora_path, 0.8, None, None)]):
        switch = ExpertSwitch(high.model.obj, low.model.obj, 0.875, 4.0, 3.0, torch.device("cpu"))
        direct = denoise(switch, text_to_video(32, 32, 5), [text.positive], [text.negative], settings)
    assert torch.equal(got, latent_to_comfy(direct))
    on_low = sample(lora(low, 0.8), text, high_noise_dit=high)["samples"]
    plain = sample(low, text, high_noise_dit=high)["samples"]
    assert (got - plain).abs().max() > 1e-4 and (on_low - plain).abs().max() > 1e-4 and (got - on_low).abs().max() > 0
    with pytest.raises(ValueError, match="one loaded model .* with different LoRA chains"):
        sample(high, text, high_noise_dit=lora(high))


def test_i2v_a14b_without_clip_and_task_defaults(models: Path, caplog: pytest.LogCaptureFixture) -> None:
    high, low, text, handle = dit(I2V_HIGH), dit(I2V_LOW), embeds(), vae("wan_2.1_vae.safetensors")
    image = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(0))
    cond, width, height = run("WanTunerImageToVideo", vae=handle, start_image=image, width=32, height=32, length=5,
                              size_from_image=False)
    with caplog.at_level(logging.INFO, logger="nodes.sampler"):
        out = sample(low, text, high_noise_dit=high, conditioning=cond)["samples"]
    assert tuple(out.shape) == (1, 16, 2, 4, 4)
    assert any("i2v-A14B experts" in r.getMessage() and "boundary 0.9 (guidance 3.5)" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------------------------------------------
# TI2V-5B with the Wan2.2 VAE
# ----------------------------------------------------------------------------------------------------------------


def test_ti2v_text_to_video_uses_the_wan22_vae_layout(models: Path) -> None:
    model, text, handle = dit(TI2V), embeds(), vae(VAE22)
    latent = sample(model, text, width=64, height=32, guidance_scale=5.0, shift=5.0)
    assert tuple(latent["samples"].shape) == (1, 48, 2, 2, 4)
    (frames,) = run("WanTunerVAEDecode", vae=handle, latent=latent)
    assert tuple(frames.shape) == (5, 32, 64, 3)
    with pytest.raises(ValueError, match=r"spatial stride 16, height and width must be multiples of 32, got 48x32"):
        sample(model, text, width=32, height=48)
    with pytest.raises(ValueError, match="TI2V-5B DiT, which has no high-noise expert"):
        sample(model, text, high_noise_dit=model, width=64)


def test_ti2v_node_and_sampler_equal_the_direct_wan_core_run(models: Path) -> None:
    """Start image -> first latent frame: the node + sampler give the direct wan_core TI2V run bit for bit, with
    the official size rule (the image's aspect ratio, sides multiples of 32) and the image latent in frame 0."""
    model, text, handle = dit(TI2V), embeds(), vae(VAE22)
    image = torch.rand(1, 40, 120, 3, generator=torch.Generator().manual_seed(1))
    cond, width, height = run("WanTunerTI2VImageToVideo", vae=handle, start_image=image, width=96, height=64,
                              length=5, size_from_image=True)
    assert (height, width) == first_frame_size((40, 120), 96 * 64, 32) == (32, 128)
    got = sample(model, text, conditioning=cond, guidance_scale=5.0, shift=5.0)["samples"]
    direct_cond = text_image_to_video(handle.model.obj, image_to_wan(image), 5, 32, 128, spatial=16)
    settings = SamplerSettings(steps=6, guidance_scale=5.0, flow_shift=5.0, seed=7, solver="euler")
    direct = denoise(model.model.obj, direct_cond, [text.positive], [text.negative], settings)
    assert torch.equal(got, latent_to_comfy(direct)) and tuple(got.shape) == (1, 48, 2, 2, 8)
    assert torch.equal(direct[:, :, :1], direct_cond.first_latent)
    t2v = sample(model, text, width=128, height=32, guidance_scale=5.0, shift=5.0)["samples"]
    assert (got[:, :, 1:] - t2v[:, :, 1:]).abs().max() > 1e-3  # the image conditions the later frames too
    exact, w, h = run("WanTunerTI2VImageToVideo", vae=handle, start_image=image, width=64, height=32, length=5,
                      size_from_image=False)
    assert (w, h) == (64, 32) and tuple(exact.cond.first_latent.shape) == (1, 48, 1, 2, 4)


def test_ti2v_node_refuses_the_wan21_vae_and_a_wan21_dit(models: Path) -> None:
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    wan21 = vae("wan_2.1_vae.safetensors")
    with pytest.raises(ValueError, match=r"needs a VAE of spatial stride 16 \(the Wan2.2 VAE, wan2.2_vae\), got one "
                                         r"of stride 8 with 16 latent channels \(the Wan2.1 VAE"):
        run("WanTunerTI2VImageToVideo", vae=wan21, start_image=image, width=32, height=32, length=5,
            size_from_image=False)
    cond = run("WanTunerTI2VImageToVideo", vae=vae(VAE22), start_image=image, width=32, height=32, length=5,
               size_from_image=False)[0]
    with pytest.raises(ValueError, match=r"TI2V image-to-video conditioning's start-image latent has 48 channels but "
                                         r"the DiT is a text-to-video model \(16 input channels\) with 16"):
        sample(dit(T2V_LOW), text=embeds(), conditioning=cond)


# ----------------------------------------------------------------------------------------------------------------
# Step caching
# ----------------------------------------------------------------------------------------------------------------


def _write_calibration(dit_path: Path, coefficients: list[float]) -> Path:
    data = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "steps": 6, "source": "test",
            "teacache": {"coefficients": coefficients}, "magcache": {"ratios": {}}}
    path = calibration_path(dit_path)
    path.write_text(json.dumps(data))
    return path


def test_step_cache_input_skips_calls_with_a_calibration(models: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = models / "models" / "diffusion_models" / TI2V
    text, model = embeds(), dit(TI2V)
    base = dict(width=64, guidance_scale=5.0, shift=5.0, steps=8)
    plain = sample(model, text, **base)["samples"]
    calibration = _write_calibration(path, [0.0, 0.0, 0.0, 0.0, 1e-3])  # every step's change estimated at 0.001
    try:
        with caplog.at_level(logging.INFO):
            cached = sample(model, text, cache_mode="teacache", cache_threshold=0.05, **base)["samples"]
            none = sample(model, text, cache_mode="none", **base)["samples"]
            magcache = sample(model, text, cache_mode="magcache", **base)["samples"]
    finally:
        calibration.unlink()
    messages = [r.getMessage() for r in caplog.records]
    assert any("step cache teacache: skipped 12 of 16 model calls" in m for m in messages), messages
    assert (cached - plain).abs().max() > 0 and torch.equal(none, plain)
    assert torch.equal(magcache, plain) and any("no MagCache ratios" in m for m in messages)
    with pytest.raises(ValueError, match="step caching is calibrated for one DiT, not a pair of experts"):
        sample(dit(T2V_LOW), text, high_noise_dit=dit(T2V_HIGH), cache_mode="teacache")
