"""The trainer nodes outside ComfyUI, on tiny random models and a tiny toy-world dataset: the training example
workflow end to end (folder -> caches -> LoRA -> LoRA loader -> sampler -> mp4), the LoRA file, the shared DiT left
as it was, the loss image and the loss messages; Cancel (against the ComfyUI stand-in of test_nodes_comfy_adapter)
leaving the last saved file valid; the chart renderer, the throttled loss stream and bad inputs."""

from __future__ import annotations

import gc
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS as N
from nodes import comfy_adapter as adapter
from nodes import training as tr
from nodes.loss_chart import AVERAGE, MARGINS, RAW, TEXT, chart_image, moving_average, render_loss_chart
from tests import tiny_model_set as tms
from tests.graph_runner import check_workflow, core_stand_ins, run_workflow

ROOT = Path(__file__).resolve().parents[1]
NAME = "wantuner_train_lora"
CLIP_SIZE, CLIP_FRAMES = 32, 5  # the test dataset's clips (the example uses 64x64x9)
TRAIN_STEPS = 4
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")


def _api() -> dict:
    return json.loads((ROOT / "example_workflows" / "api" / f"{NAME}.json").read_text())


def _ui() -> dict:
    return json.loads((ROOT / "example_workflows" / f"{NAME}.json").read_text())


def _write_dataset(input_dir: Path, clips: int = 1) -> Path:
    """Purple toy-world clips (mp4 + .txt captions) where the example workflow expects them."""
    from wan_core.toy.world import Combo, write_dataset

    combos = [Combo("purple", "square", "right"), Combo("purple", "circle", "left")]
    write_dataset(input_dir / "wantuner_dataset", combos, clips, seed=3, fmt="mp4", size=CLIP_SIZE,
                  num_frames=CLIP_FRAMES)
    return input_dir / "wantuner_dataset" / "videos"


def _test_graph(**train: object) -> dict:
    """The example with test-sized settings: small clips, a few steps, a learning rate that shows in samples."""
    graph = _api()
    graph["5"]["inputs"].update(width=CLIP_SIZE, height=CLIP_SIZE, frames=CLIP_FRAMES)
    graph["6"]["inputs"].update({"steps": TRAIN_STEPS, "save_every_n_steps": 2, "rank": 4, "alpha": 4.0,
                                 "learning_rate": 5e-2, **train})
    graph["10"]["inputs"].update(steps=4)
    return graph


def _core(input_dir: Path) -> dict:
    return {**core_stand_ins(input_dir), "PreviewImage": lambda images: ()}


def _live_wan_models() -> int:
    from wan_core.models.dit import WanModel

    gc.collect()
    return sum(isinstance(o, WanModel) for o in gc.get_objects())


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()})


# ----------------------------------------------------------------------------------------------------------------
# The example workflow, static checks
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def listed_models(listed_models: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The suite's listed models folder (conftest) plus an input folder for the training dataset."""
    tmp_path = listed_models
    monkeypatch.setenv(adapter.INPUT_DIR_ENV, str(tmp_path / "input"))
    (tmp_path / "input" / "wantuner_dataset" / "videos").mkdir(parents=True)
    return tmp_path


def test_ui_workflow_matches_the_nodes_and_links_the_trained_file_into_the_lora_loader(listed_models: Path) -> None:
    graph = _ui()
    nodes = {n["id"]: n for n in graph["nodes"]}
    links = {link[0]: link for link in graph["links"]}
    for node in (n for n in graph["nodes"] if n["type"].startswith("WanTuner")):
        cls = N[node["type"]]
        types_ = cls.INPUT_TYPES()
        specs = {**types_["required"], **types_.get("optional", {})}
        widgets = [k for k, (kind, _) in specs.items() if isinstance(kind, list) or kind in WIDGETS]
        assert len(node["widgets_values"]) == len(widgets) + sum(
            bool(specs[w][1].get("control_after_generate")) for w in widgets), node["type"]
        sockets = [(k, kind) for k, (kind, _) in specs.items() if k not in widgets]
        converted = [(i["name"], i["type"]) for i in node["inputs"] if "widget" in i]
        assert [(i["name"], i["type"]) for i in node["inputs"] if "widget" not in i] == sockets
        assert all(name in widgets for name, _ in converted)
        outputs = [("COMBO" if isinstance(t, list) else t) for t in cls.RETURN_TYPES]
        assert [(o["name"], o["type"]) for o in node["outputs"]] == list(zip(cls.RETURN_NAMES, outputs))
    lora_loader = next(n for n in graph["nodes"] if n["type"] == "WanTunerLoRALoader")
    (slot,) = [i for i in lora_loader["inputs"] if "widget" in i]
    assert (slot["name"], slot["type"], slot["widget"]) == ("lora_name", "COMBO", {"name": "lora_name"})
    link_id, src, src_slot, dst, dst_slot, kind = links[slot["link"]]
    assert nodes[src]["type"] == "WanTunerTrainLoRA" and (src_slot, kind) == (0, "COMBO")
    assert (dst, lora_loader["inputs"][dst_slot]) == (lora_loader["id"], slot)
    assert link_id in nodes[src]["outputs"][0]["links"]
    notes = " ".join(n["widgets_values"][0] for n in graph["nodes"] if n["type"] == "Note")
    assert "models/diffusion_models" in notes and "write_dataset" in notes


def test_api_workflow_validates_and_types_the_file_name_as_the_lora_choices(listed_models: Path) -> None:
    api = _api()
    order = check_workflow(api, core=_core(Path(".")))
    assert order.index("6") < order.index("7") < order.index("10")  # train, then load the file, then sample
    assert api["7"]["inputs"]["lora_name"] == ["6", 0]
    assert N["WanTunerTrainLoRA"].RETURN_TYPES[0] == N["WanTunerLoRALoader"].INPUT_TYPES()["required"][
        "lora_name"][0]
    new = listed_models / "loras" / "later.safetensors"
    new.touch()  # the types follow the folder, so a file trained earlier does not break the link
    assert "later.safetensors" in N["WanTunerTrainLoRA"].RETURN_TYPES[0]
    assert N["WanTunerTrainLoRA"]().RETURN_TYPES == N["WanTunerTrainLoRA"].RETURN_TYPES
    check_workflow(api, core=_core(Path(".")))
    assert sorted(n["class_type"] for n in api.values()) == sorted(
        n["type"] for n in _ui()["nodes"] if n["type"] != "Note")


# ----------------------------------------------------------------------------------------------------------------
# The example workflow, run on tiny models
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory):
    """Runs the example (test-sized) once; records the shared DiT before training and the live model count."""
    root = tmp_path_factory.mktemp("train_workflow")
    tms.write_model_set(root / "models")
    folder = _write_dataset(root / "input")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(adapter.MODELS_DIR_ENV, str(root / "models"))
        mp.setenv(adapter.OUTPUT_DIR_ENV, str(root / "output"))
        mp.setenv(adapter.INPUT_DIR_ENV, str(root / "input"))
        adapter.clear_cache()
        adapter.EVENT_LOG.clear()
        graph = _test_graph()
        shared = N["WanTunerDiTLoader"]().load(**graph["1"]["inputs"])[0]  # the object the graph will share
        before, models_before = _snapshot(shared.model.obj), _live_wan_models()
        with torch.inference_mode():  # as ComfyUI runs every node
            result = run_workflow(graph, _core(root / "input"))
        events = list(adapter.EVENT_LOG)
        models_after = _live_wan_models()
        yield types.SimpleNamespace(root=root, folder=folder, graph=graph, result=result, shared=shared,
                                    before=before, models=(models_before, models_after), events=events)
        adapter.clear_cache()


@pytest.mark.slow
def test_cache_node_writes_the_folder_toml_and_summarises(workflow) -> None:
    from training.dataset.schema import load_dataset_config

    handle, summary = workflow.result.outputs["5"]
    assert handle.config == workflow.folder / tr.CACHE_FOLDER / tr.TOML_NAME
    (dataset,) = load_dataset_config(handle.config).datasets
    assert (dataset.directory, dataset.target_frames, dataset.resolution) == (
        str(workflow.folder), (CLIP_FRAMES,), (CLIP_SIZE, CLIP_SIZE))
    assert (handle.items, handle.buckets, handle.clip, handle.control) == (
        2, ((CLIP_SIZE, CLIP_SIZE, CLIP_FRAMES),), False, False)
    assert f"2 items (2 samples, 2 batches per epoch) in 1 buckets\n  {CLIP_SIZE}x{CLIP_SIZE}x{CLIP_FRAMES}: 2 items" \
        in summary
    assert "latents: 2 encoded, 0 reused; T5: 3 encoded, 0 reused" in summary  # 2 captions + the empty caption
    assert workflow.result.ui["5"]["text"] == [summary]


@pytest.mark.slow
def test_trained_lora_is_in_the_loras_folder_and_loads_with_zero_unmatched_keys(workflow) -> None:
    from safetensors.torch import load_file

    from wan_core.lora.apply import lora_report

    name, image, summary = workflow.result.outputs["6"]
    loras = workflow.root / "models" / "loras"
    assert name == "wantuner/toy_purple.safetensors"
    assert sorted(p.name for p in (loras / "wantuner").iterdir()) == [
        "toy_purple-step00000002.safetensors", "toy_purple-step00000004.safetensors", "toy_purple.safetensors"]
    report = lora_report(workflow.shared.model.obj, loras / name, 1.0, None, None)
    assert report.matched == 20 and report.unmatched == ()  # 10 Linear layers in each of the 2 blocks
    tensors = load_file(loras / name)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert len(ups) == 20 and all(float(v.abs().max()) > 0 for v in ups)  # trained away from the zero init
    text = workflow.result.outputs["7"][1]  # the LoRA loader got the new file through the link
    assert text.startswith(f"{name}: 20 modules matched") and "no unmatched keys" in text
    assert f"{TRAIN_STEPS} steps in" in summary and str(loras / name) in summary


@pytest.mark.slow
def test_the_trained_lora_changes_the_samples_and_the_video_is_written(workflow) -> None:
    import av

    result = workflow.result
    plain_inputs = {k: v for k, v in workflow.graph["10"]["inputs"].items() if not isinstance(v, list)}
    embeds, vae = result.outputs["4"][0], result.outputs["3"][0]
    plain = N["WanTunerSampler"]().sample(dit=result.outputs["1"][0], text_embeds=embeds, vae=vae, **plain_inputs)
    with_lora = result.outputs["10"][0]["samples"]
    assert float((with_lora - plain[0]["samples"]).abs().max()) > 1e-2
    (entry,) = result.ui["12"]["images"]
    with av.open(str(workflow.root / "output" / entry["subfolder"] / entry["filename"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == workflow.graph["10"]["inputs"]["length"]


@pytest.mark.slow
def test_training_leaves_the_shared_dit_as_it_was_and_frees_its_copy(workflow) -> None:
    from wan_core.lora.apply import LoRAModule

    model = workflow.result.outputs["1"][0].model.obj
    assert model is workflow.shared.model.obj
    weights, grads = _snapshot(model)
    before_weights, before_grads = workflow.before
    assert grads == before_grads
    assert weights.keys() == before_weights.keys()
    assert all(torch.equal(weights[k], before_weights[k]) for k in weights)
    assert not any(isinstance(m, LoRAModule) for m in model.modules())
    assert workflow.models[1] == workflow.models[0]  # the training copy is gone


@pytest.mark.slow
def test_loss_image_ui_and_websocket_messages(workflow) -> None:
    _, image, _ = workflow.result.outputs["6"]
    assert image.shape == (1, 256, 512, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    losses = workflow.result.ui["6"]["losses"]
    assert [step for step, _ in losses] == list(range(1, TRAIN_STEPS + 1))
    assert all(np.isfinite(loss) and loss > 0 for _, loss in losses)
    messages = [data for event, data in workflow.events if event == adapter.TRAINING_EVENT]
    assert all(m["node"] == "6" for m in messages)
    assert messages[0] == {"node": "6", "prompt_id": None, "points": [], "total": TRAIN_STEPS, "status": "starting",
                           "reset": True}
    assert [m["status"] for m in messages[1:-1]] == ["running"] * (len(messages) - 2)
    assert messages[-1]["status"] == "done" and not any(m["reset"] for m in messages[1:])
    assert [p for m in messages for p in m["points"]] == losses  # every point once, in order
    json.dumps(messages, allow_nan=False)


# ----------------------------------------------------------------------------------------------------------------
# Training the loaded DiT itself
# ----------------------------------------------------------------------------------------------------------------


def _weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of the state dict."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _model_state(model: torch.nn.Module) -> tuple:
    """Everything besides the weights that training could leave changed: module types (LoRA/fp8 wrappers),
    requires_grad, train/eval modes, attention backends, gradient checkpointing, forward overrides."""
    return ([(n, type(m).__name__, m.training, getattr(m, "attn_backend", None), "forward" in m.__dict__)
             for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()], model.gradient_checkpointing)


def test_train_node_trains_the_loaded_dit_itself_and_leaves_it_unchanged(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The DiT loaded (under inference mode, as ComfyUI runs nodes) by the loader is the model the LoRA is trained
    on: no second WanModel exists during training, the LoRA file is written, and afterwards the loaded DiT has the
    same weights hash, no LoRA, and its requires_grad flags, modes and attention backends as before."""
    import training.train as train_module

    tms.write_model_set(tmp_path / "models")
    _write_dataset(tmp_path / "input")
    for env, name in ((adapter.MODELS_DIR_ENV, "models"), (adapter.OUTPUT_DIR_ENV, "output"),
                      (adapter.INPUT_DIR_ENV, "input")):
        monkeypatch.setenv(env, str(tmp_path / name))
    adapter.clear_cache()
    graph = _test_graph(output_name="wantuner/shared", steps=2, save_every_n_steps=0)
    with torch.inference_mode():
        shared = N["WanTunerDiTLoader"]().load(**graph["1"]["inputs"])[0]
        vae = N["WanTunerVAELoader"]().load(**graph["3"]["inputs"])[0]
        t5 = N["WanTunerT5Loader"]().load(**graph["2"]["inputs"])[0]
        cache = {k: v for k, v in graph["5"]["inputs"].items() if not isinstance(v, list)}
        dataset = N["WanTunerCacheDataset"]().cache(vae=vae, t5=t5, unique_id="5", **cache)["result"][0]
    model = shared.model.obj
    model.eval()  # as sampling leaves it
    hash_before, state_before, models_before = _weights_hash(model), _model_state(model), _live_wan_models()
    trained_on: list[tuple[object, int]] = []
    apply_lora = train_module.apply_lora

    def spy(run, dit):  # the model the trainer attaches its LoRA to, and how many DiTs are alive then
        trained_on.append((dit, _live_wan_models()))
        return apply_lora(run, dit)

    monkeypatch.setattr(train_module, "apply_lora", spy)
    train = {k: v for k, v in graph["6"]["inputs"].items() if not isinstance(v, list)}
    with torch.inference_mode():
        name, _, summary = N["WanTunerTrainLoRA"]().train(dit=shared, dataset=dataset, unique_id="6",
                                                          **train)["result"]
    assert [(dit is model, count) for dit, count in trained_on] == [(True, models_before)]
    assert name == "wantuner/shared.safetensors" and (tmp_path / "models" / "loras" / name).is_file()
    assert "2 steps in" in summary
    assert _weights_hash(model) == hash_before
    assert _model_state(model) == state_before
    adapter.clear_cache()


# ----------------------------------------------------------------------------------------------------------------
# Cancel, inside the ComfyUI stand-in
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_stops_between_steps_keeps_the_saved_file_valid_and_frees_the_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_nodes_comfy_adapter import FakeComfy, Interrupted
    from wan_core.lora.apply import lora_report

    tms.write_model_set(tmp_path / "models")
    _write_dataset(tmp_path / "input")
    fake = FakeComfy(tmp_path / "models", tmp_path / "output")
    fp, mm = fake.modules["folder_paths"], fake.modules["comfy.model_management"]
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]
    fp.get_input_directory = lambda: str(tmp_path / "input")
    unloads: list[bool] = []
    mm.unload_all_models = lambda: unloads.append(True)
    sent: list[tuple[str, dict, str]] = []
    server = types.ModuleType("server")
    record = lambda event, data, sid: sent.append((event, data, sid))  # noqa: E731
    server.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(
        client_id="client-1", last_prompt_id="p-1", send_sync=record))
    context = types.ModuleType("comfy_execution.utils")
    context.get_executing_context = lambda: types.SimpleNamespace(prompt_id="p-2", node_id="6")
    for name, module in {**fake.modules, "server": server, "comfy_execution.utils": context}.items():
        monkeypatch.setitem(sys.modules, name, module)
    adapter.clear_cache()
    graph = _test_graph(output_name="wantuner/cancelled", steps=6)
    shared = N["WanTunerDiTLoader"]().load(**graph["1"]["inputs"])[0]
    models_before = _live_wan_models()
    cache = {k: v for k, v in graph["5"]["inputs"].items() if not isinstance(v, list)}
    vae = N["WanTunerVAELoader"]().load(**graph["3"]["inputs"])[0]
    t5 = N["WanTunerT5Loader"]().load(**graph["2"]["inputs"])[0]
    dataset = N["WanTunerCacheDataset"]().cache(vae=vae, t5=t5, unique_id="5", **cache)["result"][0]
    fake.checks, fake.interrupt_at = 0, 3  # Cancel seen at the third step
    train = {k: v for k, v in graph["6"]["inputs"].items() if not isinstance(v, list)}
    with pytest.raises(Interrupted), torch.inference_mode():
        N["WanTunerTrainLoRA"]().train(dit=shared, dataset=dataset, unique_id="6", **train)
    folder = tmp_path / "models" / "loras" / "wantuner"
    assert sorted(p.name for p in folder.iterdir()) == ["cancelled-step00000002.safetensors"]
    report = lora_report(shared.model.obj, folder / "cancelled-step00000002.safetensors", 1.0, None, None)
    assert report.matched == 20 and report.unmatched == ()
    assert unloads and _live_wan_models() == models_before
    assert [p[0] for p in fake.progress if p[1] == 6] == [1, 2]  # the third check raised before its update
    assert all(event == adapter.TRAINING_EVENT and sid == "client-1" for event, _, sid in sent)
    assert all(data["prompt_id"] == "p-2" and data["node"] == "6" for _, data, _ in sent)
    assert sent[-1][1]["status"] == "interrupted"
    assert [p[0] for _, data, _ in sent for p in data["points"]] == [1, 2, 3]
    adapter.clear_cache()


# ----------------------------------------------------------------------------------------------------------------
# Chart, stream, inputs
# ----------------------------------------------------------------------------------------------------------------


def _has_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((np.abs(pixels.astype(int) - colour).sum(-1) <= 30).any())


def test_loss_chart_draws_the_curve_where_the_losses_are() -> None:
    points = [(s, 2.0 / s) for s in range(1, 101)]  # falling
    pixels = render_loss_chart(points, 400, 200)
    assert pixels.shape == (200, 400, 3) and pixels.dtype == np.uint8
    left, top, right, bottom = MARGINS[0], MARGINS[1], 400 - MARGINS[2], 200 - MARGINS[3]
    width, height = right - left, bottom - top
    start = pixels[top: top + height // 4, left: left + width // 4]  # high loss at the first steps
    end = pixels[bottom - height // 4: bottom, right - width // 4: right]  # low loss at the last steps
    assert _has_colour(start, RAW) and _has_colour(end, AVERAGE)
    assert not _has_colour(pixels[top: top + height // 4, right - width // 4: right], RAW)
    rising = render_loss_chart([(s, float(s)) for s in range(1, 101)], 400, 200)
    assert not _has_colour(rising[top: top + height // 4, left: left + width // 8], RAW)


def test_loss_chart_skips_non_finite_values_and_handles_few_points() -> None:
    with_nan = render_loss_chart([(1, 1.0), (2, float("nan")), (3, 0.5), (4, float("inf"))])
    assert np.array_equal(with_nan, render_loss_chart([(1, 1.0), (3, 0.5)]))
    empty = render_loss_chart([])
    assert _has_colour(empty, TEXT) and not _has_colour(empty, RAW)
    single = render_loss_chart([(7, 0.25)])
    assert _has_colour(single, AVERAGE)
    image = chart_image([(1, 1.0), (2, 0.5)], 200, 120)
    assert image.shape == (1, 120, 200, 3) and image.dtype == torch.float32 and float(image.max()) <= 1.0
    with pytest.raises(ValueError, match="at least 160x100 pixels, got 100x50"):
        render_loss_chart([(1, 1.0)], 100, 50)
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_loss_stream_is_throttled_but_loses_no_point() -> None:
    now = [0.0]
    stream = adapter.LossStream("9", interval=0.5, clock=lambda: now[0])
    adapter.EVENT_LOG.clear()
    stream.start(10)
    for step in range(1, 11):
        now[0] += 0.2
        stream.add(step, 10, float("nan") if step == 4 else 1.0 / step)
    stream.close("done")
    messages = [data for _, data in adapter.EVENT_LOG]
    # starting; step 1 (first); every >= 0.5 s (steps 4, 7, 10 - the last always); done
    assert [[p[0] for p in m["points"]] for m in messages] == [[], [1], [2, 3, 4], [5, 6, 7], [8, 9, 10], []]
    assert [m["status"] for m in messages] == ["starting", "running", "running", "running", "running", "done"]
    assert messages[2]["points"][2] == [4, None]  # NaN travels as null
    json.dumps(messages, allow_nan=False)
    with pytest.raises(ValueError, match="interval must be >= 0 seconds, got -1"):
        adapter.LossStream("9", interval=-1)


def test_dataset_path_and_folder_problems_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(adapter.INPUT_DIR_ENV, str(tmp_path))
    validate = N["WanTunerCacheDataset"].VALIDATE_INPUTS
    assert "dataset_path is empty" in validate(dataset_path="  ")
    assert f"{tmp_path / 'nope'} does not exist (relative paths are inside ComfyUI's input folder" in validate(
        dataset_path="nope")
    (tmp_path / "notes.txt").write_text("x")
    assert "is a .txt file; expected a folder" in validate(dataset_path="notes.txt")
    assert validate(dataset_path=f'"{tmp_path}"') is True  # pasted with quotes
    assert "frames must be 4n+1" in validate(frames=10) and "try 9 or 13" in validate(frames=10)
    settings = tr.FolderSettings(64, 64, 9, "head", True, 1, 1, ".txt")
    with pytest.raises(ValueError, match=r"holds no images \(.*\) or videos"):
        tr.folder_dataset_toml(tmp_path, settings)


def _comfy_folders(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for env, name in ((adapter.INPUT_DIR_ENV, "input"), (adapter.OUTPUT_DIR_ENV, "output"),
                      (adapter.TEMP_DIR_ENV, "temp"), (adapter.MODELS_DIR_ENV, "models")):
        (root / name).mkdir()
        monkeypatch.setenv(env, str(root / name))


def _image_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"")
    (folder / "a.txt").write_text("a red square")
    return folder


def _toml(path: Path, data: Path, cache: Path) -> Path:
    path.write_text(f'[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\n[[datasets]]\n'
                    f"image_directory = {json.dumps(str(data))}\ncache_directory = {json.dumps(str(cache))}\n")
    return path


CACHE_SETTINGS = {"width": 64, "height": 64, "frames": 9, "frame_extraction": "head", "enable_bucket": True,
                  "num_repeats": 1, "batch_size": 1, "caption_extension": ".txt"}


def test_cache_dataset_refuses_paths_outside_comfyuis_folders(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _comfy_folders(tmp_path, monkeypatch)
    validate = N["WanTunerCacheDataset"].VALIDATE_INPUTS
    outside = _image_folder(tmp_path / "elsewhere")
    message = validate(dataset_path=str(outside))
    assert message.startswith(f"dataset_path {outside} resolves to {outside}, outside the folders WanTuner may use (")
    with pytest.raises(ValueError, match="outside the folders WanTuner may use"):
        N["WanTunerCacheDataset"]().cache(vae=None, t5=None, dataset_path=str(outside), **CACHE_SETTINGS)
    assert not (outside / tr.CACHE_FOLDER).exists()  # nothing written there
    (tmp_path / "input" / "linked").symlink_to(outside)  # symlinks are followed
    assert f"resolves to {outside}, outside" in validate(dataset_path="linked")
    loras = tmp_path / "models" / "loras"
    toml = _toml(tmp_path / "input" / "d.toml", _image_folder(tmp_path / "input" / "data"), loras)
    message = validate(dataset_path="d.toml")
    assert message.startswith(f"datasets[0] cache_directory in {toml}: {loras} resolves to {loras}, outside")
    with pytest.raises(ValueError, match="cache_directory .* outside the folders WanTuner may use"):
        N["WanTunerCacheDataset"]().cache(vae=None, t5=None, dataset_path="d.toml", **CACHE_SETTINGS)
    assert not loras.exists()
    assert "datasets[0] directory" in validate(dataset_path=str(_toml(toml, outside, tmp_path / "temp" / "c")))


def test_cache_dataset_accepts_paths_inside_comfyuis_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _comfy_folders(tmp_path, monkeypatch)
    validate = N["WanTunerCacheDataset"].VALIDATE_INPUTS
    data = _image_folder(tmp_path / "input" / "data")
    assert validate(dataset_path="data") is True and validate(dataset_path=str(data)) is True
    settings = tr.FolderSettings(64, 64, 9, "head", True, 1, 1, ".txt")
    group = tr.dataset_group(tr.resolve_dataset_path(str(data)), settings)
    assert group.datasets[0].cache_directory == str(data / tr.CACHE_FOLDER / "images")
    toml = _toml(tmp_path / "input" / "d.toml", data, tmp_path / "temp" / "cache")
    assert validate(dataset_path="d.toml") is True
    assert tr.dataset_group(toml, settings).datasets[0].cache_directory == str(tmp_path / "temp" / "cache")


def test_a_folder_registered_for_datasets_is_allowed_inside_comfyui(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_nodes_comfy_adapter import FakeComfy

    fake = FakeComfy(tmp_path / "models", tmp_path / "output")
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    shared = _image_folder(tmp_path / "shared" / "data")
    validate = N["WanTunerCacheDataset"].VALIDATE_INPUTS
    assert "outside the folders WanTuner may use" in validate(dataset_path=str(shared))
    fake.modules["folder_paths"].folder_names_and_paths[adapter.DATA_FOLDER] = ([str(tmp_path / "shared")], set())
    assert validate(dataset_path=str(shared)) is True
    assert "outside the folders" in validate(dataset_path=str(tmp_path / "models"))


def test_folder_toml_lists_images_and_videos_separately(tmp_path: Path) -> None:
    from training.dataset.schema import load_dataset_config

    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    path = tr.folder_dataset_toml(tmp_path, tr.FolderSettings(96, 64, 17, "uniform", False, 3, 2, ".caption"))
    group = load_dataset_config(path)
    videos, images = group.datasets
    assert (videos.is_video, videos.directory, videos.target_frames, videos.frame_extraction) == (
        True, str(tmp_path), (17,), "uniform")
    assert (images.is_video, images.directory) == (False, str(tmp_path))
    for cfg in (videos, images):
        assert (cfg.resolution, cfg.caption_extension, cfg.batch_size, cfg.num_repeats, cfg.enable_bucket) == (
            (96, 64), ".caption", 2, 3, False)
    assert {videos.cache_directory, images.cache_directory} == {str(tmp_path / tr.CACHE_FOLDER / "videos"),
                                                               str(tmp_path / tr.CACHE_FOLDER / "images")}
    stamp = path.stat().st_mtime_ns
    tr.folder_dataset_toml(tmp_path, tr.FolderSettings(96, 64, 17, "uniform", False, 3, 2, ".caption"))
    assert path.stat().st_mtime_ns == stamp  # unchanged settings leave the file alone


def test_dataset_state_follows_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv(adapter.INPUT_DIR_ENV, str(tmp_path))
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"video")
    (folder / "a.txt").write_text("a red square")
    first = N["WanTunerCacheDataset"].IS_CHANGED(dataset_path="data")
    assert N["WanTunerCacheDataset"].IS_CHANGED(dataset_path="data") == first
    (folder / tr.CACHE_FOLDER).mkdir()
    (folder / tr.CACHE_FOLDER / "x_wan.safetensors").write_bytes(b"cache")  # the caches do not count
    assert N["WanTunerCacheDataset"].IS_CHANGED(dataset_path="data") == first
    (folder / "a.txt").write_text("a blue square")
    os.utime(folder / "a.txt", ns=(1, 1))
    assert N["WanTunerCacheDataset"].IS_CHANGED(dataset_path="data") != first
    assert N["WanTunerCacheDataset"].IS_CHANGED(dataset_path="missing").startswith("invalid: ")


def test_output_names_and_settings_are_checked() -> None:
    from dataclasses import replace

    validate = N["WanTunerTrainLoRA"].VALIDATE_INPUTS
    assert validate(output_name="wantuner/my_lora") is True
    assert tr.lora_target("a/b/c.safetensors") == (Path("a/b"), "c")
    assert tr.lora_target(" x ") == (Path(), "x")
    for bad in ("", "../up", "/abs/x", "a/../b", "c:x", "x?"):
        message = validate(output_name=bad)
        assert isinstance(message, str) and f"output_name {bad!r} must be a file name" in message
    from nodes.comfy_adapter import ManagedModel
    from nodes.types import DiTHandle
    from tests.tiny import TINY_DIT
    from wan_core.models.dit import WanModel

    model = WanModel(TINY_DIT)
    dit = DiTHandle(ManagedModel(model, model, "dit"), "d.safetensors", None)
    settings = tr.TrainSettings(4, 4.0, 1e-3, 10, 0, "AdamW", "shift", 3.0, 1, True, 0, "musubi")
    config = tr.train_config(settings, dit, Path("d.safetensors"), Path("x.toml"), Path("out"), "n")
    assert (config.network.rank, config.network.alpha, config.optimizer.learning_rate, config.schedule.max_train_steps,
            config.schedule.max_train_epochs, config.timesteps.sampling, config.timesteps.discrete_flow_shift,
            config.memory.gradient_checkpointing, config.save.save_every_n_steps, config.memory.mixed_precision,
            config.model.attention, config.data.max_data_loader_n_workers) == (
        4, 4.0, 1e-3, 10, None, "shift", 3.0, True, None, "no", "sdpa", 0)
    epochs = tr.TrainSettings(4, 4.0, 1e-3, 10, 3, "AdamW", "sigma", 1.0, 1, False, 5, "comfyui", "bf16", False, 0,
                              "xformers")
    config = tr.train_config(epochs, replace(dit, task="t2v-1.3B"), Path("d"), Path("x"), Path("o"), "n")
    assert (config.schedule.max_train_epochs, config.model.task, config.save.save_every_n_steps,
            config.save.save_format, config.model.attention, config.memory.mixed_precision) == (
        3, "t2v-1.3B", 5, "comfyui", "xformers", "bf16")
    with pytest.raises(ValueError, match="fp8_base is on but the DiT loader loaded the DiT without fp8"):
        tr.train_config(replace(epochs, fp8_base=True), dit, Path("d"), Path("x"), Path("o"), "n")
    with pytest.raises(ValueError, match="blocks_to_swap is 2 but the DiT loader loaded the DiT without block swap"):
        tr.train_config(replace(epochs, blocks_to_swap=2), dit, Path("d"), Path("x"), Path("o"), "n")


def test_trainer_refuses_datasets_and_dits_that_do_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    tms.write_model_set(tmp_path)
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tmp_path))
    adapter.clear_cache()
    loader = {"task": "auto", "dtype": "default", "fp8": "none", "attention": "sdpa", "blocks_to_swap": 0,
              "compile": False}
    i2v = N["WanTunerDiTLoader"]().load(tms.FILES["dit_i2v"][1], **loader)[0]
    plain = tr.DatasetHandle(tmp_path / "d.toml", 1, ((64, 64, 9),), False, False, False, "")
    with pytest.raises(ValueError, match="needs clip, latents_image in the dataset cache.*connect a CLIP vision"):
        tr.check_fits(i2v, plain)
    tr.check_fits(i2v, replace(plain, image_latents=True, clip=True))
    t2v = N["WanTunerDiTLoader"]().load(tms.FILES["dit_t2v"][1], **loader)[0]
    with_lora = N["WanTunerLoRALoader"]().add(t2v, tms.LORA[1], 1.0, "", "")["result"][0]
    with pytest.raises(ValueError, match="connect the DiT loader itself to the trainer, not a LoRA loader"):
        tr.check_fits(with_lora, plain)
    adapter.clear_cache()


# ----------------------------------------------------------------------------------------------------------------
# Wan2.2 A14B: one LoRA across a loaded expert pair
# ----------------------------------------------------------------------------------------------------------------

A14B_LOW, A14B_HIGH = "wan2.2_t2v_low_noise_14B_fp16.safetensors", "wan2.2_t2v_high_noise_14B_fp16.safetensors"


def test_train_node_trains_one_lora_across_a_loaded_expert_pair_as_the_cli_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """high_noise_dit + boundary reach the trainer's expert-pair path: batches at or above the boundary run through
    the high-noise expert, the LoRA equals the one `python -m training train --dit LOW --dit_high_noise HIGH` trains
    from the files with the same settings, and both loaded experts are handed back unchanged."""
    from dataclasses import replace

    import training.train as train_module
    from training.experts import ExpertPair
    from wan_core.loading.checkpoint import load_state_dict, read_metadata

    tms.write_model_set(tmp_path / "models")
    tms.write_wan22_files(tmp_path / "models")
    _write_dataset(tmp_path / "input")
    for env, name in ((adapter.MODELS_DIR_ENV, "models"), (adapter.OUTPUT_DIR_ENV, "output"),
                      (adapter.INPUT_DIR_ENV, "input")):
        monkeypatch.setenv(env, str(tmp_path / name))
    adapter.clear_cache()
    graph = _test_graph(output_name="wantuner/pair", steps=6, save_every_n_steps=0, timestep_sampling="uniform")
    loader = {**graph["1"]["inputs"], "task": "t2v-A14B"}
    with torch.inference_mode():
        low = N["WanTunerDiTLoader"]().load(**{**loader, "model_name": A14B_LOW})[0]
        high = N["WanTunerDiTLoader"]().load(**{**loader, "model_name": A14B_HIGH})[0]
        vae = N["WanTunerVAELoader"]().load(**graph["3"]["inputs"])[0]
        t5 = N["WanTunerT5Loader"]().load(**graph["2"]["inputs"])[0]
        cache = {k: v for k, v in graph["5"]["inputs"].items() if not isinstance(v, list)}
        dataset = N["WanTunerCacheDataset"]().cache(vae=vae, t5=t5, unique_id="5", **cache)["result"][0]
    hashes = {name: _weights_hash(d.model.obj) for name, d in (("low", low), ("high", high))}
    configs, picked = [], []
    node_train, select = train_module.train, ExpertPair.select

    def spy_train(config, **kwargs):
        configs.append(config)
        return node_train(config, **kwargs)

    def spy_select(self, sigmas):
        model = select(self, sigmas)
        picked.append(("high" if model is self.high else "low", float(sigmas.max()) * 1000 >= 500))
        return model

    monkeypatch.setattr(tr, "train", spy_train)
    monkeypatch.setattr(ExpertPair, "select", spy_select)
    train = {k: v for k, v in graph["6"]["inputs"].items() if not isinstance(v, list)}
    with torch.inference_mode():
        name, _, summary = N["WanTunerTrainLoRA"]().train(dit=low, dataset=dataset, high_noise_dit=high,
                                                          unique_id="6", **{**train, "boundary": 500.0})["result"]
    (config,) = configs
    assert (config.model.task, config.model.timestep_boundary) == ("t2v-A14B", 500.0)
    assert config.model.dit_high_noise == str(tmp_path / "models" / "diffusion_models" / A14B_HIGH)
    assert len(picked) == 6 and all((side == "high") == above for side, above in picked)
    assert {side for side, _ in picked} == {"high", "low"}
    node_lora = tmp_path / "models" / "loras" / name
    assert read_metadata(node_lora)["ss_sd_model_name_high_noise"] == A14B_HIGH
    assert {n: _weights_hash(d.model.obj) for n, d in (("low", low), ("high", high))} == hashes
    files_run = node_train(replace(config, save=replace(config.save, output_dir=str(tmp_path / "cli"))))
    expected = load_state_dict(files_run.output)
    got = load_state_dict(node_lora)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    adapter.clear_cache()


def test_train_node_refuses_expert_pairs_that_do_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tms.write_model_set(tmp_path)
    tms.write_wan22_files(tmp_path)
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tmp_path))
    adapter.clear_cache()
    loader = {"task": "auto", "dtype": "default", "fp8": "none", "attention": "sdpa", "blocks_to_swap": 0,
              "compile": False}
    low = N["WanTunerDiTLoader"]().load(A14B_LOW, **loader)[0]
    ti2v = N["WanTunerDiTLoader"]().load("wan2.2_ti2v_5B_fp16.safetensors", **loader)[0]
    i2v = N["WanTunerDiTLoader"]().load("wan2.2_i2v_high_noise_14B_fp16.safetensors", **loader)[0]
    with pytest.raises(ValueError, match="is a TI2V-5B DiT, which has no high-noise expert"):
        tr.check_pair(ti2v, low)
    with pytest.raises(ValueError, match="DiTs of different shapes; connect the two experts of one Wan2.2 A14B"):
        tr.check_pair(low, i2v)
    with_lora = N["WanTunerLoRALoader"]().add(low, tms.LORA[1], 1.0, "", "")["result"][0]
    with pytest.raises(ValueError, match="connect the high-noise DiT loader itself to the trainer"):
        tr.check_pair(low, with_lora)
    assert N["WanTunerTrainLoRA"].VALIDATE_INPUTS(boundary=1500.0) == (
        "timestep boundary must be in [0, 1] or (1, 1000], got 1500.0")
    assert N["WanTunerTrainLoRA"].VALIDATE_INPUTS(boundary=-1.0) is True
    adapter.clear_cache()
