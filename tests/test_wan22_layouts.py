"""The Wan2.2 file layouts users have, end to end through the CLI on tiny random files without our metadata (the
architecture detected from shapes, as for the real files): the official A14B folder (high_noise_model/ and
low_noise_model/ of sharded safetensors + index json), the official Wan2.2_VAE.pth, and Comfy-Org's fp8_scaled
DiTs (float8_e4m3fn block weights with `scale_weight` tensors and a `scaled_fp8` marker)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.model_set import _save, write_model_set
from tests.test_generate_wan22 import TINY_VAE22
from tests.tiny import TINY_DIT, randomize_
from wan_core.generate.cli import main
from wan_core.generate.outputs import load_latent
from wan_core.loading.checkpoint import CheckpointError, load_state_dict
from wan_core.loading.convert import DIT_DIFFUSERS, rename
from wan_core.models.dit import WanModel
from wan_core.models.ops import dequantize_weight
from wan_core.models.vae import WanVAEModel, load_vae

# head dim 128 (as every real model) so that the architecture is detectable from the shapes alone
DETECTABLE = dataclasses.replace(TINY_DIT, dim=128, num_heads=1, ffn_dim=256)
DETECTABLE_TI2V = dataclasses.replace(DETECTABLE, in_dim=48, out_dim=48)
COMFY_PREFIX = "model.diffusion_model."
E4M3 = torch.float8_e4m3fn


def _plain(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """A safetensors file with no metadata."""
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _sharded_folder(folder: Path, sd: dict[str, torch.Tensor], shards: int = 3) -> Path:
    """The official layout: diffusion_pytorch_model-0000i-of-0000n.safetensors + the index json."""
    folder.mkdir(parents=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        _plain(folder / name, {k: sd[k] for k in part})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": DETECTABLE.dim}))
    return folder


def _comfy_fp8_scaled(path: Path, sd: dict[str, torch.Tensor]) -> tuple[Path, dict[str, torch.Tensor]]:
    """Comfy-Org's fp8_scaled layout: prefixed keys, 2-D block weights as float8_e4m3fn with a per-tensor
    `scale_weight`, the rest bf16, and the `scaled_fp8` marker. Returns the file and its dequantised bf16 state
    dict (each weight fp8 x scale formed in fp32, rounded once to bf16)."""
    stored, dequantised = {}, {}
    for key, value in sd.items():
        if key.startswith("blocks.") and key.endswith(".weight") and value.dim() == 2:
            scale = (value.abs().max() / 448).float().reshape(())
            weight = (value / scale).to(E4M3)
            stored[COMFY_PREFIX + key] = weight
            stored[COMFY_PREFIX + key[: -len("weight")] + "scale_weight"] = scale
            dequantised[key] = dequantize_weight(weight, scale, torch.bfloat16)
        else:
            stored[COMFY_PREFIX + key] = dequantised[key] = value.to(torch.bfloat16)
    stored["scaled_fp8"] = torch.zeros(0, dtype=E4M3)
    return _plain(path, stored), dequantised


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wan22_layouts")
    paths = write_model_set(folder)
    experts = {name: randomize_(WanModel(DETECTABLE), seed, scale=0.05).state_dict()
               for name, seed in (("high", 21), ("low", 22))}
    for name, sd in experts.items():
        paths[name] = _plain(folder / f"{name}.safetensors", sd)
        _sharded_folder(folder / "Wan2.2-T2V-A14B" / f"{name}_noise_model", sd)
        diffusers = rename(sd, DIT_DIFFUSERS, to_ours=False, what="test")
        _sharded_folder(folder / "Wan2.2-T2V-A14B-Diffusers" / ("transformer" if name == "high" else "transformer_2"),
                        diffusers)
        paths[f"{name}_fp8"], deq = _comfy_fp8_scaled(folder / f"wan2.2_t2v_{name}_noise_14B_fp8_scaled.safetensors",
                                                      sd)
        paths[f"{name}_deq"] = _plain(folder / f"{name}_dequantised.safetensors", deq)
    paths["root"] = folder / "Wan2.2-T2V-A14B"
    paths["diffusers_root"] = folder / "Wan2.2-T2V-A14B-Diffusers"
    ti2v = randomize_(WanModel(DETECTABLE_TI2V), 23, scale=0.05).state_dict()
    paths["ti2v"] = _plain(folder / "ti2v.safetensors", ti2v)
    paths["ti2v_fp8"], deq = _comfy_fp8_scaled(folder / "wan2.2_ti2v_5B_fp8_scaled.safetensors", ti2v)
    paths["ti2v_deq"] = _plain(folder / "ti2v_dequantised.safetensors", deq)
    vae = randomize_(WanVAEModel(TINY_VAE22), 0, scale=0.1)
    paths["vae22"] = _save(vae, TINY_VAE22, folder / "wan2.2_vae.safetensors")
    torch.save(vae.state_dict(), folder / "Wan2.2_VAE.pth")
    paths["vae22_pth"] = folder / "Wan2.2_VAE.pth"
    return paths


def _run(files, out: Path, *extra: str) -> torch.Tensor:
    assert main(["--t5", str(files["t5"]), "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "4",
                 "--seed", "7", "--output_type", "latent", "--prompt", "a red square", "--save_path", str(out),
                 "--quiet", "--device", "cpu", *extra]) == 0
    (path,) = sorted(out.glob("*_latent.safetensors"))
    return load_latent(path)[0]


def _t2v(files, out: Path, *extra: str) -> torch.Tensor:
    """A T2V run; the task is inferred from the files (tiny weights do not fit the 14B preset's shapes)."""
    return _run(files, out, "--vae", str(files["vae"]), *extra)


def _folders(files, high: str, low: str) -> tuple[str, ...]:
    root = files["root"]
    return "--dit", str(root / f"{low}_noise_model"), "--dit_high_noise", str(root / f"{high}_noise_model")


def test_official_root_folder_as_dit_uses_both_experts(files, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = _t2v(files, tmp_path / "root", "--dit", str(files["root"]))
    assert "is the official Wan2.2 expert folder: using both experts" in caplog.text
    assert "switching to the low-noise expert" in caplog.text
    assert torch.equal(root, _t2v(files, tmp_path / "named", *_folders(files, "high", "low")))
    assert not torch.equal(root, _t2v(files, tmp_path / "swapped", *_folders(files, "low", "high")))


def test_diffusers_pipeline_folder_as_dit_uses_transformer_high_and_transformer_2_low(files, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = _t2v(files, tmp_path / "root", "--dit", str(files["diffusers_root"]))
    assert "is a diffusers Wan2.2 pipeline folder: using both experts" in caplog.text
    folder = files["diffusers_root"]
    named = ("--dit", str(folder / "transformer_2"), "--dit_high_noise", str(folder / "transformer"))
    assert torch.equal(root, _t2v(files, tmp_path / "named", *named))
    swapped = ("--dit", named[3], "--dit_high_noise", named[1])
    assert not torch.equal(root, _t2v(files, tmp_path / "swapped", *swapped))


def test_official_root_folder_picks_each_expert_by_its_folder_name(files, tmp_path):
    named = _t2v(files, tmp_path / "named", *_folders(files, "high", "low"))
    low = str(files["root"] / "low_noise_model")
    assert torch.equal(_t2v(files, tmp_path / "a", "--dit", low, "--dit_high_noise", str(files["root"])), named)
    high = str(files["root"] / "high_noise_model")
    assert torch.equal(_t2v(files, tmp_path / "b", "--dit", str(files["root"]), "--dit_high_noise", high), named)


def test_sharded_folder_loads_every_shard(files):
    folder = files["root"] / "high_noise_model"
    assert load_state_dict(folder).keys() == load_state_dict(files["high"]).keys()
    assert all(torch.equal(load_state_dict(folder)[k], v) for k, v in load_state_dict(files["high"]).items())


def test_sharded_folder_with_a_missing_shard_is_one_clear_error(files, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    index = files["root"] / "low_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
    (broken / index.name).write_text(index.read_text())
    with pytest.raises(FileNotFoundError, match=r"sharded checkpoint .*broken is incomplete: missing "
                                                r"diffusion_pytorch_model-00001-of-00003.safetensors"):
        load_state_dict(broken)
    with pytest.raises(CheckpointError, match=r"is a directory with no \*.safetensors.index.json"):
        load_state_dict(tmp_path)


def test_comfy_fp8_scaled_experts_equal_their_dequantised_weights(files, tmp_path):
    got = _t2v(files, tmp_path / "fp8", "--dit", str(files["low_fp8"]), "--dit_high_noise", str(files["high_fp8"]))
    want = _t2v(files, tmp_path / "deq", "--dit", str(files["low_deq"]), "--dit_high_noise", str(files["high_deq"]))
    assert torch.equal(got, want)


def test_comfy_fp8_scaled_ti2v_and_the_official_vae_pth(files, tmp_path):
    def ti2v(out: str, dit: str, vae: str) -> torch.Tensor:
        return _run(files, tmp_path / out, "--dit", str(files[dit]), "--vae", str(files[vae]), "--video_size", "32",
                    "64", "--output_type", "both")

    fp8 = ti2v("fp8", "ti2v_fp8", "vae22")
    assert fp8.shape == (1, 48, 2, 2, 4)
    assert torch.equal(fp8, ti2v("deq", "ti2v_deq", "vae22"))
    # Wan2.2_VAE.pth (a plain state dict, read with weights_only=True) runs, and decodes as the safetensors file
    assert torch.equal(ti2v("pth", "ti2v_fp8", "vae22_pth"), fp8)
    assert len(list((tmp_path / "pth").glob("*.mp4"))) == 1
    pth, safetensors = load_vae(files["vae22_pth"]), load_vae(files["vae22"])
    assert pth.config == TINY_VAE22
    assert torch.equal(pth.decode(fp8), safetensors.decode(fp8))
