"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan through the real key conversion (tiny fp32 config, CPU),
chunking/cache/tiling behaviour, loaders for every layout, and bad input."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import randomize_
from wan_core.loading.checkpoint import CheckpointError, build_on_meta, load_into, save_safetensors
from wan_core.loading.convert import rename, vae_diffusers_rules
from wan_core.models.config import CONFIG_METADATA_KEY, DiTConfig, VAEConfig, config_to_json
from wan_core.models.vae import (
    VAE_MEAN,
    VAE_STD,
    FeatureCache,
    WanVAE,
    WanVAEModel,
    detect_vae_config,
    latent_frames,
    load_vae,
    pixel_frames,
    tile_spans,
)

# Tiny config that still exercises the official <-> diffusers key map (dim_mult and num_res_blocks fixed).
TINY_VAE = VAEConfig(dim=8)
# Weight noise scale: 0.05 keeps the decoded video mostly inside [-1, 1] (about 2 % clamped), so the comparison
# is not dominated by the clamp.
WEIGHT_SCALE = 0.05


def diffusers_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(base_dim=TINY_VAE.dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
    return randomize_(ref, seed, scale=WEIGHT_SCALE).eval()


def official_sd(ref) -> dict[str, torch.Tensor]:
    return rename(ref.state_dict(), vae_diffusers_rules(2, 4), to_ours=True, what="test VAE")


def ours_from(sd: dict[str, torch.Tensor], **options) -> WanVAE:
    model = load_into(build_on_meta(lambda: WanVAEModel(TINY_VAE)), {k: v.clone() for k, v in sd.items()})
    return WanVAE(model, **options)


@pytest.fixture(scope="module")
def ref():
    return diffusers_vae()


@pytest.fixture(scope="module")
def vae(ref) -> WanVAE:
    return ours_from(official_sd(ref))


def _video(b: int, t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=gen) * 2 - 1


def _latents(b: int, f: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 16, f, h, w, generator=torch.Generator().manual_seed(seed))


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(VAE_MEAN).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(VAE_STD).view(1, -1, 1, 1, 1)
    return mean, inv_std


# ----------------------------------------------------------------------------------------------------------------
# Parity with diffusers (expected bit-exact: same ops in the same order, fp32)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 9, 17])
def test_encode_matches_diffusers(ref, vae: WanVAE, frames: int) -> None:
    batch = 2 if frames < 17 else 1
    video = _video(batch, frames, 32, 48)
    mean, inv_std = _stats()
    with torch.no_grad():  # diffusers does not normalise; the official wrapper does (mu - mean) * (1 / std)
        expected = (ref.encode(video).latent_dist.mean - mean) * inv_std
    got = vae.encode(video)
    assert got.shape == (batch, 16, latent_frames(frames), 4, 6)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("frames", [1, 3, 5])
def test_decode_matches_diffusers(ref, vae: WanVAE, frames: int) -> None:
    batch = 2 if frames < 5 else 1
    z = _latents(batch, frames, 4, 6)
    mean, inv_std = _stats()
    with torch.no_grad():
        expected = ref.decode(z / inv_std + mean).sample
    got = vae.decode(z)
    assert got.shape == (batch, 3, pixel_frames(frames), 32, 48)
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert (got.abs() == 1).float().mean() < 0.1  # a meaningful comparison, not a saturated one
    assert got.std() > 0.1


def test_real_config_has_the_official_size_and_names() -> None:
    model = build_on_meta(lambda: WanVAEModel(VAEConfig()))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(126.9e6, abs=0.05e6)  # official: 126.9 M
    sd = model.state_dict()
    for key in ("encoder.conv1.weight", "encoder.downsamples.10.residual.6.bias",
                "encoder.downsamples.8.time_conv.bias", "encoder.middle.1.to_qkv.weight", "encoder.head.0.gamma",
                "conv1.weight", "conv2.weight",
                "decoder.upsamples.14.residual.3.gamma", "decoder.upsamples.3.time_conv.weight",
                "decoder.upsamples.11.resample.1.weight", "decoder.head.2.weight"):
        assert key in sd, key
    assert [k for k in sd if k.startswith("decoder.") and ".shortcut." in k] == [
        "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.4.shortcut.bias"]
    assert "encoder.downsamples.2.time_conv.weight" not in sd  # level 0 downsamples only in space
    assert "decoder.upsamples.11.time_conv.weight" not in sd
    assert tuple(sd["decoder.head.0.gamma"].shape) == (96, 1, 1, 1)
    assert tuple(sd["decoder.middle.1.norm.gamma"].shape) == (384, 1, 1)
    assert detect_vae_config(sd) == VAEConfig()


def test_detect_config_reads_every_field() -> None:
    cfg = VAEConfig(dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(0.5,),
                    temperal_downsample=(True, False))
    sd = build_on_meta(lambda: WanVAEModel(cfg)).state_dict()
    assert detect_vae_config(sd) == cfg


# ----------------------------------------------------------------------------------------------------------------
# Cache, tiling, progress, dtype
# ----------------------------------------------------------------------------------------------------------------


def test_cache_on_cpu_gives_identical_results(vae: WanVAE) -> None:
    video, z = _video(1, 9, 32, 48), _latents(1, 3, 4, 6)
    plain = vae.encode(video), vae.decode(z)
    vae.cache_device = "cpu"
    try:
        cached = vae.encode(video), vae.decode(z)
    finally:
        vae.cache_device = None
    assert torch.equal(plain[0], cached[0]) and torch.equal(plain[1], cached[1])


def test_feature_cache_copies_views_and_moves_to_its_device() -> None:
    chunk = torch.randn(1, 2, 4, 3, 3)
    cache = FeatureCache("cpu")
    index, slot = cache.take()
    assert slot is None
    cache.put(index, chunk[:, :, -2:])
    stored = cache.tensors()[0]
    assert torch.equal(stored, chunk[:, :, -2:])
    assert stored.untyped_storage().data_ptr() != chunk.untyped_storage().data_ptr()  # the chunk can be freed
    cache.next_chunk()
    assert cache.take()[1] is stored


@pytest.mark.gpu
def test_cache_on_cpu_while_computing_on_gpu(ref) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    vae = ours_from(official_sd(ref)).to("cuda")
    z = _latents(1, 3, 4, 6).cuda()
    plain = vae.decode(z)
    vae.cache_device = "cpu"
    assert torch.equal(vae.decode(z), plain)


def test_tiling_with_one_tile_equals_untiled(vae: WanVAE) -> None:
    video, z = _video(1, 5, 32, 48), _latents(1, 2, 4, 6)
    plain = vae.encode(video), vae.decode(z)
    tiled = ours_from(vae.model.state_dict(), tiling=True, tile_size=64, tile_overlap=16)
    assert len(tiled.tiles(32, 48)) == 1
    assert torch.equal(tiled.encode(video), plain[0]) and torch.equal(tiled.decode(z), plain[1])


def _blend_two(left: torch.Tensor, right: torch.Tensor, overlap: int) -> torch.Tensor:
    """Two tiles side by side (last dim), linearly cross-faded over `overlap` columns (written independently of
    the implementation: left weight (overlap - k) / (overlap + 1), right weight (k + 1) / (overlap + 1))."""
    k = torch.arange(overlap, dtype=torch.float32)
    w_left, w_right = (overlap - k) / (overlap + 1), (k + 1) / (overlap + 1)
    mixed = (left[..., -overlap:] * w_left + right[..., :overlap] * w_right) / (w_left + w_right)
    return torch.cat([left[..., :-overlap], mixed, right[..., overlap:]], dim=-1)


def test_tiled_output_is_the_blend_of_its_tiles(vae: WanVAE) -> None:
    video, z = _video(1, 5, 64, 96), _latents(1, 2, 8, 12)
    tiled = ours_from(vae.model.state_dict(), tiling=True, tile_size=64, tile_overlap=16)
    assert [(t.y0, t.y1, t.x0, t.x1) for t in tiled.tiles(64, 96)] == [(0, 8, 0, 8), (0, 8, 4, 12)]
    steps: list[tuple[int, int]] = []
    enc = tiled.encode(video, progress=lambda done, total: steps.append((done, total)))
    assert steps == [(i, 4) for i in range(1, 5)]  # 2 tiles x 2 chunks
    # each tile is an independent causal pass over all frames; tiles overlap by 4 latent cells = 32 pixels
    expected = _blend_two(vae.encode(video[..., :64]), vae.encode(video[..., 32:]), 4)
    torch.testing.assert_close(enc, expected, rtol=0, atol=1e-6)
    expected = _blend_two(vae.decode(z[..., :8]), vae.decode(z[..., 4:]), 32)
    torch.testing.assert_close(tiled.decode(z), expected, rtol=0, atol=1e-6)


def test_tiled_encode_is_close_to_untiled(vae: WanVAE) -> None:
    video = _video(1, 5, 64, 96)
    plain = vae.encode(video)
    tiled = ours_from(vae.model.state_dict(), tiling=True, tile_size=64, tile_overlap=16).encode(video)
    # Not equal: a tile sees less context (the receptive field of the random tiny encoder spans the whole frame, and
    # the middle attention is global per frame). Measured: mean |diff| 3.6 % of mean |latent|, max 13 % of max.
    assert (tiled - plain).abs().mean() < 0.05 * plain.abs().mean()
    assert (tiled - plain).abs().max() < 0.2 * plain.abs().max()


@pytest.mark.slow
def test_tiled_decode_is_close_to_untiled(vae: WanVAE) -> None:
    z = _latents(1, 1, 32, 64)
    plain = vae.decode(z)
    tiled = ours_from(vae.model.state_dict(), tiling=True, tile_size=256, tile_overlap=64)
    assert len(tiled.tiles(256, 512)) == 3
    diff = (tiled.decode(z) - plain).abs()
    # Measured (256 x 512 frame, 3 tiles of 256 px overlapping by 128 px): mean |diff| 3.9 % of mean |pixel|, max
    # 0.23; errors concentrate where a tile edge cuts the decoder's receptive field, away from edges they vanish.
    assert diff.mean() < 0.06 * plain.abs().mean()
    assert diff.max() < 0.35


def test_tile_grid_covers_the_frame_with_the_requested_overlap() -> None:
    for length, tile, overlap in [(90, 64, 8), (160, 64, 8), (117, 64, 16), (64, 64, 8), (20, 64, 8), (65, 64, 0)]:
        spans = tile_spans(length, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(e - s == min(tile, length) for s, e in spans)
        assert all(b[0] <= a[1] - overlap for a, b in zip(spans, spans[1:]))
    vae = WanVAE(build_on_meta(lambda: WanVAEModel(TINY_VAE)))
    assert vae.uses_tiling(720, 1280) and vae.uses_tiling(1280, 720) and not vae.uses_tiling(480, 832)
    assert len(vae.tiles(720, 1280)) == 6 and len(vae.tiles(480, 832)) == 1
    vae.tiling = False
    assert len(vae.tiles(720, 1280)) == 1


def test_progress_is_called_per_chunk(vae: WanVAE) -> None:
    calls: list[tuple[int, int]] = []
    vae.decode(_latents(1, 3, 4, 6), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    vae.encode(_video(1, 9, 32, 48), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_bf16_compute_is_close_to_fp32(vae: WanVAE) -> None:
    z = _latents(1, 2, 4, 6)
    half = ours_from(vae.model.state_dict()).to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    got, want = half.decode(z), vae.decode(z)
    assert got.dtype == torch.float32
    # measured: max |diff| 0.10, mean 0.010 (the decoded values average 0.31 in magnitude)
    assert (got - want).abs().max() < 0.2 and (got - want).abs().mean() < 0.02
    enc, enc32 = half.encode(_video(1, 1, 32, 48)), vae.encode(_video(1, 1, 32, 48))
    assert enc.dtype == torch.float32
    assert (enc - enc32).abs().mean() < 0.003  # measured 0.0011 (latents average 0.29 in magnitude)


# ----------------------------------------------------------------------------------------------------------------
# Frame helpers and bad input
# ----------------------------------------------------------------------------------------------------------------


def test_frame_helpers() -> None:
    assert [latent_frames(n) for n in (1, 5, 17, 81)] == [1, 2, 5, 21]
    assert [pixel_frames(f) for f in (1, 2, 5, 21)] == [1, 5, 17, 81]
    with pytest.raises(ValueError, match=r"got 80 frames.*4n\+1.*77 or 81"):
        latent_frames(80)
    with pytest.raises(ValueError, match="at least 1"):
        pixel_frames(0)


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 10, 32, 48), r"got 10 frames.*nearest valid: 9 or 13"),
    ((1, 3, 0, 32, 48), r"got 0 frames.*nearest valid: 1 or 5"),
    ((1, 3, 5, 36, 48), r"multiples of 8, got 36x48 \(height 36 -> 32 or 40\)"),
    ((1, 3, 5, 32, 50), r"width 50 -> 48 or 56"),
    ((1, 4, 5, 32, 48), r"3 \(RGB\) channels.*\[1, 4, 5, 32, 48\]"),
    ((3, 5, 32, 48), r"\[B, 3, T, H, W\].*got \[3, 5, 32, 48\]"),
])
def test_encode_rejects_bad_video(vae: WanVAE, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


def test_encode_rejects_integer_video(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        vae.encode(torch.zeros(1, 3, 1, 32, 48, dtype=torch.uint8))


@pytest.mark.parametrize("shape, message", [
    ((1, 8, 2, 4, 6), r"16 channels.*got shape \[1, 8, 2, 4, 6\]"),
    ((16, 2, 4, 6), r"\[B, 16, F, h, w\], got \[16, 2, 4, 6\]"),
    ((1, 16, 0, 4, 6), "at least one frame"),
])
def test_decode_rejects_bad_latents(vae: WanVAE, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vae.decode(torch.zeros(shape))


@pytest.mark.parametrize("options, message", [
    ({"tile_size": 60}, "multiple of 8"), ({"tile_size": 32}, "at least 64"),
    ({"tile_overlap": 300}, "between 0 and tile_size/2"), ({"tiling": "yes"}, "True, False or 'auto'"),
])
def test_bad_tiling_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WanVAE(build_on_meta(lambda: WanVAEModel(TINY_VAE)), **options)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _assert_loaded(vae: WanVAE, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
    assert vae.config == TINY_VAE
    assert vae.dtype == dtype
    loaded = vae.model.state_dict()
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value.to(dtype)), key


@pytest.mark.parametrize("layout, prefix, suffix", [
    ("official", "", ".safetensors"),
    ("official", "", ".pth"),
    ("official", "first_stage_model.", ".safetensors"),
    ("official", "vae.", ".pth"),
    ("diffusers", "", ".safetensors"),
    ("diffusers", "vae.", ".safetensors"),
])
def test_load_layouts(ref, tmp_path, layout: str, prefix: str, suffix: str) -> None:
    sd = official_sd(ref)
    tensors = sd if layout == "official" else ref.state_dict()
    tensors = {prefix + k: v for k, v in tensors.items()}
    path = tmp_path / f"vae{suffix}"
    if suffix == ".pth":
        torch.save(tensors, path)
    else:
        save_safetensors(tensors, path)
    _assert_loaded(load_vae(path), sd)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16])
def test_load_half_precision_files(ref, tmp_path, file_dtype: torch.dtype) -> None:
    sd = {k: v.to(file_dtype) for k, v in official_sd(ref).items()}
    save_safetensors(sd, tmp_path / "vae.safetensors")
    _assert_loaded(load_vae(tmp_path / "vae.safetensors"), sd)  # computes in fp32 by default, as official
    _assert_loaded(load_vae(tmp_path / "vae.safetensors", dtype=torch.bfloat16), sd, torch.bfloat16)


def test_loaded_vae_matches_diffusers(ref, tmp_path) -> None:
    save_safetensors(ref.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    vae = load_vae(tmp_path / "diffusion_pytorch_model.safetensors", cache_device="cpu", tiling=False)
    z = _latents(1, 2, 4, 6)
    mean, inv_std = _stats()
    with torch.no_grad():
        expected = ref.decode(z / inv_std + mean).sample
    assert torch.equal(vae.decode(z), expected)
    assert vae.cache_device == "cpu" and vae.tiling is False


def test_config_from_metadata_and_argument(ref, tmp_path) -> None:
    sd = official_sd(ref)
    path = save_safetensors(sd, tmp_path / "vae.safetensors", metadata={CONFIG_METADATA_KEY: config_to_json(TINY_VAE)})
    _assert_loaded(load_vae(path), sd)
    _assert_loaded(load_vae(path, config=TINY_VAE), sd)
    with pytest.raises(CheckpointError, match=r"encoder.conv1.weight' has shape \[8, 3, 3, 3, 3\].*expects \[16, 3"):
        load_vae(path, config=VAEConfig(dim=16))
    dit_meta = {CONFIG_METADATA_KEY: config_to_json(DiTConfig())}
    bad = save_safetensors(sd, tmp_path / "bad.safetensors", metadata=dit_meta)
    with pytest.raises(ValueError, match="holds a DiTConfig, not a VAEConfig"):
        load_vae(bad)


def test_load_errors(ref, tmp_path) -> None:
    sd = official_sd(ref)
    with pytest.raises(FileNotFoundError, match="not found: .*missing.safetensors"):
        load_vae(tmp_path / "missing.safetensors")

    good = save_safetensors(sd, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vae(truncated)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_vae(corrupt)

    unknown = save_safetensors({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, tmp_path / "u.safetensors")
    with pytest.raises(CheckpointError, match=r"not a Wan2.1 VAE checkpoint.*first keys: bar.bias, foo.weight"):
        load_vae(unknown)
    odd = save_safetensors({**ref.state_dict(), "decoder.extra.weight": torch.zeros(2)}, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown key layout.*decoder.extra.weight"):
        load_vae(odd)
    missing = save_safetensors({k: v for k, v in sd.items() if k != "decoder.conv1.bias"}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): decoder.conv1.bias"):
        load_vae(missing)
