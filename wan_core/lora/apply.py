"""LoRA for the Wan2.1 DiT: merging, unmerged application with live strengths, and the training network.

Inference:
- `merge_loras(model_or_state_dict, loras, multipliers)`: W ← W + Σ m·ΔW, computed in fp32 and cast back once.
  Merging needs bf16/fp16/fp32 weights: a loader that quantises to fp8 merges first, then quantises.
- `apply_loras(model, loras, multipliers) -> LoRAHandle`: wraps each matched Linear-like layer in a `LoRAModule`
  (out = base(x) + Σ m·ΔW x, the LoRA part computed in the layer's compute dtype). The base layer is only called,
  never read, so fp8 layers work. `handle.set_multiplier()` changes strengths, `handle.remove()` unwraps.
- Include/exclude (one regex per LoRA, musubi `--include_patterns/--exclude_patterns`): `re.search` on the
  sd-scripts module name (`lora_unet_blocks_9_cross_attn_k`); include first, then exclude, so a module matching
  both is dropped. Module names are the same whatever the file's format.

Training: `LoRANetwork(model, rank, alpha, ...)` puts a LoRA on every Linear of each
`WanAttentionBlock` (musubi's `networks.lora_wan`). Its include/exclude patterns work differently from the
inference ones, as in musubi: `re.fullmatch` on official module names (`blocks.0.self_attn.q`), a module is skipped
when it matches an exclude pattern and no include pattern (include wins), and the default exclude
`DEFAULT_TRAIN_EXCLUDE` is always added. Include patterns alone therefore select nothing extra; to train only
some layers, exclude everything (`.*`) and include those.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, overload

import torch
import torch.nn.functional as F
from torch import nn

from wan_core.loading.convert import kohya_lora_name
from wan_core.lora.formats import Adapter, LoRA, LoRASource, LowRank, load_lora, lora_state_dict, save_lora
from wan_core.models.ops import Fp32Linear

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_EXCLUDE = r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*"
MUSUBI_NETWORK_MODULE = "networks.lora_wan"
Target = nn.Module | MutableMapping[str, torch.Tensor]
Multipliers = float | Sequence[float] | None  # one per LoRA, or one for all (None: 1.0)
Patterns = str | Sequence[str | None] | None  # one regex per LoRA, or one for all (None: no filter)


# ----------------------------------------------------------------------------------------------------------------
# Target discovery
# ----------------------------------------------------------------------------------------------------------------

def _out_in_features(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a layer `_is_linear_like` accepted."""
    return cast(int, layer.out_features), cast(int, layer.in_features)


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(getattr(module, "in_features", None), int)
                                             and isinstance(getattr(module, "out_features", None), int))


def _walk_linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every Linear-like layer; a LoRAModule yields its base under the wrapper's name."""
    for name, child in module.named_children():
        full = prefix + name
        if isinstance(child, LoRAModule):
            yield full, child.base
        elif _is_linear_like(child):
            yield full, child
        else:
            yield from _walk_linears(child, full + ".")


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Official name -> Linear-like layer (nn.Linear subclasses and anything with int in/out_features)."""
    return dict(_walk_linears(model))


def _state_dict_linears(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Module name -> weight key for the 2-D `.weight` tensors of a state dict (official names)."""
    return {k[: -len(".weight")]: k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2}


# ----------------------------------------------------------------------------------------------------------------
# Per-LoRA options and the report
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoRAReport:
    """What happened to one LoRA: modules used, modules dropped by include/exclude, keys that matched nothing."""

    source: str
    format: str
    multiplier: float
    matched: int
    filtered: tuple[str, ...] = ()
    unmatched: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (f"{self.source} ({self.format}, x{self.multiplier:g}): {self.matched} modules, "
                f"{len(self.filtered)} filtered out, {len(self.unmatched)} unmatched keys")


@overload
def _compile(pattern: str, what: str) -> re.Pattern[str]: ...
@overload
def _compile(pattern: str | None, what: str) -> re.Pattern[str] | None: ...
def _compile(pattern: str | None, what: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid {what} pattern {pattern!r}: {exc}") from None


def inference_filter(include: str | None = None, exclude: str | None = None) -> Callable[[str], bool]:
    """musubi's inference filter for one LoRA: keep a module when `include` is found in its sd-scripts name (if
    given) and `exclude` is not (if given). Takes official module names."""
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")

    def keep(module: str) -> bool:
        name = kohya_lora_name(module)
        return (inc is None or inc.search(name) is not None) and (exc is None or exc.search(name) is None)

    return keep


def lora_multiplier(value: object, source: object = None) -> float:
    """`value` as a float; a NaN, inf or non-number strength is a ValueError naming the LoRA."""
    where = f" for LoRA {source}" if source is not None else ""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"LoRA multiplier {value!r}{where} is not a number; expected a finite number such as "
                         "1.0") from None
    if not math.isfinite(number):
        raise ValueError(f"LoRA multiplier {value!r}{where} is not finite; expected a finite number such as 1.0")
    return number


def _per_lora(values: object, count: int, what: str, default: object) -> list[Any]:
    """One entry per LoRA from user input: None (`default` for each), a single value, or a sequence."""
    if values is None:
        return [default] * count
    if isinstance(values, (str, int, float)):
        values = [values]
    if not isinstance(values, Iterable):
        raise ValueError(f"{what} must be one value or one per LoRA, got a {type(values).__name__}")
    items = list(values)
    if len(items) != count:
        raise ValueError(f"got {len(items)} {what} for {count} LoRA(s); give one per LoRA (in the same order)")
    return items


def _source_name(source: LoRASource) -> str:
    if isinstance(source, LoRA):
        return source.source
    return "<state dict>" if isinstance(source, Mapping) else str(source)


def _prepare(loras: Sequence[LoRASource] | LoRASource, modules: set[str], multipliers: Multipliers,
             include_patterns: Patterns,
             exclude_patterns: Patterns) -> list[tuple[dict[str, Adapter], float, LoRAReport]]:
    if isinstance(loras, (str, os.PathLike, Mapping, LoRA)):
        loras = [loras]
    count = len(loras)
    mults = [lora_multiplier(m, _source_name(source))
             for m, source in zip(_per_lora(multipliers, count, "multipliers", 1.0), loras)]
    includes = _per_lora(include_patterns, count, "include patterns", None)
    excludes = _per_lora(exclude_patterns, count, "exclude patterns", None)
    prepared = []
    for source, mult, inc, exc in zip(loras, mults, includes, excludes):
        keep = inference_filter(inc, exc)
        lora = load_lora(source, modules)
        used = {m: a for m, a in lora.adapters.items() if keep(m)}
        filtered = tuple(m for m in lora.adapters if m not in used)
        if filtered:
            logger.info("%s: include/exclude patterns keep %d of %d modules", lora.source, len(used),
                        len(lora.adapters))
        report = LoRAReport(lora.source, lora.format, mult, len(used), filtered, lora.unmatched)
        logger.info("LoRA %s", report)
        prepared.append((used, mult, report))
    return prepared


def _check_shape(module: str, adapter: Adapter, shape: tuple[int, ...], source: str) -> None:
    if tuple(adapter.shape) != tuple(shape):
        raise ValueError(f"LoRA {source}: module {module} has a delta of shape {list(adapter.shape)} but the model's "
                         f"layer is {list(shape)} ([out, in]); the LoRA was made for a different model size")


# ----------------------------------------------------------------------------------------------------------------
# Merged mode
# ----------------------------------------------------------------------------------------------------------------

def _merged(weight: torch.Tensor, parts: list[tuple[Adapter, float]], where: str) -> torch.Tensor:
    if weight.dtype.itemsize == 1:
        raise ValueError(f"{where} is stored as {weight.dtype}: merge LoRAs into the bf16/fp16/fp32 weights before "
                         f"quantising to fp8 (the loader merges first, then quantises)")
    total = weight.detach().float()
    for adapter, mult in parts:
        total = total + mult * adapter.delta().to(weight.device)
    return total.to(weight.dtype)


def _weight(layer: nn.Module, name: str) -> torch.Tensor:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype.itemsize == 1:
        raise ValueError(f"cannot merge a LoRA into {name} ({type(layer).__name__}): merging needs bf16/fp16/fp32 "
                         f"weights, so merge before quantising to fp8, or use apply_loras (unmerged)")
    return weight


def merge_loras(target: Target, loras: Sequence[LoRASource] | LoRASource, multipliers: Multipliers = None, *,
                include_patterns: Patterns = None, exclude_patterns: Patterns = None) -> list[LoRAReport]:
    """Merge LoRAs into a model (in place) or a state dict with official names (entries replaced in place).

    W ← W + Σ_i m_i·ΔW_i, summed in float32 and rounded once to W's dtype. `loras`: paths, state dicts or parsed
    `LoRA`s; `multipliers`, `include_patterns`, `exclude_patterns`: one per LoRA (None = 1.0 / no filter).
    """
    layers: dict[str, nn.Module] | None = None
    keys: dict[str, str] = {}
    state: MutableMapping[str, torch.Tensor] = {}
    if isinstance(target, nn.Module):
        layers = linear_modules(target)
    else:
        keys, state = _state_dict_linears(target), target
    names = set(layers if layers is not None else keys)
    prepared = _prepare(loras, names, multipliers, include_patterns, exclude_patterns)
    per_module: dict[str, list[tuple[Adapter, float]]] = {}
    for used, mult, report in prepared:
        for module, adapter in used.items():
            shape = _weight(layers[module], module).shape if layers is not None else state[keys[module]].shape
            _check_shape(module, adapter, tuple(shape), report.source)
            if mult != 0.0:
                per_module.setdefault(module, []).append((adapter, mult))
    with torch.no_grad():
        for module, parts in per_module.items():
            if layers is not None:
                weight = _weight(layers[module], module)
                weight.copy_(_merged(weight, parts, module))
            else:
                state[keys[module]] = _merged(state[keys[module]], parts, keys[module])
    logger.info("merged %d LoRA(s) into %d layers", len(prepared), len(per_module))
    return [report for _, _, report in prepared]


# ----------------------------------------------------------------------------------------------------------------
# Unmerged mode
# ----------------------------------------------------------------------------------------------------------------

def _device_of(module: nn.Module) -> torch.device:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _lora_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base layer computes in (fp8 storage computes in bf16 unless it says otherwise)."""
    if isinstance(base, Fp32Linear):
        return torch.float32
    dtype = getattr(base, "compute_dtype", None)
    if dtype is None:
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    return torch.bfloat16 if dtype.itemsize == 1 else dtype


class _LowRankBranch(nn.Module):
    """m·(alpha/r)·up(down(x)) with the weights held in the compute dtype."""

    down: torch.Tensor
    up: torch.Tensor

    def __init__(self, adapter: LowRank, multiplier: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("down", adapter.down.to(device, dtype), persistent=False)  # [r, in]
        self.register_buffer("up", adapter.up.to(device, dtype), persistent=False)  # [out, r]
        self.scale = adapter.scale
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        hidden = F.linear(x.to(self.down.dtype), self.down)  # [..., r]
        return F.linear(hidden, self.up) * (self.multiplier * self.scale)


class _DeltaBranch(nn.Module):
    """m·ΔW x for LoHa/LoKr, with ΔW materialised once (alpha/rank included) in the compute dtype."""

    delta: torch.Tensor

    def __init__(self, adapter: Adapter, multiplier: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("delta", adapter.delta().to(device, dtype), persistent=False)  # [out, in]
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.delta.dtype), self.delta) * self.multiplier


class LoRAModule(nn.Module):
    """A Linear-like layer plus LoRA branches: base(x) + Σ branch(x), in the base output's dtype.

    Attributes the wrapper lacks (weight, in_features, compute_dtype, ...) are read from the base layer, so
    code that inspects the model keeps working while LoRAs are applied. The branches live inside the model, so
    `.to()` and block swapping move them with their layer; while wrapped, the layer's weights appear in the
    model's state dict as `<name>.base.weight` (remove the LoRAs, or merge, before saving a model).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.branches = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for branch in self.branches.values():
            if branch.multiplier != 0.0:
                out = out + branch(x).to(out.dtype)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)


_handle_ids = itertools.count()


class LoRAHandle:
    """The LoRAs applied by one `apply_loras` call: change their strengths or remove them."""

    def __init__(self, model: nn.Module, reports: list[LoRAReport]) -> None:
        self.model = model
        self.reports = reports
        self._branches: list[list[tuple[str, LoRAModule, str]]] = [[] for _ in reports]
        self._multipliers = [r.multiplier for r in reports]
        self._removed = False

    @property
    def multipliers(self) -> list[float]:
        return list(self._multipliers)

    @property
    def matched(self) -> int:
        return sum(r.matched for r in self.reports)

    def set_multiplier(self, multiplier: float, index: int | None = None) -> None:
        """Set the strength of LoRA `index` (all of this handle's LoRAs when None); 0 disables it."""
        if self._removed:
            raise RuntimeError("these LoRAs were removed; apply them again")
        indices = range(len(self.reports)) if index is None else [index]
        for i in indices:
            if not 0 <= i < len(self.reports):
                raise ValueError(f"LoRA index {i} out of range: this handle holds {len(self.reports)} LoRA(s)")
            value = lora_multiplier(multiplier, self.reports[i].source)
            self._multipliers[i] = value
            for _, wrapper, key in self._branches[i]:
                cast(_LowRankBranch | _DeltaBranch, wrapper.branches[key]).multiplier = value

    def remove(self) -> None:
        """Remove this handle's branches; layers left without branches get their original module back."""
        if self._removed:
            return
        for entries in self._branches:
            for name, wrapper, key in entries:
                del wrapper.branches[key]
                if not len(wrapper.branches):
                    _unwrap(self.model, name, wrapper)
        self._removed = True


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _wrap(model: nn.Module, name: str) -> LoRAModule:
    parent, child = _parent(model, name)
    current = parent.get_submodule(child)
    if isinstance(current, LoRAModule):
        return current
    wrapper = LoRAModule(current)
    setattr(parent, child, wrapper)
    return wrapper


def _unwrap(model: nn.Module, name: str, wrapper: LoRAModule) -> None:
    parent, child = _parent(model, name)
    if parent._modules.get(child) is wrapper:
        setattr(parent, child, wrapper.base)


def apply_loras(model: nn.Module, loras: Sequence[LoRASource] | LoRASource, multipliers: Multipliers = None, *,
                include_patterns: Patterns = None, exclude_patterns: Patterns = None) -> LoRAHandle:
    """Apply LoRAs without touching the weights (see the module docstring); returns a `LoRAHandle`."""
    layers = linear_modules(model)
    prepared = _prepare(loras, set(layers), multipliers, include_patterns, exclude_patterns)
    handle = LoRAHandle(model, [report for _, _, report in prepared])
    handle_id = next(_handle_ids)
    for index, (used, mult, report) in enumerate(prepared):
        for module, adapter in used.items():
            base = layers[module]
            _check_shape(module, adapter, _out_in_features(base), report.source)
            dtype, device = _lora_dtype(base), _device_of(base)
            branch = (_LowRankBranch(adapter, mult, dtype, device) if isinstance(adapter, LowRank)
                      else _DeltaBranch(adapter, mult, dtype, device))
            wrapper = _wrap(model, module)
            key = f"lora{handle_id}_{index}"
            wrapper.branches[key] = branch
            handle._branches[index].append((module, wrapper, key))
    logger.info("applied %d LoRA(s) unmerged to %d layers", len(prepared),
                len({m for entries in handle._branches for m, _, _ in entries}))
    return handle


# ----------------------------------------------------------------------------------------------------------------
# Training network
# ----------------------------------------------------------------------------------------------------------------

def _as_list(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def training_targets(model: nn.Module, include_patterns: str | Sequence[str] | None = None,
                     exclude_patterns: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """musubi's Wan targets: every Linear-like layer inside a WanAttentionBlock, filtered with `re.fullmatch` on
    official names; skipped when an exclude pattern matches and no include pattern does; the default exclude
    pattern is always appended."""
    from wan_core.models.dit import WanAttentionBlock

    excludes = [_compile(p, "exclude") for p in [*_as_list(exclude_patterns), DEFAULT_TRAIN_EXCLUDE]]
    includes = [_compile(p, "include") for p in _as_list(include_patterns)]
    targets: dict[str, nn.Module] = {}
    for block_name, block in model.named_modules():
        if not isinstance(block, WanAttentionBlock):
            continue
        for child_name, layer in _walk_linears(block, f"{block_name}."):
            excluded = any(p.fullmatch(child_name) for p in excludes)
            if excluded and not any(p.fullmatch(child_name) for p in includes):
                continue
            targets[child_name] = layer
    return targets


class TrainableLoRA(nn.Module):
    """One trainable LoRA on a Linear-like layer (musubi LoRAModule semantics).

    out = base(x) + m·(alpha/r)·up(dropout(down(x))), with network dropout on the down output, rank dropout (a
    [B, r] mask, scale / (1 − p)) and module dropout (skip the LoRA) in training mode only. down is
    Kaiming-uniform (a = √5), up starts at zero. The LoRA computes in its own weight dtype (x is cast unless
    autocast is on) and the sum is returned in the base output's dtype.
    """

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float | None, *, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank} for {name}")
        self.name, self.rank, self.multiplier = name, rank, multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        out_features, in_features = _out_in_features(base)
        self.lora_down = nn.Linear(in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.alpha: torch.Tensor
        self.register_buffer("alpha", torch.tensor(0.0))
        self.set_alpha(alpha)
        self._base = [base]  # a list, so the base layer is not registered (not saved, not moved)
        self._original_forward: Callable | None = None

    def set_alpha(self, alpha: float | None) -> None:
        """alpha None or 0 means alpha = rank (scale 1), as in musubi."""
        value = float(self.rank if alpha is None or alpha == 0 else alpha)
        self.alpha.fill_(value)
        self.scale = value / self.rank

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def apply_to(self) -> None:
        if self._original_forward is None:
            self._had_instance_forward = "forward" in self.base.__dict__
            self._original_forward = self.base.forward
            self.base.forward = self.forward

    def remove(self) -> None:
        if self._original_forward is not None:
            if self._had_instance_forward:
                self.base.forward = self._original_forward
            else:
                del self.base.forward
            self._original_forward = None

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_down.weight.dtype
        if x.is_floating_point() and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            return x.to(dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, in] -> [B, L, out] (the patched forward of the base layer)."""
        original = self._original_forward
        if original is None:
            raise RuntimeError(f"LoRA {self.name} is not applied to its layer (call apply_to first)")
        out = original(x)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        hidden = self.lora_down(self._lora_input(x))  # [B, L, r]
        if self.training and self.dropout:
            hidden = F.dropout(hidden, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            keep = torch.rand(hidden.shape[0], self.rank, device=hidden.device) > self.rank_dropout
            hidden = hidden * keep.view(hidden.shape[0], *([1] * (hidden.dim() - 2)), self.rank).to(hidden.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return (out + self.lora_up(hidden) * (self.multiplier * scale)).to(out.dtype)


class LoRANetwork(nn.Module):
    """The LoRA network trained by `python -m training` (musubi `networks.lora_wan`).

    Built and applied at once: each target layer's forward is patched (the model's modules and state dict are
    unchanged); the LoRA parameters live in this module, so move it with `.to(device)` yourself. Child names
    are the sd-scripts names, so `state_dict()` is musubi's file layout.
    """

    def __init__(self, model: nn.Module, rank: int = 4, alpha: float | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 include_patterns: str | Sequence[str] | None = None,
                 exclude_patterns: str | Sequence[str] | None = None, multiplier: float = 1.0, *,
                 ranks: Mapping[str, int] | None = None, alphas: Mapping[str, float | None] | None = None) -> None:
        super().__init__()
        multiplier = lora_multiplier(multiplier)
        targets = training_targets(model, include_patterns, exclude_patterns)
        if ranks is not None:
            targets = {n: m for n, m in targets.items() if n in ranks}
        if not targets:
            raise RuntimeError("no LoRA target layers: the model has no WanAttentionBlock Linear layers left after "
                               f"include {include_patterns!r} / exclude {exclude_patterns!r}")
        self.rank, self.alpha_value, self.multiplier = rank, alpha, multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.include_patterns, self.exclude_patterns = _as_list(include_patterns), _as_list(exclude_patterns)
        self.by_name: dict[str, TrainableLoRA] = {}
        for name, layer in targets.items():
            module = TrainableLoRA(name, layer, ranks[name] if ranks else rank,
                                   alphas.get(name) if alphas is not None else alpha, multiplier=multiplier,
                                   dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
            self.add_module(kohya_lora_name(name), module)
            self.by_name[name] = module
        self.apply_to()
        logger.info("LoRA network: %d modules, rank %s, alpha %s, dropout %s/%s/%s", len(self.by_name),
                    rank if ranks is None else sorted(set(ranks.values())), alpha, dropout, rank_dropout,
                    module_dropout)

    @classmethod
    def from_weights(cls, model: nn.Module, source: LoRASource, multiplier: float = 1.0,
                     **kwargs: Any) -> LoRANetwork:
        """A network shaped after a LoRA file (per-module rank and alpha; musubi `--dim_from_weights`), loaded."""
        from wan_core.models.dit import WanAttentionBlock

        names = {n for b, block in model.named_modules() if isinstance(block, WanAttentionBlock)
                 for n, _ in _walk_linears(block, f"{b}.")}
        lora = load_lora(source, names)
        ranks = {m: a.rank for m, a in lora.adapters.items() if isinstance(a, LowRank)}
        if len(ranks) != len(lora.adapters) or not ranks:
            raise ValueError(f"{lora.source}: a LoRA network can only start from a plain LoRA with block layers "
                             f"(found {len(ranks)} LoRA and {len(lora.adapters) - len(ranks)} LoHa/LoKr modules)")
        common = Counter(ranks.values()).most_common(1)[0][0]
        network = cls(model, rank=common, alpha=None, multiplier=multiplier, ranks=ranks,
                      alphas={m: a.alpha for m, a in lora.adapters.items()}, exclude_patterns=[],
                      include_patterns=[".*"], **kwargs)
        network.load_weights(lora)
        return network

    # -- application -------------------------------------------------------------------------------------------

    def apply_to(self) -> None:
        for module in self.by_name.values():
            module.apply_to()

    def remove(self) -> None:
        """Restore the original forwards of the target layers."""
        for module in self.by_name.values():
            module.remove()

    def set_multiplier(self, multiplier: float) -> None:
        multiplier = lora_multiplier(multiplier)
        self.multiplier = multiplier
        for module in self.by_name.values():
            module.multiplier = multiplier

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for module in self.by_name.values() for p in (module.lora_down.weight, module.lora_up.weight)]

    def param_groups(self, lr: float, loraplus_lr_ratio: float | None = None) -> list[dict]:
        """Optimizer parameter groups; with LoRA+ the up weights get lr·ratio."""
        downs = [m.lora_down.weight for m in self.by_name.values()]
        ups = [m.lora_up.weight for m in self.by_name.values()]
        if loraplus_lr_ratio is None:
            return [{"params": downs + ups, "lr": lr}]
        return [{"params": downs, "lr": lr}, {"params": ups, "lr": lr * loraplus_lr_ratio}]

    # -- saving and loading --------------------------------------------------------------------------------------

    def adapters(self) -> dict[str, LowRank]:
        return {name: LowRank(m.lora_down.weight.detach(), m.lora_up.weight.detach(), float(m.alpha))
                for name, m in self.by_name.items()}

    def state_dict_in(self, format: str = "musubi", *, dtype: torch.dtype | None = None, prefix: str | None = None,
                      keep_alpha: bool = False) -> dict[str, torch.Tensor]:
        """The weights in "musubi" (sd-scripts keys + alpha), "comfyui" or "diffusers" layout (see
        `wan_core.lora.formats.lora_state_dict` for `prefix`, `keep_alpha`)."""
        tensors = lora_state_dict(self.adapters(), format, prefix=prefix, keep_alpha=keep_alpha)
        return {k: v.to(dtype) if dtype is not None and v.dim() else v for k, v in tensors.items()}

    def network_metadata(self) -> dict[str, str]:
        """musubi's network keys (`ss_network_*`); trainers add their own keys on top."""
        args = {k: v for k, v in (("rank_dropout", self.rank_dropout), ("module_dropout", self.module_dropout),
                                  ("include_patterns", self.include_patterns or None),
                                  ("exclude_patterns", self.exclude_patterns or None)) if v is not None}
        return {"ss_network_module": MUSUBI_NETWORK_MODULE, "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.alpha_value), "ss_network_dropout": str(self.dropout),
                "ss_network_args": json.dumps(args)}

    def save(self, path: str | os.PathLike, format: str = "musubi", *, metadata: Mapping[str, str] | None = None,
             dtype: torch.dtype | None = None, prefix: str | None = None, keep_alpha: bool = False) -> Path:
        """Write the LoRA atomically, with `network_metadata()` updated by `metadata` (passed through)."""
        meta = {**self.network_metadata(), **{k: str(v) for k, v in (metadata or {}).items()}}
        return save_lora(self.adapters(), path, format, metadata=meta, dtype=dtype, prefix=prefix,
                         keep_alpha=keep_alpha)

    def load_weights(self, source: LoRASource) -> LoRAReport:
        """Continue from a LoRA in any format: copies down/up and takes the file's alpha (so the delta is the
        file's). Ranks must agree (use `from_weights` otherwise)."""
        lora = load_lora(source, set(self.by_name))
        with torch.no_grad():
            for name, adapter in lora.adapters.items():
                module = self.by_name[name]
                if not isinstance(adapter, LowRank):
                    raise ValueError(f"{lora.source}: {name} is a {adapter.kind} adapter; the network is a plain LoRA")
                if adapter.rank != module.rank:
                    raise ValueError(f"{lora.source}: {name} has rank {adapter.rank} but the network has rank "
                                     f"{module.rank}; build the network with that rank (or LoRANetwork.from_weights)")
                module.lora_down.weight.copy_(adapter.down)
                module.lora_up.weight.copy_(adapter.up)
                module.set_alpha(adapter.alpha)
        missing = [n for n in self.by_name if n not in lora.adapters]
        if missing:
            logger.warning("%s has no weights for %d network modules (they keep their initial values): %s",
                           lora.source, len(missing), ", ".join(missing[:10]))
        logger.info("loaded LoRA weights for %d modules from %s", len(lora.adapters), lora.source)
        return LoRAReport(lora.source, lora.format, self.multiplier, len(lora.adapters), (), lora.unmatched)
