"""README command 1 with the embedded toy models: wall time of a fresh `python -m wan_core.generate` process, from
start to the saved mp4 (interpreter start, imports, model loading, T5, denoising, decoding, mp4 writing).

    python bench/bench_toy_generate.py [--repeats 3] [--threads N] [--goal 10]

Prints one JSON object (times in seconds, the best and every run, the machine's load average) and exits 1 when the
best run misses the goal or no mp4 was written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["-m", "wan_core.generate", "--prompt", "a red square moving right"]


def run_once(save_path: Path, threads: int | None) -> tuple[float, list[Path]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *COMMAND, "--save_path", str(save_path), "--quiet"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"generate failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed, sorted(save_path.glob("*.mp4"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the child (default: unset)")
    parser.add_argument("--goal", type=float, default=10.0, help="seconds the best run must stay under")
    args = parser.parse_args()
    times, videos = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            elapsed, found = run_once(Path(tmp) / f"run{i}", args.threads)
            times.append(round(elapsed, 2))
            videos.append(len(found))
    result = {"command": "python " + " ".join(COMMAND) + " --save_path outputs", "best_s": min(times),
              "runs_s": times, "mp4_written": videos, "goal_s": args.goal, "load_average": os.getloadavg()}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if min(times) < args.goal and all(videos) else 1


if __name__ == "__main__":
    raise SystemExit(main())
