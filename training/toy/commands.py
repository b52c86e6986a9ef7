"""Running the project's own commands (`python -m training ...`, `python -m training.toy.vae_train ...`) as
subprocesses of the toy recipe, each appending its output to a log file; timing the stages of a toy build and
writing its figures.

Subprocesses run with OMP_WAIT_POLICY=PASSIVE unless set: on a shared 2-core machine, spinning OpenMP threads make
every other process (and themselves) several times slower.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from wan_core.loading.checkpoint import write_text_atomic

logger = logging.getLogger(__name__)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start(args: Sequence[object], log: Path, env: dict[str, str], tag: str = "") -> tuple[list[str], IO[str],
                                                                                       subprocess.Popen[bytes]]:
    """Start `python <args>` with its output appended to `log` (after a `$ command` line); returns the command, the
    open log (the caller closes it once the process has ended) and the process."""
    command = [sys.executable, *map(str, args)]
    logger.info("$ %s%s", " ".join(command[1:]), tag)
    f = open(log, "a", encoding="utf-8")  # noqa: SIM115 (closed by the caller, after the process ends)
    f.write(f"\n$ {' '.join(command)}\n")
    f.flush()
    return command, f, subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)


def _finish(f: IO[str], process: subprocess.Popen[bytes]) -> int:
    """Wait for `process`, close its log `f` and return the exit code; an exception while waiting (an interrupt)
    kills the process first, as `subprocess.run` does."""
    try:
        return process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        f.close()


def run(args: Sequence[object], log: Path) -> None:
    """Run `python <args>` with its output appended to `log`; a failure raises RuntimeError naming the log."""
    command, f, process = _start(args, log, _env())
    code = _finish(f, process)
    if code:
        raise RuntimeError(f"`{' '.join(command[1:4])} ...` failed with exit code {code}; see {log}")


def run_all(jobs: Sequence[tuple[Sequence[object], Path]]) -> None:
    """Run `python <args>` of every (args, log) job at once, each appending to its own log, and wait for all. Without
    OMP_NUM_THREADS in the environment each job gets cpu count // jobs threads (at least 1). Any failure raises
    RuntimeError naming the failed jobs' logs, after every job has ended."""
    env = _env()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, len(jobs)))))
    running = [(_start(args, log, env, " &"), log) for args, log in jobs]
    failed = []
    for (command, f, process), log in running:
        code = _finish(f, process)
        if code:
            failed.append(f"`{' '.join(command[1:4])} ...` exit code {code}, see {log}")
    if failed:
        raise RuntimeError("; ".join(failed))


def emit_json(figures: dict[str, Any], path: str | Path | None = None) -> None:
    """Print `figures` as indented JSON and, with `path`, write the same text there (temporary file, then rename)."""
    text = json.dumps(figures, indent=1) + "\n"
    sys.stdout.write(text)
    if path:
        write_text_atomic(path, text)


class TimedStages:
    """Stage timing and the JSON report of a toy build (a dataclass with `work`, `stages` and `figures` fields);
    the report is `work / REPORT_NAME`, rewritten after every stage."""

    REPORT_NAME = "report.json"
    work: Path
    stages: dict[str, float]
    figures: dict[str, object]

    def timed(self, name: str, fn: Callable[..., Any], *args: object) -> Any:
        start = time.perf_counter()
        logger.info("== %s", name)
        result = fn(*args)
        self.stages[name] = round(time.perf_counter() - start, 1)
        self.save()
        logger.info("== %s done in %.1f s", name, self.stages[name])
        return result

    def save(self) -> None:
        write_text_atomic(self.work / self.REPORT_NAME,
                          json.dumps({"stages": self.stages, "figures": self.figures}, indent=1) + "\n")
