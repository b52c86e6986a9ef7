"""Wan2.2 VAE (TI2V-5B: z 48, 2x2 patchify, residual down/up blocks): parity with diffusers' AutoencoderKLWan
(is_residual, patch_size 2) through the real key conversion on a tiny fp32 config, detection and loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.numerics import assert_float32_parity, float64_run, rel_err
from tests.tiny import randomize_
from wan_core.loading.checkpoint import build_on_meta, load_into, save_safetensors
from wan_core.loading.convert import rename, vae22_diffusers_rules
from wan_core.models.config import WAN21_VAE, WAN22_VAE, VAEConfig
from wan_core.models.vae import VAE22_MEAN, VAE22_STD, WanVAE, WanVAEModel, detect_vae_config, load_vae

# Tiny Wan2.2-shaped VAE: every level kind (space-only down, space+time down, no down; time up, space-only up)
# and a decoder wider than the encoder, as the real one (160 / 256).
TINY_VAE22 = VAEConfig(dim=8, dec_dim=12, z_dim=48, patch_size=2, is_residual=True)
WEIGHT_SCALE = 0.05  # keeps the decoded video mostly inside [-1, 1], so the clamp does not hide differences


def diffusers_vae22(seed: int = 0):
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
                           patch_size=2, scale_factor_spatial=16, in_channels=12, out_channels=12,
                           latents_mean=list(VAE22_MEAN), latents_std=list(VAE22_STD))
    return randomize_(ref, seed, scale=WEIGHT_SCALE).eval()


class _Encode(nn.Module):
    """diffusers encode -> normalised mean, as the official Wan2_2_VAE.encode: (mu - mean) * (1 / std)."""

    def __init__(self, ref: nn.Module) -> None:
        super().__init__()
        self.ref = ref

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        mu = self.ref.encode(video).latent_dist.mean
        mean = torch.tensor(VAE22_MEAN, dtype=mu.dtype).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(VAE22_STD, dtype=mu.dtype).view(1, -1, 1, 1, 1)
        return (mu - mean) * inv_std


class _Decode(nn.Module):
    def __init__(self, ref: nn.Module) -> None:
        super().__init__()
        self.ref = ref

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(VAE22_MEAN, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(VAE22_STD, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return self.ref.decode(z * std + mean).sample


@pytest.fixture(scope="module")
def ref():
    return diffusers_vae22()


@pytest.fixture(scope="module")
def official(ref) -> dict[str, torch.Tensor]:
    return rename(ref.state_dict(), vae22_diffusers_rules(2, 4), to_ours=True, what="test Wan2.2 VAE")


@pytest.fixture(scope="module")
def vae(official) -> WanVAE:
    model = load_into(build_on_meta(lambda: WanVAEModel(TINY_VAE22)), {k: v.clone() for k, v in official.items()})
    return WanVAE(model, tiling=False)


def _video(b: int, t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(b: int, f: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 48, f, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("frames", [1, 9])
def test_encode_matches_diffusers(ref, vae: WanVAE, frames: int) -> None:
    video = _video(2 if frames == 1 else 1, frames, 32, 64)
    with torch.no_grad():
        want32 = _Encode(ref)(video)
    want64 = float64_run(_Encode(ref), video)
    got = vae.encode(video)
    assert got.shape == (video.shape[0], 48, (frames - 1) // 4 + 1, 2, 4)
    print(f"encode T={frames}: max rel err {rel_err(got, want64):.3g} vs float64, {rel_err(got, want32):.3g} vs "
          f"diffusers fp32 (its own fp32 error {rel_err(want32, want64):.3g})")
    assert_float32_parity(got, want32, want64)


@pytest.mark.parametrize("frames", [1, 3])
def test_decode_matches_diffusers(ref, vae: WanVAE, frames: int) -> None:
    z = _latents(2 if frames == 1 else 1, frames, 2, 4)
    with torch.no_grad():
        want32 = _Decode(ref)(z)
    want64 = float64_run(_Decode(ref), z)
    got = vae.decode(z)
    assert got.shape == (z.shape[0], 3, 1 + 4 * (frames - 1), 32, 64)
    print(f"decode F={frames}: max rel err {rel_err(got, want64):.3g} vs float64, {rel_err(got, want32):.3g} vs "
          f"diffusers fp32 (its own fp32 error {rel_err(want32, want64):.3g})")
    assert_float32_parity(got, want32, want64)
    assert (got.abs() == 1).float().mean() < 0.1 and got.std() > 0.05  # not a saturated comparison


def test_key_mapping_round_trips_to_the_diffusers_names(ref, official) -> None:
    assert "decoder.upsamples.0.upsamples.0.residual.2.weight" in official  # the official Wan2_2_VAE names
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in official
    assert "decoder.upsamples.0.upsamples.3.time_conv.weight" in official
    assert "encoder.downsamples.0.downsamples.2.resample.1.weight" in official
    assert set(official) == set(build_on_meta(lambda: WanVAEModel(TINY_VAE22)).state_dict())
    back = rename(official, vae22_diffusers_rules(2, 4), to_ours=False, what="ours")
    assert set(back) == set(ref.state_dict())


def test_detect_config() -> None:
    assert detect_vae_config(build_on_meta(lambda: WanVAEModel(TINY_VAE22)).state_dict()) == TINY_VAE22
    real = build_on_meta(lambda: WanVAEModel(WAN22_VAE)).state_dict()
    assert detect_vae_config(real) == WAN22_VAE
    assert tuple(real["encoder.conv1.weight"].shape) == (160, 12, 3, 3, 3)  # 2x2-patchified RGB
    assert tuple(real["decoder.head.2.weight"].shape)[:2] == (12, 256)
    assert tuple(real["conv2.weight"].shape)[:2] == (48, 48)
    assert WAN22_VAE.space_stride == 16 and WAN21_VAE.space_stride == 8


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_load_vae_detects_wan22(ref, official, vae: WanVAE, tmp_path, layout: str) -> None:
    path = save_safetensors(official if layout == "official" else ref.state_dict(), tmp_path / "vae.safetensors")
    loaded = load_vae(path, tiling=False)
    assert loaded.config == TINY_VAE22
    z = _latents(1, 2, 2, 4)
    assert torch.equal(loaded.decode(z), vae.decode(z))


def test_wan22_video_size_checks_use_its_stride(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match=r"multiples of 16, got 40x64 \(height 40 -> 32 or 48\)"):
        vae.encode(torch.zeros(1, 3, 1, 40, 64))
    with pytest.raises(ValueError, match="48 channels"):
        vae.decode(torch.zeros(1, 16, 1, 2, 4))
