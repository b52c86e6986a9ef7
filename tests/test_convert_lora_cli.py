"""`python -m training convert-lora`: musubi <-> ComfyUI <-> diffusers files keep the weight delta (and alpha)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import TINY_DIT, randomize_
from training.__main__ import main as training_main
from wan_core.loading.checkpoint import load_state_dict, read_metadata
from wan_core.lora.formats import load_lora
from wan_core.lora.network import LoRANetwork, training_targets
from wan_core.models.dit import WanModel


@pytest.fixture()
def musubi_file(tmp_path: Path) -> tuple[Path, set[str]]:
    model = randomize_(WanModel(TINY_DIT), 0).requires_grad_(False)
    network = LoRANetwork(model, rank=4, alpha=2.0)
    with torch.no_grad():
        for module in network.by_name.values():
            module.lora_up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(module.name)))
    path = network.save(tmp_path / "lora.safetensors", "musubi", metadata={"ss_seed": "3"})
    return path, set(training_targets(model))


def _deltas(path: Path, modules: set[str]) -> dict[str, torch.Tensor]:
    lora = load_lora(path, modules)
    assert not lora.unmatched
    return {name: adapter.delta() for name, adapter in lora.adapters.items()}


def test_round_trips_keep_the_delta(musubi_file, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source, modules = musubi_file
    reference = _deltas(source, modules)
    other = tmp_path / "comfy.safetensors"
    assert training_main(["convert-lora", "--input", str(source), "--output", str(other), "--target", "other"]) == 0
    assert capsys.readouterr().out.strip() == str(other)
    keys = load_state_dict(other)
    assert all(k.startswith("diffusion_model.blocks.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert read_metadata(other)["ss_seed"] == "3"
    back = tmp_path / "back.safetensors"
    assert training_main(["convert-lora", "--input", str(other), "--output", str(back), "--target", "default"]) == 0
    assert all(k.startswith("lora_unet_blocks_") for k in load_state_dict(back))
    bare = tmp_path / "bare.safetensors"
    assert training_main(["convert-lora", "--input", str(source), "--output", str(bare), "--target", "other",
                          "--diffusers_prefix", "-", "--keep_alpha"]) == 0
    assert all(k.startswith("blocks.") for k in load_state_dict(bare))
    diffusers = tmp_path / "diffusers.safetensors"
    assert training_main(["convert-lora", "--input", str(back), "--output", str(diffusers), "--target",
                          "diffusers"]) == 0
    assert all(k.startswith("transformer.blocks.") for k in load_state_dict(diffusers))
    for path in (other, back, bare, diffusers):
        deltas = _deltas(path, modules)
        assert sorted(deltas) == sorted(reference)
        for name, delta in deltas.items():
            torch.testing.assert_close(delta, reference[name], rtol=1e-5, atol=1e-8)
    alphas = {n: a.alpha for n, a in load_lora(bare, modules).adapters.items()}
    assert set(alphas.values()) == {2.0}  # kept exactly with --keep_alpha


def test_convert_errors(musubi_file, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source, _ = musubi_file
    assert training_main(["convert-lora", "--input", str(tmp_path / "missing.safetensors"), "--output",
                          str(tmp_path / "x.safetensors"), "--target", "other"]) == 1
    assert "missing.safetensors" in capsys.readouterr().err
    assert training_main(["convert-lora", "--input", str(source), "--output", str(source), "--target", "other"]) == 2
    assert "--output must differ from --input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        training_main(["convert-lora", "--input", str(source), "--output", "y", "--target", "kohya"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    not_a_lora = tmp_path / "weights.safetensors"
    from wan_core.loading.checkpoint import save_safetensors

    save_safetensors({"something.weight": torch.zeros(2, 2)}, not_a_lora)
    assert training_main(["convert-lora", "--input", str(not_a_lora), "--output", str(tmp_path / "z.safetensors"),
                          "--target", "other"]) == 1
    assert "something.weight" in capsys.readouterr().err
