"""Full-parameter LoRA patches (`.diff`, `.diff_b`, `.set_weight`), DoRA `.dora_scale`, and the key layouts of the
distilled few-step LoRAs (lightx2v, CausVid) that use them: every key must load, and the merged weights must equal
an independent float64 computation; the unmerged path must give the merged model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.numerics import assert_float32_parity
from tests.test_lora_formats import BLOCK_LINEARS, _model, _run, _run64
from tests.tiny import TINY_DIT_BY_TYPE
from wan_core.lora.apply import LoRAModule, apply_loras, linear_modules, merge_loras
from wan_core.lora.formats import lora_state_dict, parse_lora

EPS32 = torch.finfo(torch.float32).eps
RANK, ALPHA, STRENGTH = 4, 3.0, 0.7
CFG = TINY_DIT_BY_TYPE["t2v"]
# Official Wan DiT names (models.md), restated here: the Linear layers outside the blocks, the norms with weights,
# and the bare parameters that ComfyUI addresses only as `diffusion_model.<name>`.
OTHER_LINEARS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
                 "head.head")
BLOCK_NORMS = ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "norm3")
BARE = ("head.modulation", *(f"blocks.{i}.modulation" for i in range(CFG.num_layers)))


def _linears() -> list[str]:
    return [f"blocks.{i}.{m}" for i in range(CFG.num_layers) for m in BLOCK_LINEARS] + list(OTHER_LINEARS)


def _norms() -> list[str]:
    return [f"blocks.{i}.{m}" for i in range(CFG.num_layers) for m in BLOCK_NORMS]


def _distill_file(prefix: str, model: torch.nn.Module, seed: int = 0, bare: bool = True) -> dict[str, torch.Tensor]:
    """A lightx2v / CausVid style file: LoRA + `.diff_b` on every Linear, `.diff` on every norm weight, `.diff_b`
    on norm3, and (for `diffusion_model.` files) `.diff` on the modulation parameters."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())

    def name(module: str) -> str:
        return "lora_unet_" + module.replace(".", "_") if prefix == "lora_unet_" else prefix + module

    sd: dict[str, torch.Tensor] = {}
    for module in _linears():
        out_f, in_f = params[f"{module}.weight"].shape
        sd[f"{name(module)}.lora_down.weight"] = torch.randn(RANK, in_f, generator=gen) * 0.2
        sd[f"{name(module)}.lora_up.weight"] = torch.randn(out_f, RANK, generator=gen) * 0.2
        sd[f"{name(module)}.alpha"] = torch.tensor(ALPHA)
        sd[f"{name(module)}.diff_b"] = torch.randn(out_f, generator=gen) * 0.1
    for module in _norms():
        sd[f"{name(module)}.diff"] = torch.randn(params[f"{module}.weight"].shape, generator=gen) * 0.1
    for i in range(CFG.num_layers):
        sd[f"{name(f'blocks.{i}.norm3')}.diff_b"] = torch.randn(CFG.dim, generator=gen) * 0.1
    if bare:
        for param in BARE:
            sd[f"{prefix}{param}.diff"] = torch.randn(params[param].shape, generator=gen) * 0.1
    return sd


def _expected(model: torch.nn.Module, sd: dict[str, torch.Tensor], prefix: str, strength: float,
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Official parameter name -> (float64 merged value, float32 rounding-error bound of the merge)."""
    params = {n: p.detach().double() for n, p in model.named_parameters()}

    def key(module: str) -> str:
        return "lora_unet_" + module.replace(".", "_") if prefix == "lora_unet_" else prefix + module

    out = {}
    for module in _linears():
        down, up = sd[f"{key(module)}.lora_down.weight"].double(), sd[f"{key(module)}.lora_up.weight"].double()
        weight = params[f"{module}.weight"]
        delta = up @ down * (ALPHA / RANK)
        magnitude = weight.abs() + abs(strength) * (up.abs() @ down.abs()) * (ALPHA / RANK)
        out[f"{module}.weight"] = (weight + strength * delta, 2 * (RANK + 2) * EPS32 * magnitude)
        bias = params[f"{module}.bias"]
        diff = sd[f"{key(module)}.diff_b"].double()
        out[f"{module}.bias"] = (bias + strength * diff, 2 * EPS32 * (bias.abs() + abs(strength) * diff.abs()))
    for name, suffix in [(f"{m}.weight", f"{key(m)}.diff") for m in _norms()] + \
            [(f"blocks.{i}.norm3.bias", f"{key(f'blocks.{i}.norm3')}.diff_b") for i in range(CFG.num_layers)] + \
            [(p, f"{prefix}{p}.diff") for p in BARE if f"{prefix}{p}.diff" in sd]:
        value, diff = params[name], sd[suffix].double()
        out[name] = (value + strength * diff, 2 * EPS32 * (value.abs() + abs(strength) * diff.abs()))
    return out


@pytest.mark.parametrize("prefix", ["diffusion_model.", "lora_unet_"])
def test_distill_layouts_load_every_key_and_merge_exactly(prefix: str) -> None:
    model = _model()
    sd = _distill_file(prefix, model, bare=prefix == "diffusion_model.")
    expected = _expected(model, sd, prefix, STRENGTH)
    parsed = parse_lora(sd, linear_modules(model), params=dict(model.named_parameters()))
    assert parsed.unmatched == ()
    assert parse_lora(sd).unmatched == ()  # the same without a model, through the Wan name table
    (report,) = merge_loras(model, [sd], [STRENGTH])
    assert report.unmatched == () and report.filtered == ()
    assert len(parsed.adapters) == len(_linears())
    assert report.matched == len(parsed.adapters) + len(parsed.params) == len(expected)  # one per parameter
    merged = dict(model.named_parameters())
    for name, (value, bound) in expected.items():
        err = (merged[name].double() - value).abs()
        assert bool((err <= bound).all()), f"{name}: max error {err.max():.3g} exceeds the float32 bound"


def _dora_reference(weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, strength: float) -> torch.Tensor:
    """Weight-decomposed LoRA as ComfyUI merges it (float64): W' = (W + ΔW)·scale/(‖·‖ + eps32), where a [1, in]
    scale normalises each column of W + ΔW and an [out, 1] scale each row of the base W; W + m·(W' − W)."""
    combined = weight + delta
    if scale.shape[0] == weight.shape[0]:
        norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    else:
        norm = torch.linalg.vector_norm(combined, dim=0, keepdim=True)
    return weight + strength * (combined * scale / (norm + EPS32) - weight)


def _dora_file(module: str, shape: tuple[int, int], axis: str, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    scale_shape = (1, in_f) if axis == "in" else (out_f, 1)
    return {f"diffusion_model.{module}.lora_down.weight": torch.randn(RANK, in_f, generator=gen) * 0.2,
            f"diffusion_model.{module}.lora_up.weight": torch.randn(out_f, RANK, generator=gen) * 0.2,
            f"diffusion_model.{module}.alpha": torch.tensor(ALPHA),
            f"diffusion_model.{module}.dora_scale": torch.rand(scale_shape, generator=gen) + 0.5}


@pytest.mark.parametrize("axis", ["in", "out"])
@pytest.mark.parametrize("strength", [1.0, STRENGTH])
def test_dora_merge_matches_float64(axis: str, strength: float) -> None:
    model = _model()
    module = "blocks.0.ffn.0"
    weight = model.get_submodule(module).weight
    sd = _dora_file(module, tuple(weight.shape), axis)
    base = weight.detach().double().clone()
    down, up = sd[f"diffusion_model.{module}.lora_down.weight"], sd[f"diffusion_model.{module}.lora_up.weight"]
    scale = sd[f"diffusion_model.{module}.dora_scale"].double()
    expected = _dora_reference(base, up.double() @ down.double() * (ALPHA / RANK), scale, strength)
    (report,) = merge_loras(model, [sd], [strength])
    assert report.unmatched == () and report.matched == 1
    # float32 norms over `in` (or `out`) elements and a rank-RANK product: relative error ≲ (length + RANK)·eps
    length = max(weight.shape)
    bound = 4 * (length + RANK) * EPS32 * (base.abs() + abs(strength) * (expected.abs() + base.abs()))
    err = (weight.detach().double() - expected).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}"
    assert not torch.allclose(expected, base)  # the adapter changes the weight


def _kind_file(kind: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ffn = model.get_submodule("blocks.0.ffn.0").weight
    if kind.startswith("dora"):
        return _dora_file("blocks.0.ffn.0", tuple(ffn.shape), kind.split("_")[1])
    key, shape = {"diff_linear": ("diffusion_model.blocks.0.ffn.0.diff", ffn.shape),
                  "diff_b": ("diffusion_model.blocks.0.self_attn.o.diff_b", (CFG.dim,)),
                  "norm_diff": ("lora_unet_blocks_1_cross_attn_norm_k.diff", (CFG.dim,)),
                  "norm3_diff_b": ("lora_unet_blocks_0_norm3.diff_b", (CFG.dim,)),
                  "modulation_diff": ("diffusion_model.head.modulation.diff", (1, 2, CFG.dim)),
                  "set_weight_linear": ("diffusion_model.blocks.1.cross_attn.q.set_weight", (CFG.dim, CFG.dim)),
                  "set_weight_norm": ("diffusion_model.blocks.0.norm3.set_weight", (CFG.dim,))}[kind]
    return {key: torch.randn(shape, generator=gen) * 0.3}


KINDS = ["diff_linear", "diff_b", "norm_diff", "norm3_diff_b", "modulation_diff", "set_weight_linear",
         "set_weight_norm", "dora_in", "dora_out"]


@pytest.mark.parametrize("kind", KINDS)
def test_unmerged_equals_merged(kind: str) -> None:
    model = _model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _run(model)
    sd = _kind_file(kind, model)
    merged = copy.deepcopy(model)
    (report,) = merge_loras(merged, [sd], [STRENGTH])
    assert report.unmatched == () and report.matched == 1
    expected, exact = _run(merged), _run64(merged)
    assert not torch.allclose(expected, before)  # the patch changes the output
    handle = apply_loras(model, [sd], [STRENGTH])
    assert handle.reports[0].unmatched == ()
    assert_float32_parity(_run(model), expected, exact)
    handle.set_multiplier(0.0)
    assert_float32_parity(_run(model), before, _run64(model))
    handle.set_multiplier(STRENGTH)
    assert_float32_parity(_run(model), expected, exact)
    handle.remove()
    for name, param in model.named_parameters():
        assert torch.equal(param, original[name]), name


def test_set_weight_replaces_the_parameter_whatever_the_strength() -> None:
    model = _model()
    value = torch.randn(CFG.dim, CFG.dim)
    merge_loras(model, [{"diffusion_model.blocks.1.cross_attn.q.set_weight": value}], [0.3])
    assert torch.equal(model.get_submodule("blocks.1.cross_attn.q").weight, value)


def test_full_patches_and_dora_round_trip_through_the_comfyui_writer() -> None:
    model = _model()
    sd = _distill_file("diffusion_model.", model)
    sd["diffusion_model.blocks.0.ffn.2.dora_scale"] = torch.rand(1, CFG.ffn_dim) + 0.5
    parsed = parse_lora(sd)
    written = lora_state_dict(parsed, "comfyui", keep_alpha=True)
    patches = [k for k in sd if k.endswith((".diff", ".diff_b", ".dora_scale"))]
    assert len(patches) > 40
    for key in patches:
        assert torch.equal(written[key], sd[key]), key
    assert parse_lora(written).unmatched == ()


def test_state_dict_merge_equals_model_merge() -> None:
    model = _model()
    sd_file = _distill_file("diffusion_model.", model) | {
        "diffusion_model.blocks.1.ffn.0.dora_scale": torch.rand(1, CFG.dim) + 0.5}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (report,) = merge_loras(state, [sd_file], [STRENGTH])
    assert report.unmatched == ()
    merge_loras(model, [sd_file], [STRENGTH])
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_fp8_storage_is_refused_with_a_clear_message() -> None:
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 1 else v for k, v in _model().state_dict().items()}
    with pytest.raises(ValueError, match="blocks.0.norm3.weight is stored as torch.float8_e4m3fn"):
        merge_loras(fp8, [{"diffusion_model.blocks.0.norm3.diff": torch.ones(CFG.dim)}])
    model = _model()
    with torch.no_grad():
        model.blocks[0].norm3.weight.data = model.blocks[0].norm3.weight.data.to(torch.float8_e4m3fn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mixed = {"diffusion_model.blocks.0.norm3.diff": torch.ones(CFG.dim),
             "diffusion_model.blocks.0.norm3.diff_b": torch.ones(CFG.dim),
             "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.ones(RANK, CFG.dim),
             "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.ones(CFG.ffn_dim, RANK)}
    with pytest.raises(ValueError, match="merge before quantising to fp8"):
        apply_loras(model, [mixed])
    assert not any(isinstance(m, LoRAModule) for m in model.modules())  # nothing half-applied stays
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
