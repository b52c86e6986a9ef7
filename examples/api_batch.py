"""Batch generation through a running ComfyUI server's HTTP API.

Submits an API-format workflow (e.g. example_workflows/api/wantuner_t2v.json, or any graph saved with the
editor's "Export (API)") once per prompt, follows each run on the websocket and downloads the saved files.

    python examples/api_batch.py example_workflows/api/wantuner_t2v.json --prompts prompts.txt
    python examples/api_batch.py workflow_api.json --prompts jobs.jsonl --server http://127.0.0.1:8188 --out out/

Prompt files: a text file (one prompt per line; empty lines and lines starting with # are skipped) or JSONL (one
object per line: {"prompt": "...", "negative_prompt": "...", "seed": 1}; only "prompt" is required). Without a seed
the job uses --seed plus its index. The prompt goes into every WanTunerTextEncode node, the seed into every
WanTunerSampler node. Needs `websocket-client` (pip install websocket-client).

Timeouts: --request_timeout (30 s) bounds each HTTP request and the websocket connect, so a server that accepts
connections but never answers fails quickly; --timeout (3600 s) bounds one job, however quiet its progress.

Exit codes: 0 all jobs succeeded, 1 a job failed while running, 2 bad input, server unreachable or graph rejected.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_NODES = ("WanTunerTextEncode",)
SEED_NODES = ("WanTunerSampler",)


class BatchError(Exception):
    """A problem that stops the batch, with a message for the user (exit code 2)."""


class JobFailed(Exception):
    """A job that the server accepted but could not finish (exit code 1)."""


@dataclass(frozen=True)
class Job:
    prompt: str
    negative_prompt: str | None
    seed: int


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def load_workflow(path: Path) -> dict[str, dict]:
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BatchError(f"workflow file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise BatchError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise BatchError(f"{path} is a UI-format workflow; the API needs the API format: use the API files in "
                         "example_workflows/api/, or 'Export (API)' in the ComfyUI editor")
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise BatchError(f"{path} is not an API-format workflow ({{node id: {{class_type, inputs}}}})")
    if not any(n["class_type"] in TEXT_NODES for n in graph.values()):
        raise BatchError(f"{path} has no {' / '.join(TEXT_NODES)} node to put the prompts in")
    return graph


def _jsonl_job(line: str, number: int, default_seed: int) -> Job:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BatchError(f"line {number} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise BatchError(f"line {number} needs an object with a \"prompt\" string, got {line[:80]!r}")
    seed = data.get("seed", default_seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BatchError(f"line {number}: seed must be a non-negative integer, got {seed!r}")
    return Job(data["prompt"], data.get("negative_prompt"), seed)


def read_jobs(path: Path, base_seed: int) -> list[Job]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BatchError(f"prompt file not found: {path}") from None
    entries = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.startswith("#")]
    jsonl = path.suffix.lower() == ".jsonl"
    jobs = [_jsonl_job(line, n, base_seed + i) if jsonl else Job(line, None, base_seed + i)
            for i, (n, line) in enumerate(entries)]
    if not jobs:
        raise BatchError(f"{path} holds no prompts")
    return jobs


def apply_job(graph: dict[str, dict], job: Job) -> dict[str, dict]:
    out = copy.deepcopy(graph)
    for node in out.values():
        if node["class_type"] in TEXT_NODES:
            node["inputs"]["prompt"] = job.prompt
            if job.negative_prompt is not None:
                node["inputs"]["negative_prompt"] = job.negative_prompt
        elif node["class_type"] in SEED_NODES:
            node["inputs"]["seed"] = job.seed
    return out


# ----------------------------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------------------------


def check_server_url(url: str) -> str:
    """The URL without a trailing slash; BatchError unless it is http(s)://host[:port][/path]."""
    parts = urllib.parse.urlsplit(url.strip())
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:  # a port that is not a number
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise BatchError(f"--server {url!r} is not an http(s) URL of a ComfyUI server (e.g. http://127.0.0.1:8188)")
    return url.strip().rstrip("/")


class Server:
    """ComfyUI's HTTP API. `timeout` bounds each HTTP call and the websocket connect (a server that accepts but
    never answers fails after it); how long a job may run is up to `follow`."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = check_server_url(url)
        self.timeout = timeout
        self.client_id = str(uuid.uuid4())

    def _request(self, path: str, body: dict | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise _rejection(exc) from None
        except TimeoutError:
            raise BatchError(f"ComfyUI at {self.url} did not answer {path.split('?')[0]} within {self.timeout:g} s "
                             "(--request_timeout); is the server busy or hung?") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise BatchError(f"ComfyUI at {self.url} did not accept the connection within {self.timeout:g} s "
                                 "(--request_timeout)") from None
            raise self._unreachable(exc) from None
        except OSError as exc:  # ConnectionError and other socket errors
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: Exception) -> BatchError:
        return BatchError(f"cannot reach ComfyUI at {self.url} ({getattr(exc, 'reason', exc)}); is it running? "
                          "Start it with: python main.py --listen 127.0.0.1 --port 8188")

    def check(self) -> None:
        stats = json.loads(self._request("/system_stats"))
        version = stats.get("system", {}).get("comfyui_version", "?")
        print(f"connected to ComfyUI {version} at {self.url}", file=sys.stderr)

    def submit(self, graph: dict[str, dict]) -> str:
        answer = json.loads(self._request("/prompt", {"prompt": graph, "client_id": self.client_id}))
        if answer.get("node_errors"):
            raise BatchError(f"the server rejected the workflow:\n{_node_errors(answer['node_errors'])}")
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict[str, Any]:
        return json.loads(self._request(f"/history/{prompt_id}")).get(prompt_id, {})

    def download(self, entry: dict[str, str]) -> bytes:
        query = urllib.parse.urlencode({k: entry.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")

    def websocket(self):
        try:
            import websocket
        except ImportError:
            raise BatchError("following progress needs websocket-client: pip install websocket-client") from None
        ws_url = self.url.replace("http://", "ws://").replace("https://", "wss://")
        try:
            return websocket.create_connection(f"{ws_url}/ws?clientId={self.client_id}", timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as exc:
            raise BatchError(f"cannot open the websocket at {ws_url}/ws: {exc}") from None


def _node_errors(errors: dict) -> str:
    lines = []
    for node_id, info in errors.items():
        for error in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type', '?')}): {error.get('message', '')}: "
                         f"{error.get('details', '')}")
    return "\n".join(lines) or json.dumps(errors)


def _rejection(exc: urllib.error.HTTPError) -> BatchError:
    body = exc.read().decode(errors="replace")
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return BatchError(f"the server answered HTTP {exc.code}: {body[:500]}")
    message = data.get("error", {}).get("message", "") if isinstance(data.get("error"), dict) else data.get("error")
    details = _node_errors(data["node_errors"]) if data.get("node_errors") else ""
    return BatchError(f"the server rejected the workflow (HTTP {exc.code}): {message}\n{details}".rstrip())


# ----------------------------------------------------------------------------------------------------------------
# Following a run
# ----------------------------------------------------------------------------------------------------------------


def _receive(ws, wait: float) -> Any:
    """The next websocket message, or None when none came within `wait` seconds (a quiet step is not an error:
    a long VAE decode sends nothing for a while)."""
    import websocket

    ws.settimeout(wait)
    try:
        return ws.recv()
    except (websocket.WebSocketTimeoutException, TimeoutError):
        return None
    except (websocket.WebSocketConnectionClosedException, ConnectionError) as exc:
        raise BatchError(f"the server closed the websocket ({exc}); did ComfyUI stop?") from None


def follow(ws, prompt_id: str, timeout: float, poll: float = 5.0) -> None:
    """Print progress until the prompt finishes; raise JobFailed on an error, an interruption or when the job
    takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = _receive(ws, min(poll, left))
        if message is None or not isinstance(message, str):
            continue  # binary frames are preview images
        event = json.loads(message)
        kind, data = event.get("type"), event.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        if kind == "progress":
            print(f"  node {data.get('node')}: {data.get('value')}/{data.get('max')}", file=sys.stderr)
        elif kind == "execution_success":
            return
        elif kind == "execution_error":
            raise JobFailed(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                            f"{data.get('exception_type')}: {data.get('exception_message')}")
        elif kind == "execution_interrupted":
            raise JobFailed(f"the run was interrupted at node {data.get('node_id')}")
        elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return
    raise JobFailed(f"no result within {timeout:.0f} s")


def finished_history(server: Server, prompt_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The prompt's /history entry; ComfyUI writes it just after announcing success, so poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        entry = server.history(prompt_id)
        if entry.get("status", {}).get("completed") or time.monotonic() > deadline:
            return entry
        time.sleep(0.2)


def save_outputs(server: Server, prompt_id: str, out_dir: Path) -> list[Path]:
    outputs = finished_history(server, prompt_id).get("outputs", {})
    saved = []
    for node_output in outputs.values():
        for entries in node_output.values():
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and "filename" in entry and entry.get("type") == "output":
                    target = out_dir / entry["filename"]
                    out_dir.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(server.download(entry))
                    saved.append(target)
    return saved


def run(args: argparse.Namespace) -> int:
    graph = load_workflow(Path(args.workflow))
    jobs = read_jobs(Path(args.prompts), args.seed)
    server = Server(args.server, args.request_timeout)
    server.check()
    ws = server.websocket()
    failures = 0
    try:
        for i, job in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] seed {job.seed}: {job.prompt}", file=sys.stderr)
            prompt_id = server.submit(apply_job(graph, job))
            try:
                follow(ws, prompt_id, args.timeout)
            except JobFailed as exc:
                failures += 1
                print(f"  failed: {exc}", file=sys.stderr)
                continue
            for path in save_outputs(server, prompt_id, Path(args.out)):
                print(path)
    finally:
        ws.close()
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", help="API-format workflow JSON")
    parser.add_argument("--prompts", required=True, help="prompt file: .txt (one per line) or .jsonl")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI server URL")
    parser.add_argument("--out", default="api_outputs", help="folder for the downloaded files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first job without a seed (+1 per job)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one job may run")
    parser.add_argument("--request_timeout", type=float, default=30.0,
                        help="seconds to wait for the server to answer one HTTP request or open the websocket")
    args = parser.parse_args(argv)
    for flag in ("timeout", "request_timeout"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag} must be a positive number of seconds, got {getattr(args, flag)}")
    try:
        return run(args)
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
