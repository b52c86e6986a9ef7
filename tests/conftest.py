"""Suite-wide settings: the tests run tiny models, where one intra-op thread is fastest and keeps timings stable
on a shared 2-core machine (subprocesses inherit it through OMP_NUM_THREADS)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest_plugins = ["pytester"]  # tests of the options below

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def _seed_global_generators() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True, scope="module")
def _seeded_module() -> None:
    """Module-scoped fixtures that draw from the global generators see the same numbers in any test order."""
    _seed_global_generators()


@pytest.fixture(autouse=True)
def _seeded_test() -> None:
    """Each test starts from the same global generator state (torch, random, numpy), whatever ran before it."""
    _seed_global_generators()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("order", "test order (to find tests that depend on what ran before them)")
    group.addoption("--reverse", action="store_true",
                    help="run the collected tests in reverse order (applied after --shuffle-seed)")
    group.addoption("--shuffle-seed", type=int, default=None, metavar="N",
                    help="run the collected tests in an order shuffled with random seed N (the same N gives the "
                         "same order)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("--shuffle-seed")
    if seed is not None:
        random.Random(seed).shuffle(items)
    if config.getoption("--reverse"):
        items.reverse()


def pytest_report_header(config: pytest.Config) -> str | None:
    seed, reverse = config.getoption("--shuffle-seed"), config.getoption("--reverse")
    if seed is None and not reverse:
        return None
    return f"test order: shuffle seed {seed}, reversed {reverse}"


@pytest.fixture
def listed_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A models folder holding (empty) files under the tiny model set's names, so the node loaders list them."""
    from nodes import comfy_adapter as adapter
    from tests import tiny_model_set as tms

    for folder, name in [*tms.FILES.values(), tms.LORA, *tms.TOY_PAIR]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).touch()
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tmp_path))
    return tmp_path
