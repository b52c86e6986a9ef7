"""The adapter's ComfyUI branch, against a small self-written stand-in of the ComfyUI modules it touches
(no ComfyUI checkout needed): folder lists, ProgressBar with previews, Cancel, ModelPatcher registration,
output naming. The real server test (test_comfyui_server.py) runs the same code inside ComfyUI."""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS as N
from nodes import comfy_adapter as adapter
from tests import tiny_model_set as tms
from wan_core.loading.model_set import TOY_EXPERT_FILES


class Interrupted(BaseException):
    """ComfyUI's InterruptProcessingException derives from BaseException."""


class FakeComfy:
    """Records what the adapter asks of ComfyUI."""

    def __init__(self, models: Path, output: Path) -> None:
        self.loads: list[tuple[list, bool]] = []
        self.freed: list[int] = []
        self.progress: list[tuple[int, int, object]] = []
        self.patchers: list[object] = []
        self.interrupt_at: int | None = None
        self.checks = 0
        exts = {".safetensors"}
        folders = {name: ([str(models / name)], exts) for name in ("diffusion_models", "text_encoders", "vae",
                                                                   "clip_vision", "loras")}
        fp = types.ModuleType("folder_paths")
        fp.folder_names_and_paths = folders
        fp.get_filename_list = lambda name: sorted(p.name for d in folders[name][0] for p in Path(d).glob("*"))
        fp.get_full_path = lambda name, file: next((str(Path(d) / file) for d in folders[name][0]
                                                   if (Path(d) / file).is_file()), None)
        fp.get_output_directory = lambda: str(output)
        fp.get_input_directory = lambda: str(output.parent / "input")
        fp.get_temp_directory = lambda: str(output.parent / "temp")
        fp.get_save_image_path = lambda prefix, out, w, h: (str(Path(out) / Path(prefix).parent), Path(prefix).name,
                                                            7, str(Path(prefix).parent), prefix)
        mm = types.ModuleType("comfy.model_management")
        mm.get_torch_device = lambda: torch.device("cpu")
        for name in ("unet_offload_device", "text_encoder_offload_device", "vae_offload_device"):
            setattr(mm, name, lambda: torch.device("cpu"))
        mm.load_models_gpu = lambda models, force_full_load=False: self.loads.append((models, force_full_load))
        mm.free_memory = lambda size, device: self.freed.append(size)
        mm.soft_empty_cache = lambda: None
        mm.throw_exception_if_processing_interrupted = self._check
        utils = types.ModuleType("comfy.utils")
        recorder = self.progress

        class ProgressBar:
            def __init__(self, total: int, node_id: str | None = None) -> None:
                self.node_id = node_id

            def update_absolute(self, value: int, total: int | None = None, preview: object = None) -> None:
                recorder.append((value, total, preview))

        utils.ProgressBar = ProgressBar
        patcher = types.ModuleType("comfy.model_patcher")
        created = self.patchers

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0) -> None:
                self.model, self.load_device, self.offload_device = model, load_device, offload_device
                model.device = offload_device  # as the real one does when the model has no device attribute
                created.append(self)

        patcher.ModelPatcher = ModelPatcher
        cli = types.ModuleType("comfy.cli_args")
        cli.LatentPreviewMethod = enum.Enum("LatentPreviewMethod", {"NoPreviews": "none", "Latent2RGB": "latent2rgb"})
        cli.args = types.SimpleNamespace(preview_method=cli.LatentPreviewMethod.Latent2RGB, preview_size=64)
        package = types.ModuleType("comfy")
        package.__path__ = []
        self.modules = {"folder_paths": fp, "comfy": package, "comfy.model_management": mm, "comfy.utils": utils,
                        "comfy.model_patcher": patcher, "comfy.cli_args": cli}

    def _check(self) -> None:
        self.checks += 1
        if self.interrupt_at is not None and self.checks >= self.interrupt_at:
            self.interrupt_at = None
            raise Interrupted()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_comfy")
    tms.write_model_set(root / "models")
    return root


@pytest.fixture
def comfy(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeComfy:
    fake = FakeComfy(models / "models", tmp_path / "output")
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    adapter.clear_cache()
    yield fake
    adapter.clear_cache()


def _t2v(comfy: FakeComfy, **sampler):
    run = lambda node, **kw: getattr(N[node](), N[node].FUNCTION)(**kw)  # noqa: E731
    dit = run("WanTunerDiTLoader", model_name=tms.FILES["dit_t2v"][1], task="auto", dtype="default", fp8="none",
              attention="sdpa", blocks_to_swap=0, compile=False)[0]
    vae = run("WanTunerVAELoader", model_name=tms.FILES["vae"][1], dtype="fp32", cache_on_cpu=False,
              tiling="auto")[0]
    t5 = run("WanTunerT5Loader", model_name=tms.FILES["t5"][1], dtype="default", fp8=False, tokenizer="")[0]
    text = run("WanTunerTextEncode", t5=t5, prompt="a red circle moving right", negative_prompt="blurry")[0]
    lora = sampler.pop("lora", None)
    if lora:
        out = run("WanTunerLoRALoader", dit=dit, lora_name=tms.LORA[1], strength=1.0, include="", exclude="")
        dit = out["result"][0]
    settings = {"width": 32, "height": 32, "length": 5, "steps": 3, "guidance_scale": 5.0, "shift": 5.0,
                "solver": "euler", "seed": 1, "noise_on_cpu": True, "cfg_skip_mode": "none", "cfg_apply_ratio": 0.5,
                "slg_mode": "none", "slg_layers": "1", "slg_scale": 3.0, "slg_start": 0.0, "slg_end": 0.3, **sampler}
    return dit, vae, run("WanTunerSampler", dit=dit, text_embeds=text, vae=vae, unique_id="10", **settings)


def test_folder_lists_and_toy_folder_registration(comfy: FakeComfy) -> None:
    assert adapter.in_comfyui()
    adapter.register_toy_folder()
    assert comfy.modules["folder_paths"].folder_names_and_paths[adapter.TOY_FOLDER][0] == [str(adapter.TOY_MODEL_DIR)]
    choices = N["WanTunerVAELoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert choices == [tms.FILES["vae"][1]]
    with pytest.raises(FileNotFoundError, match="not found in ComfyUI's models folder"):
        adapter.model_path("vae", "nope.safetensors")


def test_models_go_through_model_management_and_steps_report_progress_with_previews(comfy: FakeComfy) -> None:
    from PIL import Image

    dit, vae, (latent,) = _t2v(comfy)
    assert latent["samples"].shape == (1, 16, 2, 4, 4)
    wrapped = {type(p.model).__name__: p.model.inner for p in comfy.patchers}
    assert wrapped["WanTuner_dit"] is dit.model.obj and wrapped["WanTuner_vae"] is vae.model.obj.model
    assert {"WanTuner_t5"} <= set(wrapped) and all(force for _, force in comfy.loads)
    assert [p for models, _ in comfy.loads for p in models].count(dit.model.patcher) >= 1
    assert [(v, t) for v, t, _ in comfy.progress] == [(1, 3), (2, 3), (3, 3)]
    for _, _, preview in comfy.progress:
        kind, image, size = preview
        assert kind == "JPEG" and isinstance(image, Image.Image) and size == 64 and image.size == (32, 32)
    assert comfy.checks >= 3  # Cancel is checked every step


def test_previews_follow_the_preview_method(comfy: FakeComfy) -> None:
    cli = comfy.modules["comfy.cli_args"]
    cli.args.preview_method = cli.LatentPreviewMethod.NoPreviews
    _t2v(comfy)
    assert comfy.progress and all(preview is None for _, _, preview in comfy.progress)


def test_cancel_interrupts_the_sampler_and_removes_the_loras(comfy: FakeComfy) -> None:
    from wan_core.lora.apply import LoRAModule

    comfy.interrupt_at = 2
    with pytest.raises(Interrupted):
        _t2v(comfy, lora=True, steps=6)
    dit = N["WanTunerDiTLoader"]().load(tms.FILES["dit_t2v"][1], "auto", "default", "none", "sdpa", 0, False)[0]
    assert not any(isinstance(m, LoRAModule) for m in dit.model.obj.modules())
    assert len([p for p in comfy.progress if p[1] == 6]) == 1  # stopped at the second check


def test_block_swapped_dit_is_placed_by_itself(comfy: FakeComfy) -> None:
    dit = N["WanTunerDiTLoader"]().load(tms.FILES["dit_t2v"][1], "auto", "default", "none", "sdpa", 1, False)[0]
    assert dit.model.patcher is None
    dit.model.ready()
    assert comfy.freed and comfy.freed[0] > 0 and dit.model.placed is not None


def test_save_video_uses_comfyui_naming(comfy: FakeComfy) -> None:
    out = N["WanTunerSaveVideo"]().save(images=torch.rand(5, 16, 16, 3), fps=16, filename_prefix="WanTuner/x", crf=20)
    assert out["ui"]["images"] == [{"filename": "x_00007_.mp4", "subfolder": "WanTuner", "type": "output"}]
    assert Path(out["result"][0]).is_file()


def test_the_toy_expert_pair_is_offered_by_the_dit_loader_once_it_is_in_the_toy_folder(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    pair = TOY_EXPERT_FILES["t2v-A14B"]
    assert set(pair) <= set(adapter.toy_names("diffusion_models"))
    assert not set(pair) & set(adapter.toy_names("vae"))
    monkeypatch.setattr(adapter, "TOY_MODEL_DIR", tmp_path)
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tmp_path / "models"))
    assert adapter.list_models("diffusion_models") == []
    for name in pair:
        (tmp_path / name).write_bytes(b"")
    assert adapter.list_models("diffusion_models") == sorted(pair)
    assert adapter.model_path("diffusion_models", pair[0]) == tmp_path / pair[0]
