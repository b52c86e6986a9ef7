"""load_dit on every checkpoint layout and dtype users have, and clear errors on bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.numerics import assert_float32_parity, reference_pair
from tests.tiny import TINY_DIT, diffusers_dit, randomize_
from wan_core import load_dit
from wan_core.loading.checkpoint import CheckpointError, build_on_meta, save_safetensors
from wan_core.loading.convert import DIT_DIFFUSERS, rename
from wan_core.models.attention import available_backends
from wan_core.models.config import CONFIG_METADATA_KEY, TASKS, VAEConfig, config_to_json
from wan_core.models.dit import WanModel, check_task

# head dim 128 (as in the real models) so that the architecture is detectable from shapes alone
DETECTABLE = dataclasses.replace(TINY_DIT, dim=128, num_heads=1, ffn_dim=256)


@pytest.fixture(scope="module")
def reference() -> WanModel:
    return randomize_(WanModel(DETECTABLE), seed=11).eval()


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 2, 8, 8, generator=gen), torch.tensor([600.0]), [torch.randn(5, 32, generator=gen)]


def _out(model: WanModel) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs())


@pytest.fixture(scope="module")
def expected(reference: WanModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's float32 and float64 outputs on _inputs()."""
    return reference_pair(reference, *_inputs())


def _same(model: WanModel, expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Equal up to float32 rounding: memory-mapped weights may be unaligned, which changes SIMD summation order."""
    assert_float32_parity(_out(model), *expected)


def _save(tmp_path, name, sd, metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_official_layout_with_and_without_prefix(tmp_path, reference, expected, prefix):
    sd = {prefix + k: v for k, v in reference.state_dict().items()}
    model = load_dit(_save(tmp_path, "dit.safetensors", sd))
    assert model.config == DETECTABLE
    _same(model, expected)
    assert not any(p.requires_grad for p in model.parameters())


def test_diffusers_layout(tmp_path, reference, expected):
    sd = rename(reference.state_dict(), DIT_DIFFUSERS, to_ours=False, what="test")
    for prefix in ("", "transformer."):
        model = load_dit(_save(tmp_path, f"d{len(prefix)}.safetensors", {prefix + k: v for k, v in sd.items()}))
        _same(model, expected)


def test_real_diffusers_model_file_loads(tmp_path):
    ref = diffusers_dit("i2v")
    path = _save(tmp_path, "diffusers.safetensors", ref.state_dict())
    model = load_dit(path, config=dataclasses.replace(TINY_DIT, in_dim=36, model_type="i2v"))
    assert model.config.model_type == "i2v"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_keep_their_dtype(tmp_path, reference, dtype):
    sd = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    model = load_dit(_save(tmp_path, "half.safetensors", sd))
    assert model.dtype == dtype
    assert model.blocks[0].modulation.dtype == dtype
    out = _out(model)
    assert out.dtype == torch.float32
    assert ((out - _out(reference)).abs().max() / _out(reference).abs().max()) < 0.05


def test_fp8_file_loads_in_bf16(tmp_path, reference):
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in reference.state_dict().items()}
    model = load_dit(_save(tmp_path, "fp8.safetensors", sd))
    assert model.dtype == torch.bfloat16
    expected = sd["blocks.0.ffn.0.weight"].to(torch.bfloat16)
    assert torch.equal(model.blocks[0].ffn[0].weight, expected)


def test_comfyui_scaled_fp8_file_is_dequantized_with_its_scales(tmp_path, reference):
    sd = {}
    for k, v in reference.state_dict().items():
        if k.endswith(".weight") and v.dim() == 2 and k.startswith("blocks."):
            scale = v.abs().max() / 448
            sd[k] = (v / scale).to(torch.float8_e4m3fn)
            sd[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            sd[k] = v
    sd["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path = _save(tmp_path, "scaled.safetensors", {"model.diffusion_model." + k: v for k, v in sd.items()})
    model = load_dit(path, dtype=torch.float32)
    key = "blocks.1.self_attn.q"
    want = sd[key + ".weight"].float() * sd[key + ".scale_weight"]
    assert torch.equal(model.blocks[1].self_attn.q.weight, want)
    rel = (_out(model) - _out(reference)).abs().max() / _out(reference).abs().max()
    assert rel < 0.1  # fp8 quantisation error, not a layout error


def test_split_files(tmp_path, reference, expected):
    sd = reference.state_dict()
    keys = sorted(sd)
    half = len(keys) // 2
    _save(tmp_path, "dit-00001-of-00002.safetensors", {k: sd[k] for k in keys[:half]})
    _save(tmp_path, "dit-00002-of-00002.safetensors", {k: sd[k] for k in keys[half:]})
    model = load_dit(tmp_path / "dit-00001-of-00002.safetensors")
    _same(model, expected)
    (tmp_path / "dit-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing dit-00002-of-00002"):
        load_dit(tmp_path / "dit-00001-of-00002.safetensors")


def test_pth_is_loaded_with_weights_only(tmp_path, reference, expected):
    path = tmp_path / "dit.pth"
    torch.save(reference.state_dict(), path)
    _same(load_dit(path), expected)
    torch.save({"weights": reference.state_dict(), "code": dataclasses.replace}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_dit(tmp_path / "evil.pth")


def test_config_in_metadata_allows_any_head_size(tmp_path):
    model = randomize_(WanModel(TINY_DIT), seed=2)
    path = tmp_path / "tiny.safetensors"
    save_safetensors(model.state_dict(), path, {CONFIG_METADATA_KEY: config_to_json(TINY_DIT)})
    assert load_dit(path).config == TINY_DIT
    assert load_dit(path, task="t2v-1.3B").config == TINY_DIT  # same kind of model as the task
    with pytest.raises(ValueError, match="task 'i2v-14B' needs a i2v model with 36 input channels"):
        load_dit(path, task="i2v-14B")


def test_config_of_another_model_in_metadata_is_a_clear_error(tmp_path):
    model = randomize_(WanModel(TINY_DIT), seed=2)
    path = tmp_path / "tiny.safetensors"
    save_safetensors(model.state_dict(), path, {CONFIG_METADATA_KEY: config_to_json(VAEConfig())})
    with pytest.raises(ValueError, match="tiny.safetensors: its wantuner_config metadata holds a VAEConfig, not a "
                                         "DiTConfig"):
        load_dit(path)


def test_wrong_task_names_key_shapes_and_fitting_task():
    sd = build_on_meta(lambda: WanModel(TASKS["t2v-1.3B"].dit)).state_dict()
    with pytest.raises(ValueError) as err:
        check_task("t2v-14B", sd)
    msg = str(err.value)
    assert "'patch_embedding.weight' has shape [1536, 16, 1, 2, 2]" in msg
    assert "expects [5120, 16, 1, 2, 2]" in msg and "fit task t2v-1.3B" in msg
    i2v = build_on_meta(lambda: WanModel(TASKS["i2v-14B"].dit)).state_dict()
    with pytest.raises(ValueError, match=r"has shape \[5120, 36, 1, 2, 2\].*fit task i2v-14B"):
        check_task("t2v-14B", i2v)
    check_task("i2v-14B", i2v)


def test_bad_files_fail_clearly(tmp_path, reference):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_dit(tmp_path / "nope.safetensors")
    good = _save(tmp_path, "good.safetensors", reference.state_dict())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_dit(garbage)
    junk_pth = tmp_path / "junk.pth"
    junk_pth.write_bytes(b"\x80garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read .*junk.pth as a PyTorch checkpoint"):
        load_dit(junk_pth)
    other = _save(tmp_path, "other.safetensors", {"encoder.conv1.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="not a Wan2.1 DiT checkpoint"):
        load_dit(other)
    sd = rename(reference.state_dict(), DIT_DIFFUSERS, to_ours=False, what="test")
    sd["blocks.0.attn1.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unknown key layout.*blocks.0.attn1.mystery.weight"):
        load_dit(_save(tmp_path, "mystery.safetensors", sd))
    if "xformers" not in available_backends():
        with pytest.raises(RuntimeError, match="needs the package 'xformers'.*pip install xformers"):
            load_dit(good, attn="xformers")
    with pytest.raises(ValueError, match="unknown attention backend 'flashy'"):
        load_dit(good, attn="flashy")


def test_odd_latent_size_is_rejected(reference):
    x, t, context = _inputs()
    with pytest.raises(ValueError, match="multiples of 16"):
        reference(x[..., :7], t, context)


def test_atomically_written_files_get_the_ordinary_file_mode(tmp_path: Path) -> None:
    import os
    import stat

    import numpy as np

    from wan_core.loading.checkpoint import new_file_mode
    from wan_core.media.io import write_video

    mask = os.umask(0o022)
    os.umask(mask)
    assert new_file_mode() == 0o666 & ~mask
    checkpoint = save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    video = write_video(torch.from_numpy(np.zeros((1, 16, 16, 3), np.float32)), tmp_path / "v.mp4", fps=16)
    for path in (checkpoint, video):
        assert stat.S_IMODE(path.stat().st_mode) == new_file_mode(), path  # not mkstemp's 0o600
