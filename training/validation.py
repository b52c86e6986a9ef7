"""Held-out validation loss at fixed timesteps with fixed noise.

The validation items (a `--validation_split` share of the training items, or the items of
`--validation_dataset_config`) are batched once. Sample k of the validation set always gets the same noise
(seeded by (seed, "validation", k)) and is evaluated at every timestep of `--validation_timesteps` (default
100, 300, 500, 700, 900) without caption dropout or LoRA dropout, so successive evaluations differ only by the
weights. Reported: `val_loss/t{T}` per timestep and `val_loss/mean` (their mean), unweighted velocity MSE. With
several processes each evaluates every P-th batch and the sums are reduced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from training.dataset.batches import BatchSource, TrainItem, epoch_batches
from training.step import AutocastFactory, StepConfig, validation_losses
from training.timesteps import mix_seed

logger = logging.getLogger(__name__)

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over processes


class Validator:
    def __init__(self, source: BatchSource, items: Sequence[TrainItem], seed: int, timesteps: Sequence[int],
                 rank: int = 0, world: int = 1) -> None:
        if not items:
            raise ValueError("the validation set is empty")
        self.source, self.seed, self.timesteps = source, seed, tuple(sorted(set(timesteps)))
        batches = epoch_batches(source, items, seed, epoch=0)
        starts = [sum(len(b) for b in batches[:i]) for i in range(len(batches))]
        self.batches = [(b, s) for i, (b, s) in enumerate(zip(batches, starts)) if i % world == rank]
        self.num_samples = sum(len(b) for b in batches)
        logger.info("validation: %d samples in %d batches, timesteps %s", self.num_samples, len(batches),
                    ", ".join(map(str, self.timesteps)))

    def run(self, model: torch.nn.Module, cfg: StepConfig, autocast: AutocastFactory | None = None,
            reduce: Reduce | None = None) -> dict[str, float]:
        totals = torch.zeros(len(self.timesteps), dtype=torch.float64)
        for items, start in self.batches:
            batch = self.source.load(items)
            seeds = [mix_seed(self.seed, "validation", start + i) for i in range(len(items))]
            losses = validation_losses(model, batch, cfg, seeds, self.timesteps, autocast)
            totals += torch.tensor([float(losses[t].double().sum()) for t in self.timesteps], dtype=torch.float64)
        if reduce is not None:
            totals = reduce(totals)
        means = totals / self.num_samples
        logs = {f"val_loss/t{t:04d}": float(m) for t, m in zip(self.timesteps, means)}
        logs["val_loss/mean"] = float(means.mean())
        return logs
