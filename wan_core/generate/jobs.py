"""Generation jobs and musubi's inline prompt syntax (`--from_file`, `--interactive`, training sample prompts).

A line is a prompt followed by options: `a cat --w 832 --h 480 --f 81 --d 42 --s 20 --g 5.0 --n blurry`.
The line is split on " --"; each part's first word is the option and the rest its value.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Job:
    """One video to generate. None means "use the task/model default"."""

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    image_path: str | None = None
    end_image_path: str | None = None
    control_path: str | None = None

    def with_seed(self) -> Job:
        """Fix a random seed now, so that it can be saved with the output."""
        return self if self.seed is not None else dataclasses.replace(self, seed=random.randint(0, 2**32 - 1))


_OPTIONS: dict[str, tuple[str, type]] = {
    "w": ("width", int), "h": ("height", int), "f": ("frames", int), "d": ("seed", int), "s": ("steps", int),
    "g": ("guidance_scale", float), "l": ("guidance_scale", float), "fs": ("flow_shift", float),
    "i": ("image_path", str), "ei": ("end_image_path", str), "cn": ("control_path", str),
    "n": ("negative_prompt", str),
}


def parse_prompt_line(line: str, base: Job | None = None) -> Job:
    """Parse one prompt line; options override the fields of `base` (the command-line defaults)."""
    parts = line.strip().split(" --")
    prompt = parts[0].strip()
    if not prompt or prompt.startswith("--"):
        raise ValueError(f"prompt line has no prompt text: {line.strip()!r}")
    values: dict[str, Any] = {"prompt": prompt}  # field name -> value of that field's type
    for part in parts[1:]:
        key, _, raw = part.strip().partition(" ")
        if key not in _OPTIONS:
            raise ValueError(f"unknown inline option --{key} in {line.strip()!r}; expected one of "
                             f"{', '.join('--' + k for k in _OPTIONS)}")
        name, kind = _OPTIONS[key]
        raw = raw.strip()
        try:
            values[name] = kind(raw)
        except ValueError:
            raise ValueError(f"inline option --{key} needs a {kind.__name__} value, got {raw!r}") from None
    return dataclasses.replace(base or Job(prompt=prompt), **values)


def prompt_lines(lines: Iterable[str]) -> Iterator[str]:
    """Non-empty, non-comment lines."""
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def read_prompt_lines(path: str | Path) -> list[str]:
    """The prompt lines of a `--from_file` / `--sample_prompts` file (comments and blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = list(prompt_lines(path.read_text(encoding="utf-8").splitlines()))
    if not lines:
        raise ValueError(f"prompt file {path} has no prompts (empty lines and # comments are skipped)")
    return lines
