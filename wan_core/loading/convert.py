"""Every foreign weight layout, as data: rename tables between the official Wan2.1 names (ours) and the
diffusers / transformers / open_clip names, applied by one small engine.

A rule pairs two full-key templates. `{n}` matches a block index (digits) and `{s}` the rest of the key (e.g.
`weight` or `bias`); both templates must use the same placeholders. Rules are anchored whole-key matches, so
their order never matters (the norm2/norm3 swap needs no placeholder trick). Keys that match no rule are an
error naming them: an unknown layout is never loaded half-way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache

import torch

from wan_core.loading.checkpoint import CheckpointError

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: str
    to_theirs: Transform | None = field(default=None, compare=False)
    to_ours: Transform | None = field(default=None, compare=False)


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[a-z]\})", template)
    groups = {"{n}": r"(?P<n>\d+)", "{m}": r"(?P<m>\d+)", "{s}": r"(?P<s>.+)"}
    return re.compile("^" + "".join(groups.get(p, re.escape(p)) for p in parts) + "$")


@cache
def _compiled(rules: tuple[Rule, ...], to_ours: bool) -> list[tuple[re.Pattern[str], Rule]]:
    return [(_pattern(r.theirs if to_ours else r.ours), r) for r in rules]


def rename(sd: Mapping[str, torch.Tensor], rules: Iterable[Rule], *, to_ours: bool, what: str,
           ignore: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Rename every key of `sd` through `rules` (foreign -> ours when `to_ours`, else ours -> foreign)."""
    names = renamed_keys(sd, rules, to_ours=to_ours, what=what, ignore=ignore)
    return {target: transform(sd[key]) if transform else sd[key] for target, (key, transform) in names.items()}


def renamed_keys(keys: Iterable[str], rules: Iterable[Rule], *, to_ours: bool, what: str,
                 ignore: Callable[[str], bool] | None = None) -> dict[str, tuple[str, Transform | None]]:
    """{new name: (key, the transform its value needs)} for every key not ignored (see `rename`)."""
    compiled = _compiled(tuple(rules), to_ours)
    out: dict[str, tuple[str, Transform | None]] = {}
    unknown: list[str] = []
    for key in keys:
        if ignore is not None and ignore(key):
            continue
        for pattern, rule in compiled:
            match = pattern.match(key)
            if match:
                target = rule.ours if to_ours else rule.theirs
                out[target.format(**match.groupdict())] = (key, rule.to_ours if to_ours else rule.to_theirs)
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise CheckpointError(f"unknown key layout for {what}: {len(unknown)} key(s) match no known format, e.g. "
                              f"{', '.join(unknown[:5])}{more}")
    return out


def _same(*templates: str) -> list[Rule]:
    return [Rule(t, t) for t in templates]



# ----------------------------------------------------------------------------------------------------------------
# DiT: official <-> diffusers WanTransformer3DModel
# ----------------------------------------------------------------------------------------------------------------

_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}
DIT_DIFFUSERS: tuple[Rule, ...] = (
    *_same("patch_embedding.{s}"),
    Rule("text_embedding.0.{s}", "condition_embedder.text_embedder.linear_1.{s}"),
    Rule("text_embedding.2.{s}", "condition_embedder.text_embedder.linear_2.{s}"),
    Rule("time_embedding.0.{s}", "condition_embedder.time_embedder.linear_1.{s}"),
    Rule("time_embedding.2.{s}", "condition_embedder.time_embedder.linear_2.{s}"),
    Rule("time_projection.1.{s}", "condition_embedder.time_proj.{s}"),
    Rule("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    *(Rule(f"blocks.{{n}}.self_attn.{a}.{{s}}", f"blocks.{{n}}.attn1.{b}.{{s}}") for a, b in _ATTN.items()),
    *(Rule(f"blocks.{{n}}.cross_attn.{a}.{{s}}", f"blocks.{{n}}.attn2.{b}.{{s}}") for a, b in _ATTN.items()),
    Rule("blocks.{n}.cross_attn.k_img.{s}", "blocks.{n}.attn2.add_k_proj.{s}"),
    Rule("blocks.{n}.cross_attn.v_img.{s}", "blocks.{n}.attn2.add_v_proj.{s}"),
    Rule("blocks.{n}.cross_attn.norm_k_img.{s}", "blocks.{n}.attn2.norm_added_k.{s}"),
    Rule("blocks.{n}.norm3.{s}", "blocks.{n}.norm2.{s}"),  # affine LayerNorm before cross-attention
    Rule("blocks.{n}.ffn.0.{s}", "blocks.{n}.ffn.net.0.proj.{s}"),
    Rule("blocks.{n}.ffn.2.{s}", "blocks.{n}.ffn.net.2.{s}"),
    Rule("head.head.{s}", "proj_out.{s}"),
    Rule("head.modulation", "scale_shift_table"),
    Rule("img_emb.proj.0.{s}", "condition_embedder.image_embedder.norm1.{s}"),
    Rule("img_emb.proj.1.{s}", "condition_embedder.image_embedder.ff.net.0.proj.{s}"),
    Rule("img_emb.proj.3.{s}", "condition_embedder.image_embedder.ff.net.2.{s}"),
    Rule("img_emb.proj.4.{s}", "condition_embedder.image_embedder.norm2.{s}"),
    Rule("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
)
DIT_DIFFUSERS_SENTINEL = "condition_embedder.time_proj.weight"


# ----------------------------------------------------------------------------------------------------------------
# VAE: official (= ComfyUI) <-> diffusers AutoencoderKLWan
# ----------------------------------------------------------------------------------------------------------------

_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.{s}": "conv1.{s}", "residual.3.gamma": "norm2.gamma",
             "residual.6.{s}": "conv2.{s}", "shortcut.{s}": "conv_shortcut.{s}"}


def _residual_rules(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}.{a}", f"{theirs}.{b}") for a, b in _RESIDUAL.items()]


@cache
def vae_diffusers_rules(num_res_blocks: int = 2, num_levels: int = 4) -> tuple[Rule, ...]:
    rules = [Rule("encoder.conv1.{s}", "encoder.conv_in.{s}"), Rule("decoder.conv1.{s}", "decoder.conv_in.{s}"),
             Rule("conv1.{s}", "quant_conv.{s}"), Rule("conv2.{s}", "post_quant_conv.{s}")]
    for part in ("encoder", "decoder"):
        rules += _residual_rules(f"{part}.middle.0", f"{part}.mid_block.resnets.0")
        rules += _residual_rules(f"{part}.middle.2", f"{part}.mid_block.resnets.1")
        rules += [Rule(f"{part}.middle.1.{a}", f"{part}.mid_block.attentions.0.{a}")
                  for a in ("norm.gamma", "to_qkv.{s}", "proj.{s}")]
        rules += [Rule(f"{part}.head.0.gamma", f"{part}.norm_out.gamma"),
                  Rule(f"{part}.head.2.{{s}}", f"{part}.conv_out.{{s}}")]
    # the encoder keeps its flat index; resample convs keep their names
    rules += _residual_rules("encoder.downsamples.{n}", "encoder.down_blocks.{n}")
    rules += [Rule("encoder.downsamples.{n}.resample.1.{s}", "encoder.down_blocks.{n}.resample.1.{s}"),
              Rule("encoder.downsamples.{n}.time_conv.{s}", "encoder.down_blocks.{n}.time_conv.{s}")]
    flat = 0
    for level in range(num_levels):  # decoder.upsamples is a flat list; diffusers groups it per level
        for r in range(num_res_blocks + 1):
            rules += _residual_rules(f"decoder.upsamples.{flat}", f"decoder.up_blocks.{level}.resnets.{r}")
            flat += 1
        if level < num_levels - 1:
            rules += [Rule(f"decoder.upsamples.{flat}.{a}.{{s}}", f"decoder.up_blocks.{level}.upsamplers.0.{a}.{{s}}")
                      for a in ("resample.1", "time_conv")]
            flat += 1
    return tuple(rules)


@cache
def vae22_diffusers_rules(num_res_blocks: int = 2, num_levels: int = 4) -> tuple[Rule, ...]:
    """The Wan2.2 (residual) VAE: official `encoder.downsamples.{level}.downsamples.{i}` / `decoder.upsamples.{level}
    .upsamples.{i}` (residual blocks, then the Resample last) <-> diffusers `down_blocks.{level}.resnets.{i}` /
    `.downsampler`, `up_blocks.{level}.resnets.{i}` / `.upsampler`. The AvgDown3D / DupUp3D shortcuts have no
    weights."""
    rules = [r for r in vae_diffusers_rules(num_res_blocks, num_levels)
             if not r.ours.startswith(("encoder.downsamples.", "decoder.upsamples."))]
    parts = (("encoder.downsamples", "encoder.down_blocks", num_res_blocks, "downsampler"),
             ("decoder.upsamples", "decoder.up_blocks", num_res_blocks + 1, "upsampler"))
    for ours, theirs, blocks, resample in parts:
        inner = ours.split(".")[1]
        rules += _residual_rules(f"{ours}.{{n}}.{inner}.{{m}}", f"{theirs}.{{n}}.resnets.{{m}}")
        rules += [Rule(f"{ours}.{{n}}.{inner}.{blocks}.{a}.{{s}}", f"{theirs}.{{n}}.{resample}.{a}.{{s}}")
                  for a in ("resample.1", "time_conv")]
    return tuple(rules)


VAE_DIFFUSERS_SENTINEL = "decoder.conv_in.weight"


# ----------------------------------------------------------------------------------------------------------------
# umT5 encoder: official .pth <-> HF UMT5EncoderModel (= ComfyUI umt5_xxl_*.safetensors)
# ----------------------------------------------------------------------------------------------------------------

_T5_LAYER = "encoder.block.{n}.layer"
T5_HF: tuple[Rule, ...] = (
    Rule("token_embedding.weight", "shared.weight"),
    Rule("blocks.{n}.norm1.weight", f"{_T5_LAYER}.0.layer_norm.weight"),
    *(Rule(f"blocks.{{n}}.attn.{p}.weight", f"{_T5_LAYER}.0.SelfAttention.{p}.weight") for p in "qkvo"),
    Rule("blocks.{n}.pos_embedding.embedding.weight", f"{_T5_LAYER}.0.SelfAttention.relative_attention_bias.weight"),
    Rule("blocks.{n}.norm2.weight", f"{_T5_LAYER}.1.layer_norm.weight"),
    Rule("blocks.{n}.ffn.gate.0.weight", f"{_T5_LAYER}.1.DenseReluDense.wi_0.weight"),
    Rule("blocks.{n}.ffn.fc1.weight", f"{_T5_LAYER}.1.DenseReluDense.wi_1.weight"),
    Rule("blocks.{n}.ffn.fc2.weight", f"{_T5_LAYER}.1.DenseReluDense.wo.weight"),
    Rule("norm.weight", "encoder.final_layer_norm.weight"),
)
T5_HF_SENTINEL = "encoder.final_layer_norm.weight"
T5_HF_EXTRA = ("encoder.embed_tokens.weight", "spiece_model")  # tied copy of shared.weight; ComfyUI tokenizer


# ----------------------------------------------------------------------------------------------------------------
# CLIP ViT-H/14 visual: official Wan (`visual.` prefix stripped) <-> HF CLIPVisionModel <-> open_clip `visual.`
# q/k/v are stacked in `to_qkv` (ours, open_clip) and split in HF.
# ----------------------------------------------------------------------------------------------------------------

_HF_VM = "vision_model"
CLIP_HF: tuple[Rule, ...] = (
    Rule("patch_embedding.weight", f"{_HF_VM}.embeddings.patch_embedding.weight"),
    Rule("cls_embedding", f"{_HF_VM}.embeddings.class_embedding",
         to_theirs=lambda t: t.reshape(-1), to_ours=lambda t: t.reshape(1, 1, -1)),
    Rule("pos_embedding", f"{_HF_VM}.embeddings.position_embedding.weight",
         to_theirs=lambda t: t.reshape(t.shape[-2], t.shape[-1]), to_ours=lambda t: t.unsqueeze(0)),
    Rule("pre_norm.{s}", f"{_HF_VM}.pre_layrnorm.{{s}}"),
    Rule("transformer.{n}.norm1.{s}", f"{_HF_VM}.encoder.layers.{{n}}.layer_norm1.{{s}}"),
    Rule("transformer.{n}.norm2.{s}", f"{_HF_VM}.encoder.layers.{{n}}.layer_norm2.{{s}}"),
    Rule("transformer.{n}.attn.proj.{s}", f"{_HF_VM}.encoder.layers.{{n}}.self_attn.out_proj.{{s}}"),
    Rule("transformer.{n}.mlp.0.{s}", f"{_HF_VM}.encoder.layers.{{n}}.mlp.fc1.{{s}}"),
    Rule("transformer.{n}.mlp.2.{s}", f"{_HF_VM}.encoder.layers.{{n}}.mlp.fc2.{{s}}"),
    Rule("post_norm.{s}", f"{_HF_VM}.post_layernorm.{{s}}"),
    Rule("head", "visual_projection.weight", to_theirs=lambda t: t.t().contiguous(),
         to_ours=lambda t: t.t().contiguous()),
)
CLIP_OPEN_CLIP: tuple[Rule, ...] = (
    Rule("patch_embedding.weight", "conv1.weight"),
    Rule("cls_embedding", "class_embedding", to_theirs=lambda t: t.reshape(-1), to_ours=lambda t: t.reshape(1, 1, -1)),
    Rule("pos_embedding", "positional_embedding", to_theirs=lambda t: t.reshape(t.shape[-2], t.shape[-1]),
         to_ours=lambda t: t.unsqueeze(0)),
    Rule("pre_norm.{s}", "ln_pre.{s}"),
    Rule("transformer.{n}.norm1.{s}", "transformer.resblocks.{n}.ln_1.{s}"),
    Rule("transformer.{n}.norm2.{s}", "transformer.resblocks.{n}.ln_2.{s}"),
    Rule("transformer.{n}.attn.to_qkv.weight", "transformer.resblocks.{n}.attn.in_proj_weight"),
    Rule("transformer.{n}.attn.to_qkv.bias", "transformer.resblocks.{n}.attn.in_proj_bias"),
    Rule("transformer.{n}.attn.proj.{s}", "transformer.resblocks.{n}.attn.out_proj.{s}"),
    Rule("transformer.{n}.mlp.0.{s}", "transformer.resblocks.{n}.mlp.c_fc.{s}"),
    Rule("transformer.{n}.mlp.2.{s}", "transformer.resblocks.{n}.mlp.c_proj.{s}"),
    Rule("post_norm.{s}", "ln_post.{s}"),
    Rule("head", "proj"),
)
CLIP_HF_SENTINEL = f"{_HF_VM}.embeddings.class_embedding"
CLIP_OPEN_CLIP_SENTINEL = "class_embedding"
_QKV_HF = re.compile(rf"^{_HF_VM}\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def clip_hf_to_ours(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPVisionModel(WithProjection) keys -> ours; q/k/v projections are stacked into `to_qkv`."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in sd.items():
        match = _QKV_HF.match(key)
        if match:
            parts.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            rest[key] = value
    out = rename(rest, CLIP_HF, to_ours=True, what="CLIP vision (HF layout)",
                 ignore=lambda k: k.endswith("position_ids"))
    for (layer, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise CheckpointError(f"CLIP layer {layer}: incomplete q/k/v projections ({sorted(qkv)})")
        out[f"transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def clip_ours_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    qkv = {k: v for k, v in sd.items() if ".attn.to_qkv." in k}
    out = rename({k: v for k, v in sd.items() if k not in qkv}, CLIP_HF, to_ours=False, what="CLIP vision (ours)")
    for key, value in qkv.items():
        layer, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        for name, chunk in zip("qkv", value.chunk(3)):
            out[f"{_HF_VM}.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = chunk
    return out


# ----------------------------------------------------------------------------------------------------------------
# LoRA module names. A LoRA targets a Linear layer by its
# module name: official dotted names are canonical (`blocks.9.cross_attn.k`). sd-scripts/musubi write
# `lora_unet_` + the name with every "." replaced by "_" (ComfyUI maps model key `diffusion_model.<k>.weight` the
# same way); ComfyUI / diffusion-pipe / musubi `convert_lora --target other` write `diffusion_model.<name>`;
# diffusers writes `transformer.<diffusers name>` (the inverse of DIT_DIFFUSERS). Used by wan_core.lora.formats.
# ----------------------------------------------------------------------------------------------------------------

# Every Linear of WanAttentionBlock (musubi's training targets; k_img/v_img exist on image models only) ...
LORA_BLOCK_LINEARS: tuple[str, ...] = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
    "ffn.0", "ffn.2",
)
# ... and the other Linear layers of WanModel, which some trainers also adapt.
LORA_OTHER_LINEARS: tuple[str, ...] = (
    "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
    "head.head", "img_emb.proj.1", "img_emb.proj.3",
)
LORA_MODULE_TEMPLATES: tuple[str, ...] = (*(f"blocks.{{n}}.{m}" for m in LORA_BLOCK_LINEARS), *LORA_OTHER_LINEARS)

KOHYA_LORA_PREFIX = "lora_unet_"
COMFYUI_LORA_PREFIX = "diffusion_model"
DIFFUSERS_LORA_PREFIX = "transformer"

# official module name <-> sd-scripts name; the table removes the "_" ambiguity (self_attn, k_img, ...) when no
# model is at hand (file conversion). With a model, wan_core.lora.formats resolves against its real module list.
LORA_KOHYA: tuple[Rule, ...] = tuple(Rule(t, KOHYA_LORA_PREFIX + t.replace(".", "_")) for t in LORA_MODULE_TEMPLATES)

# Prefixes in front of module names seen in LoRA files (most specific first): ComfyUI, PEFT-wrapped, DiffSynth.
LORA_KNOWN_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.", "base_model.model.",
                                        "transformer.", "pipe.dit.", "dit.")
# sd-scripts-style prefixes: musubi, Wan-Fun / VideoX-Fun (double underscore, ComfyUI's convert_lora_wan_fun),
# LyCORIS / older ai-toolkit.
LORA_UNDERSCORE_PREFIXES: tuple[str, ...] = ("lora_unet__", "lora_unet_", "lycoris_")

# Key suffix -> (role, algorithm). `lora_A.<adapter>.weight` (PEFT adapter names) is handled by LORA_PEFT_SUFFIX.
LORA_ROLE_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_down.weight", "down", "lora"), (".lora_up.weight", "up", "lora"),
    (".lora_A.weight", "down", "lora"), (".lora_B.weight", "up", "lora"),
    ("_lora.down.weight", "down", "lora"), ("_lora.up.weight", "up", "lora"),
    (".lora.down.weight", "down", "lora"), (".lora.up.weight", "up", "lora"),
    (".hada_w1_a", "w1_a", "loha"), (".hada_w1_b", "w1_b", "loha"),
    (".hada_w2_a", "w2_a", "loha"), (".hada_w2_b", "w2_b", "loha"),
    (".lokr_w1", "w1", "lokr"), (".lokr_w1_a", "w1_a", "lokr"), (".lokr_w1_b", "w1_b", "lokr"),
    (".lokr_w2", "w2", "lokr"), (".lokr_w2_a", "w2_a", "lokr"), (".lokr_w2_b", "w2_b", "lokr"),
    (".alpha", "alpha", ""),
)
LORA_PEFT_SUFFIX = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[A-Za-z0-9_-]+)\.weight$")

# Role -> key suffix when writing each format.
LORA_WRITE_SUFFIXES: dict[str, dict[str, str]] = {
    "musubi": {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"},
    "comfyui": {"down": ".lora_A.weight", "up": ".lora_B.weight", "alpha": ".alpha"},
    "diffusers": {"down": ".lora_A.weight", "up": ".lora_B.weight", "alpha": ".alpha"},
}
LYCORIS_WRITE_SUFFIXES: dict[str, dict[str, str]] = {
    "loha": {"w1_a": ".hada_w1_a", "w1_b": ".hada_w1_b", "w2_a": ".hada_w2_a", "w2_b": ".hada_w2_b",
             "alpha": ".alpha"},
    "lokr": {"w1": ".lokr_w1", "w1_a": ".lokr_w1_a", "w1_b": ".lokr_w1_b", "w2": ".lokr_w2", "w2_a": ".lokr_w2_a",
             "w2_b": ".lokr_w2_b", "alpha": ".alpha"},
}


def rename_one(key: str, rules: Iterable[Rule], *, to_ours: bool) -> str | None:
    """Rename a single key through `rules` (see `rename`); None when no rule matches."""
    for pattern, rule in _compiled(tuple(rules), to_ours):
        match = pattern.match(key)
        if match:
            return (rule.ours if to_ours else rule.theirs).format(**match.groupdict())
    return None


def kohya_lora_name(module: str) -> str:
    """`blocks.9.cross_attn.k` -> `lora_unet_blocks_9_cross_attn_k` (the name include/exclude patterns search)."""
    return KOHYA_LORA_PREFIX + module.replace(".", "_")


def module_from_kohya(name: str) -> str | None:
    """`lora_unet_blocks_9_cross_attn_k` -> `blocks.9.cross_attn.k` through the Wan table (None if unknown)."""
    return rename_one(name, LORA_KOHYA, to_ours=True)


def module_from_diffusers(name: str) -> str | None:
    """diffusers module name (`blocks.0.attn1.to_q`) -> official (`blocks.0.self_attn.q`), via DIT_DIFFUSERS."""
    official = rename_one(f"{name}.weight", DIT_DIFFUSERS, to_ours=True)
    return official[: -len(".weight")] if official and official.endswith(".weight") else None


def module_to_diffusers(module: str) -> str | None:
    """official module name -> diffusers module name (None when diffusers has no such layer)."""
    theirs = rename_one(f"{module}.weight", DIT_DIFFUSERS, to_ours=False)
    return theirs[: -len(".weight")] if theirs and theirs.endswith(".weight") else None


def is_wan_lora_module(module: str) -> bool:
    """Whether `module` is a Linear layer name of some Wan2.1 DiT (block index free)."""
    return rename_one(module, LORA_KOHYA, to_ours=False) is not None
