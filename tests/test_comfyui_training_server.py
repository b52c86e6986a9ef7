"""The trainer nodes inside a real ComfyUI server (marker `comfyui`; skipped unless COMFYUI_DIR points at a ComfyUI
checkout; same setup as test_comfyui_server.py): the training example end to end over HTTP with the loss messages
on the websocket, Cancel through POST /interrupt, the front-end extension served, and (when a Chromium binary is
installed) the real front end drawing the live loss chart."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file():
    pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run the real-server tests", allow_module_level=True)

from tests import test_comfyui_server as base  # noqa: E402
from tests.test_comfyui_server import ROOT, RUN_TIMEOUT, Server  # noqa: E402
from tests.test_nodes_training import TRAIN_STEPS, _test_graph, _write_dataset  # noqa: E402

comfy_server = base.server  # the same server fixture, started once for this module
EVENT = "wantuner.training"
PACK = "ComfyUI-WanTuner"  # the folder name the server fixture links the pack under
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def dataset(comfy_server: Server) -> Path:
    return _write_dataset(comfy_server.base / "input")


def _lora_report(srv: Server, path: Path):
    from wan_core.lora.apply import lora_report
    from wan_core.models.dit import load_dit

    model = load_dit(srv.base / "models" / "diffusion_models" / "wan21_toy_t2v_dit.safetensors", device="cpu")
    return lora_report(model, path, 1.0, None, None)


def _failure(events: list[dict]) -> str:
    data = events[-1]["data"] if events else {}
    return f"{data.get('exception_message')}\n{''.join(data.get('traceback', []))}" if data else "no events"


def test_extension_is_served_and_parses(comfy_server: Server) -> None:
    listed = comfy_server.get("/extensions")
    assert f"/extensions/{PACK}/wantuner_training.js" in listed
    with urllib.request.urlopen(f"{comfy_server.url}/extensions/{PACK}/wantuner_training.js", timeout=60) as response:
        served = response.read()
    assert served == (ROOT / "web" / "js" / "wantuner_training.js").read_bytes()
    node = shutil.which("node")
    if node:
        subprocess.run([node, "--input-type=module", "--check"], input=served, check=True, timeout=60)


def test_object_info_types_the_trained_name_as_the_lora_choices(comfy_server: Server) -> None:
    info = comfy_server.get("/object_info")
    trainer, loader = info["WanTunerTrainLoRA"], info["WanTunerLoRALoader"]
    assert trainer["output"][0] == loader["input"]["required"]["lora_name"][0]
    assert trainer["output"][1:] == ["IMAGE", "STRING"] and trainer["output_node"] is True
    assert all("tooltip" in spec[1] for spec in trainer["input"]["required"].values())
    assert info["WanTunerCacheDataset"]["output"] == ["WANTUNER_DATASET", "STRING"]


def test_training_workflow_runs_streams_the_loss_and_the_lora_is_used(comfy_server: Server, dataset: Path) -> None:
    import av

    graph = _test_graph()
    outcome, events, _ = comfy_server.run(graph)
    assert outcome == "execution_success", _failure(events)
    prompt_id = events[-1]["data"]["prompt_id"]
    messages = [e["data"] for e in events if e["type"] == EVENT]
    assert messages and all(m["node"] == "6" and m["prompt_id"] == prompt_id for m in messages)
    assert (messages[0]["status"], messages[0]["reset"], messages[-1]["status"]) == ("starting", True, "done")
    points = [p for m in messages for p in m["points"]]
    assert [step for step, _ in points] == list(range(1, TRAIN_STEPS + 1))
    steps = [e["data"]["value"] for e in events if e["type"] == "progress" and e["data"]["node"] == "6"]
    assert steps and steps[-1] == TRAIN_STEPS
    entry = comfy_server.history(prompt_id)
    outputs = entry["outputs"]
    assert outputs["6"]["losses"] == points and "4 steps in" in outputs["6"]["text"][0]
    lora = comfy_server.base / "models" / "loras" / "wantuner" / "toy_purple.safetensors"
    assert lora.is_file() and "wantuner/toy_purple.safetensors: 20 modules matched" in outputs["7"]["text"][0]
    report = _lora_report(comfy_server, lora)
    assert report.matched == 20 and report.unmatched == ()
    assert outputs["8"]["images"]  # the loss curve went through the native PreviewImage
    (saved,) = outputs["12"]["images"]
    with av.open(str(comfy_server.base / "output" / saved["subfolder"] / saved["filename"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == graph["10"]["inputs"]["length"]


def test_cancel_stops_training_and_keeps_the_last_saved_file(comfy_server: Server, dataset: Path) -> None:
    import websocket

    graph = _test_graph(output_name="wantuner/cancelled", steps=100_000, save_every_n_steps=1)
    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(f"{comfy_server.url.replace('http', 'ws')}/ws?clientId={client_id}",
                                     timeout=RUN_TIMEOUT)
    try:
        status, answer = comfy_server.post("/prompt", {"prompt": graph, "client_id": client_id})
        assert status == 200, answer
        deadline, interrupted, final = time.monotonic() + RUN_TIMEOUT, False, None
        while final is None and time.monotonic() < deadline:
            message = ws.recv()
            if not isinstance(message, str):
                continue
            event = json.loads(message)
            if event["type"] == EVENT and not interrupted and any(p[0] >= 3 for p in event["data"]["points"]):
                comfy_server.post("/interrupt", {})
                interrupted = True
            if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                final = event
    finally:
        ws.close()
    assert final is not None and final["type"] == "execution_interrupted" and final["data"]["node_id"] == "6"
    folder = comfy_server.base / "models" / "loras" / "wantuner"
    saved = sorted(folder.glob("cancelled-step*.safetensors"))
    # the interrupt follows the loss message of step 3, which is sent just before that step's Cancel check (and its
    # save), so the run stops at step 3 or a little later
    assert [p.name for p in saved] == [f"cancelled-step{i:08d}.safetensors" for i in range(1, len(saved) + 1)]
    assert len(saved) >= 2 and not (folder / "cancelled.safetensors").exists()
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]  # no half-written file
    report = _lora_report(comfy_server, saved[-1])
    assert report.matched == 20 and report.unmatched == ()


# ----------------------------------------------------------------------------------------------------------------
# The real front end, in headless Chromium driven over the DevTools protocol
# ----------------------------------------------------------------------------------------------------------------


class Browser:
    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            answer = json.loads(self.ws.recv())
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                return answer["result"]

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {expression}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium) for the front-end check")
    port, profile = _free_port(), tempfile.mkdtemp(prefix="wantuner-chromium-")
    process = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                "--disable-background-networking", "--no-first-run", "--window-size=1600,1000",
                                f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                    pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("chromium did not open its DevTools port")
            time.sleep(0.5)
        yield Browser(pages[0]["webSocketDebuggerUrl"])
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


LOAD_AND_QUEUE = """
(async () => {
  const app = window.comfyAPI.app.app;
  await app.loadGraphData(%s);
  const set = (id, values) => {
    const node = app.graph.getNodeById(id);
    for (const [name, value] of Object.entries(values)) {
      const widget = node?.widgets?.find((w) => w.name === name);
      const names = node?.widgets?.map((w) => w.name);
      if (!widget) throw new Error(`node ${id} (${node?.type}) has no widget ${name}: ${names}`);
      widget.value = value;
    }
  };
  set(5, %s);
  set(6, %s);
  set(10, {steps: 4});
  await app.queuePrompt(0, 1);
  return true;
})()
"""


def test_front_end_draws_the_live_loss_chart(comfy_server: Server, dataset: Path, browser: Browser) -> None:
    # a returning user: the front end restores the default graph on start (a first run opens the templates); the
    # test workflow is loaded once that graph is there, so that the start-up does not replace it afterwards
    assert comfy_server.post("/settings/Comfy.TutorialCompleted", True)[0] == 200
    browser.call("Page.enable")
    browser.call("Runtime.enable")
    browser.call("Page.navigate", url=comfy_server.url)
    browser.wait_for("window.comfyAPI?.app?.app?.vueAppReady === true", 120)
    browser.wait_for("window.comfyAPI.app.app.extensions.some((e) => e.name === 'WanTuner.TrainingLoss')", 60)
    browser.wait_for("!!window.LiteGraph?.registered_node_types?.WanTunerTrainLoRA", 60)
    browser.wait_for("window.comfyAPI.app.app.graph?.nodes?.length > 0", 60)
    workflow = (ROOT / "example_workflows" / "wantuner_train_lora.json").read_text()
    test = _test_graph(output_name="wantuner/browser", steps=12, save_every_n_steps=0)
    cache = {k: test["5"]["inputs"][k] for k in ("width", "height", "frames")}
    train = {k: test["6"]["inputs"][k] for k in ("output_name", "steps", "save_every_n_steps", "rank", "alpha",
                                                 "learning_rate")}
    browser.evaluate(LOAD_AND_QUEUE % (workflow, json.dumps(cache), json.dumps(train)))
    state = "window.comfyAPI.app.app.graph.getNodeById(6)?.wantunerLoss"
    browser.wait_for(f"{state}?.status === 'done'", RUN_TIMEOUT)
    points = browser.evaluate(f"{state}.points")
    assert [p[0] for p in points] == list(range(1, 13))
    assert (comfy_server.base / "models" / "loras" / "wantuner" / "browser.safetensors").is_file()
    browser.evaluate("(() => { const app = window.comfyAPI.app.app; const node = app.graph.getNodeById(6); "
                     "app.canvas.ds.scale = 1.5; app.canvas.centerOnNode(node); app.canvas.setDirty(true, true); "
                     "return true; })()")
    time.sleep(1.0)
    shot = browser.call("Page.captureScreenshot", format="png")
    out = Path(os.environ.get("WANTUNER_SCREENSHOT_DIR", tempfile.gettempdir())) / "wantuner_training_chart.png"
    out.write_bytes(base64.b64decode(shot["data"]))
