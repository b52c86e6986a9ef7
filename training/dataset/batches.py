"""Batches for the training loop: epoch plans, sharding across processes, resumable loading, validation split.

A `BatchSource` lists items (each with the bucket it can be batched in and its dataset's batch size and repeats)
and loads a batch of them as the agreed dict {"latents": [B, 16, F, h, w], "t5": [[L_i, dim]], optional "clip",
"latents_image", "latents_control", "captions"}; its `empty_t5` is the cached empty caption (caption dropout).

Epoch plan (`epoch_batches`): per dataset, items are repeated `num_repeats` times, grouped by bucket, shuffled
within each bucket and cut into batches of the dataset's size (the last one of a bucket may be smaller); then all
batches are shuffled. Everything is drawn from `random.Random(seed + epoch)`, so any process can rebuild any
epoch's plan. With P processes, micro-step m of an epoch gives process r batch m·P + r; the plan's tail that does
not fill all processes is dropped (logged). `Progress` counts micro-steps, so a resumed run skips exactly the
batches already used.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger(__name__)

Batch = dict[str, object]


@dataclass(frozen=True)
class TrainItem:
    key: str  # unique within its source
    bucket: tuple  # items of one batch share it, e.g. (width, height, frames)
    dataset: int = 0


@dataclass(frozen=True)
class DatasetBatching:
    batch_size: int = 1
    num_repeats: int = 1


class BatchSource(Protocol):
    empty_t5: torch.Tensor | None

    def items(self) -> Sequence[TrainItem]: ...

    def batching(self, dataset: int) -> DatasetBatching: ...

    def load(self, items: Sequence[TrainItem]) -> Batch: ...


# ----------------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------------

def epoch_batches(source: BatchSource, items: Sequence[TrainItem], seed: int,
                  epoch: int) -> list[tuple[TrainItem, ...]]:
    """All batches of one epoch, reproducible from (seed, epoch): the source's own `epoch_batches(items, seed,
    epoch)` when it has one, else `default_epoch_batches`."""
    own = getattr(source, "epoch_batches", None)
    if own is not None:
        return [tuple(b) for b in own(items, seed, epoch)]
    return default_epoch_batches(source, items, seed, epoch)


def default_epoch_batches(source: BatchSource, items: Sequence[TrainItem], seed: int,
                          epoch: int) -> list[tuple[TrainItem, ...]]:
    """Per dataset: repeats, buckets shuffled and cut into batches; then all batches shuffled (module docstring)."""
    rng = random.Random(seed + epoch)
    batches: list[tuple[TrainItem, ...]] = []
    for dataset in sorted({item.dataset for item in items}):
        settings = source.batching(dataset)
        buckets: dict[tuple, list[TrainItem]] = {}
        for item in items:
            if item.dataset == dataset:
                buckets.setdefault(item.bucket, []).extend([item] * settings.num_repeats)
        for bucket in sorted(buckets, key=repr):
            members = buckets[bucket]
            rng.shuffle(members)
            batches.extend(tuple(members[i: i + settings.batch_size])
                           for i in range(0, len(members), settings.batch_size))
    rng.shuffle(batches)
    return batches


def split_validation(items: Sequence[TrainItem], fraction: float,
                     seed: int) -> tuple[list[TrainItem], list[TrainItem]]:
    """(train, validation): a seeded `fraction` of the items (at least one, never all) is held out."""
    if len(items) < 2:
        raise ValueError(f"--validation_split needs at least 2 items, the dataset has {len(items)}")
    order = sorted(items, key=lambda i: (i.dataset, i.key))
    random.Random(seed).shuffle(order)
    count = min(len(order) - 1, max(1, round(fraction * len(order))))
    held = {id(i) for i in order[:count]}
    return [i for i in items if id(i) not in held], [i for i in items if id(i) in held]


@dataclass(frozen=True)
class EpochPlan:
    """This process's micro-batches of one epoch and where its samples sit in each global batch."""

    epoch: int
    batches: tuple[tuple[TrainItem, ...], ...]  # this rank's batch per micro-step
    offsets: tuple[int, ...]  # index of this rank's first sample in the global batch of the micro-step

    def __len__(self) -> int:
        return len(self.batches)


def plan_epoch(source: BatchSource, items: Sequence[TrainItem], seed: int, epoch: int, rank: int = 0,
               world: int = 1) -> EpochPlan:
    batches = epoch_batches(source, items, seed, epoch)
    micro = len(batches) // world
    if micro == 0:
        raise ValueError(f"the dataset gives {len(batches)} batches per epoch, fewer than the {world} processes")
    if len(batches) % world and rank == 0 and epoch == 0:
        logger.warning("%d of %d batches per epoch are not used: the count is not a multiple of the %d processes",
                       len(batches) % world, len(batches), world)
    mine = tuple(batches[m * world + rank] for m in range(micro))
    offsets = tuple(sum(len(batches[m * world + r]) for r in range(rank)) for m in range(micro))
    return EpochPlan(epoch, mine, offsets)


def steps_per_epoch(micro_steps: int, accumulation: int) -> int:
    return math.ceil(micro_steps / accumulation)


def max_batch_size(source: BatchSource, items: Sequence[TrainItem]) -> int:
    return max(source.batching(d).batch_size for d in {i.dataset for i in items})


# ----------------------------------------------------------------------------------------------------------------
# Loading (DataLoader workers read the caches; the order is fixed by the plan)
# ----------------------------------------------------------------------------------------------------------------

class _PlanDataset(Dataset):
    """Index (epoch, position) -> (position, batch dict). Plans are rebuilt from (seed, epoch) wherever they are
    needed, so persistent workers (which hold a copy of this object) plan new epochs themselves."""

    def __init__(self, source: BatchSource, items: Sequence[TrainItem], seed: int, rank: int, world: int) -> None:
        self.source, self.items, self.seed, self.rank, self.world = source, list(items), seed, rank, world
        self.plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self.plans:
            self.plans = {epoch: plan_epoch(self.source, self.items, self.seed, epoch, self.rank, self.world)}
        return self.plans[epoch]

    def __len__(self) -> int:
        return len(self.plan(0))

    def __getitem__(self, index: tuple[int, int]) -> tuple[int, Batch]:
        epoch, position = index
        return position, self.source.load(self.plan(epoch).batches[position])


class _PositionSampler(Sampler):
    def __init__(self) -> None:
        super().__init__()
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, p) for p in range(self.start, self.stop)])

    def __len__(self) -> int:
        return self.stop - self.start


def _no_collate(batch: tuple[int, Batch]) -> tuple[int, Batch]:
    return batch


class BatchLoader:
    """One epoch's (position, batch) pairs from a start position, read by `num_workers` DataLoader workers."""

    def __init__(self, source: BatchSource, items: Sequence[TrainItem], seed: int, rank: int = 0, world: int = 1,
                 num_workers: int = 0, persistent: bool = False) -> None:
        self.dataset = _PlanDataset(source, items, seed, rank, world)
        self.sampler = _PositionSampler()
        self.num_workers, self.persistent = num_workers, persistent and num_workers > 0
        self._loader: DataLoader | None = None

    def plan(self, epoch: int) -> EpochPlan:
        return self.dataset.plan(epoch)

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        plan = self.plan(epoch)
        self.sampler.epoch, self.sampler.start, self.sampler.stop = epoch, start, len(plan)
        if self.num_workers == 0:
            for position in range(start, len(plan)):
                yield self.dataset[(epoch, position)]
            return
        if self._loader is None or not self.persistent:
            self._loader = DataLoader(self.dataset, sampler=self.sampler, batch_size=None,
                                      num_workers=self.num_workers, persistent_workers=self.persistent,
                                      collate_fn=_no_collate)
        yield from self._loader


# ----------------------------------------------------------------------------------------------------------------
# An in-memory source (tests, in-process callers)
# ----------------------------------------------------------------------------------------------------------------

_STACKED = ("latents", "clip", "latents_image", "latents_control")


def collate(samples: Sequence[dict]) -> Batch:
    """Per-sample dicts ({"latents": [16, F, h, w], "t5": [L, dim], ...}) -> the batch dict (T5 stays a list)."""
    batch: Batch = {"latents": torch.stack([s["latents"] for s in samples]), "t5": [s["t5"] for s in samples]}
    for key in _STACKED[1:]:
        present = [key in s for s in samples]
        if any(present):
            if not all(present):
                raise ValueError(f"{key!r} is cached for some samples of a batch but not for others")
            batch[key] = torch.stack([s[key] for s in samples])
    batch["captions"] = [s.get("caption", "") for s in samples]
    return batch


class MemorySource:
    """Samples held in memory, one dataset: items are batched by latent shape."""

    def __init__(self, samples: Sequence[dict], batch_size: int = 1, num_repeats: int = 1,
                 empty_t5: torch.Tensor | None = None) -> None:
        if not samples:
            raise ValueError("no training samples")
        self.samples = list(samples)
        self.settings = DatasetBatching(batch_size, num_repeats)
        self.empty_t5 = empty_t5

    def items(self) -> list[TrainItem]:
        return [TrainItem(str(i), tuple(s["latents"].shape)) for i, s in enumerate(self.samples)]

    def batching(self, dataset: int) -> DatasetBatching:
        return self.settings

    def load(self, items: Sequence[TrainItem]) -> Batch:
        return collate([self.samples[int(item.key)] for item in items])
