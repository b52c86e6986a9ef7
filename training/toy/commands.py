"""Running the project's own commands (`python -m training ...`, `python -m training.toy.vae_train ...`) as
subprocesses of the toy recipe, each appending its output to a log file.

Subprocesses run with OMP_WAIT_POLICY=PASSIVE unless set: on a shared 2-core machine, spinning OpenMP threads make
every other process (and themselves) several times slower.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run(args: Sequence[str], log: Path) -> None:
    """Run `python <args>` with its output appended to `log`; a failure raises RuntimeError naming the log."""
    command = [sys.executable, *map(str, args)]
    logger.info("$ %s", " ".join(command[1:]))
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=_env(), check=False)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(command[1:4])} ...` failed with exit code {done.returncode}; see {log}")
