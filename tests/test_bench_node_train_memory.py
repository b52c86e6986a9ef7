"""The node memory benchmark runs end to end on the tiny model set (--smoke) and reports sane numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_node_train_memory  # noqa: E402


@pytest.mark.slow
def test_smoke_row(capsys: pytest.CaptureFixture) -> None:
    assert bench_node_train_memory.main(["--smoke", "--steps", "1"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["hwm_after_train_mb"] >= row["hwm_after_load_mb"] > 0 and row["dit_params_m"] > 0
