"""What is trained: the DiT (loaded for training) and either a LoRA network or all of the DiT's parameters.

- `inspect_dit`: architecture, stored dtype and metadata from the file header (no weights read).
- `load_training_dit`: `wan_core.load_dit` with the task check, the weight dtype for the chosen mixed precision
  (musubi's rule: bf16 weights need bf16 or no mixed precision, fp16 weights fp16 or no), `--fp8_base` /
  `--fp8_scaled` through `wan_core.runtime.fp8`, gradient checkpointing, and `--blocks_to_swap` through
  `wan_core.runtime.offload`.
  Full training keeps fp32 master weights and computes under autocast.
- `Trainable`: the parameters, optimizer groups (LoRA+ aware), the state dict written into training states, and
  the saved file: a LoRA in musubi or ComfyUI keys through `LoRANetwork.save`, or, for `--network_module full`,
  the whole DiT in official names with its `wantuner_config` (and the input file's other wantuner_* keys).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from training import sharding
from training.experts import ExpertPair, share_network
from wan_core.loading.checkpoint import peek_shapes, read_metadata, save_safetensors
from wan_core.lora.formats import save_lora
from wan_core.lora.network import LoRANetwork
from wan_core.models.config import (
    CONFIG_METADATA_KEY,
    DiTConfig,
    config_from_json,
    config_to_json,
    detect_config,
    tasks_matching,
)
from wan_core.models.dit import WanModel, checkpoint_dtype, load_dit, normalize_dit_keys
from wan_core.models.ops import FP8_DTYPES
from wan_core.runtime.offload import enable_block_swap, parse_blocks_to_swap, pin_mode

if TYPE_CHECKING:
    from training.train_config import MemoryConfig, ModelConfig, TrainConfig

logger = logging.getLogger(__name__)

NETWORK_ARG_TYPES = {"rank_dropout": float, "module_dropout": float, "loraplus_lr_ratio": float,
                     "include_patterns": list, "exclude_patterns": list, "verbose": bool}
_MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DiTInfo:
    config: DiTConfig
    dtype: torch.dtype
    metadata: dict[str, str]


def inspect_dit(path: str | Path) -> DiTInfo:
    """Config (metadata, else shapes), stored dtype and metadata of a DiT file, reading only its header."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    shapes = normalize_dit_keys(peek_shapes(path), path.name)
    metadata = read_metadata(path) if path.suffix == ".safetensors" else {}
    cfg = config_from_json(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else detect_config(shapes)
    if not isinstance(cfg, DiTConfig):
        raise ValueError(f"{path} holds a {type(cfg).__name__} ({CONFIG_METADATA_KEY} metadata), not a DiT")
    return DiTInfo(cfg, checkpoint_dtype(shapes), metadata)


def resolve_task(task: str | None, info: DiTInfo) -> str | None:
    """--task, else the preset whose architecture equals the file's (None for non-preset sizes such as toys)."""
    if task is not None:
        return task
    fits = tasks_matching(info.config)
    return fits[0] if fits else None


def weight_dtype(mixed_precision: str | None, stored: torch.dtype, full: bool) -> torch.dtype:
    """The dtype the DiT weights are kept in during training."""
    mixed = _MIXED_DTYPES.get(mixed_precision or "no")
    if full:
        return torch.float32
    if stored in FP8_DTYPES:
        return mixed or torch.bfloat16
    for half, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        if stored == half and mixed is not None and mixed != half:
            raise ValueError(f"the DiT weights are {name}: use --mixed_precision {name} or no (got "
                             f"{mixed_precision}); converting would lose precision")
    return mixed or stored


def _block_swap(model: WanModel, blocks: int, device: torch.device, pinned: bool) -> None:
    """`wan_core.runtime.offload`: the last `blocks` blocks' frozen weights stream from CPU memory (LoRA stays on
    device)."""
    count = parse_blocks_to_swap(blocks, len(model.blocks))
    swapper = enable_block_swap(model, count, device, pin=pin_mode(pinned))
    model._block_swapper = swapper  # keep it alive with the model


def load_training_dit(models: ModelConfig, memory: MemoryConfig, info: DiTInfo, device: torch.device,
                      full: bool, path: str | None = None) -> WanModel:
    """The DiT `path` (default `models.dit`, described by `info`) ready for training on `device`."""
    dtype = weight_dtype(memory.mixed_precision, info.dtype, full)
    fp8 = ("fp8_scaled" if memory.fp8_scaled else "fp8") if memory.fp8_base else None
    staged = memory.blocks_to_swap is not None
    model = load_dit(path or models.dit, task=models.task, dtype=dtype, device="cpu" if staged else device,
                     attn=models.attention, fp8=fp8)
    model.gradient_checkpointing = bool(memory.gradient_checkpointing)
    if staged:
        _block_swap(model, memory.blocks_to_swap, device, memory.use_pinned_memory_for_block_swap)
    return model


# ----------------------------------------------------------------------------------------------------------------
# A DiT loaded by someone else (the ComfyUI DiT loader)
# ----------------------------------------------------------------------------------------------------------------

def given_dit_info(model: WanModel, path: str | Path | None) -> DiTInfo:
    """DiTInfo of a loaded model: its config and compute dtype, and the metadata of its file (when given)."""
    metadata = read_metadata(Path(path)) if path is not None and Path(path).suffix == ".safetensors" else {}
    return DiTInfo(model.config, model.dtype, metadata)


def _check_borrowable(model: WanModel, cfg: TrainConfig, device: torch.device) -> None:
    """A given DiT is trained as it is loaded: LoRA only, its own fp8/block swap, on the training device."""
    problems = []
    if cfg.network.full:
        problems.append("full training would change the given DiT's weights; train a LoRA")
    if cfg.memory.fp8_base or cfg.memory.blocks_to_swap:
        problems.append("fp8_base / blocks_to_swap are the given DiT's own (set them where it is loaded)")
    where = next(model.parameters()).device
    if where.type != device.type:
        problems.append(f"the given DiT is on {where}, the training runs on {device}")
    if problems:
        raise ValueError("cannot train the given DiT: " + "; ".join(problems))
    weight_dtype(cfg.memory.mixed_precision, model.dtype, False)  # a bf16 model with fp16 training etc.


def _normal_view(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor over the storage of `tensor` (an inference tensor): same memory, nothing copied."""
    view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    with torch.no_grad():
        return view.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())


def normal_tensors(model: nn.Module) -> int:
    """Replace the inference-mode parameters and buffers (made under torch.inference_mode, as ComfyUI loads models)
    by normal tensors over the same memory (no copy): autograd can neither save inference tensors for the backward
    pass nor track their versions. Tied tensors stay tied. The Parameter objects change, so a block swapper holding
    them must be detached first. Returns how many were replaced."""
    new: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, make in ((module._parameters, lambda t: nn.Parameter(_normal_view(t), t.requires_grad)),
                            (module._buffers, _normal_view)):
            for name, tensor in table.items():
                if tensor is not None and tensor.is_inference():
                    table[name] = new.setdefault(id(tensor), make(tensor))
    return len(new)


@contextlib.contextmanager
def borrowed_dit(model: WanModel, cfg: TrainConfig, device: torch.device) -> Iterator[WanModel]:
    """Lend `model` to a LoRA training run: for the run its attention backend and gradient checkpointing are the
    config's and its inference-mode tensors become normal tensors (same memory, `normal_tensors`); afterwards
    requires_grad, the train/eval modes, the attention backends and gradient checkpointing are restored and the
    RoPE cache emptied (the caller removes its LoRA)."""
    _check_borrowable(model, cfg, device)
    replaced = normal_tensors(model)
    if replaced:
        logger.info("%d inference-mode tensors of the given DiT made usable by autograd (no copy)", replaced)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    backends = [(m, m.attn_backend) for m in model.modules() if hasattr(m, "attn_backend")]
    checkpointing = model.gradient_checkpointing
    model._rope_cache = {}
    model.set_attention_backend(cfg.model.attention)
    model.gradient_checkpointing = cfg.memory.gradient_checkpointing
    try:
        yield model
    finally:
        for param, flag in grads:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training
        for module, backend in backends:
            module.attn_backend = backend
        model.gradient_checkpointing = checkpointing
        model._rope_cache = {}


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------

def parse_network_args(items: list[str] | None) -> dict[str, object]:
    """musubi `--network_args key=value` items, typed; unknown keys are an error."""
    out: dict[str, object] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in NETWORK_ARG_TYPES:
            raise ValueError(f"--network_args {item!r}: expected key=value with key one of "
                             f"{', '.join(NETWORK_ARG_TYPES)}")
        kind = NETWORK_ARG_TYPES[key]
        try:
            if kind is list:
                value = ast.literal_eval(raw) if raw.startswith(("[", "(")) else [raw]
                out[key] = [str(p) for p in value]
            elif kind is bool:
                out[key] = raw.lower() in ("true", "1", "yes")
            else:
                out[key] = kind(raw)
        except (ValueError, SyntaxError):
            raise ValueError(f"--network_args {item!r}: {key} needs a {kind.__name__} value") from None
    return out


@dataclass(frozen=True)
class NetworkConfig:
    full: bool = False
    rank: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    extra: dict[str, object] = field(default_factory=dict)  # parsed --network_args
    raw_args: tuple[str, ...] = ()
    weights: str | None = None
    dim_from_weights: bool = False
    module: str = "networks.lora_wan"  # musubi's --network_module name, recorded in the metadata

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NetworkConfig:
        full = args.network_module == "full"
        return cls(full, args.network_dim or 4, 1.0 if args.network_alpha is None else args.network_alpha,
                   args.network_dropout, parse_network_args(args.network_args), tuple(args.network_args or ()),
                   args.network_weights, args.dim_from_weights, args.network_module or "networks.lora_wan")


class Trainable:
    """The trained parameters: a `LoRANetwork` over the frozen DiT, or the DiT itself. With a Wan2.2 expert pair
    (`attach_experts`) `model` is the low-noise expert and `shadow` the network patched into the high-noise one,
    sharing the LoRA weights."""

    def __init__(self, model: WanModel, network: LoRANetwork | None, cfg: NetworkConfig) -> None:
        self.model, self.network, self.cfg = model, network, cfg
        self.module: torch.nn.Module = network if network is not None else model
        self.experts: ExpertPair | None = None
        self.shadow: LoRANetwork | None = None

    @property
    def is_full(self) -> bool:
        return self.network is None

    @property
    def denoiser(self) -> WanModel | ExpertPair:
        """What a training step runs: the DiT, or the expert pair."""
        return self.experts if self.experts is not None else self.model

    def attach_experts(self, experts: ExpertPair) -> None:
        """Train this LoRA across `experts` (whose low-noise expert is `model`): patch the shared network into the
        high-noise expert."""
        if self.network is None or experts.low is not self.model:
            raise ValueError("an expert pair trains a LoRA network built on its low-noise expert")
        self.shadow = share_network(self.network, experts.high)
        self.experts = experts

    def remove_network(self) -> None:
        """Restore the forwards of the LoRA-patched layers (of both experts)."""
        for network in (self.network, self.shadow):
            if network is not None:
                network.remove()

    def parameters(self) -> list[torch.nn.Parameter]:
        if self.network is not None:
            return self.network.trainable_parameters()
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self, lr: float) -> list[dict]:
        if self.network is not None:
            return self.network.param_groups(lr, self.cfg.extra.get("loraplus_lr_ratio"))  # type: ignore[arg-type]
        return [{"params": self.parameters(), "lr": lr}]

    def train(self) -> None:
        self.module.train()
        if self.shadow is not None:
            self.shadow.train()

    def eval(self) -> None:
        self.module.eval()
        if self.shadow is not None:
            self.shadow.eval()

    @property
    def sharded(self) -> bool:
        """Whether the trained parameters are FSDP shards (full fine-tuning of a sharded DiT)."""
        params = self.parameters()
        return bool(params) and sharding.is_sharded(params[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to restore the trained weights exactly (LoRA down/up/alpha, or the whole DiT); this
        process's shards when sharded."""
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def full_state_dict(self, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """`state_dict` with sharded tensors gathered (a collective: every process calls it): on the main process
        only ({} elsewhere), or with `everywhere` on every process. Unsharded: `state_dict()` on every process."""
        if not self.sharded:
            return self.state_dict()
        return sharding.gather_model_state(self.module, everywhere)

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        expected = self.module.state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        wrong = sorted(k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or wrong:
            shape = f"; {wrong[0]} is {list(sd[wrong[0]].shape)}, expected {list(expected[wrong[0]].shape)}" \
                if wrong else ""
            raise ValueError(f"the training state does not fit this run's {'DiT' if self.is_full else 'LoRA'}: "
                             f"{len(missing)} missing, {len(unexpected)} unexpected and {len(wrong)} mis-shaped keys"
                             f"{shape}; was it saved with other network settings?")
        if self.sharded:  # full tensors on every process: each keeps its shard
            sharding.load_model_state(self.module, sd)
        else:
            self.module.load_state_dict(dict(sd))

    def save(self, path: Path, fmt: str, metadata: Mapping[str, str], dtype: torch.dtype,
             dit_metadata: Mapping[str, str], weights: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write the trained weights atomically (LoRA in `fmt`, or the full DiT with its config); `weights`: the
        full state dict when it was gathered from shards (`full_state_dict`)."""
        if self.network is not None:
            return save_lora(self.network.adapters(), path, fmt, metadata=metadata, dtype=dtype)
        keep = {k: v for k, v in dit_metadata.items() if k.startswith("wantuner_")}
        meta = {**keep, **metadata, CONFIG_METADATA_KEY: config_to_json(self.model.config)}
        state = self.state_dict() if weights is None else weights
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        return save_safetensors(tensors, path, meta)


def apply_network(model: WanModel, cfg: NetworkConfig) -> Trainable:
    """Freeze the DiT and attach a trainable LoRA (or unfreeze everything for full training)."""
    if cfg.full:
        model.requires_grad_(True)
        logger.info("full training: %.1fM DiT parameters", sum(p.numel() for p in model.parameters()) / 1e6)
        return Trainable(model, None, cfg)
    model.requires_grad_(False)
    extra = cfg.extra
    kwargs = {"dropout": cfg.dropout, "rank_dropout": extra.get("rank_dropout"),
              "module_dropout": extra.get("module_dropout")}
    if cfg.weights and cfg.dim_from_weights:
        network = LoRANetwork.from_weights(model, cfg.weights, **kwargs)
    else:
        network = LoRANetwork(model, cfg.rank, cfg.alpha, include_patterns=extra.get("include_patterns"),
                              exclude_patterns=extra.get("exclude_patterns"), **kwargs)
        if cfg.weights:
            report = network.load_weights(cfg.weights)
            if report.unmatched:
                raise ValueError(f"--network_weights {cfg.weights}: {len(report.unmatched)} keys match no layer of "
                                 f"this DiT (e.g. {', '.join(report.unmatched[:3])})")
    if extra.get("verbose"):
        for name, module in network.by_name.items():
            logger.info("LoRA %s: rank %d, alpha %g", name, module.rank, float(module.alpha))
    device = next(model.parameters()).device
    network.to(device)
    return Trainable(model, network, cfg)
