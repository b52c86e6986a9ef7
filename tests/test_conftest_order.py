"""The suite's --reverse and --shuffle-seed options reorder the collected tests."""

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
