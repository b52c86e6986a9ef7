"""Optimizers and learning-rate schedulers (musubi's `--optimizer_type`, `--lr_scheduler` and companions).

Optimizers (`build_optimizer`):
- `AdamW` (torch.optim.AdamW, the default), `AdamW8bit` (bitsandbytes.optim.AdamW8bit),
- `Adafactor`: transformers.optimization.Adafactor, as musubi (relative_step=True by default, which makes the
  learning rate internal and selects transformers' AdafactorSchedule); torch's own is `torch.optim.Adafactor`,
- `Prodigy` (prodigyopt.Prodigy),
- any class path `module.Class`, or a bare class name from torch.optim; `--optimizer_args k=v ...` are parsed with
  `ast.literal_eval` (so `betas=0.9,0.999` is a tuple) and passed to the constructor.
Schedule-free optimizers (`*ScheduleFree`) get `optimizer.train()/eval()` calls from the loop and a constant
schedule.

Schedulers (`build_scheduler`): the multipliers of transformers' / diffusers' `get_scheduler` (constant,
constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt, cosine_with_min_lr,
warmup_stable_decay, piecewise_constant) reimplemented as `LambdaLR`s, or `--lr_scheduler_type module.Class` with
`--lr_scheduler_args`. `--lr_warmup_steps/--lr_decay_steps` below 1 are ratios of the total steps (musubi).
The schedule advances once per optimizer step and spans `--max_train_steps` optimizer steps, also under DDP
(musubi multiplies the step count by the process count because accelerate steps a prepared scheduler once per
process; the resulting learning rates per optimizer step are the same).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant")
_NAMED_OPTIMIZERS = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                     "adafactor": "transformers.optimization.Adafactor", "prodigy": "prodigyopt.Prodigy"}
_PACKAGE_HINTS = {"bitsandbytes": "pip install bitsandbytes (needs a CUDA build for 8-bit optimizers)",
                  "transformers": "pip install transformers", "prodigyopt": "pip install prodigyopt",
                  "schedulefree": "pip install schedulefree"}


def parse_kwargs(items: Sequence[str] | None, flag: str) -> dict[str, object]:
    """`key=value` strings -> dict, values through ast.literal_eval (strings that are not literals stay strings)."""
    out: dict[str, object] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes key=value items, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


def import_class(path: str, default_module: str, what: str) -> type:
    """`module.Class` or a bare class name from `default_module`, with a clear error naming the package."""
    module_name, _, name = path.rpartition(".")
    module_name = module_name or default_module
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        root = (exc.name or module_name).split(".")[0]
        hint = _PACKAGE_HINTS.get(root, f"pip install {root}")
        raise RuntimeError(f"{what} {path!r} needs the Python package {root!r}, which is not installed "
                           f"({hint})") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"unknown {what} {path!r}: {module_name} has no class {name!r}")
    return cls


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str = "AdamW"
    optimizer_args: tuple[str, ...] = ()
    learning_rate: float = 2e-6
    max_grad_norm: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimizerConfig:
        return cls(args.optimizer_type or "AdamW", tuple(args.optimizer_args or ()), args.learning_rate,
                   args.max_grad_norm)


@dataclass
class BuiltOptimizer:
    optimizer: torch.optim.Optimizer
    name: str  # module.Class(args) for the metadata
    schedule_free: bool
    adafactor_relative_step: bool


def optimizer_class_path(optimizer_type: str) -> str:
    return _NAMED_OPTIMIZERS.get(optimizer_type.lower(), optimizer_type)


def build_optimizer(cfg: OptimizerConfig,
                    param_groups: Iterable[dict] | Iterable[torch.nn.Parameter]) -> BuiltOptimizer:
    """The optimizer over `param_groups` (each group may carry its own lr, e.g. LoRA+)."""
    kwargs = parse_kwargs(cfg.optimizer_args, "--optimizer_args")
    path = optimizer_class_path(cfg.optimizer_type)
    cls = import_class(path, "torch.optim", "optimizer")
    lr: float | None = cfg.learning_rate
    relative_step = False
    if path == _NAMED_OPTIMIZERS["adafactor"]:
        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init"):
            kwargs["relative_step"] = True
        relative_step = bool(kwargs["relative_step"])
        if relative_step:
            logger.info("Adafactor with relative_step: --learning_rate %g is its initial lr; the adafactor schedule "
                        "is used", cfg.learning_rate)
            lr = None
    groups = list(param_groups)
    if relative_step:
        groups = [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in groups]
    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except TypeError as exc:
        raise ValueError(f"cannot build optimizer {path} with --optimizer_args {kwargs}: {exc}") from None
    name = f"{cls.__module__}.{cls.__name__}" + (f"({','.join(f'{k}={v}' for k, v in kwargs.items())})"
                                                  if kwargs else "")
    schedule_free = cls.__name__.lower().endswith("schedulefree")
    logger.info("optimizer: %s", name)
    return BuiltOptimizer(optimizer, name, schedule_free, relative_step)


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedules (multipliers of the base lr; transformers/diffusers semantics)
# ----------------------------------------------------------------------------------------------------------------

def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def constant(step: int) -> float:
    return 1.0


def constant_with_warmup(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def cosine(step: int, *, warmup: int, total: int, cycles: float = 0.5, min_ratio: float = 0.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress))
    return max(0.0, factor * (1.0 - min_ratio) + min_ratio)


def cosine_with_restarts(step: int, *, warmup: int, total: int, cycles: int = 1) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))


def polynomial(step: int, *, warmup: int, total: int, power: float, lr_init: float, lr_end: float = 1e-7) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1.0 - (step - warmup) / (total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def warmup_stable_decay(step: int, *, warmup: int, stable: int, decay: int, cycles: float, min_ratio: float) -> float:
    """Linear warmup from min_ratio, constant, cosine decay to min_ratio (transformers' default wsd types)."""
    if step < warmup:
        return max(0.0, _warmup(step, warmup) * (1.0 - min_ratio) + min_ratio)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = float(step - warmup - stable) / float(max(1, decay))
        factor = 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress))
        return max(0.0, factor * (1.0 - min_ratio) + min_ratio)
    return min_ratio


def piecewise_constant(step: int, *, rules: tuple[tuple[int, float], ...], last: float) -> float:
    """diffusers' step_rules "1:10,0.1:20,0.01": multiplier 1 before step 10, 0.1 before 20, then 0.01."""
    for boundary, value in rules:
        if step < boundary:
            return value
    return last


def _parse_step_rules(text: str) -> tuple[tuple[tuple[int, float], ...], float]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        rules = tuple((int(b), float(v)) for v, b in (p.split(":") for p in parts[:-1]))
        return rules, float(parts[-1])
    except (ValueError, IndexError):
        raise ValueError(f"piecewise_constant needs step_rules like '1:10,0.1:20,0.01', got {text!r}") from None


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "constant"
    warmup_steps: int | float = 0
    decay_steps: int | float = 0
    num_cycles: int = 1
    power: float = 1.0
    timescale: int | None = None
    min_lr_ratio: float | None = None
    scheduler_type: str = ""
    scheduler_args: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SchedulerConfig:
        return cls(args.lr_scheduler, args.lr_warmup_steps, args.lr_decay_steps, args.lr_scheduler_num_cycles,
                   args.lr_scheduler_power, args.lr_scheduler_timescale, args.lr_scheduler_min_lr_ratio,
                   args.lr_scheduler_type or "", tuple(args.lr_scheduler_args or ()))


def _steps(value: int | float, total: int) -> int:
    """musubi: a float below 1 is a ratio of the total steps."""
    return int(value * total) if isinstance(value, float) and value < 1 else int(value)


def schedule_multiplier(cfg: SchedulerConfig, total: int, lr_init: float) -> functools.partial:
    """The multiplier function step -> lr factor for one of `SCHEDULERS`."""
    warmup, decay = _steps(cfg.warmup_steps, total), _steps(cfg.decay_steps, total)
    extra = parse_kwargs(cfg.scheduler_args, "--lr_scheduler_args")
    name = cfg.name
    if name in ("constant", "piecewise_constant") and warmup:
        raise ValueError(f"--lr_scheduler {name} takes no warmup; drop --lr_warmup_steps {cfg.warmup_steps}")
    if name == "constant":
        return functools.partial(constant)
    if name == "piecewise_constant":
        rules, last = _parse_step_rules(extra.get("step_rules", "1"))
        return functools.partial(piecewise_constant, rules=rules, last=last)
    if name == "constant_with_warmup":
        return functools.partial(constant_with_warmup, warmup=warmup)
    if name == "linear":
        return functools.partial(linear, warmup=warmup, total=total)
    if name == "cosine":
        return functools.partial(cosine, warmup=warmup, total=total)
    if name == "cosine_with_restarts":
        return functools.partial(cosine_with_restarts, warmup=warmup, total=total, cycles=cfg.num_cycles)
    if name == "polynomial":
        lr_end = float(extra.get("lr_end", 1e-7))
        if not lr_init > lr_end:
            raise ValueError(f"--lr_scheduler polynomial: lr_end {lr_end} must be below the learning rate {lr_init}")
        return functools.partial(polynomial, warmup=warmup, total=total, power=cfg.power, lr_init=lr_init,
                                 lr_end=lr_end)
    if name == "inverse_sqrt":
        timescale = cfg.timescale if cfg.timescale is not None else (warmup or 10_000)
        return functools.partial(inverse_sqrt, warmup=warmup, timescale=timescale)
    if name == "cosine_with_min_lr":
        if cfg.min_lr_ratio is None:
            raise ValueError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio")
        return functools.partial(cosine, warmup=warmup, total=total, cycles=cfg.num_cycles / 2,
                                 min_ratio=cfg.min_lr_ratio)
    if name == "warmup_stable_decay":
        return functools.partial(warmup_stable_decay, warmup=warmup, stable=total - warmup - decay, decay=decay,
                                 cycles=cfg.num_cycles / 2, min_ratio=cfg.min_lr_ratio or 0.0)
    raise ValueError(f"unknown --lr_scheduler {name!r}; expected one of {', '.join(SCHEDULERS)} (or a class path in "
                     f"--lr_scheduler_type)")


class AdafactorLR(torch.optim.lr_scheduler.LRScheduler):
    """Reports Adafactor's internal (relative-step) learning rate; stepping it changes nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float) -> None:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", initial_lr)
        self.initial_lr = initial_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        lrs = []
        for group in self.optimizer.param_groups:
            param = group["params"][0]
            state = self.optimizer.state.get(param, {})
            if "step" not in state:
                lrs.append(self.initial_lr)
                continue
            lrs.append(float(self.optimizer._get_lr(group, state)))  # type: ignore[attr-defined]
        return lrs


def build_scheduler(cfg: SchedulerConfig, built: BuiltOptimizer, total_steps: int,
                    learning_rate: float) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler for `built.optimizer` over `total_steps` optimizer steps."""
    optimizer = built.optimizer
    if cfg.scheduler_type:
        cls = import_class(cfg.scheduler_type, "torch.optim.lr_scheduler", "--lr_scheduler_type")
        return cls(optimizer, **parse_kwargs(cfg.scheduler_args, "--lr_scheduler_args"))
    if built.adafactor_relative_step:
        if cfg.name not in ("constant", "adafactor") or _steps(cfg.warmup_steps, total_steps):
            logger.warning("Adafactor with relative_step uses its own schedule; --lr_scheduler %s is ignored",
                           cfg.name)
        return AdafactorLR(optimizer, learning_rate)
    if built.schedule_free and cfg.name != "constant":
        raise ValueError(f"{built.name} is schedule-free: use --lr_scheduler constant (got {cfg.name})")
    return LambdaLR(optimizer, schedule_multiplier(cfg, total_steps, learning_rate))


def current_lrs(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> list[float]:
    """The learning rate of every parameter group (Prodigy and D-Adaptation report d·lr)."""
    lrs = []
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        lrs.append(float(lr) * float(group["d"]) if "d" in group else float(lr))
    return lrs
