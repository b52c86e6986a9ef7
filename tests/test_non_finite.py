"""NaN/inf weights are refused where they are loaded (DiT, VAE, umT5, CLIP, LoRA) and where LoRAs are written, and
LoRA strengths must be finite numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cache_helpers import write_models
from safetensors.torch import load_file, save_file

from tests.tiny_training import tiny_dit_file
from wan_core.generate.cli import main as generate_main
from wan_core.loading.checkpoint import NonFiniteError, non_finite_count, read_metadata
from wan_core.loading.model_set import ModelSpec, toy_path
from wan_core.lora.apply import apply_loras, linear_modules, merge_loras
from wan_core.lora.formats import LowRank, load_lora, save_lora
from wan_core.models.clip import load_clip_vision
from wan_core.models.dit import load_dit
from wan_core.models.t5 import load_t5
from wan_core.models.vae import load_vae

NAN, INF = float("nan"), float("inf")


def _poison(path: Path, key: str, value: float, dtype: torch.dtype | None = None) -> Path:
    """Rewrite `path` with one value of tensor `key` replaced by `value` (metadata kept)."""
    tensors = load_file(str(path))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.dim() == 2 and k.startswith("blocks.") else v for k, v in tensors.items()}
    bad = tensors[key].float().clone()
    bad.view(-1)[bad.numel() // 2] = value
    tensors[key] = bad.to(tensors[key].dtype)
    save_file(tensors, str(path), metadata=read_metadata(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


def _first_float_key(path: Path, contains: str = "") -> str:
    return next(k for k, v in load_file(str(path)).items() if v.is_floating_point() and v.dim() >= 2
                and contains in k)


@pytest.mark.parametrize("value", [NAN, INF])
def test_dit_with_non_finite_weights_is_refused_naming_file_and_key(tmp_path, value):
    path = tiny_dit_file(tmp_path / "dit.safetensors")
    key = "blocks.1.ffn.0.weight"
    _poison(path, key, value)
    with pytest.raises(NonFiniteError, match=rf"DiT dit\.safetensors: tensor '{key}' holds 1 NaN/inf value"):
        load_dit(path)


@pytest.mark.parametrize("fp8", [None, "fp8_scaled"])
def test_fp8_dit_nan_encoding_is_refused(tmp_path, fp8):
    """e4m3fn has NaN encodings (S.1111.111) but no inf (torch saturates inf to 448 when casting)."""
    path = tiny_dit_file(tmp_path / "dit.safetensors")
    key = "blocks.0.self_attn.q.weight"
    _poison(path, key, NAN, dtype=torch.float8_e4m3fn)
    assert load_file(str(path))[key].dtype == torch.float8_e4m3fn
    with pytest.raises(NonFiniteError, match=rf"dit\.safetensors: tensor '{key}'"):
        load_dit(path, fp8=fp8)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                                   torch.float8_e5m2fnuz])
def test_fp8_non_finite_bytes_agree_with_the_upcast_values(dtype):
    every_byte = torch.arange(256, dtype=torch.uint8).view(dtype)
    expected = int((~torch.isfinite(every_byte.float())).sum())
    assert expected > 0 and non_finite_count(every_byte) == expected
    finite = every_byte[torch.isfinite(every_byte.float())]
    assert non_finite_count(finite) == 0


def test_counts_are_exact_and_a_sum_overflow_is_not_a_false_alarm():
    assert non_finite_count(torch.tensor([3e38, 3e38, -3e38, 3e38])) == 0  # sums to inf, all finite
    assert non_finite_count(torch.tensor([1.0, NAN, INF, -INF]).to(torch.bfloat16)) == 3
    assert non_finite_count(torch.tensor([1, 2, 3])) == 0


@pytest.mark.parametrize("kind", ["vae", "t5", "clip"])
def test_encoders_with_non_finite_weights_are_refused(models, tmp_path, kind):
    source = getattr(models, kind)
    path = tmp_path / source.name
    path.write_bytes(source.read_bytes())
    key = _first_float_key(path, {"vae": "decoder", "t5": "blocks", "clip": "transformer"}[kind])
    _poison(path, key, NAN)
    load = {"vae": load_vae, "t5": load_t5, "clip": load_clip_vision}[kind]
    with pytest.raises(NonFiniteError, match=rf"{path.name}: tensor '.*' holds 1 NaN/inf value"):
        load(path)


def _lora_for(dit: Path, scale: float = 0.01) -> dict[str, LowRank]:
    modules = sorted(linear_modules(load_dit(dit)))[:3]
    model = load_dit(dit)
    layers = linear_modules(model)
    gen = torch.Generator().manual_seed(0)
    return {m: LowRank(torch.randn(2, layers[m].in_features, generator=gen) * scale,
                       torch.randn(layers[m].out_features, 2, generator=gen) * scale, 2.0) for m in modules}


def test_lora_with_non_finite_tensors_is_refused(tmp_path):
    dit = tiny_dit_file(tmp_path / "dit.safetensors")
    path = save_lora(_lora_for(dit), tmp_path / "style.safetensors")
    key = next(k for k in load_file(str(path)) if k.endswith("lora_up.weight"))
    _poison(path, key, INF)
    with pytest.raises(NonFiniteError, match=rf"LoRA .*style\.safetensors: tensor '{key}'"):
        load_lora(path)
    with pytest.raises(NonFiniteError, match="style.safetensors"):
        merge_loras(load_dit(dit), path)


def test_lora_save_refuses_non_finite_tensors_and_fp16_overflow(tmp_path):
    dit = tiny_dit_file(tmp_path / "dit.safetensors")
    adapters = _lora_for(dit)
    name = next(iter(adapters))
    adapters[name].up[0, 0] = NAN
    with pytest.raises(NonFiniteError, match="not written"):
        save_lora(adapters, tmp_path / "nan.safetensors")
    adapters[name].up[0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(NonFiniteError, match="not written"):
        save_lora(adapters, tmp_path / "fp16.safetensors", dtype=torch.float16)
    assert not list(tmp_path.glob("*nan*")) and not list(tmp_path.glob("*fp16*"))


@pytest.mark.parametrize("value", [NAN, INF, -INF, "x"])
def test_lora_multiplier_must_be_finite(tmp_path, value):
    dit = tiny_dit_file(tmp_path / "dit.safetensors")
    path = save_lora(_lora_for(dit), tmp_path / "style.safetensors")
    model = load_dit(dit)
    with pytest.raises(ValueError, match=r"LoRA multiplier .* for LoRA .*style\.safetensors"):
        merge_loras(model, path, [value])
    with pytest.raises(ValueError, match="LoRA multiplier"):
        apply_loras(model, path, [value])
    handle = apply_loras(model, path, [0.5])
    with pytest.raises(ValueError, match="LoRA multiplier"):
        handle.set_multiplier(value)
    assert handle.multipliers == [0.5]
    with pytest.raises(ValueError, match="LoRA multiplier"):
        ModelSpec(loras=((str(path), value, None, None),))


def _generate(lora: Path, out: Path, *extra: str) -> int:
    """The CLI on the embedded toy models (which a finite LoRA runs on end to end)."""
    return generate_main(["--lora_weight", str(lora), *extra, "--prompt", "a purple ball", "--save_path", str(out),
                          "--device", "cpu", "--quiet", "--infer_steps", "1", "--video_size", "32", "32",
                          "--video_length", "1", "--output_type", "latent"])


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_generate_cli_refuses_a_non_finite_multiplier(tmp_path, capsys, value):
    lora, out = toy_path("lora"), tmp_path / "out"
    assert _generate(lora, out, "--lora_multiplier", value) == 2
    assert f"LoRA multiplier {float(value)!r} for LoRA {lora} is not finite" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # the output folder may be made (writability check), empty


def test_generate_cli_refuses_a_lora_with_non_finite_tensors(tmp_path, capsys):
    lora, out = tmp_path / "diverged.safetensors", tmp_path / "out"
    lora.write_bytes(toy_path("lora").read_bytes())
    key = next(k for k in load_file(str(lora)) if k.endswith("lora_down.weight"))
    _poison(lora, key, NAN)
    assert _generate(lora, out) == 2
    assert f"LoRA {lora}: tensor '{key}' holds 1 NaN/inf value(s)" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # the output folder may be made (writability check), empty
