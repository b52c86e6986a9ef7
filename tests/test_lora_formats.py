"""LoRA at inference: every key format, LyCORIS deltas, merge vs unmerged, include/exclude, conversion.

References are independent of the code under test: key names are written here from the formats' published key
layouts, deltas are recomputed here in float64, and the end-to-end check runs diffusers'
own Wan LoRA converters + PEFT on diffusers' WanTransformer3DModel.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.numerics import assert_float32_parity, float64_copy, float64_run, float64_upcasts, to_float64
from tests.tiny import TINY_DIT, TINY_DIT_BY_TYPE, diffusers_dit, randomize_
from wan_core.loading.checkpoint import build_on_meta, load_into, read_metadata
from wan_core.loading.convert import DIT_DIFFUSERS, rename
from wan_core.lora.apply import LoRAModule, apply_loras, inference_filter, linear_modules, merge_loras
from wan_core.lora.formats import (
    LoHa,
    LoKr,
    convert_lora_file,
    detect_lora_format,
    load_lora,
    lora_state_dict,
    parse_lora,
)
from wan_core.models.dit import WanModel
from wan_core.models.ops import CastLinear

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
IMG_LINEARS = ("cross_attn.k_img", "cross_attn.v_img")
# diffusers WanTransformer3DModel module names, restated here independently of wan_core.loading.convert
DIFFUSERS_NAME = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                  "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                  "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
                  "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
                  "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
RANK, ALPHA = 4, 3.0


def _targets(kind: str = "t2v", num_layers: int = 2) -> list[str]:
    names = BLOCK_LINEARS + (IMG_LINEARS if kind != "t2v" else ())
    return [f"blocks.{i}.{m}" for i in range(num_layers) for m in names]


def _shape(cfg, module: str) -> tuple[int, int]:
    if module.endswith("ffn.0"):
        return cfg.ffn_dim, cfg.dim
    if module.endswith("ffn.2"):
        return cfg.dim, cfg.ffn_dim
    return cfg.dim, cfg.dim


def _random_lora(kind: str = "t2v", seed: int = 0, rank: int = RANK, cfg=None):
    """module -> (down [r, in], up [out, r]) with visible, well-conditioned values."""
    cfg = cfg or TINY_DIT_BY_TYPE[kind]
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in _targets(kind, cfg.num_layers):
        rows, cols = _shape(cfg, module)
        out[module] = (torch.randn(rank, cols, generator=gen) * 0.2, torch.randn(rows, rank, generator=gen) * 0.2)
    return out


def _ref_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None = ALPHA) -> torch.Tensor:
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    return (up.double() @ down.double() * scale).float()


def _underscore(module: str) -> str:
    return module.replace(".", "_")


# Key writers, one per layout (written from the format descriptions, not with wan_core's writer).
def _musubi(lora, prefix="lora_unet_"):
    sd = {}
    for m, (down, up) in lora.items():
        name = prefix + _underscore(m)
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)}
    return sd


def _dotted(lora, prefix: str, a: str, b: str, alpha: bool, fold: bool = False, diffusers_names: bool = False):
    sd = {}
    for m, (down, up) in lora.items():
        block, name = m.split(".", 2)[1], m.split(".", 2)[2]
        module = f"blocks.{block}.{DIFFUSERS_NAME[name]}" if diffusers_names else m
        f = math.sqrt(ALPHA / down.shape[0]) if fold else 1.0
        sd |= {f"{prefix}{module}.{a}": down * f, f"{prefix}{module}.{b}": up * f}
        if alpha:
            sd[f"{prefix}{module}.alpha"] = torch.tensor(ALPHA)
    return sd


WRITERS = {
    "musubi": _musubi,
    "wan_fun": lambda lora: _musubi(lora, "lora_unet__"),
    "lycoris_prefix": lambda lora: _musubi(lora, "lycoris_"),
    "comfyui_alpha": lambda lora: _dotted(lora, "diffusion_model.", "lora_A.weight", "lora_B.weight", True),
    "comfyui_folded": lambda lora: _dotted(lora, "diffusion_model.", "lora_A.weight", "lora_B.weight", False, True),
    "comfyui_native": lambda lora: _dotted(lora, "diffusion_model.", "lora_down.weight", "lora_up.weight", True),
    "diffusers": lambda lora: _dotted(lora, "transformer.", "lora_A.weight", "lora_B.weight", False, True, True),
    "peft_wrapped": lambda lora: _dotted(lora, "base_model.model.", "lora_A.default.weight",
                                         "lora_B.default.weight", False, True),
    "peft_bare": lambda lora: _dotted(lora, "", "lora_A.default.weight", "lora_B.default.weight", False, True),
    "peft_bare_diffusers": lambda lora: _dotted(lora, "", "lora_A.weight", "lora_B.weight", True, False, True),
}


def _model(kind: str = "t2v", seed: int = 0, cfg=None) -> WanModel:
    return randomize_(WanModel(cfg or TINY_DIT_BY_TYPE[kind]), seed).eval()


def _inputs(kind: str = "t2v", seed: int = 1):
    cfg = TINY_DIT_BY_TYPE[kind]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=gen)
    y = torch.randn(1, cfg.in_dim - 16, 2, 8, 8, generator=gen) if cfg.in_dim > 16 else None
    clip = torch.randn(1, cfg.image_tokens, 1280, generator=gen) if cfg.has_image_input else None
    return x, torch.tensor([600.0]), [torch.randn(7, cfg.text_dim, generator=gen)], clip, y


def _run(model, kind: str = "t2v") -> torch.Tensor:
    x, t, context, clip, y = _inputs(kind)
    with torch.no_grad():
        return model(x, t, context, clip_fea=clip, y=y)


def _run64(model, kind: str = "t2v") -> torch.Tensor:
    """_run in float64 (tests.numerics.float64_run)."""
    x, t, context, clip, y = _inputs(kind)
    return float64_run(model, x, t, context, clip_fea=clip, y=y)


def _manual_merge(model: WanModel, lora, multiplier: float = 1.0, alpha: float | None = ALPHA,
                  dtype: torch.dtype = torch.float32) -> WanModel:
    merged = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        for m, (down, up) in lora.items():
            weight = merged.get_submodule(m).weight
            weight.copy_((weight.double() + multiplier * _ref_delta(down, up, alpha).double()).to(dtype))
    return merged


def _expected(model: WanModel, *merges: tuple[dict, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """_run of the model with the (lora, multiplier) pairs merged by hand: in float32, and exactly in float64."""
    outputs = []
    for dtype, run in ((torch.float32, _run), (torch.float64, _run64)):
        merged = model
        for lora, multiplier in merges:
            merged = _manual_merge(merged, lora, multiplier, dtype=dtype)
        outputs.append(run(merged))
    return outputs[0], outputs[1]


# ----------------------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_every_layout_gives_the_same_delta(layout: str) -> None:
    lora = _random_lora("i2v")
    model = _model("i2v")
    parsed = parse_lora(WRITERS[layout](lora), linear_modules(model))
    assert parsed.unmatched == ()
    assert set(parsed.adapters) == set(lora)
    for m, (down, up) in lora.items():
        torch.testing.assert_close(parsed.adapters[m].delta(), _ref_delta(down, up))
    without_model = parse_lora(WRITERS[layout](lora))  # resolved through the Wan table (file conversion)
    assert set(without_model.adapters) == set(lora)


@pytest.mark.parametrize("layout", ["musubi", "comfyui_folded", "diffusers", "peft_wrapped", "wan_fun"])
def test_every_layout_gives_the_same_model_output(layout: str) -> None:
    lora = _random_lora()
    model = _model()
    expected = _expected(model, (lora, 0.8))
    merged = copy.deepcopy(model)
    (report,) = merge_loras(merged, [WRITERS[layout](lora)], [0.8])
    assert report.matched == len(lora) and report.unmatched == ()
    assert_float32_parity(_run(merged), *expected)
    handle = apply_loras(model, [WRITERS[layout](lora)], [0.8])
    assert_float32_parity(_run(model), *expected)
    handle.remove()


def test_detect_format() -> None:
    lora = _random_lora()
    assert detect_lora_format(WRITERS["musubi"](lora)) == "musubi/lora"
    assert detect_lora_format(WRITERS["wan_fun"](lora)) == "wan_fun/lora"
    assert detect_lora_format(WRITERS["comfyui_alpha"](lora)) == "comfyui/lora"
    assert detect_lora_format(WRITERS["diffusers"](lora)) == "diffusers/lora"
    assert detect_lora_format(WRITERS["peft_bare"](lora)) == "peft/lora"
    assert detect_lora_format({"lora_unet_blocks_0_ffn_0.hada_w1_a": torch.zeros(1)}) == "musubi/loha"


@pytest.mark.slow  # importing peft takes ~10 s on two cores
@pytest.mark.parametrize("layout", ["musubi", "comfyui_alpha", "diffusers"])
def test_matches_diffusers_with_its_own_lora_converters(layout: str) -> None:
    """End to end against an independent stack: diffusers' Wan LoRA converters + PEFT on WanTransformer3DModel."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    ref = diffusers_dit("t2v")
    ours = load_into(build_on_meta(lambda: WanModel(TINY_DIT)),
                     rename(ref.state_dict(), DIT_DIFFUSERS, to_ours=True, what="test")).eval()
    file = WRITERS[layout](_random_lora())
    converted = WanLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in file.items()})  # it scales in place
    ref.load_lora_adapter(converted, prefix="transformer", adapter_name="t")
    x, t, context, _, _ = _inputs()
    padded = torch.cat([context[0], torch.zeros(512 - 7, TINY_DIT.text_dim)])[None]
    with torch.no_grad():
        expected = ref(x, t, padded, return_dict=False)[0]
    exact = float64_run(ref, x, t, padded, return_dict=False)[0]
    unmerged = apply_loras(ours, [file])
    assert_float32_parity(_run(ours), expected, exact)
    unmerged.remove()
    merge_loras(ours, [file])
    assert_float32_parity(_run(ours), expected, exact)


def test_i2v_lora_on_t2v_model_reports_image_keys(caplog: pytest.LogCaptureFixture) -> None:
    file = WRITERS["musubi"](_random_lora("i2v"))
    file["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    model = _model("t2v")
    with caplog.at_level(logging.WARNING, logger="wan_core.lora.formats"):
        (report,) = merge_loras(model, [file])
    image_keys = {k for k in file if "_img" in k}
    assert len(image_keys) == 2 * 2 * 3  # blocks x (k_img, v_img) x (down, up, alpha)
    assert set(report.unmatched) == image_keys | {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"}
    assert report.matched == 20
    assert "lora_unet_blocks_0_cross_attn_k_img" in caplog.text and "NOT applied" in caplog.text


def test_comfyui_native_key_set_loads() -> None:
    """ComfyUI's SaveLoRA layout: diffusion_model.X.lora_up/lora_down/alpha plus bias and norm diffs."""
    lora = _random_lora()
    file = WRITERS["comfyui_native"](lora)
    file["diffusion_model.blocks.0.cross_attn.norm_k.diff"] = torch.zeros(64)
    file["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.zeros(64)
    parsed = parse_lora(file, linear_modules(_model()))
    assert set(parsed.adapters) == set(lora)
    assert parsed.unmatched == ()
    assert set(parsed.params) == {"blocks.0.cross_attn.norm_k.weight", "blocks.0.self_attn.q.bias"}


def test_saved_names_are_those_comfyui_maps() -> None:
    """ComfyUI maps model key diffusion_model.<k>.weight from `lora_unet_<k with . -> _>` and from
    `diffusion_model.<k>`, and reads .lora_up/.lora_down/.lora_A/.lora_B .weight and .alpha after those names."""
    suffixes = (".lora_up.weight", ".lora_down.weight", ".lora_B.weight", ".lora_A.weight", ".alpha")
    for kind in ("t2v", "i2v"):
        model = _model(kind)
        names = {"diffusion_model." + k[: -len(".weight")] for k in model.state_dict() if k.endswith(".weight")}
        key_map = {n for n in names} | {"lora_unet_" + _underscore(n[len("diffusion_model."):]) for n in names}
        lora = parse_lora(WRITERS["musubi"](_random_lora(kind)), linear_modules(model))
        for fmt in ("musubi", "comfyui"):
            for keep_alpha in (False, True):
                written = lora_state_dict(lora, fmt, keep_alpha=keep_alpha)
                bases = set()
                for key in written:
                    suffix = next(s for s in suffixes if key.endswith(s))
                    bases.add(key[: -len(suffix)])
                assert bases <= key_map, bases - key_map  # zero "lora key not loaded"
                assert len(bases) == len(_targets(kind))  # every target module is written


def test_duplicate_tensors_for_one_module_are_an_error() -> None:
    file = WRITERS["musubi"](_random_lora())
    file["diffusion_model.blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(RANK, 64)
    with pytest.raises(ValueError, match="blocks.0.self_attn.q"):
        parse_lora(file)


def test_not_a_lora_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a LoRA file"):
        parse_lora({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)})
    with pytest.raises(FileNotFoundError):
        load_lora(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# LyCORIS
# ----------------------------------------------------------------------------------------------------------------

def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """kron(A, B)[i·p + k, j·q + l] = A[i, j]·B[k, l]."""
    return torch.einsum("ij,kl->ikjl", a, b).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def test_loha_delta() -> None:
    gen = torch.Generator().manual_seed(0)
    w1a, w1b, w2a, w2b = (torch.randn(*s, generator=gen) for s in ((64, 4), (4, 128), (64, 4), (4, 128)))
    expected = ((w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * (6.0 / 4)).float()
    file = {f"lora_unet_blocks_0_ffn_2.hada_{n}": t for n, t in zip(("w1_a", "w1_b", "w2_a", "w2_b"),
                                                                      (w1a, w1b, w2a, w2b))}
    file["lora_unet_blocks_0_ffn_2.alpha"] = torch.tensor(6.0)
    adapter = parse_lora(file).adapters["blocks.0.ffn.2"]
    assert isinstance(adapter, LoHa)
    torch.testing.assert_close(adapter.delta(), expected)
    del file["lora_unet_blocks_0_ffn_2.alpha"]  # no alpha: scale 1
    torch.testing.assert_close(parse_lora(file).adapters["blocks.0.ffn.2"].delta(), expected / 1.5)


@pytest.mark.parametrize("layout", ["w1_full_w2_lowrank", "w1_lowrank_w2_full", "both_lowrank", "both_full"])
def test_lokr_delta(layout: str) -> None:
    """out 128 = 8·16, in 64 = 4·16; LyCORIS: scale alpha/rank with rank from w1_a, else w2_a; 1 if both full."""
    gen = torch.Generator().manual_seed(1)
    rank, alpha = 2, 5.0
    w1 = torch.randn(8, 4, generator=gen)
    w1a, w1b = torch.randn(8, rank, generator=gen), torch.randn(rank, 4, generator=gen)
    w2 = torch.randn(16, 16, generator=gen)
    w2a, w2b = torch.randn(16, rank, generator=gen), torch.randn(rank, 16, generator=gen)
    file, factors = {}, []
    if layout.startswith("w1_full") or layout == "both_full":
        file["lokr_w1"], factors = w1, [w1.double()]
    else:
        file["lokr_w1_a"], file["lokr_w1_b"], factors = w1a, w1b, [w1a.double() @ w1b.double()]
    if layout.endswith("w2_full") or layout == "both_full":
        file["lokr_w2"] = w2
        factors.append(w2.double())
    else:
        file["lokr_w2_a"], file["lokr_w2_b"] = w2a, w2b
        factors.append(w2a.double() @ w2b.double())
    file["alpha"] = torch.tensor(alpha)
    scale = 1.0 if layout == "both_full" else alpha / rank
    expected = (_kron(*factors) * scale).float()
    sd = {f"diffusion_model.blocks.1.ffn.0.{k}": v for k, v in file.items()}
    adapter = parse_lora(sd).adapters["blocks.1.ffn.0"]
    assert isinstance(adapter, LoKr)
    torch.testing.assert_close(adapter.delta(), expected)


def test_lycoris_merge_equals_unmerged() -> None:
    gen = torch.Generator().manual_seed(2)
    file = {"lora_unet_blocks_1_self_attn_o.lokr_w1": torch.randn(8, 8, generator=gen) * 0.1,
            "lora_unet_blocks_1_self_attn_o.lokr_w2_a": torch.randn(8, 2, generator=gen) * 0.1,
            "lora_unet_blocks_1_self_attn_o.lokr_w2_b": torch.randn(2, 8, generator=gen) * 0.1,
            "lora_unet_blocks_1_self_attn_o.alpha": torch.tensor(1.0)}
    for n, s in (("w1_a", (64, 2)), ("w1_b", (2, 128)), ("w2_a", (64, 2)), ("w2_b", (2, 128))):
        file[f"lora_unet_blocks_0_ffn_2.hada_{n}"] = torch.randn(*s, generator=gen) * 0.3
    model = _model()
    merged, merged64 = copy.deepcopy(model), float64_copy(model)
    merge_loras(merged, [file], [0.7])
    with float64_upcasts():
        merge_loras(merged64, [to_float64(file)], [0.7])
    handle = apply_loras(model, [file], [0.7])
    assert handle.matched == 2
    assert_float32_parity(_run(model), _run(merged), _run64(merged64))
    handle.set_multiplier(0.0)
    assert not torch.allclose(_run(model), _run(merged))


# ----------------------------------------------------------------------------------------------------------------
# Application modes
# ----------------------------------------------------------------------------------------------------------------

def test_several_loras_merged_unmerged_and_multipliers() -> None:
    first, second = _random_lora(seed=3), _random_lora(seed=4, rank=2)
    files = [WRITERS["musubi"](first), WRITERS["comfyui_alpha"](second)]
    model = _model()
    base_out = _run(model)
    expected = _expected(model, (first, 0.8), (second, -0.5))
    merged = copy.deepcopy(model)
    reports = merge_loras(merged, files, [0.8, -0.5])
    assert [r.matched for r in reports] == [20, 20]
    assert_float32_parity(_run(merged), *expected)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_loras(model, files, [0.8, -0.5])
    assert isinstance(model.blocks[0].self_attn.q, LoRAModule) and model.dtype == torch.float32
    assert_float32_parity(_run(model), *expected)
    handle.set_multiplier(0.0)
    assert torch.equal(_run(model), base_out)  # multiplier 0 == base
    handle.set_multiplier(0.8, index=0)
    assert_float32_parity(_run(model), *_expected(_model(), (first, 0.8)))  # one LoRA on, one off
    handle.set_multiplier(1.3, index=1)
    assert_float32_parity(_run(model), *_expected(_model(), (first, 0.8), (second, 1.3)))
    assert handle.multipliers == [0.8, 1.3]
    handle.remove()
    assert type(model.blocks[0].self_attn.q) is CastLinear
    assert torch.equal(_run(model), base_out)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="removed"):
        handle.set_multiplier(1.0)


def test_multipliers_that_are_neither_a_number_nor_a_sequence_are_a_clear_error() -> None:
    files = [WRITERS["musubi"](_random_lora(seed=3))]
    with pytest.raises(ValueError, match="multipliers must be one value or one per LoRA, got a dtype"):
        merge_loras(_model(), files, torch.float32)  # type: ignore[arg-type]


def test_merge_with_multiplier_zero_is_bit_identical_and_state_dict_merge() -> None:
    model = _model()
    file = WRITERS["musubi"](_random_lora())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    merge_loras(sd, [file], [0.0])
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    merge_loras(sd, [file], [0.6])
    merged = copy.deepcopy(model)
    merge_loras(merged, [file], [0.6])
    assert all(torch.equal(sd[k], v) for k, v in merged.state_dict().items())


def test_two_handles_stack_and_remove_independently() -> None:
    model = _model()
    base_out = _run(model)
    first, second = _random_lora(seed=5), _random_lora(seed=6)
    h1 = apply_loras(model, WRITERS["musubi"](first))
    h2 = apply_loras(model, WRITERS["diffusers"](second), 0.5)
    assert not isinstance(model.blocks[0].self_attn.q.base, LoRAModule)  # one wrapper, two branches
    assert torch.equal(_run(copy.deepcopy(model)), _run(model))  # wrapped models copy (ComfyUI clones models)
    h1.remove()
    assert_float32_parity(_run(model), *_expected(_model(), (second, 0.5)))
    h2.remove()
    assert torch.equal(_run(model), base_out)


def test_bf16_model_keeps_its_dtype() -> None:
    model = _model().to(torch.bfloat16)
    file = WRITERS["musubi"](_random_lora())
    merge_loras(model, [file])
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    handle = apply_loras(model, [file])
    assert model.blocks[0].self_attn.q.branches[next(iter(model.blocks[0].self_attn.q.branches))].down.dtype == \
        torch.bfloat16
    assert _run(model).dtype == torch.float32
    handle.remove()


class QuantLinear(torch.nn.Module):
    """A stand-in for an fp8 layer: no `.weight`, int8 storage with a scale, computes in `compute_dtype`."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.abs().max() / 127
        self.register_buffer("qweight", torch.round(linear.weight / scale).to(torch.int8))
        self.register_buffer("wscale", scale)
        self.bias = linear.bias
        self.compute_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.qweight.float() * self.wscale, self.bias)


def test_unmerged_wraps_layers_without_weight() -> None:
    model = _model()
    lora = _random_lora()
    for m in lora:
        parent, _, child = m.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(model.get_submodule(m)))
    base_out = _run(model)
    layer = model.blocks[1].cross_attn.k
    down, up = lora["blocks.1.cross_attn.k"]
    handle = apply_loras(model, [WRITERS["musubi"](lora)], [0.9])
    assert handle.matched == 20 and model.blocks[1].cross_attn.k.base is layer
    x = torch.randn(3, 64)
    torch.testing.assert_close(model.blocks[1].cross_attn.k(x), layer(x) + 0.9 * x @ _ref_delta(down, up).T)
    assert not torch.equal(_run(model), base_out)
    handle.remove()
    assert torch.equal(_run(model), base_out)
    with pytest.raises(ValueError, match="before quantising"):
        merge_loras(model, [WRITERS["musubi"](lora)])


def test_unmerged_on_fp8_layers() -> None:
    """The fp8 path: merge before quantising is refused afterwards; unmerged LoRAs wrap FP8Linear layers."""
    from wan_core.models.ops import FP8Linear
    from wan_core.runtime.fp8 import apply_fp8

    model = apply_fp8(_model(), "fp8_scaled", compute_dtype=torch.float32)
    lora = _random_lora()
    layer = model.blocks[0].ffn[0]
    assert isinstance(layer, FP8Linear)
    base_out = _run(model)
    with pytest.raises(ValueError, match="before quantising"):
        merge_loras(model, [WRITERS["musubi"](lora)])
    handle = apply_loras(model, [WRITERS["musubi"](lora)], [1.1])
    x = torch.randn(5, 64)
    down, up = lora["blocks.0.ffn.0"]
    torch.testing.assert_close(model.blocks[0].ffn[0](x), layer(x) + 1.1 * x @ _ref_delta(down, up).T)
    assert model.dtype == torch.float32
    assert not torch.equal(_run(model), base_out)
    handle.remove()
    assert model.blocks[0].ffn[0] is layer and torch.equal(_run(model), base_out)


def test_shape_and_count_errors() -> None:
    wide = dataclasses.replace(TINY_DIT, dim=128, num_heads=8)
    file = WRITERS["musubi"](_random_lora(cfg=wide))
    with pytest.raises(ValueError, match="different model size"):
        merge_loras(_model(), [file])
    with pytest.raises(ValueError, match="2 multipliers for 1 LoRA"):
        apply_loras(_model(), [WRITERS["musubi"](_random_lora())], [1.0, 0.5])
    with pytest.raises(ValueError, match="invalid include pattern"):
        merge_loras(_model(), [WRITERS["musubi"](_random_lora())], include_patterns=["blocks_(["])
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in _model().state_dict().items()}
    with pytest.raises(ValueError, match="before quantising"):
        merge_loras(fp8, [WRITERS["musubi"](_random_lora())])


# ----------------------------------------------------------------------------------------------------------------
# Include / exclude (spec examples, on a 40-block model)
# ----------------------------------------------------------------------------------------------------------------

CFG40 = dataclasses.replace(TINY_DIT, dim=16, ffn_dim=32, num_heads=2, num_layers=40)


def _zero_sd() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in WanModel.expected_shapes(CFG40).items()}


def _changed(sd: dict[str, torch.Tensor]) -> set[str]:
    return {k[: -len(".weight")] for k, v in sd.items() if v.abs().sum() > 0}


def _blocks(modules: set[str]) -> set[int]:
    return {int(m.split(".")[1]) for m in modules}


def test_spec_exclude_blocks_20_to_39() -> None:
    sd = _zero_sd()
    (report,) = merge_loras(sd, [WRITERS["musubi"](_random_lora(cfg=CFG40))], exclude_patterns=[r"blocks_[23]\d_"])
    assert _changed(sd) == {m for m in _targets(num_layers=20)}
    assert report.matched == 200 and len(report.filtered) == 200


def test_spec_include_cross_attn_exclude_blocks_0_to_4() -> None:
    sd = _zero_sd()
    merge_loras(sd, [WRITERS["comfyui_alpha"](_random_lora(cfg=CFG40))], include_patterns=["cross_attn"],
                exclude_patterns=["blocks_(0|1|2|3|4)_"])
    assert _changed(sd) == {f"blocks.{i}.cross_attn.{p}" for i in range(5, 40) for p in "qkvo"}


def test_spec_two_lora_example() -> None:
    """`--include_patterns "cross_attn" ".*" --exclude_patterns "dummy_do_not_exclude" "blocks_(0|1|2|3|4)"`.

    LoRA 1: cross-attention of every block. LoRA 2: everything except names containing blocks_0..blocks_4 — the
    pattern has no trailing `_`, so re.search also matches blocks_10..blocks_39 and only blocks 5-9 remain."""
    first, second = WRITERS["musubi"](_random_lora(cfg=CFG40, seed=1)), WRITERS["musubi"](_random_lora(cfg=CFG40))
    sd1, sd2 = _zero_sd(), _zero_sd()
    options = {"include_patterns": ["cross_attn", ".*"],
               "exclude_patterns": ["dummy_do_not_exclude", "blocks_(0|1|2|3|4)"]}
    r1, r2 = merge_loras(sd1, [first, second], [1.0, 0.0], **options)  # see each LoRA's effect alone
    merge_loras(sd2, [first, second], [0.0, 1.0], **options)
    assert _changed(sd1) == {f"blocks.{i}.cross_attn.{p}" for i in range(40) for p in "qkvo"}
    assert r1.matched == 160
    assert _changed(sd2) == set(_targets(num_layers=10)) - set(_targets(num_layers=5))
    assert r2.matched == 50


def test_filter_include_then_exclude() -> None:
    keep = inference_filter("cross_attn", "cross_attn_k")
    assert keep("blocks.9.cross_attn.q")
    assert not keep("blocks.9.cross_attn.k")  # matches both: dropped
    assert not keep("blocks.9.self_attn.q")  # include given, not matched
    assert inference_filter(None, None)("blocks.0.ffn.0")


# ----------------------------------------------------------------------------------------------------------------
# File conversion (musubi convert_lora.py semantics)
# ----------------------------------------------------------------------------------------------------------------

def _deltas(path: Path) -> dict[str, torch.Tensor]:
    return {m: a.delta() for m, a in load_lora(path).adapters.items()}


def test_convert_default_to_other_and_back(tmp_path: Path) -> None:
    lora = _random_lora("i2v")
    src = tmp_path / "musubi.safetensors"
    save_file(WRITERS["musubi"](lora), src, metadata={"ss_network_dim": "4", "sshs_model_hash": "stale"})
    other = tmp_path / "out" / "other.safetensors"
    convert_lora_file(src, other, "other")
    written = load_file(other)
    factor = math.sqrt(ALPHA / RANK)
    assert set(written) == {f"diffusion_model.{m}.lora_{ab}.weight" for m in lora for ab in "AB"}  # no alpha keys
    for m, (down, up) in lora.items():
        torch.testing.assert_close(written[f"diffusion_model.{m}.lora_A.weight"], down * factor, rtol=0, atol=0)
        torch.testing.assert_close(written[f"diffusion_model.{m}.lora_B.weight"], up * factor, rtol=0, atol=0)
    assert read_metadata(other)["ss_network_dim"] == "4"
    back = tmp_path / "back.safetensors"
    convert_lora_file(other, back, "default")
    restored = load_file(back)
    assert restored["lora_unet_blocks_1_cross_attn_k_img.alpha"].item() == RANK  # musubi: alpha = rank
    for path in (other, back):
        got = _deltas(path)
        for m, (down, up) in lora.items():
            torch.testing.assert_close(got[m], _ref_delta(down, up))
    assert read_metadata(back)["sshs_model_hash"] != "stale"
    names = sorted(p.name for p in tmp_path.rglob("*"))  # atomic writes leave no temporary files
    assert names == ["back.safetensors", "musubi.safetensors", "other.safetensors", "out"]


def test_convert_keep_alpha_is_bit_exact_and_prefixes(tmp_path: Path) -> None:
    lora = _random_lora()
    src = tmp_path / "musubi.safetensors"
    save_file(WRITERS["musubi"](lora), src)
    exact = tmp_path / "exact.safetensors"
    convert_lora_file(src, exact, "other", keep_alpha=True, diffusers_prefix="-")
    written = load_file(exact)
    down, up = lora["blocks.1.ffn.2"]
    assert torch.equal(written["blocks.1.ffn.2.lora_A.weight"], down)
    assert torch.equal(written["blocks.1.ffn.2.lora_B.weight"], up)
    assert written["blocks.1.ffn.2.alpha"].item() == ALPHA
    back = tmp_path / "back.safetensors"
    convert_lora_file(exact, back, "default")
    assert all(torch.equal(v, load_file(back)[k]) for k, v in load_file(src).items())  # round trip is bit-exact
    custom = tmp_path / "custom.safetensors"
    convert_lora_file(src, custom, "other", diffusers_prefix="my_model", adapter_name="default")
    assert "my_model.blocks.0.self_attn.q.lora_A.default.weight" in load_file(custom)
    again = tmp_path / "again.safetensors"
    convert_lora_file(custom, again, "default", diffusers_prefix="my_model")
    for m, delta in _deltas(again).items():
        torch.testing.assert_close(delta, _ref_delta(*lora[m]))


def test_convert_to_diffusers_and_back(tmp_path: Path) -> None:
    lora = _random_lora("i2v")
    src = tmp_path / "musubi.safetensors"
    save_file(WRITERS["musubi"](lora), src)
    out = tmp_path / "diffusers.safetensors"
    convert_lora_file(src, out, "diffusers")
    assert "transformer.blocks.1.attn2.add_k_proj.lora_A.weight" in load_file(out)
    back = tmp_path / "back.safetensors"
    convert_lora_file(out, back, "default")
    for m, delta in _deltas(back).items():
        torch.testing.assert_close(delta, _ref_delta(*lora[m]))


def test_convert_lycoris_keeps_tensors(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    file = {f"lora_unet_blocks_0_ffn_2.hada_{n}": torch.randn(*s, generator=gen)
            for n, s in (("w1_a", (64, 2)), ("w1_b", (2, 128)), ("w2_a", (64, 2)), ("w2_b", (2, 128)))}
    file["lora_unet_blocks_0_ffn_2.alpha"] = torch.tensor(1.0)
    src, out = tmp_path / "loha.safetensors", tmp_path / "loha_other.safetensors"
    save_file(file, src)
    convert_lora_file(src, out, "other")
    written = load_file(out)
    assert torch.equal(written["diffusion_model.blocks.0.ffn.2.hada_w1_a"], file["lora_unet_blocks_0_ffn_2.hada_w1_a"])
    assert written["diffusion_model.blocks.0.ffn.2.alpha"].item() == 1.0
    with pytest.raises(ValueError, match="diffusers format"):
        convert_lora_file(src, tmp_path / "x.safetensors", "diffusers")


def test_convert_errors(tmp_path: Path) -> None:
    src = tmp_path / "musubi.safetensors"
    save_file(WRITERS["musubi"](_random_lora()), src)
    with pytest.raises(ValueError, match="unknown LoRA format 'sideways'"):
        convert_lora_file(src, tmp_path / "o.safetensors", "sideways")
    with pytest.raises(FileNotFoundError):
        convert_lora_file(tmp_path / "nope.safetensors", tmp_path / "o.safetensors")
    junk = tmp_path / "junk.safetensors"
    save_file({"lora_te1_x.lora_down.weight": torch.zeros(2, 2)}, junk)
    with pytest.raises(ValueError, match="no LoRA module could be converted"):
        convert_lora_file(junk, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_sshs_hash_is_the_sha256_of_the_tensor_data(tmp_path: Path) -> None:
    src, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(WRITERS["comfyui_alpha"](_random_lora()), src)
    convert_lora_file(src, out, "default")
    raw = out.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert read_metadata(out)["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()
