"""Checkpoint names, retention, and training states for `--save_state` / `--resume`.

File names follow musubi: `{name}-{epoch:06d}.safetensors`, `{name}-step{step:08d}.safetensors` and the final
`{name}.safetensors`; state folders `{name}-{epoch:06d}-state`, `{name}-step{step:08d}-state`, `{name}-state`.
`--save_last_n_epochs/_steps(_state)` delete the save that falls out of the window (musubi's arithmetic).

A state folder holds `weights.safetensors` (the trained tensors, exact) and `state.pt` (optimizer, scheduler and
grad-scaler state dicts, the CPU/CUDA/Python RNG states, the loop counters and the moving-average loss window),
read back with `torch.load(weights_only=True)`. It is written to a temporary folder and renamed, so an
interrupted save never leaves a half state. The loop counters (optimizer step, epoch, micro-steps consumed in
that epoch) let a resumed run skip exactly the batches already used; unlike musubi, which restores no loop
counters, counters are restored, and resuming reproduces an uninterrupted run bit for bit on the CPU.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from wan_core.loading.checkpoint import load_state_dict, make_temp, require_finite, save_safetensors

logger = logging.getLogger(__name__)

STATE_WEIGHTS = "weights.safetensors"
STATE_FILE = "state.pt"
STATE_VERSION = 1


def epoch_file(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}.safetensors"


def step_file(name: str, step: int) -> str:
    return f"{name}-step{step:08d}.safetensors"


def last_file(name: str) -> str:
    return f"{name}.safetensors"


def epoch_state(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}-state"


def step_state(name: str, step: int) -> str:
    return f"{name}-step{step:08d}-state"


def last_state(name: str) -> str:
    return f"{name}-state"


def epoch_to_remove(epoch: int, every: int | None, keep: int | None) -> int | None:
    """musubi: keeping the last `keep` epoch saves made every `every` epochs drops epoch − every·keep."""
    if keep is None or every is None:
        return None
    old = epoch - every * keep
    return old if old > 0 else None


def step_to_remove(step: int, every: int | None, keep: int | None) -> int | None:
    """musubi: keep the saves of the last `keep` steps; drop the save at (step − keep − 1) rounded down to `every`."""
    if keep is None or every is None:
        return None
    old = step - keep - 1
    old -= old % every
    return old if old > 0 else None


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
        logger.info("removed old state %s", path)
    elif path.exists():
        path.unlink()
        logger.info("removed old checkpoint %s", path)


@dataclass
class Progress:
    """Loop counters: optimizer steps done, current epoch, micro-steps of that epoch already consumed."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    recent_losses: list[float] = field(default_factory=list)

    def moving_average(self) -> float:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else float("nan")


def _rng_state() -> dict[str, object]:
    state: dict[str, object] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainingObjects:
    """What a state folder restores."""

    weights: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    optimizer_state: dict | None = None  # written instead of optimizer.state_dict() (gathered from FSDP shards)


def save_state(path: Path, objects: TrainingObjects, progress: Progress, run_info: dict[str, object]) -> Path:
    """Write a state folder atomically (temporary folder in the same directory, then rename); NaN/inf weights are
    refused (NonFiniteError) before anything is written."""
    require_finite(objects.weights, f"training state {path} (not written)")
    tmp = make_temp(path, directory=True)
    try:
        save_safetensors(objects.weights, tmp / STATE_WEIGHTS)
        optimizer = objects.optimizer.state_dict() if objects.optimizer_state is None else objects.optimizer_state
        payload = {"version": STATE_VERSION, "optimizer": optimizer,
                   "scheduler": objects.scheduler.state_dict(),
                   "scaler": None if objects.scaler is None else objects.scaler.state_dict(),
                   "rng": _rng_state(), "progress": asdict(progress), "run": run_info}
        torch.save(payload, tmp / STATE_FILE)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved training state %s (step %d)", path, progress.global_step)
    return path


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, the rest) of a state folder, with clear errors for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such state folder (written by --save_state as "
                                f"<output_name>-step00000010-state)")
    missing = [n for n in (STATE_WEIGHTS, STATE_FILE) if not (path / n).is_file()]
    if missing:
        raise ValueError(f"--resume {path} is not a training state folder: {', '.join(missing)} missing")
    payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if payload.get("version") != STATE_VERSION:
        raise ValueError(f"--resume {path}: state version {payload.get('version')} is not {STATE_VERSION}")
    weights = load_state_dict(path / STATE_WEIGHTS)
    require_finite(weights, f"--resume {path / STATE_WEIGHTS}")
    return weights, payload


def restore_state(payload: dict, objects: TrainingObjects,
                  load_optimizer: Callable[[dict], None] | None = None) -> Progress:
    """Load optimizer/scheduler/scaler/RNG states into `objects` (weights are loaded by the caller);
    `load_optimizer(state)` replaces `objects.optimizer.load_state_dict` (FSDP shards)."""
    (load_optimizer or objects.optimizer.load_state_dict)(payload["optimizer"])
    objects.scheduler.load_state_dict(payload["scheduler"])
    if objects.scaler is not None and payload["scaler"] is not None:
        objects.scaler.load_state_dict(payload["scaler"])
    _set_rng_state(payload["rng"])
    return Progress(**payload["progress"])


def check_resumed_run(saved: dict[str, object], current: dict[str, object]) -> None:
    """Warn about settings that differ from the saved run (they change what resuming reproduces)."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            logger.warning("resuming with %s = %r, but the state was saved with %r", key, value, saved[key])

