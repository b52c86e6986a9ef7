"""CLIP ViT-H/14 visual tower: parity with transformers' CLIPVisionModel (`hidden_states[-2]`) through the real key
conversions, official preprocessing, a loader test per checkpoint layout, and clear errors on bad input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import wan_core.loading.checkpoint as checkpoint_module
import wan_core.models.clip as clip_module
from tests.numerics import assert_float32_parity, float64_run
from tests.tiny import randomize_
from wan_core.loading.checkpoint import CheckpointError, build_on_meta, load_into
from wan_core.loading.convert import CLIP_OPEN_CLIP, clip_hf_to_ours, rename
from wan_core.models.clip import CLIPVision, detect_clip_config, load_clip_vision, preprocess
from wan_core.models.config import CONFIG_METADATA_KEY, CLIPVisionConfig, config_to_json

TINY = CLIPVisionConfig(dim=32, num_heads=4, num_layers=3)  # hidden 32, mlp 128, 3 layers, 4 heads
METADATA = {CONFIG_METADATA_KEY: config_to_json(TINY)}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _hf_reference(seed: int = 0):
    from transformers import CLIPVisionConfig as HFConfig
    from transformers import CLIPVisionModelWithProjection

    config = HFConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      image_size=224, patch_size=14, projection_dim=16, hidden_act="gelu", layer_norm_eps=1e-5)
    return randomize_(CLIPVisionModelWithProjection(config), seed).eval()


@pytest.fixture(scope="module")
def ref():
    return _hf_reference()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(ref, pixels) -> torch.Tensor:
    return _penultimate(ref, pixels)


@pytest.fixture(scope="module")
def expected64(ref, pixels) -> torch.Tensor:
    return _penultimate64(ref, pixels)


def _penultimate(ref, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def _penultimate64(ref, pixels: torch.Tensor) -> torch.Tensor:
    """_penultimate computed in float64 (the bound of tests.numerics.assert_float32_parity is made from it)."""
    return float64_run(ref, pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _ours_full(ref) -> dict[str, torch.Tensor]:
    """The whole tower (incl. last block, post_norm, head) in official names, as the official file holds it."""
    return clip_hf_to_ours(ref.state_dict())


def _fake_text_tower() -> dict[str, torch.Tensor]:
    """Stand-ins for the official file's XLM-R text tower and logit scale (must never be read)."""
    return {"textual.token_embedding.weight": torch.randn(50, 16),
            "textual.blocks.0.attn.q.weight": torch.randn(16, 16),
            "textual.head.0.weight": torch.randn(8, 16), "log_scale": torch.tensor(4.6)}


# ----------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_penultimate_block_matches_transformers(pixels, attn_impl) -> None:
    ref = _hf_reference()
    ref.set_attn_implementation(attn_impl)
    sd = {f"visual.{k}": v for k, v in _ours_full(ref).items()
          if not k.startswith(("post_norm.", "head", "transformer.2."))}
    ours = load_into(build_on_meta(lambda: CLIPVision(TINY)), sd).eval()
    expected = _penultimate(ref, pixels)
    with torch.no_grad():
        got = ours.visual(pixels)
    assert got.shape == expected.shape == (2, 257, 32)
    assert_float32_parity(got, expected, _penultimate64(ref, pixels))


def test_module_holds_only_the_used_parts_under_official_names() -> None:
    keys = set(build_on_meta(lambda: CLIPVision(TINY)).state_dict())
    blocks = {k.split(".")[2] for k in keys if k.startswith("visual.transformer.")}
    assert blocks == {"0", "1"}  # 3 blocks in the file, the last one is not built
    for key in ("visual.patch_embedding.weight", "visual.cls_embedding", "visual.pos_embedding",
                "visual.pre_norm.weight", "visual.transformer.1.norm1.bias", "visual.transformer.1.attn.to_qkv.weight",
                "visual.transformer.1.attn.proj.bias", "visual.transformer.1.norm2.weight",
                "visual.transformer.1.mlp.0.weight", "visual.transformer.1.mlp.2.bias"):
        assert key in keys, key
    assert "visual.patch_embedding.bias" not in keys
    assert not any(k.startswith(("visual.post_norm", "visual.head")) for k in keys)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------


def _images(h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def test_squash_preprocessing_is_the_official_one() -> None:
    images = _images(100, 150)
    manual = _normalize(F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False))
    got = preprocess(images, CLIPVisionConfig())
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, manual, rtol=0, atol=1e-6)


def test_center_crop_scales_the_short_side_and_crops_the_middle() -> None:
    images = _images(100, 150)  # scale 2.24 -> 224 x 336, window columns 56..280
    resized = F.interpolate(images, size=(224, 336), mode="bicubic", align_corners=False, antialias=True)
    manual = _normalize(resized[..., :, 56:280])
    got = preprocess(images, CLIPVisionConfig(), crop="center")
    torch.testing.assert_close(got, manual, rtol=0, atol=1e-6)
    squash = preprocess(images, CLIPVisionConfig())
    assert (got - squash).abs().max() > 0.1  # the two modes see different pixels on non-square input


def test_both_modes_leave_a_224_square_image_untouched() -> None:
    images = _images(224, 224)
    for crop in ("none", "center"):
        torch.testing.assert_close(preprocess(images, CLIPVisionConfig(), crop=crop), _normalize(images),
                                   rtol=0, atol=1e-6)


def test_encode_is_preprocessing_then_the_tower(tmp_path, ref) -> None:
    images = _images(100, 150)
    path = tmp_path / "clip_vision_h.safetensors"
    save_file(ref.state_dict(), str(path), metadata=METADATA)
    for crop in ("none", "center"):
        model = load_clip_vision(path, crop=crop)
        other = "center" if crop == "none" else "none"
        for pixels, got in ((preprocess(images, TINY, crop=crop), model.encode(images)),
                            (preprocess(images, TINY, crop=other), model.encode(images, crop=other))):
            assert_float32_parity(got, _penultimate(ref, pixels), _penultimate64(ref, pixels))


# ----------------------------------------------------------------------------------------------------------------
# Loading every layout (a spy records every tensor the loader accepts; safetensors reads are spied on directly)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Records the keys accepted by the loader's filter and every tensor read from a safetensors file."""
    record: dict[str, list[str]] = {"accepted": [], "read": []}
    real_load, real_open = checkpoint_module.load_state_dict, checkpoint_module.safe_open

    def load_state_dict(path, device="cpu", keys=None):
        def recording(key: str) -> bool:
            ok = keys is None or keys(key)
            if ok:
                record["accepted"].append(key)
            return ok

        return real_load(path, device, keys=recording)

    class SpyOpen:
        def __init__(self, *args, **kwargs) -> None:
            self._file = real_open(*args, **kwargs)

        def __enter__(self):
            self._handle = self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_tensor(self, key: str) -> torch.Tensor:
            record["read"].append(key)
            return self._handle.get_tensor(key)

    monkeypatch.setattr(clip_module, "load_state_dict", load_state_dict)
    monkeypatch.setattr(checkpoint_module, "safe_open", SpyOpen)
    return record


def _official(ref) -> dict[str, torch.Tensor]:
    return {**{f"visual.{k}": v for k, v in _ours_full(ref).items()}, **_fake_text_tower()}


def _open_clip(ref, prefix: str) -> dict[str, torch.Tensor]:
    sd = {prefix + k: v for k, v in rename(_ours_full(ref), CLIP_OPEN_CLIP, to_ours=False, what="test").items()}
    if prefix:  # a full open_clip model: its text tower uses the same block names at the top level
        sd.update({"transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16), "token_embedding.weight":
                   torch.randn(50, 16), "positional_embedding": torch.randn(77, 16), "ln_final.weight": torch.ones(16),
                   "text_projection": torch.randn(16, 16), "logit_scale": torch.tensor(4.6)})
    return sd


# never-read keys per layout: text tower / logit scale, last block (index 2), post-norm, projection
_UNUSED = {
    "official": ("textual.", "log_scale", "visual.transformer.2.", "visual.post_norm.", "visual.head"),
    "hf": ("vision_model.encoder.layers.2.", "vision_model.post_layernorm.", "visual_projection."),
    "open_clip": ("visual.transformer.resblocks.2.", "visual.ln_post.", "visual.proj", "transformer.", "token_",
                  "positional_embedding", "ln_final.", "text_projection", "logit_scale"),
    "open_clip_bare": ("transformer.resblocks.2.", "ln_post.", "proj"),
}


def _write(tmp_path, layout: str, ref, dtype: torch.dtype = torch.float32) -> tuple:
    """(path, config argument) for a tiny checkpoint in `layout`; .pth files carry no metadata."""
    if layout == "official":
        sd, name = _official(ref), "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    elif layout == "official_st":
        sd, name = _official(ref), "clip_official.safetensors"
    elif layout == "hf":
        sd, name = dict(ref.state_dict()), "clip_vision_h.safetensors"
    elif layout == "open_clip":
        sd, name = _open_clip(ref, "visual."), "open_clip.safetensors"
    else:
        sd, name = _open_clip(ref, ""), "open_clip_visual.pth"
    sd = {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / name
    if name.endswith(".pth"):
        torch.save(sd, path)
        return path, TINY
    save_file(sd, str(path), metadata=METADATA)
    return path, None


@pytest.mark.parametrize("layout", ["official", "official_st", "hf", "open_clip", "open_clip_bare"])
def test_every_layout_loads_only_what_it_uses(tmp_path, ref, pixels, expected, expected64, spy, layout) -> None:
    path, config = _write(tmp_path, layout, ref)
    model = load_clip_vision(path, config=config)
    assert model.cfg == TINY and model.dtype == torch.float32
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert_float32_parity(model.visual(pixels), expected, expected64)
    unused = _UNUSED[layout.replace("_st", "")]
    file_keys = set(_official(ref) if layout.startswith("official") else ref.state_dict() if layout == "hf"
                    else _open_clip(ref, "visual." if layout == "open_clip" else ""))
    assert any(k.startswith(unused) for k in file_keys)  # the file does hold unused tensors ...
    touched = spy["accepted"] + spy["read"]
    assert touched and not [k for k in touched if k.startswith(unused)]  # ... and none of them was read
    if path.suffix == ".safetensors":
        assert sorted(spy["read"]) == sorted(spy["accepted"])


def test_hf_model_folder_with_config_json(tmp_path, ref, pixels, expected, expected64) -> None:
    """diffusers' image_encoder/ (CLIPVisionModelWithProjection.save_pretrained): no metadata, config.json."""
    ref.save_pretrained(tmp_path / "image_encoder")
    model = load_clip_vision(tmp_path / "image_encoder")
    assert model.cfg == TINY
    with torch.no_grad():
        assert_float32_parity(model.visual(pixels), expected, expected64)


def _rounded(ref, dtype: torch.dtype):
    rounded = copy.deepcopy(ref)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(dtype).float())
    return rounded


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["official", "hf"])
def test_half_precision_files(tmp_path, ref, pixels, layout, file_dtype) -> None:
    path, config = _write(tmp_path, layout, ref, file_dtype)
    expected = _penultimate(_rounded(ref, file_dtype), pixels)
    upcast = load_clip_vision(path, config=config)  # CPU default: fp32, weights exactly the file's values
    assert upcast.dtype == torch.float32
    with torch.no_grad():
        assert_float32_parity(upcast.visual(pixels), expected, _penultimate64(_rounded(ref, file_dtype), pixels))
    native = load_clip_vision(path, dtype=file_dtype, config=config)  # official GPU precision, run on the CPU
    with torch.no_grad():
        out = native.visual(pixels)
    assert out.dtype == file_dtype
    # compute-dtype rounding only (measured 9e-4 fp16, 7e-3 bf16): four machine epsilons of the dtype
    assert _rel(out, expected) <= 4 * torch.finfo(file_dtype).eps


def test_shape_detection_of_vit_h() -> None:
    dim, hidden = 1280, 5120
    meta = {"pos_embedding": torch.empty(1, 257, dim, device="meta"),
            "patch_embedding.weight": torch.empty(dim, 3, 14, 14, device="meta"),
            "transformer.0.mlp.0.weight": torch.empty(hidden, dim, device="meta")}
    assert detect_clip_config(meta, num_layers=32) == CLIPVisionConfig()
    tiny = {"pos_embedding": torch.empty(1, 257, 32), "patch_embedding.weight": torch.empty(32, 3, 14, 14)}
    with pytest.raises(ValueError, match=r"width 32 .*pass config=CLIPVisionConfig"):
        detect_clip_config(tiny, num_layers=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_default_is_fp16(tmp_path, ref, pixels) -> None:
    path, _ = _write(tmp_path, "hf", ref, torch.float16)
    model = load_clip_vision(path, device="cuda")
    assert model.dtype == torch.float16 and model.device.type == "cuda"
    images = _images(480, 832)
    expected = _penultimate(_rounded(ref, torch.float16), preprocess(images, TINY))
    out = model.encode(images)
    assert out.dtype == torch.float16 and out.device.type == "cuda"
    assert _rel(out.cpu(), expected) <= 4 * torch.finfo(torch.float16).eps


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(ref) -> CLIPVision:
    sd = {f"visual.{k}": v for k, v in _ours_full(ref).items()
          if not k.startswith(("post_norm.", "head", "transformer.2."))}
    return load_into(build_on_meta(lambda: CLIPVision(TINY)), sd).eval()


@pytest.mark.parametrize("images, message", [
    (torch.zeros(1, 1, 64, 64), r"\[B, 3, H, W\].*got \(1, 1, 64, 64\)"),
    (torch.zeros(3, 64, 64), r"\[B, 3, H, W\].*got \(3, 64, 64\)"),
    (torch.zeros(1, 64, 64, 3), r"channels first.*got \(1, 64, 64, 3\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r"floating-point images.*torch.uint8"),
    ([[0.0]], r"torch.Tensor.*got list"),
])
def test_bad_images(tiny_model, images, message) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(images)


def test_bad_crop_mode(tiny_model) -> None:
    with pytest.raises(ValueError, match=r"unknown CLIP crop mode 'middle'.*none, center"):
        tiny_model.encode(_images(64, 64), crop="middle")
    with pytest.raises(ValueError, match="unknown CLIP crop mode"):
        CLIPVision(TINY, crop="squash")


def test_tower_rejects_unresized_pixels(tiny_model) -> None:
    with pytest.raises(ValueError, match=r"224x224 pixels, got \(1, 3, 64, 64\)"):
        tiny_model.visual(torch.zeros(1, 3, 64, 64))


def test_missing_and_corrupt_files(tmp_path, ref) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip_vision(tmp_path / "nope.safetensors")
    path, _ = _write(tmp_path, "hf", ref)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_clip_vision(tmp_path / "cut.safetensors")
    path, config = _write(tmp_path, "official", ref)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*cut.pth"):
        load_clip_vision(tmp_path / "cut.pth", config=config)


def test_unknown_layouts(tmp_path, ref) -> None:
    dit_like = tmp_path / "dit.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "head.modulation": torch.zeros(1, 2, 4)},
              str(dit_like))
    with pytest.raises(CheckpointError, match=r"unknown key layout for CLIP vision.*blocks.0.self_attn.q.weight"):
        load_clip_vision(dit_like)
    sd = _open_clip(ref, "visual.")
    sd["visual.attn_pool.query"] = torch.zeros(4, 32)  # a tower with parts we do not know
    path = tmp_path / "attn_pool.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=METADATA)
    with pytest.raises(CheckpointError, match=r"unknown key layout.*attn_pool.query"):
        load_clip_vision(path)


def test_incomplete_or_mismatched_weights(tmp_path, ref) -> None:
    sd = _official(ref)
    del sd["visual.pre_norm.weight"]
    path = tmp_path / "incomplete.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing key.*visual.pre_norm.weight"):
        load_clip_vision(path, config=TINY)
    path, _ = _write(tmp_path, "official", ref)
    with pytest.raises(ValueError, match=r"num_layers=32 but .* holds 3 transformer blocks"):
        load_clip_vision(path, config=CLIPVisionConfig())
    with pytest.raises(CheckpointError, match=r"'visual.cls_embedding' has shape \[1, 1, 32\].*\[1, 1, 64\]"):
        load_clip_vision(path, config=dataclasses.replace(TINY, dim=64))
    with pytest.raises(ValueError, match=r"width 32.*config="):
        load_clip_vision(path)  # a .pth has no metadata and the tiny width is not detectable
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        load_clip_vision(path, config=TINY, attn="fast")


def test_file_written_from_the_module_itself_round_trips(tmp_path) -> None:
    """Our own files hold only the used blocks (num_layers - 1); the config in the metadata still counts all."""
    from wan_core.loading.checkpoint import save_safetensors

    model = randomize_(CLIPVision(TINY), seed=5)
    path = save_safetensors(model.state_dict(), tmp_path / "own.safetensors", METADATA)
    loaded = load_clip_vision(path)
    assert loaded.cfg == TINY
    images = torch.rand(2, 3, 60, 40) * 2 - 1
    assert torch.equal(loaded.encode(images), model.encode(images))
