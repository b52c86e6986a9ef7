"""Suite-wide settings: the tests run tiny models, where one intra-op thread is fastest and keeps timings stable
on a shared 2-core machine (subprocesses inherit it through OMP_NUM_THREADS)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
