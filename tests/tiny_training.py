"""Tiny DiT files, in-memory training samples and argument lists shared by the training tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from tests.tiny import TINY_DIT, TINY_DIT_BY_TYPE, randomize_
from training.args import parse_train_config
from training.dataset.batches import MemorySource
from training.init_dit import write_dit
from training.train_config import TrainConfig
from wan_core.models.dit import WanModel

LATENT_SHAPE = (16, 1, 4, 4)  # [C, F, h, w]: one latent frame of 4x4 (2x2 tokens)
# Wan2.2: the A14B experts have Wan2.1 shapes (i2v-A14B: mask + image latents, no CLIP branch); TI2V-5B works on
# the Wan2.2 VAE's 48 latent channels
TINY_DITS = {**TINY_DIT_BY_TYPE, "i2v-A14B": dataclasses.replace(TINY_DIT, in_dim=36),
             "ti2v-5B": dataclasses.replace(TINY_DIT, in_dim=48, out_dim=48)}


def tiny_dit_file(path: Path, kind: str = "t2v", seed: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """A tiny DiT of `kind` (a TINY_DITS key) with random (non-zero) weights and its config in the metadata."""
    torch.manual_seed(seed)
    model = randomize_(WanModel(TINY_DITS[kind]), seed)
    return write_dit(model, path, metadata)


def tiny_samples(count: int, kind: str = "t2v", seed: int = 1, shape: Sequence[int] = LATENT_SHAPE) -> list[dict]:
    """Per-sample cache dicts as the cache reader gives them (I2V and Fun-Control extras included per kind)."""
    gen = torch.Generator().manual_seed(seed)
    text_dim = TINY_DITS[kind].text_dim
    shape = (TINY_DITS[kind].out_dim, *shape[1:])
    samples = []
    for i in range(count):
        sample = {"latents": torch.randn(*shape, generator=gen), "t5": torch.randn(3 + i % 4, text_dim, generator=gen),
                  "caption": f"caption {i}"}
        if kind in ("i2v", "flf2v", "fc", "i2v-A14B"):
            image = torch.randn(20, *shape[1:], generator=gen)
            image[:4] = (torch.arange(shape[1]) == 0).float().view(1, -1, 1, 1).expand(4, -1, *shape[2:])
            sample["latents_image"] = image
        if kind in ("i2v", "flf2v", "fc"):
            tokens = 514 if kind == "flf2v" else 257
            sample["clip"] = torch.randn(tokens, 1280, generator=gen) * 0.1
        if kind == "fc":
            sample["latents_control"] = torch.randn(*shape, generator=gen)
        samples.append(sample)
    return samples


def memory_source(count: int = 4, kind: str = "t2v", batch_size: int = 1, seed: int = 1,
                  empty_t5: bool = True) -> MemorySource:
    text_dim = TINY_DITS[kind].text_dim
    empty = torch.randn(1, text_dim, generator=torch.Generator().manual_seed(99)) if empty_t5 else None
    return MemorySource(tiny_samples(count, kind, seed), batch_size=batch_size, empty_t5=empty)


def train_args(dit: Path, out: Path, *extra: str) -> TrainConfig:
    """The TrainConfig of these flags plus the tests' defaults."""
    base = ["--dit", str(dit), "--dataset_config", str(out / "unused.toml"), "--output_dir", str(out),
            "--max_data_loader_n_workers", "0", "--seed", "5", "--learning_rate", "1e-2", "--timestep_sampling",
            "uniform"]
    if "full" not in extra:
        base += ["--network_dim", "4", "--network_alpha", "4"]
    return parse_train_config([*base, *extra])
