"""LoRA inference for the Wan2.1 DiT: merging, and unmerged application with live strengths (the trainable network
is in `wan_core.lora.network`).

Inference:
- `merge_loras(model_or_state_dict, loras, multipliers)`: W ← W + Σ m·ΔW, computed in fp32 and cast back once.
  Merging needs bf16/fp16/fp32 weights: a loader that quantises to fp8 merges first, then quantises.
- `apply_loras(model, loras, multipliers) -> LoRAHandle`: wraps each matched Linear-like layer in a `LoRAModule`
  (out = base(x) + Σ m·ΔW x, the LoRA part computed in the layer's compute dtype). The base layer is only called,
  never read, so fp8 layers work. `handle.set_multiplier()` changes strengths, `handle.remove()` unwraps.
- Full-parameter patches (`.diff`, `.diff_b`, `.set_weight`): merged as P ← P + m·diff (a set_weight replaces P
  whatever the strength, as in ComfyUI). Unmerged, a `.diff` of a Linear weight is a branch like any adapter; the
  other patches (norms, biases, modulation, set_weight) are written into the parameter while applied and the
  original values are restored by `remove()` (and rewritten by `set_multiplier()`); they need non-fp8 storage.
- DoRA (`.dora_scale`): ΔW depends on the base weight (`weight_delta`), so it is computed once from the layer's
  weight; merged and unmerged both need a bf16/fp16/fp32 weight. Several LoRAs on one layer each see the base
  weight from before the merge.
- Include/exclude (one regex per LoRA, musubi `--include_patterns/--exclude_patterns`): `re.search` on the
  sd-scripts module name (`lora_unet_blocks_9_cross_attn_k`); include first, then exclude, so a module matching
  both is dropped. Module names are the same whatever the file's format.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, overload

import torch
import torch.nn.functional as F
from torch import nn

from wan_core.loading.convert import kohya_lora_name
from wan_core.lora.formats import Adapter, FullDiff, LoRA, LoRASource, LowRank, ParamPatch, load_lora, weight_delta
from wan_core.models.ops import Fp32Linear

logger = logging.getLogger(__name__)

Target = nn.Module | MutableMapping[str, torch.Tensor]
Multipliers = float | Sequence[float] | None  # one per LoRA, or one for all (None: 1.0)
Patterns = str | Sequence[str | None] | None  # one regex per LoRA, or one for all (None: no filter)


# ----------------------------------------------------------------------------------------------------------------
# Target discovery
# ----------------------------------------------------------------------------------------------------------------

def out_in_features(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a layer `_is_linear_like` accepted."""
    return cast(int, layer.out_features), cast(int, layer.in_features)


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(getattr(module, "in_features", None), int)
                                             and isinstance(getattr(module, "out_features", None), int))


def walk_linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every Linear-like layer; a LoRAModule yields its base under the wrapper's name."""
    for name, child in module.named_children():
        full = prefix + name
        if isinstance(child, LoRAModule):
            yield full, child.base
        elif _is_linear_like(child):
            yield full, child
        else:
            yield from walk_linears(child, full + ".")


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Official name -> Linear-like layer (nn.Linear subclasses and anything with int in/out_features)."""
    return dict(walk_linears(model))


def _walk_params(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str]]:
    for attr, _ in module.named_parameters(recurse=False):
        yield prefix + attr, module, attr
    for name, child in module.named_children():
        yield from _walk_params(child.base if isinstance(child, LoRAModule) else child, f"{prefix}{name}.")


def parameter_owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Official parameter name -> (owning module, attribute), seen through LoRAModule wrappers."""
    return {name: (owner, attr) for name, owner, attr in _walk_params(model)}


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
def compile_pattern(pattern: str, what: str) -> re.Pattern[str]: ...
@overload
def compile_pattern(pattern: str | None, what: str) -> re.Pattern[str] | None: ...
def compile_pattern(pattern: str | None, what: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid {what} pattern {pattern!r}: {exc}") from None


def inference_filter(include: str | None = None, exclude: str | None = None) -> Callable[[str], bool]:
    """musubi's inference filter for one LoRA: keep a module when `include` is found in its sd-scripts name (if
    given) and `exclude` is not (if given). Takes official module names."""
    inc, exc = compile_pattern(include, "include"), compile_pattern(exclude, "exclude")

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


Prepared = tuple[dict[str, Adapter], float, LoRAReport, dict[str, ParamPatch]]


def _prepare(loras: Sequence[LoRASource] | LoRASource, modules: set[str], multipliers: Multipliers,
             include_patterns: Patterns, exclude_patterns: Patterns, params: set[str]) -> list[Prepared]:
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
        lora = load_lora(source, modules, params=params)
        used = {m: a for m, a in lora.adapters.items() if keep(m)}
        used_params = {p: v for p, v in lora.params.items() if keep(p.rpartition(".")[0] or p)}
        filtered = (*(m for m in lora.adapters if m not in used), *(p for p in lora.params if p not in used_params))
        if filtered:
            logger.info("%s: include/exclude patterns keep %d of %d modules and parameters", lora.source,
                        len(used) + len(used_params), len(lora.adapters) + len(lora.params))
        report = LoRAReport(lora.source, lora.format, mult, len(used) + len(used_params), filtered, lora.unmatched)
        logger.info("LoRA %s", report)
        prepared.append((used, mult, report, used_params))
    return prepared


def _check_shape(module: str, adapter: Adapter | ParamPatch, shape: tuple[int, ...], source: str) -> None:
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
    base = weight.detach().float()
    total = base
    for adapter, mult in parts:
        total = total + mult * weight_delta(adapter, base).to(weight.device)
    return total.to(weight.dtype)


def _patched(value: torch.Tensor, parts: list[tuple[ParamPatch, float]], where: str) -> torch.Tensor:
    """P after full-parameter patches: P + Σ m·diff (float32, rounded once); a SetWeight replaces P first."""
    if value.dtype.itemsize == 1:
        raise ValueError(f"{where} is stored as {value.dtype}: patch it before quantising to fp8")
    total = value.detach().float()
    for patch, _ in parts:
        if not isinstance(patch, FullDiff):
            total = patch.value.float().to(value.device)
    for patch, mult in parts:
        if isinstance(patch, FullDiff):
            total = total + mult * patch.delta().to(value.device)
    return total.to(value.dtype)


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
    owners: dict[str, tuple[nn.Module, str]] | None = None
    keys: dict[str, str] = {}
    state: MutableMapping[str, torch.Tensor] = {}
    if isinstance(target, nn.Module):
        layers, owners = linear_modules(target), parameter_owners(target)
    else:
        keys, state = _state_dict_linears(target), target
    names = set(layers if layers is not None else keys)
    prepared = _prepare(loras, names, multipliers, include_patterns, exclude_patterns,
                        set(owners if owners is not None else state))
    per_module: dict[str, list[tuple[Adapter, float]]] = {}
    per_param: dict[str, list[tuple[ParamPatch, float]]] = {}
    for used, mult, report, used_params in prepared:
        for module, adapter in used.items():
            shape = _weight(layers[module], module).shape if layers is not None else state[keys[module]].shape
            _check_shape(module, adapter, tuple(shape), report.source)
            if mult != 0.0:
                per_module.setdefault(module, []).append((adapter, mult))
        for name, patch in used_params.items():
            shape = getattr(*owners[name]).shape if owners is not None else state[name].shape
            _check_shape(name, patch, tuple(shape), report.source)
            if mult != 0.0:
                per_param.setdefault(name, []).append((patch, mult))
    with torch.no_grad():
        for module, parts in per_module.items():
            if layers is not None:
                weight = _weight(layers[module], module)
                weight.copy_(_merged(weight, parts, module))
            else:
                state[keys[module]] = _merged(state[keys[module]], parts, keys[module])
        for name, patches in per_param.items():
            if owners is not None:
                value = getattr(*owners[name])
                value.copy_(_patched(value, patches, name))
            else:
                state[name] = _patched(state[name], patches, name)
    logger.info("merged %d LoRA(s) into %d layers and %d other parameters", len(prepared), len(per_module),
                len(per_param))
    return [report for _, _, report, _ in prepared]


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
    """m·ΔW x for LoHa/LoKr/DoRA/full diffs, with ΔW materialised once (alpha/rank included) in the compute dtype."""

    delta: torch.Tensor

    def __init__(self, delta: torch.Tensor, multiplier: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("delta", delta.to(device, dtype), persistent=False)  # [out, in]
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
        # parameters patched in place (norms, biases, modulation, set_weight): name -> (owner, attr, original)
        self._originals: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
        self._param_patches: list[dict[str, ParamPatch]] = [{} for _ in reports]

    def _patch_param(self, index: int, name: str, owner: nn.Module, attr: str, patch: ParamPatch) -> None:
        value = getattr(owner, attr)
        if value.dtype.itemsize == 1:
            raise ValueError(f"LoRA {self.reports[index].source}: {name} is stored as {value.dtype}; a full patch "
                             f"(.diff/.diff_b/.set_weight) needs bf16/fp16/fp32, so merge before quantising to fp8")
        self._originals.setdefault(name, (owner, attr, value.detach().clone()))
        self._param_patches[index][name] = patch

    def _refresh_params(self) -> None:
        """Write every in-place patched parameter as original + Σ m·patch with the current strengths."""
        with torch.no_grad():
            for name, (owner, attr, original) in self._originals.items():
                parts = [(patches[name], m) for patches, m in zip(self._param_patches, self._multipliers)
                         if name in patches and m != 0.0]
                getattr(owner, attr).copy_(_patched(original, parts, name))

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
        self._refresh_params()

    def remove(self) -> None:
        """Remove this handle's branches; layers left without branches get their original module back."""
        if self._removed:
            return
        with torch.no_grad():
            for owner, attr, original in self._originals.values():
                getattr(owner, attr).copy_(original)
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
    owners = parameter_owners(model)
    prepared = _prepare(loras, set(layers), multipliers, include_patterns, exclude_patterns, set(owners))
    handle = LoRAHandle(model, [report for _, _, report, _ in prepared])
    handle_id = next(_handle_ids)
    try:
        _attach(handle, handle_id, prepared, layers, owners)
    except Exception:
        handle.remove()  # nothing half-applied stays in the model
        raise
    handle._refresh_params()
    logger.info("applied %d LoRA(s) unmerged to %d layers (%d parameters patched in place)", len(prepared),
                len({m for entries in handle._branches for m, _, _ in entries}), len(handle._originals))
    return handle


def _attach(handle: LoRAHandle, handle_id: int, prepared: list[Prepared], layers: dict[str, nn.Module],
            owners: dict[str, tuple[nn.Module, str]]) -> None:
    for index, (used, mult, report, used_params) in enumerate(prepared):
        key = f"lora{handle_id}_{index}"
        for module, adapter in used.items():
            base = layers[module]
            _check_shape(module, adapter, out_in_features(base), report.source)
            _add_branch(handle, index, module, _branch(adapter, mult, base, module), key)
        for name, patch in used_params.items():
            owner, attr = owners[name]
            _check_shape(name, patch, tuple(getattr(owner, attr).shape), report.source)
            module = name[: -len(".weight")]
            if isinstance(patch, FullDiff) and name.endswith(".weight") and module in layers:
                base = layers[module]
                branch = _DeltaBranch(patch.delta(), mult, _lora_dtype(base), _device_of(base))
                _add_branch(handle, index, module, branch, key + "_diff")
            else:
                handle._patch_param(index, name, owner, attr, patch)


def _branch(adapter: Adapter, mult: float, base: nn.Module, module: str) -> nn.Module:
    dtype, device = _lora_dtype(base), _device_of(base)
    if adapter.dora_scale is not None:
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype.itemsize == 1:
            raise ValueError(f"DoRA on {module} ({type(base).__name__}) needs the bf16/fp16/fp32 base weight to "
                             f"normalise; merge DoRA LoRAs before quantising to fp8")
        return _DeltaBranch(weight_delta(adapter, weight), mult, dtype, device)
    if isinstance(adapter, LowRank):
        return _LowRankBranch(adapter, mult, dtype, device)
    return _DeltaBranch(adapter.delta(), mult, dtype, device)


def _add_branch(handle: LoRAHandle, index: int, module: str, branch: nn.Module, key: str) -> None:
    wrapper = _wrap(handle.model, module)
    wrapper.branches[key] = branch
    handle._branches[index].append((module, wrapper, key))


# ----------------------------------------------------------------------------------------------------------------
# A LoRA chain applied for one sampling run, and a dry run that reports what a LoRA matches
# ----------------------------------------------------------------------------------------------------------------

def lora_report(model: torch.nn.Module, path: str | Path, strength: float, include: str | None,
                exclude: str | None) -> LoRAReport:
    """Apply one LoRA unmerged, read its `LoRAReport` (matched, filtered and unmatched keys) and remove it again:
    the same matching and shape checks the sampler will run, without leaving the model changed."""
    handle = apply_loras(model, [str(path)], [strength], include_patterns=[include], exclude_patterns=[exclude])
    try:
        return handle.reports[0]
    finally:
        handle.remove()


@contextmanager
def applied_loras(model: torch.nn.Module,
                  loras: Sequence[tuple[str, float, str | None, str | None]]) -> Iterator[LoRAHandle | None]:
    """Apply a LoRA chain [(path, strength, include, exclude), ...] unmerged for the duration of a `with` block,
    then remove it (also when the run is interrupted)."""
    if not loras:
        yield None
        return
    paths, strengths, includes, excludes = (list(column) for column in zip(*loras))
    handle = apply_loras(model, paths, strengths, include_patterns=includes, exclude_patterns=excludes)
    try:
        yield handle
    finally:
        handle.remove()
