"""examples/api_batch.py without a server: input files, job edits and the error paths (the full run against a
real server is in test_comfyui_server.py)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "api_batch.py"
T2V_API = ROOT / "example_workflows" / "api" / "wantuner_t2v.json"
sys.path.insert(0, str(SCRIPT.parent))
import api_batch  # noqa: E402


def test_prompt_files_text_and_jsonl(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("# a comment\na red square\n\n  a blue circle  \n")
    assert api_batch.read_jobs(text, 10) == [api_batch.Job("a red square", None, 10),
                                             api_batch.Job("a blue circle", None, 11)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x", "seed": 5, "negative_prompt": "y"}\n{"prompt": "z"}\n')
    assert api_batch.read_jobs(jsonl, 0) == [api_batch.Job("x", "y", 5), api_batch.Job("z", None, 1)]
    jsonl.write_text('{"prompt": "x"}\n{"text": "no prompt"}\n')
    with pytest.raises(api_batch.BatchError, match='line 2 needs an object with a "prompt" string'):
        api_batch.read_jobs(jsonl, 0)
    jsonl.write_text('{"prompt": "x", "seed": -1}\n')
    with pytest.raises(api_batch.BatchError, match="line 1: seed must be a non-negative integer, got -1"):
        api_batch.read_jobs(jsonl, 0)


def test_jobs_edit_every_text_encoder_and_sampler() -> None:
    graph = api_batch.load_workflow(T2V_API)
    edited = api_batch.apply_job(graph, api_batch.Job("a green triangle", "noisy", 99))
    assert edited["4"]["inputs"]["prompt"] == "a green triangle"
    assert edited["4"]["inputs"]["negative_prompt"] == "noisy"
    assert edited["10"]["inputs"]["seed"] == 99
    assert graph["10"]["inputs"]["seed"] == 42  # the loaded workflow is left as it was


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_ui_format_and_unreachable_server_give_clear_errors(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    ui = _run(str(ROOT / "example_workflows" / "wantuner_t2v.json"), "--prompts", str(prompts))
    assert ui.returncode == 2 and "UI-format workflow" in ui.stderr and "Export (API)" in ui.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    down = _run(str(T2V_API), "--prompts", str(prompts), "--server", f"http://127.0.0.1:{port}", "--timeout", "5")
    assert down.returncode == 2 and f"cannot reach ComfyUI at http://127.0.0.1:{port}" in down.stderr
    missing = _run(str(T2V_API), "--prompts", str(tmp_path / "none.txt"))
    assert missing.returncode == 2 and "prompt file not found" in missing.stderr


def test_rejected_graph_lists_the_node_errors() -> None:
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
            "node_errors": {"10": {"class_type": "WanTunerSampler", "errors": [
                {"message": "Custom validation failed for node", "details": "length - video length must be 4n+1"}]}}}
    error = urllib.error.HTTPError("http://x/prompt", 400, "Bad Request", {}, io.BytesIO(json.dumps(body).encode()))
    message = str(api_batch._rejection(error))
    assert "rejected the workflow (HTTP 400): Prompt outputs failed validation" in message
    assert "node 10 (WanTunerSampler): Custom validation failed for node: length - video length must be 4n+1" \
        in message


def test_a_server_that_accepts_and_never_answers_fails_after_the_request_timeout(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never sends a byte
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        result = _run(str(T2V_API), "--prompts", str(prompts), "--server", url, "--request_timeout", "2")
        elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: ComfyUI at {url} did not answer /system_stats within 2 s (--request_timeout); "
                             "is the server busy or hung?\n")
    assert elapsed < 60  # the job timeout (3600 s by default) is not what ends the wait


def test_a_silent_websocket_waits_for_the_job_timeout_only(monkeypatch: pytest.MonkeyPatch) -> None:
    class Silent:
        def settimeout(self, seconds: float) -> None:
            self.wait = seconds

        def recv(self):
            import websocket

            time.sleep(self.wait)
            raise websocket.WebSocketTimeoutException("timed out")

    start = time.monotonic()
    with pytest.raises(api_batch.JobFailed, match="no result within 1 s"):
        api_batch.follow(Silent(), "p1", timeout=1.0, poll=0.3)
    assert 1.0 <= time.monotonic() - start < 5


@pytest.mark.parametrize("url", ["notaurl", "ftp://host:21", "http://", "http://host:port", "127.0.0.1:8188"])
def test_a_server_that_is_no_url_gives_one_line(tmp_path: Path, url: str) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    result = _run(str(T2V_API), "--prompts", str(prompts), "--server", url)
    assert result.returncode == 2
    assert result.stderr == (f"error: --server {url!r} is not an http(s) URL of a ComfyUI server "
                             "(e.g. http://127.0.0.1:8188)\n")
