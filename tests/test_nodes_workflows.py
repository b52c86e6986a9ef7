"""The example workflows: UI files agree with the nodes' INPUT_TYPES, API files validate, and every API workflow runs
through the node classes on tiny random models and writes the expected mp4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS
from nodes import comfy_adapter as adapter
from tests.graph_runner import GraphError, RunResult, check_workflow, core_stand_ins, run_workflow

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
NAMES = ("wantuner_t2v", "wantuner_i2v", "wantuner_flf2v", "wantuner_fun_control", "wantuner_lora_regex",
         "wantuner_fewstep", "wantuner_t2v_a14b", "wantuner_stepcache")
OFFICIAL_NAMES = ("wantuner_i2v_a14b", "wantuner_ti2v_5b")  # Wan2.2 models without toy files: official file names
TRAINING_NAMES = ("wantuner_train_lora",)  # checked and run by tests/test_nodes_training.py
CONTROL_AFTER_GENERATE = ("fixed", "increment", "decrement", "randomize")
EXAMPLE_IMAGE_HW = (48, 80)  # a non-square start image, so size_from_image has something to do


def _ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def _api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def test_every_workflow_exists_in_both_formats_and_nothing_else_is_there() -> None:
    everything = sorted(NAMES + OFFICIAL_NAMES + TRAINING_NAMES)
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == everything
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == everything


def test_committed_files_are_the_builders_output() -> None:
    import importlib

    module = importlib.import_module("example_workflows.build_workflows")
    for path, text in module.render().items():
        assert path.read_text() == text, f"{path.name} is stale: run python example_workflows/build_workflows.py"


def _check_widget(where: str, kind: object, options: dict, value: object) -> None:
    if isinstance(kind, list):
        assert value in kind, f"{where}: {value!r} not among {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an int"
        assert options["min"] <= value <= options["max"], f"{where}: {value} outside its range"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and options["min"] <= value <= options["max"], f"{where}: {value!r}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r}"
    else:
        assert kind == "STRING" and isinstance(value, str), f"{where}: {value!r}"


def _expected_widgets(cls: type) -> tuple[list[tuple[str, object, dict]], list[tuple[str, str]]]:
    widgets, sockets = [], []
    for group in ("required", "optional"):
        for name, (kind, options) in cls.INPUT_TYPES().get(group, {}).items():
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                widgets.append((name, kind, options))
                if options.get("control_after_generate"):
                    widgets.append(("control_after_generate", list(CONTROL_AFTER_GENERATE), {}))
            else:
                sockets.append((name, kind))
    return widgets, sockets


def test_examples_use_the_toy_model_names() -> None:
    from wan_core.loading.model_set import TOY_FILES

    api = {name: _api(name) for name in NAMES}
    assert api["wantuner_t2v"]["1"]["inputs"]["model_name"] == TOY_FILES["dit"]
    assert api["wantuner_i2v"]["1"]["inputs"]["model_name"] == TOY_FILES["dit_i2v"]
    for graph in api.values():
        assert graph["2"]["inputs"]["model_name"] == TOY_FILES["t5"]
        assert graph["3"]["inputs"]["model_name"] == TOY_FILES["vae"]
        if "5" in graph:
            assert graph["5"]["inputs"]["model_name"] == TOY_FILES["clip"]


def test_every_toy_file_the_examples_name_ships_in_the_toy_model_folder() -> None:
    from wan_core.loading.model_set import TOY_MODEL_DIR

    named = {value for name in (*NAMES, *TRAINING_NAMES) for node in _api(name).values()
             for value in node["inputs"].values() if isinstance(value, str) and value.startswith(("wan21_toy_",
                                                                                                  "wan22_toy_"))}
    assert named, "the example workflows name no toy model file"
    missing = sorted(n for n in named if not (TOY_MODEL_DIR / n).is_file())
    assert not missing, f"example workflows name toy files that are not shipped in {TOY_MODEL_DIR}: {missing}"


def test_fewstep_workflow_samples_four_guidance_one_distill_steps() -> None:
    sampler = _api("wantuner_fewstep")["10"]["inputs"]
    assert (sampler["steps"], sampler["guidance_scale"], sampler["solver"]) == (4, 1.0, "flowmatch_distill")
    assert 5.0 <= sampler["shift"] <= 8.0
    assert sampler["dit"] == ["6", 0] and _api("wantuner_fewstep")["6"]["class_type"] == "WanTunerLoRALoader"


@pytest.fixture
def models_for(request: pytest.FixtureRequest) -> None:
    """Model folders whose files the workflow names: the toy names (empty files), or tiny real Wan2.2 files under
    the official names (the loaders read their headers to validate the task)."""
    name = request.node.callspec.params["name"]
    request.getfixturevalue("official_models" if name in OFFICIAL_NAMES else "listed_models")


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model_set import write_model_set, write_wan22_files

    root = tmp_path_factory.mktemp("official") / "models"
    write_model_set(root)
    write_wan22_files(root)
    return root


@pytest.fixture
def official_models(tiny_official: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tiny_official))
    return tiny_official


@pytest.mark.parametrize("name", NAMES + OFFICIAL_NAMES)
def test_ui_workflow_matches_current_input_types(name: str, models_for: None) -> None:
    graph = _ui(name)
    links = {link[0]: link for link in graph["links"]}
    nodes = {node["id"]: node for node in graph["nodes"]}
    ours = [n for n in graph["nodes"] if n["type"].startswith("WanTuner")]
    assert ours and any(n["type"] == "Note" and "models/diffusion_models" in n["widgets_values"][0]
                        for n in graph["nodes"])
    for node in ours:
        cls = NODE_CLASS_MAPPINGS[node["type"]]
        widgets, sockets = _expected_widgets(cls)
        values = node["widgets_values"]
        assert len(values) == len(widgets), f"{name} node {node['id']}: {len(values)} values, {len(widgets)} widgets"
        for (wname, kind, options), value in zip(widgets, values):
            _check_widget(f"{name} node {node['id']} ({node['type']}.{wname})", kind, options, value)
        assert [(i["name"], i["type"]) for i in node["inputs"]] == sockets, f"{name} node {node['id']} sockets"
        assert [(o["name"], o["type"]) for o in node["outputs"]] == list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))
        for slot, socket in enumerate(node["inputs"]):
            if socket["link"] is not None:
                link_id, src, src_slot, dst, dst_slot, kind = links[socket["link"]]
                assert (dst, dst_slot, kind) == (node["id"], slot, socket["type"])
                assert link_id in nodes[src]["outputs"][src_slot]["links"]
                source_cls = NODE_CLASS_MAPPINGS.get(nodes[src]["type"])
                if source_cls is not None:
                    assert source_cls.RETURN_TYPES[src_slot] == kind


@pytest.mark.parametrize("name", NAMES + OFFICIAL_NAMES)
def test_api_workflow_passes_validation_and_mirrors_the_ui_file(name: str, models_for: None) -> None:
    api = _api(name)
    order = check_workflow(api, core=core_stand_ins(Path(".")))
    assert set(order) == set(api)
    ui_types = sorted(n["type"] for n in _ui(name)["nodes"] if n["type"] != "Note")
    assert sorted(n["class_type"] for n in api.values()) == ui_types


def test_validation_rejects_bad_edits_with_readable_messages(listed_models: Path) -> None:
    api = _api("wantuner_t2v")
    sampler = next(k for k, v in api.items() if v["class_type"] == "WanTunerSampler")
    api[sampler]["inputs"]["length"] = 10
    with pytest.raises(GraphError, match=r"4n\+1 frames.*got 10; try 9 or 13"):
        check_workflow(api)
    api[sampler]["inputs"].update(length=9, width=100)
    with pytest.raises(GraphError, match=r"width must be a positive multiple of 16 \(got 100; try 96 or 112\)"):
        check_workflow(api)
    api[sampler]["inputs"]["width"] = 64
    api[sampler]["inputs"]["text_embeds"] = ["1", 0]
    with pytest.raises(GraphError, match="expects WANTUNER_TEXT_EMBEDS but node 1 gives WANTUNER_DIT"):
        check_workflow(api)


# ----------------------------------------------------------------------------------------------------------------
# Running every API workflow on tiny models
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RunResult, Path]]:
    from PIL import Image

    from tests.tiny_model_set import write_model_set, write_wan22_files

    root = tmp_path_factory.mktemp("workflows")
    write_model_set(root / "models")
    (root / "input").mkdir()
    pixels = np.zeros((*EXAMPLE_IMAGE_HW, 3), np.uint8)
    pixels[..., 2] = 200
    pixels[10:30, 10:30, 0] = 255
    Image.fromarray(pixels).save(root / "input" / "example.png")
    write_wan22_files(root / "models")
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(adapter.MODELS_DIR_ENV, str(root / "models"))
        mp.setenv(adapter.OUTPUT_DIR_ENV, str(root / "output"))
        adapter.clear_cache()
        for name in NAMES:
            results[name] = (run_workflow(_api(name), core_stand_ins(root / "input")), root / "output")
        for name in OFFICIAL_NAMES:
            results[name] = (run_workflow(shrunk(_api(name)), core_stand_ins(root / "input")), root / "output")
        adapter.clear_cache()
    return results


SHRUNK = {"width": 64, "height": 64, "length": 9, "steps": 4}


def shrunk(graph: dict) -> dict:
    """An official-size workflow at the toy world's size and 4 steps, its sampler hand-over moved to step 2."""
    for node in graph.values():
        inputs = node["inputs"]
        inputs.update({k: v for k, v in SHRUNK.items() if k in inputs})
        if node["class_type"] == "WanTunerSampler":
            inputs["end_step"] = 2 if inputs["end_step"] < 10000 else 10000
            inputs["start_step"] = 2 if inputs["start_step"] > 0 else 0
    return graph


def _saved_video(result: RunResult, output: Path) -> Path:
    (entry,) = result.ui["12"]["images"]
    assert entry["type"] == "output" and entry["filename"].endswith("_.mp4")
    return output / entry["subfolder"] / entry["filename"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_and_writes_the_video(name: str, runs) -> None:
    import av

    from wan_core.sampling.conditioning import size_for_image

    result, output = runs[name]
    path = _saved_video(result, output)
    assert result.outputs["12"] == (str(path),)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
    sampler = _api(name)["10"]["inputs"]
    height, width = sampler["height"], sampler["width"]
    if name == "wantuner_i2v":
        height, width = size_for_image(EXAMPLE_IMAGE_HW, width * height)
        assert result.outputs["8"][1:] == (width, height)
    assert len(frames) == sampler["length"] and frames[0].shape == (height, width, 3)
    samples = result.outputs["10"][0]["samples"]
    assert tuple(samples.shape) == (1, 16, (sampler["length"] - 1) // 4 + 1, height // 8, width // 8)


@pytest.mark.slow
def test_lora_workflow_reports_matches_and_changes_the_result(runs) -> None:
    from wan_core.lora.apply import LoRAModule

    result, _ = runs["wantuner_lora_regex"]
    first, second = result.ui["6"]["text"][0], result.ui["7"]["text"][0]
    assert result.outputs["6"][1] == first and result.outputs["7"][1] == second
    # include self_attn|ffn, exclude blocks_1_ffn: only blocks.0.self_attn.q of the three layers in the file
    assert "1 modules matched (strength 1" in first and "blocks.0.cross_attn.k, blocks.1.ffn.0" in first
    assert "1 modules matched (strength 0.5" in second and "blocks.0.self_attn.q, blocks.1.ffn.0" in second
    for text in (first, second):
        assert "3 unmatched keys: lora_unet_blocks_7_self_attn_q.alpha" in text
    dit = result.outputs["7"][0]
    assert [(s.strength, s.include) for s in dit.loras] == [(1.0, "self_attn|ffn"), (0.5, "cross_attn")]
    assert not any(isinstance(m, LoRAModule) for m in dit.model.obj.modules())  # removed after sampling
    plain = runs["wantuner_t2v"][0].outputs["10"][0]["samples"]
    assert (result.outputs["10"][0]["samples"] - plain).abs().max() > 1e-3


def test_official_wan22_workflows_name_the_official_files_and_defaults() -> None:
    from wan_core.models.config import TASKS
    from wan_core.sampling.experts import expert_for
    from wan_core.sampling.solvers import get_schedule

    i2v = _api("wantuner_i2v_a14b")
    assert (i2v["5"]["inputs"]["model_name"], i2v["1"]["inputs"]["model_name"]) == (
        "wan2.2_i2v_high_noise_14B_fp16.safetensors", "wan2.2_i2v_low_noise_14B_fp16.safetensors")
    first, second, preset = i2v["9"]["inputs"], i2v["10"]["inputs"], TASKS["i2v-A14B"]
    assert first["dit"] == ["5", 0] and second["dit"] == ["1", 0] and second["latent"] == ["9", 0]
    assert (first["steps"], first["shift"], first["guidance_scale"]) == (
        preset.sample_steps, preset.sample_shift, preset.guide_scale_high)
    timesteps = get_schedule(first["solver"], first["steps"], first["shift"]).timesteps.tolist()
    k = first["end_step"]
    assert second["start_step"] == k and second["guidance_scale"] == preset.guide_scale
    assert [expert_for(t, preset.boundary) for t in timesteps[k - 1:k + 1]] == ["high", "low"]
    assert "image_embeds" not in i2v["8"]["inputs"]
    ti2v, preset = _api("wantuner_ti2v_5b"), TASKS["ti2v-5B"]
    sampler = ti2v["10"]["inputs"]
    assert ti2v["1"]["inputs"]["model_name"] == "wan2.2_ti2v_5B_fp16.safetensors"
    assert ti2v["3"]["inputs"]["model_name"] == "wan2.2_vae.safetensors"
    assert (sampler["height"], sampler["width"]) in preset.sizes and sampler["length"] == preset.frame_num
    assert (sampler["steps"], sampler["shift"], sampler["guidance_scale"]) == (50, 5.0, 5.0)
    assert ti2v["12"]["inputs"]["fps"] == preset.fps
    start, image = ti2v["8"], ti2v["6"]
    assert start["class_type"] == "WanTunerTI2VImageToVideo" and image["class_type"] == "LoadImage"
    assert sampler["conditioning"] == ["8", 0] and start["inputs"]["start_image"] == ["6", 0]
    assert (start["inputs"]["height"], start["inputs"]["width"], start["inputs"]["length"]) == (
        sampler["height"], sampler["width"], sampler["length"])


def test_t2v_a14b_workflow_loads_the_toy_pair_with_its_stored_settings() -> None:
    """The T2V-A14B example loads the toy expert pair; boundary and high-noise guidance are left at -1 (the low-noise
    expert's stored values), steps / shift / guidance are the ones stored in its file."""
    from nodes.sampler import TASK_DEFAULT
    from wan_core.loading.model_set import TOY_EXPERT_FILES, TOY_MODEL_DIR, sampling_defaults

    graph = _api("wantuner_t2v_a14b")
    t2v, (high, low) = graph["10"]["inputs"], TOY_EXPERT_FILES["t2v-A14B"]
    assert (graph["6"]["inputs"]["model_name"], graph["1"]["inputs"]["model_name"]) == (high, low)
    assert t2v["high_noise_dit"] == ["6", 0] and t2v["dit"] == ["1", 0]
    assert (t2v["boundary"], t2v["guidance_scale_high_noise"]) == (TASK_DEFAULT, TASK_DEFAULT)
    stored = sampling_defaults(TOY_MODEL_DIR / low)
    assert (t2v["steps"], t2v["shift"], t2v["guidance_scale"]) == (
        stored["infer_steps"], stored["flow_shift"], stored["guidance_scale"])


@pytest.mark.slow
@pytest.mark.parametrize("name", OFFICIAL_NAMES + ("wantuner_t2v_a14b", "wantuner_stepcache"))
def test_wan22_and_step_cache_workflows_run(name: str, runs) -> None:
    """The Wan2.2 workflows run on tiny random files under the official names (shrunk to 64x64x9, 4 steps); the
    I2V-A14B chain hands a noisy latent from its first sampler to its second; the TI2V-5B video starts on the start
    image's latent."""
    import av

    from nodes.sampler import HANDOVER
    from wan_core.media.layouts import latent_to_comfy

    result, output = runs[name]
    samples = result.outputs["10"][0]["samples"]
    channels, stride = (48, 16) if name == "wantuner_ti2v_5b" else (16, 8)
    height, width = (64, 64)
    if name in ("wantuner_i2v_a14b", "wantuner_ti2v_5b"):
        height, width = result.outputs["8"][2], result.outputs["8"][1]
    if name == "wantuner_i2v_a14b":
        assert HANDOVER in result.outputs["9"][0] and HANDOVER not in result.outputs["10"][0]
    if name == "wantuner_ti2v_5b":
        first = result.outputs["8"][0].cond.first_latent
        assert first is not None and torch.equal(samples[:, :, :1], latent_to_comfy(first))
    assert tuple(samples.shape) == (1, channels, 3, height // stride, width // stride)
    with av.open(str(_saved_video(result, output))) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == 9 and frames[0].shape == (height, width, 3)
