"""The trainable LoRA network for the Wan2.1 DiT (what `python -m training` trains).

`LoRANetwork(model, rank, alpha, ...)` puts a LoRA on every Linear of each `WanAttentionBlock` (musubi's
`networks.lora_wan`). Its include/exclude patterns work differently from the inference ones, as in musubi:
`re.fullmatch` on official module names (`blocks.0.self_attn.q`), a module is skipped when it matches an exclude
pattern and no include pattern (include wins), and the default exclude `DEFAULT_TRAIN_EXCLUDE` is always added. Include
patterns alone therefore select nothing extra; to train only some layers, exclude everything (`.*`) and include those.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wan_core.loading.convert import kohya_lora_name
from wan_core.lora.apply import LoRAReport, compile_pattern, lora_multiplier, out_in_features, walk_linears
from wan_core.lora.formats import LoRASource, LowRank, load_lora, lora_state_dict, save_lora
from wan_core.models.dit import WanAttentionBlock

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_EXCLUDE = r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*"
MUSUBI_NETWORK_MODULE = "networks.lora_wan"


def _as_list(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def training_targets(model: nn.Module, include_patterns: str | Sequence[str] | None = None,
                     exclude_patterns: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """musubi's Wan targets: every Linear-like layer inside a WanAttentionBlock, filtered with `re.fullmatch` on
    official names; skipped when an exclude pattern matches and no include pattern does; the default exclude
    pattern is always appended."""
    excludes = [compile_pattern(p, "exclude") for p in [*_as_list(exclude_patterns), DEFAULT_TRAIN_EXCLUDE]]
    includes = [compile_pattern(p, "include") for p in _as_list(include_patterns)]
    targets: dict[str, nn.Module] = {}
    for block_name, block in model.named_modules():
        if not isinstance(block, WanAttentionBlock):
            continue
        for child_name, layer in walk_linears(block, f"{block_name}."):
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
        out_features, in_features = out_in_features(base)
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
        names = {n for b, block in model.named_modules() if isinstance(block, WanAttentionBlock)
                 for n, _ in walk_linears(block, f"{b}.")}
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
                if adapter.dora_scale is not None:
                    raise ValueError(f"{lora.source}: {name} is a DoRA adapter (.dora_scale); the network is a plain "
                                     f"LoRA")
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
        # full-parameter patches (.diff, .diff_b, .set_weight) have no place in a LoRA network: not loaded
        patched = tuple(k for p in lora.params for k in lora.source_keys.get(p, (p,)))
        if patched:
            logger.warning("%s: %d full-parameter patch key(s) are not part of a LoRA network and are NOT loaded: %s",
                           lora.source, len(patched), ", ".join(patched[:10]))
        return LoRAReport(lora.source, lora.format, self.multiplier, len(lora.adapters), (),
                          (*lora.unmatched, *patched))
