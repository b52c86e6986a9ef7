"""The suite's conftest: --reverse and --shuffle-seed reorder the collected tests; every test starts from the same
global generator state."""

from __future__ import annotations

from pathlib import Path

import pytest

NAMES = [f"test_{i}" for i in range(8)]


def _collected(pytester: pytest.Pytester, *options: str) -> list[str]:
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider", *options)
    assert result.ret == 0, result.stdout.str()
    return [line.rsplit("::", 1)[1] for line in result.outlines if "::" in line]


def test_reverse_and_shuffle_seed_reorder_the_tests(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(**{name: "".join(f"def {n}():\n    pass\n\n\n" for n in names)
                           for name, names in (("test_a", NAMES[:4]), ("test_b", NAMES[4:]))})
    assert _collected(pytester) == NAMES
    assert _collected(pytester, "--reverse") == NAMES[::-1]
    shuffled = _collected(pytester, "--shuffle-seed", "1")
    assert sorted(shuffled) == NAMES and shuffled != NAMES
    assert _collected(pytester, "--shuffle-seed", "1", "--reverse") == shuffled[::-1]  # same seed, same order


def test_every_test_starts_from_the_same_global_generator_state(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_draws="""
import random

import numpy as np
import torch


def test_draws_from_every_global_generator():
    torch.rand(5), random.random(), np.random.rand(5)


def test_sees_the_seeded_state():
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(0)))
    assert random.random() == random.Random(0).random()
    assert np.random.rand() == np.random.RandomState(0).rand()
""")
    for order in ([], ["--reverse"]):
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", *order)
        result.assert_outcomes(passed=2)
