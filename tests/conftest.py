"""Suite-wide settings: the tests run tiny models, where one intra-op thread is fastest and keeps timings stable
on a shared 2-core machine (subprocesses inherit it through OMP_NUM_THREADS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def listed_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A models folder holding (empty) files under the tiny model set's names, so the node loaders list them."""
    from nodes import comfy_adapter as adapter
    from tests import tiny_model_set as tms

    for folder, name in [*tms.FILES.values(), tms.LORA]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).touch()
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tmp_path))
    return tmp_path
