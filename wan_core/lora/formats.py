"""LoRA files in every format seen for Wan2.1, read into one canonical form and written back out.

Canonical form: a `LoRA` maps official dotted module names (`blocks.9.cross_attn.k`) to an adapter:

- `LowRank`: down [r, in], up [out, r], alpha (None = rank)   ΔW = up @ down · alpha / r
- `LoHa` (LyCORIS): hada_w1_a [out, r], hada_w1_b [r, in], hada_w2_a, hada_w2_b, alpha
                                                              ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r
- `LoKr` (LyCORIS): lokr_w1 or lokr_w1_a @ lokr_w1_b, lokr_w2 or lokr_w2_a @ lokr_w2_b, alpha
                                                              ΔW = kron(w1, w2) · alpha / r  (1 if both are full)
- any of the three with `dora_scale` (DoRA, `.dora_scale`): the merged weight is renormalised (`weight_delta`).

Full-parameter patches, by official parameter name (`LoRA.params`), as ComfyUI's loader reads them: `FullDiff` from
`.diff` / `.w_norm` (the module's weight, or the named parameter itself such as `head.modulation`) and `.diff_b` /
`.b_norm` (its bias); `SetWeight` from `.set_weight`. The step/CFG-distilled LoRAs (lightx2v, CausVid) use them on
norms (norm_q, norm_k, norm3), biases, the head and its modulation.

Accepted layouts: musubi / sd-scripts `lora_unet_blocks_9_cross_attn_k.lora_down
.weight`; Wan-Fun `lora_unet__…`; LyCORIS `lycoris_…`; ComfyUI / diffusion-pipe / musubi `convert_lora --target
other` `diffusion_model.blocks.9.cross_attn.k.lora_A.weight` (or `.lora_down/.lora_up`, with or without `.alpha`);
diffusers `transformer.blocks.9.attn2.to_k.lora_A.weight`; PEFT `base_model.model.…lora_A.default.weight` and bare
`blocks.…` keys (official or diffusers names). The underscore names are resolved against the model's real module
list when one is given (else against the Wan table in wan_core.loading.convert), so `self_attn` / `k_img` never split.
Keys that cannot be used are returned in `LoRA.unmatched` and logged by name, never dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import safetensors.torch
import torch

from wan_core.loading.checkpoint import load_state_dict, read_metadata, require_finite, save_safetensors
from wan_core.loading.convert import (
    COMFYUI_LORA_PREFIX,
    DIFFUSERS_LORA_PREFIX,
    KOHYA_LORA_PREFIX,
    LORA_KNOWN_PREFIXES,
    LORA_MODULE_TEMPLATES,
    LORA_PEFT_SUFFIX,
    LORA_ROLE_SUFFIXES,
    LORA_UNDERSCORE_PREFIXES,
    LORA_WRITE_SUFFIXES,
    LYCORIS_WRITE_SUFFIXES,
    is_wan_lora_module,
    kohya_lora_name,
    module_from_diffusers,
    module_from_kohya,
    module_to_diffusers,
)

logger = logging.getLogger(__name__)

FORMATS = ("musubi", "comfyui", "diffusers")
_FORMAT_ALIASES = {"default": "musubi", "other": "comfyui", "musubi": "musubi", "comfyui": "comfyui",
                   "diffusers": "diffusers"}
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash")


# ----------------------------------------------------------------------------------------------------------------
# Adapters (canonical, per module)
# ----------------------------------------------------------------------------------------------------------------

def _scale(alpha: float | None, rank: int) -> float:
    return 1.0 if alpha is None else alpha / rank


def _matrix(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {list(t.shape)} (conv LoRAs are not supported)")


@dataclass(frozen=True, eq=False)
class LowRank:
    """Classic LoRA: ΔW = up @ down · alpha / rank."""

    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None  # DoRA magnitude, [1, in] or [out, 1]
    kind: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        _matrix("lora down", self.down)
        _matrix("lora up", self.up)
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"lora up {list(self.up.shape)} and down {list(self.down.shape)} have different ranks")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def delta(self) -> torch.Tensor:
        """ΔW [out, in] in float32."""
        return (self.up.float() @ self.down.float()) * self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"down": self.down, "up": self.up}


@dataclass(frozen=True, eq=False)
class LoHa:
    """LyCORIS LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank, rank = w1_b.shape[0]."""

    w1_a: torch.Tensor  # [out, r]
    w1_b: torch.Tensor  # [r, in]
    w2_a: torch.Tensor  # [out, r]
    w2_b: torch.Tensor  # [r, in]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    kind: ClassVar[str] = "loha"

    def __post_init__(self) -> None:
        for name in ("w1_a", "w1_b", "w2_a", "w2_b"):
            _matrix(f"hada_{name}", getattr(self, name))
        first = (self.w1_a.shape[0], self.w1_b.shape[1])
        if first != (self.w2_a.shape[0], self.w2_b.shape[1]) or self.w1_a.shape[1] != self.w1_b.shape[0] \
                or self.w2_a.shape[1] != self.w2_b.shape[0]:
            raise ValueError(f"inconsistent LoHa shapes: w1_a {list(self.w1_a.shape)}, w1_b {list(self.w1_b.shape)}, "
                             f"w2_a {list(self.w2_a.shape)}, w2_b {list(self.w2_b.shape)}")

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def delta(self) -> torch.Tensor:
        w1 = self.w1_a.float() @ self.w1_b.float()
        w2 = self.w2_a.float() @ self.w2_b.float()
        return w1 * w2 * self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w1_a": self.w1_a, "w1_b": self.w1_b, "w2_a": self.w2_a, "w2_b": self.w2_b}


@dataclass(frozen=True, eq=False)
class LoKr:
    """LyCORIS LoKr: ΔW = kron(w1, w2) · alpha / rank; each factor is full or a low-rank product.

    As in LyCORIS, rank is w1_a's rank when w1 is decomposed, else w2_a's; with both factors full the scale is 1.
    """

    w1: torch.Tensor | None = None  # [a, c]
    w1_a: torch.Tensor | None = None  # [a, r]
    w1_b: torch.Tensor | None = None  # [r, c]
    w2: torch.Tensor | None = None  # [b, d]
    w2_a: torch.Tensor | None = None  # [b, r]
    w2_b: torch.Tensor | None = None  # [r, d]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    kind: ClassVar[str] = "lokr"

    def __post_init__(self) -> None:
        for i in (1, 2):
            full, a, b = (getattr(self, f"w{i}{s}") for s in ("", "_a", "_b"))
            if (full is None) == (a is None or b is None) or (a is None) != (b is None):
                raise ValueError(f"LoKr factor {i} needs lokr_w{i} or both lokr_w{i}_a and lokr_w{i}_b")
            for name, t in ((f"lokr_w{i}", full), (f"lokr_w{i}_a", a), (f"lokr_w{i}_b", b)):
                if t is not None:
                    _matrix(name, t)
            if a is not None and a.shape[1] != b.shape[0]:
                raise ValueError(f"lokr_w{i}_a {list(a.shape)} and lokr_w{i}_b {list(b.shape)} have different ranks")

    @property
    def rank(self) -> int | None:
        if self.w1_a is not None:
            return self.w1_a.shape[1]
        return None if self.w2_a is None else self.w2_a.shape[1]

    @property
    def scale(self) -> float:
        rank = self.rank
        return 1.0 if rank is None else _scale(self.alpha, rank)

    def _factor(self, i: int) -> torch.Tensor:
        full = getattr(self, f"w{i}")
        if full is not None:
            return full.float()
        return getattr(self, f"w{i}_a").float() @ getattr(self, f"w{i}_b").float()

    @property
    def shape(self) -> tuple[int, int]:
        a, b = _kron_factor_shape(self.w1, self.w1_a, self.w1_b), _kron_factor_shape(self.w2, self.w2_a, self.w2_b)
        return a[0] * b[0], a[1] * b[1]

    def delta(self) -> torch.Tensor:
        return torch.kron(self._factor(1), self._factor(2)) * self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _kron_factor_shape(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[int, int]:
    """[out, in] of a LoKr factor given whole (`full`) or as `a @ b` (`LoKr.__post_init__` checked one is)."""
    if full is not None:
        return full.shape[0], full.shape[1]
    if a is None or b is None:
        raise ValueError("a LoKr factor needs lokr_w{i} or both lokr_w{i}_a and lokr_w{i}_b")
    return a.shape[0], b.shape[1]


@dataclass(frozen=True, eq=False)
class FullDiff:
    """A full-size difference added to one parameter (`.diff`, `.diff_b`, `.w_norm`, `.b_norm`): P ← P + m·diff."""

    diff: torch.Tensor
    kind: ClassVar[str] = "diff"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def delta(self) -> torch.Tensor:
        return self.diff.float()


@dataclass(frozen=True, eq=False)
class SetWeight:
    """A replacement value for one parameter (`.set_weight`): P ← value, whatever the strength (as ComfyUI)."""

    value: torch.Tensor
    kind: ClassVar[str] = "set"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)


Adapter = LowRank | LoHa | LoKr
ParamPatch = FullDiff | SetWeight
_ADAPTERS: dict[str, type] = {"lora": LowRank, "loha": LoHa, "lokr": LoKr}


def weight_delta(adapter: Adapter, weight: torch.Tensor) -> torch.Tensor:
    """ΔW at strength 1 (float32) of `adapter` on the base weight W [out, in]; strength m gives W + m·ΔW.

    Without `dora_scale` this is `adapter.delta()`. With it (DoRA, weight-decomposed): W' = (W + ΔW_lora) ·
    dora_scale / (‖·‖ + eps) and ΔW = W' − W, where for a [1, in] scale the norm is that of each column of
    W + ΔW_lora and for an [out, 1] scale that of each row of the base W; eps is float32's machine epsilon
    (ComfyUI's float32 patching arithmetic).
    """
    lora = adapter.delta()
    scale = adapter.dora_scale
    if scale is None:
        return lora
    base = weight.detach().float()
    combined = base + lora.to(base.device)
    out_features, in_features = base.shape
    scale = scale.float().to(base.device)
    if scale.shape[0] == out_features and scale.numel() == out_features:
        norm = base.norm(dim=1, keepdim=True)  # [out, 1]
        scale = scale.reshape(out_features, 1)
    elif scale.shape[0] == 1 and scale.numel() == in_features:
        norm = combined.norm(dim=0, keepdim=True)  # [1, in]
        scale = scale.reshape(1, in_features)
    else:
        raise ValueError(f"dora_scale of shape {list(scale.shape)} fits neither [1, {in_features}] nor "
                         f"[{out_features}, 1] of the layer's weight {list(base.shape)}")
    return combined * (scale / (norm + torch.finfo(torch.float32).eps)) - base


# ----------------------------------------------------------------------------------------------------------------
# The canonical container
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LoRA:
    """A parsed LoRA file: adapters by official module name, full-parameter patches (`.diff`, `.diff_b`,
    `.set_weight`) by official parameter name, plus every source key that could not be used."""

    adapters: dict[str, Adapter]
    unmatched: tuple[str, ...] = ()
    format: str = "canonical"
    source: str = "<state dict>"
    metadata: dict[str, str] = field(default_factory=dict)
    source_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    params: dict[str, ParamPatch] = field(default_factory=dict)

    def restricted_to(self, modules: Collection[str], params: Collection[str] | None = None) -> LoRA:
        """The same LoRA with adapters for modules outside `modules` (and, when given, patches of parameters
        outside `params`) moved to `unmatched` (by source key)."""
        keep = {m: a for m, a in self.adapters.items() if m in modules}
        keep_params = {p: v for p, v in self.params.items() if params is None or p in params}
        gone = [m for m in self.adapters if m not in keep] + [p for p in self.params if p not in keep_params]
        lost = [k for m in gone for k in self.source_keys.get(m, (f"{m}.*",))]
        if not lost:
            return self
        _warn_unmatched(self.source, lost)
        return LoRA(keep, (*self.unmatched, *lost), self.format, self.source, self.metadata,
                    {m: k for m, k in self.source_keys.items() if m in keep or m in keep_params}, keep_params)


def _warn_unmatched(source: str, keys: list[str]) -> None:
    shown = ", ".join(keys[:20]) + (f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else "")
    logger.warning("%s: %d LoRA key(s) match no layer of the model and are NOT applied: %s", source, len(keys), shown)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def split_lora_key(key: str) -> tuple[str, str, str] | None:
    """`<module path><suffix>` -> (module path, role, algorithm); None when the suffix is not a LoRA tensor."""
    match = LORA_PEFT_SUFFIX.match(key)
    if match and match["adapter"] != "weight":
        return match["module"], "down" if match["ab"] == "A" else "up", "lora"
    for suffix, role, algo in LORA_ROLE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role, algo
    if key.endswith(_DORA_SUFFIX) and len(key) > len(_DORA_SUFFIX):
        return key[: -len(_DORA_SUFFIX)], "dora_scale", ""
    return None


# Full-parameter patch suffixes -> (which parameter of the module path, patch kind). `.diff`/`.set_weight` on a
# path that names a parameter itself (`head.modulation`) patch that parameter.
_PARAM_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".diff_b", "bias", "diff"), (".diff", "weight", "diff"), (".set_weight", "weight", "set"),
    (".w_norm", "weight", "diff"), (".b_norm", "bias", "diff"),
)
_DORA_SUFFIX = ".dora_scale"
_PATCHES: dict[str, type] = {"diff": FullDiff, "set": SetWeight}


def split_param_key(key: str) -> tuple[str, str, str] | None:
    """`<path>.diff_b` -> (path, "bias", "diff"); None when the key is not a full-parameter patch."""
    for suffix, which, kind in _PARAM_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], which, kind
    return None


def _template_regex(templates: Iterable[str], to_kohya: bool) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for template in templates:
        text = kohya_lora_name(template) if to_kohya else template
        out.append((re.compile("^" + re.escape(text).replace(r"\{n\}", r"(?P<n>\d+)") + "$"), template))
    return out


# Parameters of the Wan2.1 DiTs that LoRA files patch in full (norms, biases, modulation, embeddings, head).
_WAN_PARAM_MODULES: tuple[str, ...] = (
    *LORA_MODULE_TEMPLATES, "blocks.{n}.self_attn.norm_q", "blocks.{n}.self_attn.norm_k",
    "blocks.{n}.cross_attn.norm_q", "blocks.{n}.cross_attn.norm_k", "blocks.{n}.cross_attn.norm_k_img",
    "blocks.{n}.norm3", "patch_embedding", "img_emb.proj.0", "img_emb.proj.4",
)
_WAN_PARAMS = _template_regex((*(f"{m}.{w}" for m in _WAN_PARAM_MODULES for w in ("weight", "bias")),
                               "blocks.{n}.modulation", "head.modulation", "img_emb.emb_pos"), to_kohya=False)
_WAN_PARAM_KOHYA = _template_regex(_WAN_PARAM_MODULES, to_kohya=True)


def _fill(matches: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
    for pattern, template in matches:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return None


class ModuleResolver:
    """Maps a LoRA module path in any naming to an official module name, or None.

    With `modules` (the model's Linear layer names) a name must exist in the model; without, in the Wan table.
    `prefixes` are extra prefixes to strip (e.g. a custom `--diffusers_prefix`).
    """

    def __init__(self, modules: Collection[str] | None = None, prefixes: Iterable[str] = ()) -> None:
        self.modules = frozenset(modules) if modules is not None else None
        self.kohya = {kohya_lora_name(m): m for m in self.modules} if self.modules is not None else None
        extra = tuple(p if p.endswith(".") else p + "." for p in prefixes if p)
        self.prefixes = (*extra, *LORA_KNOWN_PREFIXES)

    def known(self, module: str) -> bool:
        return module in self.modules if self.modules is not None else is_wan_lora_module(module)

    def __call__(self, path: str) -> str | None:
        for prefix in LORA_UNDERSCORE_PREFIXES:
            if path.startswith(prefix):
                name = KOHYA_LORA_PREFIX + path[len(prefix):]
                return self.kohya.get(name) if self.kohya is not None else module_from_kohya(name)
        stripped = True
        while stripped:  # e.g. base_model.model.transformer.blocks...
            stripped = False
            for prefix in self.prefixes:
                if path.startswith(prefix):
                    path, stripped = path[len(prefix):], True
                    break
        if self.known(path):
            return path
        official = module_from_diffusers(path)
        return official if official is not None and self.known(official) else None


class ParamResolver:
    """Maps the module path of a `.diff`/`.diff_b`/`.set_weight` key to an official parameter name, or None.

    With `params` (the model's parameter names) the parameter must exist in the model; without, in the Wan table.
    """

    def __init__(self, params: Collection[str] | None = None, prefixes: Iterable[str] = ()) -> None:
        self.params = frozenset(params) if params is not None else None
        self.kohya = None
        if self.params is not None:
            self.kohya = {kohya_lora_name(p[: -len(".weight")]): p[: -len(".weight")]
                          for p in self.params if p.endswith(".weight")}
        extra = tuple(p if p.endswith(".") else p + "." for p in prefixes if p)
        self.prefixes = (*extra, *LORA_KNOWN_PREFIXES)

    def known(self, param: str) -> bool:
        return param in self.params if self.params is not None else _fill(_WAN_PARAMS, param) is not None

    def _module(self, path: str) -> tuple[str | None, bool]:
        for prefix in LORA_UNDERSCORE_PREFIXES:
            if path.startswith(prefix):
                name = KOHYA_LORA_PREFIX + path[len(prefix):]
                return (self.kohya.get(name) if self.kohya is not None else _fill(_WAN_PARAM_KOHYA, name)), True
        stripped = True
        while stripped:
            stripped = False
            for prefix in self.prefixes:
                if path.startswith(prefix):
                    path, stripped = path[len(prefix):], True
                    break
        return path, False

    def __call__(self, path: str, which: str) -> str | None:
        module, kohya = self._module(path)
        if module is None:
            return None
        candidates = [f"{module}.{which}"]
        official = None if kohya else module_from_diffusers(module)
        if official is not None:
            candidates.append(f"{official}.{which}")
        if which == "weight" and not kohya:
            candidates.append(module)  # a bare parameter such as head.modulation
        return next((c for c in candidates if self.known(c)), None)


def detect_lora_format(sd: Mapping[str, torch.Tensor]) -> str:
    """A short description of a LoRA state dict's layout, e.g. `musubi/lora`, `comfyui/loha`, `diffusers/lora`."""
    keys = list(sd)
    naming = "bare"
    for label, test in (("wan_fun", lambda k: k.startswith("lora_unet__")),
                        ("musubi", lambda k: k.startswith("lora_unet_")),
                        ("lycoris", lambda k: k.startswith("lycoris_")),
                        ("comfyui", lambda k: k.startswith(("diffusion_model.", "model.diffusion_model."))),
                        ("diffusers", lambda k: k.startswith("transformer.")),
                        ("peft", lambda k: k.startswith("base_model.model.") or ".default." in k)):
        if any(test(k) for k in keys):
            naming = label
            break
    parts = [split_lora_key(k) for k in keys]
    algos = sorted({p[2] for p in parts if p is not None and p[2]}
                   | {p[2] for p in map(split_param_key, keys) if p is not None})
    return f"{naming}/{'+'.join(algos) or 'unknown'}"


def _alpha(value: torch.Tensor, key: str) -> float:
    if value.numel() != 1:
        raise ValueError(f"LoRA alpha {key!r} must be a scalar, got shape {list(value.shape)}")
    return float(value.float().item())


def _collect(sd: Mapping[str, torch.Tensor], resolve: ModuleResolver, resolve_param: ParamResolver,
             ) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], dict[str, tuple[str, ParamPatch]],
                        list[str]]:
    """Group adapter tensors by official module and role, and full-parameter patches by official parameter; keys
    that do not parse or resolve go to the unmatched list."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    patches: dict[str, tuple[str, ParamPatch]] = {}
    unmatched: list[str] = []
    for key, value in sd.items():
        param = split_param_key(key)
        if param is not None:
            name = resolve_param(param[0], param[1])
            if name is None:
                unmatched.append(key)
            elif name in patches:
                raise ValueError(f"LoRA keys {patches[name][0]!r} and {key!r} both patch parameter {name!r}; a file "
                                 f"must hold one patch per parameter")
            else:
                patches[name] = (key, _PATCHES[param[2]](value))
            continue
        parts = split_lora_key(key)
        module = resolve(parts[0]) if parts else None
        if parts is None or module is None:
            unmatched.append(key)
            continue
        role = parts[1] if not parts[2] or parts[1] in ("alpha", "dora_scale") else f"{parts[2]}:{parts[1]}"
        slot = groups.setdefault(module, {})
        if role in slot:
            raise ValueError(f"LoRA keys {slot[role][0]!r} and {key!r} both give the {role} tensor of module "
                             f"{module!r}; a file must hold one LoRA per layer")
        slot[role] = (key, value)
    return groups, patches, unmatched


_SHARED_ROLES = ("alpha", "dora_scale")


def _build(module: str, roles: dict[str, tuple[str, torch.Tensor]]) -> Adapter:
    algos = {r.split(":")[0] for r in roles if r not in _SHARED_ROLES}
    if len(algos) != 1:
        raise ValueError(f"mixes {sorted(algos)} tensors" if algos else "has an alpha or dora_scale but no weights")
    algo = algos.pop()
    tensors = {r.split(":")[1]: v for r, (_, v) in roles.items() if r not in _SHARED_ROLES}
    alpha = _alpha(roles["alpha"][1], roles["alpha"][0]) if "alpha" in roles else None
    dora_scale = roles["dora_scale"][1] if "dora_scale" in roles else None
    if algo == "lora" and set(tensors) != {"down", "up"}:
        raise ValueError(f"needs both down and up weights, got {sorted(tensors)}")
    if algo == "loha" and set(tensors) != {"w1_a", "w1_b", "w2_a", "w2_b"}:
        raise ValueError(f"needs hada_w1_a/b and hada_w2_a/b, got {sorted(tensors)}")
    return _ADAPTERS[algo](**tensors, alpha=alpha, dora_scale=dora_scale)


def _is_lora_key(key: str) -> bool:
    return split_lora_key(key) is not None or split_param_key(key) is not None


def parse_lora(sd: Mapping[str, torch.Tensor], modules: Collection[str] | None = None, *,
               prefixes: Iterable[str] = (), source: str = "<state dict>",
               metadata: Mapping[str, str] | None = None, params: Collection[str] | None = None) -> LoRA:
    """Read a LoRA state dict in any supported layout into the canonical form (see the module docstring).

    `modules`: the target model's Linear layer names (`linear_module_names(model)`); keys for layers the model
    lacks (e.g. k_img/v_img of an I2V LoRA on a T2V model) are reported in `unmatched`. `params`: the model's
    parameter names, which `.diff` / `.diff_b` / `.set_weight` keys must name (None: the Wan table).
    """
    if not sd:
        raise ValueError(f"{source} holds no tensors; expected a LoRA state dict")
    if not any(_is_lora_key(k) for k in sd):
        sample = ", ".join(list(sd)[:3])
        raise ValueError(f"{source} is not a LoRA file: no key ends in a LoRA suffix (.lora_down.weight, "
                         f".lora_A.weight, .hada_w1_a, .lokr_w1, .diff, ...); first keys: {sample}")
    require_finite(sd, f"LoRA {source}")
    groups, patches, unmatched = _collect(sd, ModuleResolver(modules, prefixes), ParamResolver(params, prefixes))
    adapters: dict[str, Adapter] = {}
    keys: dict[str, tuple[str, ...]] = {p: (k,) for p, (k, _) in patches.items()}
    for module, roles in groups.items():
        try:
            adapters[module] = _build(module, roles)
        except ValueError as exc:
            logger.warning("%s: LoRA for %s is not usable (%s)", source, module, exc)
            unmatched.extend(k for k, _ in roles.values())
            continue
        keys[module] = tuple(k for k, _ in roles.values())
    if unmatched:
        _warn_unmatched(source, unmatched)
    return LoRA(adapters, tuple(unmatched), detect_lora_format(sd), source, dict(metadata or {}), keys,
                {p: patch for p, (_, patch) in patches.items()})


LoRASource = str | os.PathLike | Mapping[str, torch.Tensor] | LoRA


def load_lora(source: LoRASource, modules: Collection[str] | None = None, *, prefixes: Iterable[str] = (),
              params: Collection[str] | None = None) -> LoRA:
    """A LoRA from a file path (.safetensors / .pth), a state dict, or an already parsed `LoRA`."""
    if isinstance(source, LoRA):
        return source.restricted_to(modules, params) if modules is not None else source
    if isinstance(source, Mapping):
        return parse_lora(source, modules, prefixes=prefixes, params=params)
    path = Path(source)
    sd = load_state_dict(path)
    return parse_lora(sd, modules, prefixes=prefixes, source=str(path), metadata=read_metadata(path), params=params)


# ----------------------------------------------------------------------------------------------------------------
# Writing and file conversion
# ----------------------------------------------------------------------------------------------------------------

def _fold(t: torch.Tensor, factor: float) -> torch.Tensor:
    return t if factor == 1.0 else (t.float() * factor).to(t.dtype)


def _module_key(module: str, fmt: str, prefix: str | None) -> str:
    if fmt == "musubi":
        return kohya_lora_name(module)
    name = module
    if fmt == "diffusers":
        diffusers_name = module_to_diffusers(module)
        if diffusers_name is None:
            raise ValueError(f"module {module!r} has no diffusers counterpart; cannot write it in diffusers format")
        name = diffusers_name
    return f"{prefix}.{name}" if prefix else name


def _normalise_format(fmt: str) -> str:
    if fmt not in _FORMAT_ALIASES:
        raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {sorted(_FORMAT_ALIASES)}")
    return _FORMAT_ALIASES[fmt]


def _default_prefix(fmt: str) -> str | None:
    return {"comfyui": COMFYUI_LORA_PREFIX, "diffusers": DIFFUSERS_LORA_PREFIX}.get(fmt)


def lora_state_dict(lora: LoRA | Mapping[str, Adapter], format: str = "musubi", *, prefix: str | None = None,
                    keep_alpha: bool = False, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Write a LoRA in `format`: "musubi" (alias "default"), "comfyui" (alias "other") or "diffusers".

    musubi: `lora_unet_<name>.lora_down/.lora_up.weight` + `.alpha` (alpha = rank when the source had none).
    comfyui: `<prefix>.<official name>.lora_A/.lora_B.weight` (prefix `diffusion_model`, "" for none).
    diffusers: `<prefix>.<diffusers name>.lora_A/.lora_B.weight` (prefix `transformer`).
    For comfyui/diffusers, as musubi's convert_lora.py does, alpha is folded into the weights (A and B each
    times sqrt(alpha/rank), no alpha key), which loaders that ignore alpha read correctly; `keep_alpha=True`
    keeps the weights and writes `.alpha` instead (bit-exact). LoHa/LoKr keep their tensors and alpha.
    `adapter_name` writes PEFT `lora_A.<adapter_name>.weight` keys.
    """
    fmt = _normalise_format(format)
    prefix = _default_prefix(fmt) if prefix is None else prefix.rstrip(".")
    adapters = lora.adapters if isinstance(lora, LoRA) else lora
    out: dict[str, torch.Tensor] = {}
    for module, adapter in adapters.items():
        base = _module_key(module, fmt, prefix)
        if not isinstance(adapter, LowRank):
            if fmt == "diffusers":
                raise ValueError(f"{adapter.kind} adapters cannot be written in diffusers format ({module})")
            suffixes = LYCORIS_WRITE_SUFFIXES[adapter.kind]
            out.update({base + suffixes[r]: t for r, t in adapter.tensors().items()})
            if adapter.alpha is not None:
                out[base + suffixes["alpha"]] = torch.tensor(adapter.alpha, dtype=torch.float32)
            continue
        out.update(_low_rank_keys(base, adapter, fmt, keep_alpha, adapter_name))
    for module, adapter in adapters.items():
        if adapter.dora_scale is not None:
            if fmt == "diffusers":
                raise ValueError(f"DoRA adapters cannot be written in diffusers format ({module})")
            out[_module_key(module, fmt, prefix) + _DORA_SUFFIX] = adapter.dora_scale
    if isinstance(lora, LoRA):
        out.update(_param_keys(lora.params, fmt, prefix))
    return out


def _param_keys(params: Mapping[str, ParamPatch], fmt: str, prefix: str | None) -> dict[str, torch.Tensor]:
    """`.diff` / `.diff_b` / `.set_weight` keys, named as ComfyUI reads them."""
    out: dict[str, torch.Tensor] = {}
    for name, patch in params.items():
        module, _, which = name.rpartition(".")
        if fmt == "diffusers" or (which not in ("weight", "bias") and fmt == "musubi"):
            raise ValueError(f"the full patch of parameter {name!r} cannot be written in {fmt} format; use comfyui")
        if which not in ("weight", "bias"):
            module, suffix = name, ".diff" if patch.kind == "diff" else ".set_weight"
        elif which == "bias":
            if patch.kind != "diff":
                raise ValueError(f"a bias replacement ({name}) has no key in any LoRA format")
            suffix = ".diff_b"
        else:
            suffix = ".diff" if patch.kind == "diff" else ".set_weight"
        base = kohya_lora_name(module) if fmt == "musubi" else (f"{prefix}.{module}" if prefix else module)
        out[base + suffix] = patch.diff if isinstance(patch, FullDiff) else patch.value
    return out


def _low_rank_keys(base: str, adapter: LowRank, fmt: str, keep_alpha: bool,
                   adapter_name: str | None) -> dict[str, torch.Tensor]:
    suffixes = dict(LORA_WRITE_SUFFIXES[fmt])
    if adapter_name and fmt != "musubi":
        suffixes["down"] = f".lora_A.{adapter_name}.weight"
        suffixes["up"] = f".lora_B.{adapter_name}.weight"
    if fmt == "musubi" or keep_alpha:
        alpha = adapter.alpha if adapter.alpha is not None else float(adapter.rank)
        return {base + suffixes["down"]: adapter.down, base + suffixes["up"]: adapter.up,
                base + suffixes["alpha"]: torch.tensor(alpha, dtype=torch.float32)}
    factor = math.sqrt(adapter.scale)
    return {base + suffixes["down"]: _fold(adapter.down, factor), base + suffixes["up"]: _fold(adapter.up, factor)}


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """sd-scripts' `sshs_model_hash` / `sshs_legacy_hash` of a file holding `tensors` and the `ss_*` metadata."""
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, training)
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora(lora: LoRA | Mapping[str, Adapter], path: str | os.PathLike, format: str = "musubi", *,
              metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None, prefix: str | None = None,
              keep_alpha: bool = False, adapter_name: str | None = None) -> Path:
    """Write a LoRA file atomically (`prefix`, `keep_alpha`, `adapter_name`: see `lora_state_dict`); musubi files
    get sshs hashes. Tensors with NaN or inf values (after the cast to `dtype`) are refused with NonFiniteError and
    nothing is written."""
    tensors = lora_state_dict(lora, format, prefix=prefix, keep_alpha=keep_alpha, adapter_name=adapter_name)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.dim() else v for k, v in tensors.items()}
    require_finite(tensors, f"LoRA {path} (not written)")
    meta = {k: str(v) for k, v in (metadata or {}).items() if k not in _STALE_METADATA}
    if _normalise_format(format) == "musubi":
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(tensors, meta)
    return save_safetensors(tensors, path, meta or None)


def convert_lora_file(input_path: str | os.PathLike, output_path: str | os.PathLike, target: str = "other", *,
                      diffusers_prefix: str | None = None, adapter_name: str | None = None,
                      keep_alpha: bool = False) -> LoRA:
    """musubi `convert_lora.py` semantics, for Wan: any supported input layout -> `target`.

    target "other" (= comfyui): `<diffusers_prefix>.<module>.lora_A/B.weight`, prefix `diffusion_model` by default,
    "-" or "" for none; alpha folded as sqrt(alpha/rank) into A and B unless `keep_alpha`. target "default"
    (= musubi): `lora_unet_…lora_down/up.weight` with the source alpha, or alpha = rank when the source has none
    (so the delta is unchanged). target "diffusers": `transformer.<diffusers module>.lora_A/B.weight`.
    Metadata is carried over (stale sshs hashes replaced). Keys that cannot be converted are logged and
    returned in `.unmatched` of the parsed input (the return value).
    """
    fmt = _normalise_format(target)
    prefix = None if diffusers_prefix is None else ("" if diffusers_prefix == "-" else diffusers_prefix)
    lora = load_lora(input_path, prefixes=[prefix] if prefix else ())
    if not lora.adapters:
        raise ValueError(f"{input_path}: no LoRA module could be converted ({len(lora.unmatched)} unmatched keys, "
                         f"e.g. {', '.join(lora.unmatched[:3])})")
    save_lora(lora, output_path, fmt, metadata=lora.metadata, prefix=prefix, keep_alpha=keep_alpha,
              adapter_name=adapter_name)
    logger.info("converted %s (%s, %d modules) -> %s (%s)", input_path, lora.format, len(lora.adapters),
                output_path, fmt)
    return lora
