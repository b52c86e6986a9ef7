"""Wan2.2 TI2V-5B image-to-video: the start image's latent as latent frame 0 with timestep 0 on its tokens
(`wan_core.sampling.first_frame`), against diffusers' WanImageToVideoPipeline (expand_timesteps) and the official
rule (the image latent put back after every solver step), on tiny random models."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

from tests.numerics import assert_float32_parity, float64_upcasts, rel_err
from tests.test_vae22 import TINY_VAE22, diffusers_vae22
from tests.tiny import TINY_DIT, randomize_
from wan_core.loading.checkpoint import build_on_meta, load_into
from wan_core.loading.convert import DIT_DIFFUSERS, rename, vae22_diffusers_rules
from wan_core.models.dit import WanModel
from wan_core.models.vae import WanVAE, WanVAEModel
from wan_core.sampling import conditioning as cond
from wan_core.sampling.first_frame import FirstFrame
from wan_core.sampling.pipeline import SamplerSettings, denoise
from wan_core.sampling.solvers import SAMPLERS, euler_schedule, get_schedule, initial_noise

TINY_TI2V = dataclasses.replace(TINY_DIT, in_dim=48, out_dim=48)
HEIGHT, WIDTH, FRAMES = 64, 32, 9  # latents [48, 3, 4, 2]: 3 latent frames of 2 tokens
STEPS, SHIFT, GUIDANCE, SEED = 4, 5.0, 5.0, 3


def diffusers_ti2v_dit(seed: int = 0):
    from diffusers import WanTransformer3DModel

    cfg = TINY_TI2V
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=48,
        out_channels=48, text_dim=cfg.text_dim, freq_dim=256, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    return randomize_(model, seed).eval()


@pytest.fixture(scope="module")
def ref_dit():
    return diffusers_ti2v_dit()


@pytest.fixture(scope="module")
def ref_vae():
    return diffusers_vae22()


@pytest.fixture(scope="module")
def dit(ref_dit) -> WanModel:
    sd = rename(ref_dit.state_dict(), DIT_DIFFUSERS, to_ours=True, what="test")
    return load_into(build_on_meta(lambda: WanModel(TINY_TI2V)), sd).eval()


@pytest.fixture(scope="module")
def vae(ref_vae) -> WanVAE:
    sd = rename(ref_vae.state_dict(), vae22_diffusers_rules(2, 4), to_ours=True, what="test")
    return WanVAE(load_into(build_on_meta(lambda: WanVAEModel(TINY_VAE22)), sd), tiling=False)


def _image() -> torch.Tensor:
    """[3, H, W] in [0, 1]."""
    return torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(5))


def _contexts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    return torch.randn(7, TINY_TI2V.text_dim, generator=gen), torch.randn(4, TINY_TI2V.text_dim, generator=gen)


def _padded(context: torch.Tensor) -> torch.Tensor:
    """[L, C] -> [1, 512, C], zero padded as our DiT pads every context."""
    out = torch.zeros(1, 512, context.shape[-1], dtype=context.dtype)
    out[0, : context.shape[0]] = context
    return out


def _diffusers_latents(ref_dit, ref_vae, float64: bool) -> torch.Tensor:
    """diffusers' TI2V pipeline (expand_timesteps) with an Euler scheduler over our Euler grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # our sigmas are already shifted
    sigmas = euler_schedule(STEPS, SHIFT).sigmas[:-1].float().numpy()
    scheduler.set_timesteps = functools.partial(scheduler.set_timesteps, sigmas=sigmas)
    transformer, vae = (copy.deepcopy(ref_dit).double(), copy.deepcopy(ref_vae).double()) if float64 else (
        ref_dit, ref_vae)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                                   transformer=transformer, expand_timesteps=True)
    positive, negative = _contexts()
    dtype = torch.float64 if float64 else torch.float32
    noise = initial_noise((1, 48, 3, HEIGHT // 16, WIDTH // 16), SEED, device="cpu")
    with torch.no_grad(), float64_upcasts():
        out = pipe(image=_image()[None], prompt_embeds=_padded(positive).to(dtype),
                   negative_prompt_embeds=_padded(negative).to(dtype), height=HEIGHT, width=WIDTH,
                   num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise,
                   output_type="latent").frames
    return out.double() if float64 else out


def _ours(dit, vae, solver: str = "euler") -> tuple[torch.Tensor, cond.Conditioning]:
    conditioning = cond.text_image_to_video(vae, _image() * 2 - 1, FRAMES, HEIGHT, WIDTH, spatial=16)
    positive, negative = _contexts()
    settings = SamplerSettings(steps=STEPS, guidance_scale=GUIDANCE, flow_shift=SHIFT, seed=SEED, solver=solver)
    return denoise(dit, conditioning, [positive], [negative], settings), conditioning


def _diffusers_sinusoid(dim: int, t: torch.Tensor) -> torch.Tensor:
    """diffusers' timestep sinusoid (float32 angles; ours and the official code form them in float64)."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


def test_matches_diffusers_ti2v_pipeline(dit, vae, ref_dit, ref_vae, monkeypatch) -> None:
    # The float32 sinusoid of t <= 1000 is off by ~1e-4 rad, which both diffusers runs share (the float64 run keeps
    # it), so it is not part of the reference's own float32 error; with diffusers' sinusoid in our DiT the
    # comparison measures the TI2V handling and float32 rounding only (measured: frames 1-2 at 7e-6 / 9e-6 from the
    # float64 run with our float64 sinusoid, 1.4e-6 / 1.0e-6 with diffusers').
    monkeypatch.setattr("wan_core.models.dit.sinusoidal_embedding", _diffusers_sinusoid)
    got, conditioning = _ours(dit, vae)
    want32 = _diffusers_latents(ref_dit, ref_vae, float64=False)
    want64 = _diffusers_latents(ref_dit, ref_vae, float64=True)
    print(f"TI2V latents: max rel err {rel_err(got, want64):.3g} vs diffusers float64, {rel_err(got, want32):.3g} vs "
          f"diffusers float32 (its own float32 error {rel_err(want32, want64):.3g})")
    assert got.shape == want32.shape == (1, 48, 3, HEIGHT // 16, WIDTH // 16)
    assert_float32_parity(got, want32, want64)
    # the image matters: a text-to-video run from the same noise is far from it
    t2v = denoise(dit, cond.text_to_video(HEIGHT, WIDTH, FRAMES, spatial=16), list(_contexts()[:1]),
                  list(_contexts()[1:]), SamplerSettings(STEPS, GUIDANCE, SHIFT, SEED, solver="euler"))
    assert rel_err(t2v[:, :, 1:], want32[:, :, 1:]) > 1e-2


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_frame_zero_of_the_result_is_the_image_latent(dit, vae, solver) -> None:
    got, conditioning = _ours(dit, vae, solver)
    assert torch.equal(got[:, :, :1], conditioning.first_latent)
    assert not torch.equal(got[:, :, 1:2], got[:, :, :1])


class _Recorder(torch.nn.Module):
    """A DiT stand-in that records the timesteps and frame 0 it sees and returns a velocity mixing all frames."""

    def __init__(self) -> None:
        super().__init__()
        self.config = TINY_TI2V
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, context, **_):
        self.seen.append((t.clone(), x[:, :, :1].clone()))
        return 0.3 * x + x.mean(dim=2, keepdim=True) + context[0].mean()


def test_per_token_timesteps_zero_on_the_first_frame() -> None:
    model = _Recorder()
    latent = torch.randn(1, 48, 1, 4, 2, generator=torch.Generator().manual_seed(1))
    conditioning = cond.Conditioning(HEIGHT, WIDTH, FRAMES, 3, spatial=16, first_latent=latent)
    settings = SamplerSettings(steps=STEPS, guidance_scale=GUIDANCE, flow_shift=SHIFT, seed=SEED)
    positive, negative = _contexts()
    denoise(model, conditioning, [positive], [negative], settings)
    schedule = get_schedule("unipc", STEPS, SHIFT)
    tokens_per_frame = (4 // 2) * (2 // 2)
    assert len(model.seen) == 2 * STEPS  # prompt and negative prompt per step
    for call, (t, frame0) in enumerate(model.seen):
        assert t.shape == (1, 3 * tokens_per_frame)
        assert torch.equal(t[0, :tokens_per_frame], torch.zeros(tokens_per_frame))
        want = torch.full((2 * tokens_per_frame,), float(schedule.timesteps[call // 2]))
        assert torch.equal(t[0, tokens_per_frame:], want)
        assert torch.equal(frame0, latent)  # the model sees the image latent in frame 0 at every step


def _official_euler(velocity, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The official TI2V rule written out for Euler: frame 0 of the noise replaced by the image latent, then after
    every step the image latent put back into frame 0."""
    schedule = euler_schedule(STEPS, SHIFT)
    sig = schedule.sigmas.float()
    x = noise.clone()
    x[:, :, :1] = latent
    for i in range(STEPS):
        t = torch.full((1,), float(schedule.timesteps[i]), dtype=torch.float32)
        x = x + velocity(x, t, i) * (sig[i + 1] - sig[i]).item()
        x[:, :, :1] = latent
    return x


def _mixing_velocity(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
    """A velocity in which every frame depends on frame 0 (as a DiT's attention makes it)."""
    return 0.3 * x + x[:, :, :1] * (1 + 0.001 * t.reshape(-1, 1, 1, 1, 1)) + 0.1 * i


def test_equals_the_official_put_back_after_every_step() -> None:
    gen = torch.Generator().manual_seed(2)
    noise, latent = torch.randn(1, 48, 3, 4, 2, generator=gen), torch.randn(1, 48, 1, 4, 2, generator=gen)
    got = FirstFrame(latent).sample("euler", _mixing_velocity, noise, euler_schedule(STEPS, SHIFT))
    assert torch.equal(got, _official_euler(_mixing_velocity, noise, latent))


@pytest.mark.parametrize("solver", sorted(set(SAMPLERS) - {"vanilla"}))
def test_the_solvers_frame_zero_state_never_reaches_other_frames(solver) -> None:
    """Element-wise solvers: whatever the solver holds in frame 0 between steps (put back or not), frames 1.. are
    the same value for value; here the velocity of frame 0 is changed and nothing else moves."""
    gen = torch.Generator().manual_seed(3)
    noise, latent = torch.randn(1, 48, 3, 4, 2, generator=gen), torch.randn(1, 48, 1, 4, 2, generator=gen)

    def perturbed(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        v = _mixing_velocity(x, t, i)
        v[:, :, :1] = v[:, :, :1] * 7 - 3
        return v

    schedule = get_schedule(solver, STEPS, SHIFT)
    first = FirstFrame(latent)
    a, b = first.sample(solver, _mixing_velocity, noise, schedule), first.sample(solver, perturbed, noise, schedule)
    assert torch.equal(a, b)


def test_image_latent_that_does_not_fit_is_refused() -> None:
    conditioning = cond.Conditioning(HEIGHT, WIDTH, FRAMES, 3, spatial=16, first_latent=torch.zeros(1, 48, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\(48, 2, 2\) but the video's latents have \(48, 4, 2\)"):
        denoise(_Recorder(), conditioning, [torch.ones(3, 32)], None, SamplerSettings(2, 1.0, 5.0, 0))


@pytest.mark.parametrize(("image_hw", "area", "want"), [
    ((704, 1280), 704 * 1280, (704, 1280)), ((1280, 704), 704 * 1280, (1280, 704)),
    ((480, 640), 704 * 1280, (800, 1088)), ((32, 64), 32 * 64, (32, 64)),
])
def test_output_size_follows_the_official_rule(image_hw, area, want) -> None:
    # (480, 640) at 901120 px: ratio 4/3, ideal 1096.1 x 822.1; width first: 1088, then 901120 / 1088 = 828.2 -> 800
    # (aspect 1.36, 2.0 % off); height first: 800, then 901120 / 800 = 1126.4 -> 1120 (aspect 1.4, 5 % off)
    h, w = cond.first_frame_size(image_hw, area)
    assert (h, w) == want and h % 32 == 0 and w % 32 == 0 and h * w <= area
