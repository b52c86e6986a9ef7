"""The training LoRA network (musubi networks.lora_wan semantics) on tiny CPU models."""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.numerics import assert_float32_parity, float64_copy, float64_run, float64_upcasts, to_float64
from tests.tiny import TINY_DIT_BY_TYPE, randomize_
from wan_core.loading.checkpoint import read_metadata
from wan_core.lora.apply import merge_loras
from wan_core.lora.formats import load_lora, lora_state_dict
from wan_core.lora.network import LoRANetwork, TrainableLoRA, training_targets
from wan_core.models.dit import WanModel
from wan_core.models.ops import CastLinear

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def _model(kind: str = "t2v", seed: int = 0) -> WanModel:
    return randomize_(WanModel(TINY_DIT_BY_TYPE[kind]), seed).eval().requires_grad_(False)


def _inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 2, 8, 8, generator=gen), torch.tensor([400.0]), [torch.randn(5, 32, generator=gen)]


def _randomize_lora(network: LoRANetwork, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_targets_are_every_block_linear() -> None:
    for kind, extra in (("t2v", ()), ("i2v", ("cross_attn.k_img", "cross_attn.v_img"))):
        names = set(training_targets(_model(kind)))
        assert names == {f"blocks.{i}.{m}" for i in range(2) for m in BLOCK_LINEARS + extra}  # 10 or 12 per block


def test_training_patterns_fullmatch_and_include_wins() -> None:
    model = _model()
    only_cross = training_targets(model, include_patterns=[r"blocks\.\d+\.cross_attn\..*"], exclude_patterns=[".*"])
    assert set(only_cross) == {f"blocks.{i}.cross_attn.{p}" for i in range(2) for p in "qkvo"}
    assert set(training_targets(model, exclude_patterns=[r"blocks\.0\..*"])) == \
        {f"blocks.1.{m}" for m in BLOCK_LINEARS}
    assert len(training_targets(model, include_patterns=[".*ffn.*"])) == 20  # include alone adds nothing
    assert len(training_targets(model, exclude_patterns=["ffn"])) == 20  # fullmatch, not search
    with pytest.raises(ValueError, match="invalid exclude pattern"):
        training_targets(model, exclude_patterns=["(["])
    with pytest.raises(RuntimeError, match="no LoRA target layers"):
        LoRANetwork(model, exclude_patterns=[".*"])


def test_init_and_identity_at_start() -> None:
    model = _model()
    x, t, context = _inputs()
    with torch.no_grad():
        base = model(x, t, context)
    network = LoRANetwork(model, rank=8, alpha=4)
    for module in network.by_name.values():
        assert torch.equal(module.lora_up.weight, torch.zeros_like(module.lora_up.weight))
        bound = 1 / math.sqrt(module.lora_down.weight.shape[1])  # kaiming_uniform(a=sqrt(5)) bound
        assert module.lora_down.weight.abs().max() <= bound and module.lora_down.weight.abs().max() > 0.8 * bound
        assert module.scale == 0.5 and float(module.alpha) == 4.0
    with torch.no_grad():
        assert torch.equal(model(x, t, context), base)
    assert "lora_unet_blocks_1_cross_attn_v.lora_down.weight" in network.state_dict()


def test_forward_equals_merged_lora_and_gradients_flow() -> None:
    model = _model()
    network = LoRANetwork(model, rank=4, alpha=1.0, multiplier=0.75)
    _randomize_lora(network)
    x, t, context = _inputs()
    merged, merged64 = copy.deepcopy(_model()), float64_copy(_model())
    merge_loras(merged, [network.state_dict_in("musubi")], [0.75])
    with float64_upcasts():
        merge_loras(merged64, [to_float64(network.state_dict_in("musubi"))], [0.75])
    with torch.no_grad():
        assert_float32_parity(model(x, t, context), merged(x, t, context), float64_run(merged64, x, t, context))
    network.train()
    model(x, t, context).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.trainable_parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow  # the first checkpointed backward of a process costs several seconds (lazy imports)
def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        model = _model()
        model.gradient_checkpointing = checkpointing
        network = LoRANetwork(model, rank=4)
        _randomize_lora(network)
        model(*_inputs()).square().mean().backward()
        grads.append([p.grad.clone() for p in network.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _single(rank_dropout=None, dropout=None, module_dropout=None) -> tuple[TrainableLoRA, CastLinear]:
    torch.manual_seed(0)
    base = CastLinear(8, 6)
    module = TrainableLoRA("blocks.0.ffn.0", base, 4, 2.0, rank_dropout=rank_dropout, dropout=dropout,
                           module_dropout=module_dropout)
    with torch.no_grad():
        module.lora_up.weight.normal_()
    module.apply_to()
    return module, base


def test_rank_dropout_masks_per_sample_and_rescales() -> None:
    module, base = _single(rank_dropout=0.5)
    x = torch.randn(3, 5, 8)
    down, up = module.lora_down.weight, module.lora_up.weight
    torch.manual_seed(11)
    got = base(x)
    torch.manual_seed(11)
    keep = (torch.rand(3, 4) > 0.5).float()[:, None, :]  # [B, 1, r]
    expected = x @ base.weight.T + base.bias + ((x @ down.T) * keep) @ up.T * (0.5 / 0.5)
    torch.testing.assert_close(got, expected)
    module.eval()
    torch.testing.assert_close(base(x), x @ base.weight.T + base.bias + (x @ down.T) @ up.T * 0.5)


def test_network_dropout_is_on_the_down_output() -> None:
    module, base = _single(dropout=0.3)
    x = torch.randn(2, 4, 8)
    torch.manual_seed(5)
    got = base(x)
    torch.manual_seed(5)
    hidden = torch.nn.functional.dropout(x @ module.lora_down.weight.T, p=0.3)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, base.weight, base.bias)
                               + hidden @ module.lora_up.weight.T * 0.5)


def test_module_dropout_skips_the_lora_in_training_only() -> None:
    module, base = _single(module_dropout=1.0)
    x = torch.randn(2, 4, 8)
    plain = torch.nn.functional.linear(x, base.weight, base.bias)
    assert torch.equal(base(x), plain)
    module.eval()
    assert not torch.allclose(base(x), plain)
    module.remove()
    assert "forward" not in base.__dict__ and torch.equal(base(x), plain)


def test_set_multiplier_and_remove() -> None:
    model = _model()
    x, t, context = _inputs()
    with torch.no_grad():
        base = model(x, t, context)
        network = LoRANetwork(model, rank=4)
        _randomize_lora(network)
        network.set_multiplier(0.0)
        assert torch.equal(model(x, t, context), base)
        network.set_multiplier(1.0)
        assert not torch.allclose(model(x, t, context), base)
        network.remove()
        assert torch.equal(model(x, t, context), base)


@pytest.mark.parametrize("fmt,keep_alpha", [("musubi", False), ("comfyui", False), ("comfyui", True),
                                            ("diffusers", False)])
def test_save_and_continue_in_every_format(tmp_path: Path, fmt: str, keep_alpha: bool) -> None:
    network = LoRANetwork(_model(), rank=4, alpha=2.0)
    _randomize_lora(network)
    path = network.save(tmp_path / "lora.safetensors", fmt, metadata={"ss_learning_rate": "0.0001", "x": 1},
                        keep_alpha=keep_alpha)
    meta = read_metadata(path)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_learning_rate"] == "0.0001"
    assert meta["ss_network_module"] == "networks.lora_wan" and meta["x"] == "1"
    resumed = LoRANetwork(_model(), rank=4, alpha=1.0)
    report = resumed.load_weights(path)
    assert report.matched == 20 and report.unmatched == ()
    original = {m: a.delta() for m, a in network.adapters().items()}
    for name, adapter in resumed.adapters().items():
        if fmt == "musubi" or keep_alpha:
            assert torch.equal(adapter.down, network.by_name[name].lora_down.weight)
            assert adapter.alpha == 2.0
        torch.testing.assert_close(adapter.delta(), original[name])
    if fmt == "musubi":
        assert load_file(path).keys() == network.state_dict().keys()
        raw = path.read_bytes()
        header = int.from_bytes(raw[:8], "little")
        assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()


def test_state_dict_in_matches_the_module_state_dict() -> None:
    network = LoRANetwork(_model(), rank=4, alpha=2.0)
    _randomize_lora(network)
    musubi = network.state_dict_in("musubi")
    assert musubi.keys() == network.state_dict().keys()
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in musubi.items())
    half = network.state_dict_in("comfyui", dtype=torch.bfloat16)
    assert half["diffusion_model.blocks.0.ffn.0.lora_A.weight"].dtype == torch.bfloat16


def test_load_weights_errors_and_from_weights(tmp_path: Path) -> None:
    source = LoRANetwork(_model("i2v"), rank=2, alpha=8.0)
    _randomize_lora(source)
    path = source.save(tmp_path / "i2v.safetensors")
    with pytest.raises(ValueError, match="rank 2 but the network has rank 4"):
        LoRANetwork(_model("i2v"), rank=4).load_weights(path)
    t2v = LoRANetwork.from_weights(_model("t2v"), path)
    assert {m.rank for m in t2v.by_name.values()} == {2} and len(t2v.by_name) == 20
    report = t2v.load_weights(path)
    assert len(report.unmatched) == 2 * 2 * 3  # k_img/v_img of each block: down, up, alpha
    torch.testing.assert_close(t2v.adapters()["blocks.1.ffn.2"].delta(), source.adapters()["blocks.1.ffn.2"].delta())
    gen = torch.Generator().manual_seed(0)
    loha = {f"lora_unet_blocks_0_ffn_2.hada_{n}": torch.randn(*s, generator=gen)
            for n, s in (("w1_a", (64, 2)), ("w1_b", (2, 128)), ("w2_a", (64, 2)), ("w2_b", (2, 128)))}
    with pytest.raises(ValueError, match="loha adapter"):
        LoRANetwork(_model(), rank=2).load_weights(loha)


def test_param_groups_loraplus() -> None:
    network = LoRANetwork(_model(), rank=4)
    (plain,) = network.param_groups(1e-4)
    assert len(plain["params"]) == 40
    down, up = network.param_groups(1e-4, loraplus_lr_ratio=16)
    assert up["lr"] == pytest.approx(1.6e-3) and all(p.shape[1] == 4 for p in up["params"])


def test_saved_lora_equals_canonical_writer() -> None:
    network = LoRANetwork(_model(), rank=4, alpha=3.0)
    _randomize_lora(network)
    lora = load_lora(network.state_dict_in("musubi"))
    for fmt in ("comfyui", "diffusers"):
        written = network.state_dict_in(fmt)
        assert written.keys() == lora_state_dict(lora, fmt).keys()


def test_trains_on_fp8_base_layers() -> None:
    """--fp8_base: the network patches FP8Linear layers (called, never read) and only the LoRA gets gradients."""
    from wan_core.models.ops import FP8Linear
    from wan_core.runtime.fp8 import apply_fp8

    model = apply_fp8(_model(), "fp8_scaled", compute_dtype=torch.float32)
    network = LoRANetwork(model, rank=4)
    assert all(isinstance(m.base, FP8Linear) for m in network.by_name.values()) and len(network.by_name) == 20
    _randomize_lora(network)
    x = torch.randn(2, 3, 64)
    layer = model.blocks[0].self_attn.q
    lora = network.by_name["blocks.0.self_attn.q"]
    network.remove()
    plain = layer(x)
    network.apply_to()
    torch.testing.assert_close(layer(x), plain + x @ lora.lora_down.weight.T @ lora.lora_up.weight.T * 0.25)
    model(*_inputs()).square().mean().backward()
    assert all(p.grad is not None for p in network.trainable_parameters())


def test_load_weights_reports_full_patches_and_refuses_dora(tmp_path: Path) -> None:
    """A ComfyUI-trained file with .diff/.diff_b keys continues as a LoRA network; the patches are reported as not
    loaded (they are not part of the network), and a DoRA adapter is refused rather than loaded without its scale."""
    source = LoRANetwork(_model(), rank=2, alpha=8.0)
    _randomize_lora(source)
    sd = source.state_dict_in("comfyui", keep_alpha=True)
    patches = {"diffusion_model.blocks.0.norm3.diff": torch.ones(64), "diffusion_model.blocks.0.ffn.2.diff_b":
               torch.ones(64)}
    report = LoRANetwork(_model(), rank=2).load_weights(sd | patches)
    assert set(report.unmatched) == set(patches) and report.matched == len(source.by_name)
    dora = sd | {"diffusion_model.blocks.0.ffn.2.dora_scale": torch.ones(1, 128)}
    with pytest.raises(ValueError, match="DoRA adapter"):
        LoRANetwork(_model(), rank=2).load_weights(dora)
