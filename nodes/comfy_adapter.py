"""Everything ComfyUI-specific in one place, with plain fallbacks so the nodes run without ComfyUI (CI, scripts).

Inside ComfyUI (detected by `folder_paths` and `comfy.model_management` being already imported, as they are when
ComfyUI loads custom nodes; never imported from here first: importing `comfy.model_management` outside ComfyUI's
main.py on a machine without a GPU but with a CUDA build of torch raises "Found no NVIDIA driver"):
- model files are listed and resolved through `folder_paths`; the embedded toy models (`wan_core/toy_models/`) are
  registered as the folder `wantuner_toy` and listed with the loader they belong to;
- files are saved with `folder_paths.get_save_image_path` naming into ComfyUI's output directory;
- sampler steps report to `comfy.utils.ProgressBar` (with a latent preview image unless ComfyUI's preview method is
  "none") and call `throw_exception_if_processing_interrupted()`, so Cancel works;
- the trainer node streams its loss to the front end as custom websocket messages (`PromptServer.send_sync`,
  event `wantuner.training`, throttled by `LossStream`) and asks ComfyUI to unload its models before training;
- loaded models are wrapped in `comfy.model_patcher.ModelPatcher` and moved with `load_models_gpu(...,
  force_full_load=True)` before each use, so ComfyUI can offload them when another model needs memory (and
  "Free model and node cache" unloads them). Block-swapped DiTs manage their own placement and are not registered.

Outside ComfyUI: model names resolve against `$WANTUNER_MODELS_DIR/<folder>/` (default `./models`, folders named
as ComfyUI's) and then the toy folder; outputs go to `$WANTUNER_OUTPUT_DIR` (default `./output`); progress is
logged; models are placed on CUDA when available, else the CPU; relative dataset paths are read from
`$WANTUNER_INPUT_DIR` (default `./input`); custom websocket messages are appended to `EVENT_LOG`.

Confinement (both): a loader's name must stay inside its model folders (no absolute path, no '..'); dataset folders,
TOMLs and every path a TOML names (data, control, JSONL and cache directories) must resolve, symlinks followed, inside
the input, output or temp directory ($WANTUNER_TEMP_DIR, default ./temp, outside ComfyUI) or a folder registered as
`datasets` (e.g. in extra_model_paths.yaml); anything else is refused with a message naming it. Symlinks inside model
folders are honoured (ComfyUI lists them too); only the name a workflow gives is checked there.

Loaded models are cached per loader kind (one entry each, two for DiTs: a Wan2.2 pair of experts): unchanged loader
inputs (including the file's size and modification time) reuse the loaded model across queued prompts.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import torch
from PIL import Image
from torch import nn

from wan_core.loading.model_set import TOY_EXPERT_FILES, TOY_FILES, TOY_MODEL_DIR

logger = logging.getLogger(__name__)

FOLDERS = ("diffusion_models", "text_encoders", "vae", "clip_vision", "loras")
FALLBACK_ALIASES = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip")}
TOY_FOLDER = "wantuner_toy"
MODEL_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt")
MODELS_DIR_ENV = "WANTUNER_MODELS_DIR"
OUTPUT_DIR_ENV = "WANTUNER_OUTPUT_DIR"


# ----------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------


def comfy_modules() -> dict[str, Any] | None:
    """ComfyUI's modules when running inside ComfyUI, else None."""
    folder_paths = sys.modules.get("folder_paths")
    management = sys.modules.get("comfy.model_management")
    if folder_paths is None or management is None:
        return None
    return {"folder_paths": folder_paths, "mm": management, "utils": importlib.import_module("comfy.utils"),
            "patcher": importlib.import_module("comfy.model_patcher")}


def in_comfyui() -> bool:
    return comfy_modules() is not None


# ----------------------------------------------------------------------------------------------------------------
# Model folders
# ----------------------------------------------------------------------------------------------------------------


def _toy_folder_of(key: str) -> str:
    """Which loader a toy file belongs to, from its TOY_FILES key (dit*, vae, t5, clip, lora*)."""
    for prefix, folder in (("dit", "diffusion_models"), ("vae", "vae"), ("t5", "text_encoders"),
                           ("clip", "clip_vision"), ("lora", "loras")):
        if key.startswith(prefix):
            return folder
    return ""


def toy_names(folder: str) -> list[str]:
    """The toy files a loader of `folder` offers (the Wan2.2 expert pairs are diffusion models too)."""
    names = {name for key, name in TOY_FILES.items() if _toy_folder_of(key) == folder}
    if folder == "diffusion_models":
        names.update(name for pair in TOY_EXPERT_FILES.values() for name in pair)
    return sorted(names)


def register_toy_folder() -> None:
    """Make ComfyUI's folder_paths know the toy model folder (called when the pack is imported)."""
    comfy = comfy_modules()
    if comfy is None:
        return
    paths = comfy["folder_paths"].folder_names_and_paths
    if TOY_FOLDER not in paths:
        paths[TOY_FOLDER] = ([str(TOY_MODEL_DIR)], set(MODEL_EXTENSIONS))


def _fallback_dirs(folder: str) -> list[Path]:
    root = Path(os.environ.get(MODELS_DIR_ENV, "models"))
    return [root / name for name in FALLBACK_ALIASES.get(folder, (folder,))]


def _list_dir(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(str(p.relative_to(directory)).replace(os.sep, "/") for p in directory.rglob("*")
                  if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS)


def list_models(folder: str) -> list[str]:
    """File names a loader offers: the ComfyUI folder's files, then the toy files of that kind that exist."""
    comfy = comfy_modules()
    if comfy is None:
        names = [n for d in _fallback_dirs(folder) for n in _list_dir(d)]
        toys = [n for n in _list_dir(TOY_MODEL_DIR) if n in toy_names(folder)]
    else:
        fp = comfy["folder_paths"]
        register_toy_folder()
        names = list(fp.get_filename_list(folder))
        toys = [n for n in fp.get_filename_list(TOY_FOLDER) if n in toy_names(folder)]
    return list(dict.fromkeys([*names, *toys]))


def model_folders(folder: str) -> list[Path]:
    """Every folder registered for a model kind (ComfyUI: folder_paths, extra_model_paths.yaml included)."""
    comfy = comfy_modules()
    if comfy is None:
        return _fallback_dirs(folder)
    return [Path(p) for p in comfy["folder_paths"].folder_names_and_paths.get(folder, ([], set()))[0]]


def check_model_name(folder: str, name: str) -> None:
    """A loader's name is a file name relative to its model folder: no absolute path, drive or '..' (ValueError)."""
    windows = PureWindowsPath(name)  # also splits at '/', and knows drives ("c:x")
    if not name.strip() or Path(name).is_absolute() or windows.drive or windows.root or ".." in windows.parts:
        raise ValueError(f"{folder} file name {name!r} must be a file inside the {folder} folder "
                         "(relative, without '..'); absolute paths and paths outside ComfyUI's folders are refused")


def model_path(folder: str, name: str) -> Path:
    """The file behind a loader's choice, which must lie inside a folder of its kind (ValueError otherwise);
    FileNotFoundError listing what is there."""
    check_model_name(folder, name)
    comfy = comfy_modules()
    candidates: list[Path] = []
    if comfy is None:
        candidates = [d / name for d in _fallback_dirs(folder)]
    else:
        found = comfy["folder_paths"].get_full_path(folder, name)
        candidates = [Path(found)] if found else []
    candidates = [p for p in candidates if within(p, model_folders(folder), follow_symlinks=False)]
    if name in toy_names(folder):
        candidates.append(TOY_MODEL_DIR / name)
    for path in candidates:
        if path.is_file():
            return path
    where = "ComfyUI's models folder" if comfy else f"${MODELS_DIR_ENV} ({_fallback_dirs(folder)[0]})"
    offered = list_models(folder)
    raise FileNotFoundError(f"{folder} file {name!r} not found in {where} or the toy model folder "
                            f"({TOY_MODEL_DIR}); available: {', '.join(offered) or 'none'}")


# ----------------------------------------------------------------------------------------------------------------
# Confinement: what the nodes read and write stays inside ComfyUI's folders
# ----------------------------------------------------------------------------------------------------------------


def _real(path: Path, follow_symlinks: bool) -> Path:
    return Path(os.path.realpath(path) if follow_symlinks else os.path.abspath(path))


def within(path: Path, roots: Sequence[Path], follow_symlinks: bool = True) -> bool:
    """Whether `path` is one of `roots` or lies below one, comparing resolved paths (symlinks followed unless
    follow_symlinks is False, in which case only '..' and absolute parts are resolved)."""
    target = _real(path, follow_symlinks)
    for root in roots:
        base = _real(root, follow_symlinks)
        if target == base or base in target.parents:
            return True
    return False


def confine(path: Path, roots: Sequence[Path], what: str, hint: str = "", follow_symlinks: bool = True) -> Path:
    """`path` resolved, or ValueError naming it and the allowed folders when it lies outside all of `roots`."""
    if within(path, roots, follow_symlinks):
        return _real(path, follow_symlinks)
    allowed = ", ".join(str(r) for r in roots) or "none"
    raise ValueError(f"{what} {path} resolves to {_real(path, follow_symlinks)}, outside the folders WanTuner may "
                     f"use ({allowed}){hint}")


DATA_FOLDER = "datasets"  # folder_paths name whose folders (extra_model_paths.yaml) may hold datasets and caches
TEMP_DIR_ENV = "WANTUNER_TEMP_DIR"


def temp_directory() -> Path:
    comfy = comfy_modules()
    if comfy is not None:
        return Path(comfy["folder_paths"].get_temp_directory())
    return Path(os.environ.get(TEMP_DIR_ENV, "temp"))


def data_roots() -> list[Path]:
    """Where datasets and their caches may be read and written: ComfyUI's input, output and temp directories and
    the folders registered as DATA_FOLDER."""
    registered = model_folders(DATA_FOLDER) if in_comfyui() else []
    return [input_directory(), output_directory(), temp_directory(), *registered]


def confine_data(path: Path | str, what: str) -> Path:
    """A dataset path (relative paths are taken from the working directory, as the trainer does) confined to
    data_roots(), symlinks followed."""
    return confine(Path(path), data_roots(), what, hint=f"; move it into ComfyUI's input folder or register its "
                   f"folder as '{DATA_FOLDER}' in extra_model_paths.yaml")


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputFile:
    path: Path
    filename: str
    subfolder: str

    def ui(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": "output"}


def output_directory() -> Path:
    comfy = comfy_modules()
    if comfy is not None:
        return Path(comfy["folder_paths"].get_output_directory())
    return Path(os.environ.get(OUTPUT_DIR_ENV, "output"))


def _next_counter(folder: Path, stem: str) -> int:
    pattern = re.compile(rf"^{re.escape(stem)}_(\d+)_\.")
    numbers = [int(m.group(1)) for p in folder.glob(f"{stem}_*") if (m := pattern.match(p.name))]
    return max(numbers, default=0) + 1


def output_file(prefix: str, extension: str, width: int = 0, height: int = 0) -> OutputFile:
    """A new file `<prefix>_<counter:05>_.<extension>` in the output directory (subfolders allowed in prefix)."""
    comfy = comfy_modules()
    if comfy is not None:
        root = comfy["folder_paths"].get_output_directory()
        folder, stem, counter, subfolder, _ = comfy["folder_paths"].get_save_image_path(prefix, root, width, height)
        folder = Path(folder)
    else:
        root = output_directory().resolve()
        target = confine(root / prefix, [root], f"filename_prefix {prefix!r}")
        if target == root:
            raise ValueError(f"filename_prefix {prefix!r} names no file inside the output folder {root}")
        folder, stem = target.parent, target.name
        subfolder = str(folder.relative_to(root)) if folder != root else ""
        folder.mkdir(parents=True, exist_ok=True)
        counter = _next_counter(folder, stem)
    filename = f"{stem}_{counter:05}_.{extension}"
    return OutputFile(folder / filename, filename, subfolder)


# ----------------------------------------------------------------------------------------------------------------
# Devices and memory management
# ----------------------------------------------------------------------------------------------------------------


def compute_device() -> torch.device:
    comfy = comfy_modules()
    if comfy is not None:
        return torch.device(comfy["mm"].get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_device() -> torch.device:
    """Where loaders put new models: the CPU inside ComfyUI (ComfyUI moves them), else the compute device."""
    return torch.device("cpu") if in_comfyui() else compute_device()


class _Holder(nn.Module):
    """A plain container so that ComfyUI's ModelPatcher can set `.device` without touching our model classes."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module


_OFFLOAD = {"dit": "unet_offload_device", "t5": "text_encoder_offload_device", "vae": "vae_offload_device",
            "clip_vision": "text_encoder_offload_device"}


@dataclass
class ManagedModel:
    """A loaded model (`obj`, e.g. a WanModel, T5Encoder, WanVAE or CLIPVision) and the nn.Module that holds its
    weights. `ready()` puts it on the compute device (through ComfyUI's memory manager when available).

    A model with a `placer` (block swap) places itself: `placer(device)` runs once, after asking ComfyUI to free
    `reserve_bytes` on the device; it is not registered with ComfyUI's model management.
    """

    obj: Any
    module: nn.Module
    kind: str
    placer: Callable[[torch.device], Any] | None = None
    reserve_bytes: int = 0
    patcher: Any = field(default=None, repr=False)
    placed: Any = field(default=None, repr=False)  # what the placer returned (e.g. the BlockSwapper)

    def __post_init__(self) -> None:
        comfy = comfy_modules()
        if comfy is None or self.placer is not None:
            return
        mm = comfy["mm"]
        offload = getattr(mm, _OFFLOAD.get(self.kind, "unet_offload_device"))()
        holder = type(f"WanTuner_{self.kind}", (_Holder,), {})(self.module)  # the name ComfyUI logs
        self.patcher = comfy["patcher"].ModelPatcher(holder, load_device=mm.get_torch_device(),
                                                     offload_device=offload)

    def ready(self) -> Any:
        comfy = comfy_modules()
        if self.patcher is not None:
            comfy["mm"].load_models_gpu([self.patcher], force_full_load=True)  # type: ignore[index]
        elif self.placer is not None:
            if self.placed is None:
                device = compute_device()
                if comfy is not None:
                    comfy["mm"].free_memory(self.reserve_bytes, device)
                self.placed = self.placer(device) or True
        else:
            self.module.to(compute_device())
        return self.obj

    def unplace(self) -> None:
        """Undo a placer's work (e.g. detach block swap) so the model can be changed; `ready()` places it again."""
        remove = getattr(self.placed, "remove", None)
        if remove is not None:
            remove()
        self.placed = None


def free_cache() -> None:
    comfy = comfy_modules()
    if comfy is not None:
        comfy["mm"].soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Loader cache
# ----------------------------------------------------------------------------------------------------------------

_CACHE: dict[str, list[tuple[tuple, Any]]] = {}  # kind -> [(key, value)], most recently used last


def file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def cached(kind: str, key: tuple, factory: Callable[[], Any], slots: int = 1,
           evict: Callable[[Any], None] | None = None) -> Any:
    """The value for `key`, built by `factory` unless one of the last `slots` loads of `kind` had the same key.
    `key[0]` names the source file (`file_key`). Before building, an entry of the same file with other inputs and
    the least recently used entries beyond `slots - 1` are dropped (`evict(value)` runs on each), so a changed input
    frees the previous model (DiTs keep two files: a Wan2.2 pair of experts)."""
    entries = _CACHE.setdefault(kind, [])
    for index, (old_key, value) in enumerate(entries):
        if old_key == key:
            logger.info("reusing the loaded %s (inputs unchanged)", kind)
            entries.append(entries.pop(index))
            return value
    same_file = [i for i, (old_key, _) in enumerate(entries) if old_key[0] == key[0]]
    drop = [entries.pop(i)[1] for i in reversed(same_file)]
    while len(entries) >= slots:
        drop.append(entries.pop(0)[1])
    for dropped in drop:
        if evict is not None:
            evict(dropped)
    value = factory()
    entries.append((key, value))
    return value


def clear_cache() -> None:
    _CACHE.clear()
    free_cache()


# ----------------------------------------------------------------------------------------------------------------
# Progress, previews and interruption
# ----------------------------------------------------------------------------------------------------------------


def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (no-op outside ComfyUI)."""
    comfy = comfy_modules()
    if comfy is not None:
        comfy["mm"].throw_exception_if_processing_interrupted()


def previews_enabled() -> bool:
    comfy = comfy_modules()
    if comfy is None:
        return False
    cli = importlib.import_module("comfy.cli_args")
    return cli.args.preview_method != cli.LatentPreviewMethod.NoPreviews


def preview_max_size() -> int:
    return int(importlib.import_module("comfy.cli_args").args.preview_size)


class Progress:
    """Per-step progress for a node: ComfyUI's ProgressBar (+ preview) inside ComfyUI, log lines outside."""

    def __init__(self, total: int, node_id: str | None, label: str,
                 preview: Callable[[Any, int], Any] | None = None) -> None:
        comfy = comfy_modules()
        self.total, self.label = total, label
        self.bar = comfy["utils"].ProgressBar(total, node_id=node_id) if comfy is not None else None
        self.preview = preview if self.bar is not None and previews_enabled() else None

    def step(self, done: int, total: int, latents: Any = None) -> None:
        check_interrupted()
        self.total = total
        if self.bar is None:
            logger.info("%s: step %d/%d", self.label, done, total)
            return
        image = None
        if self.preview is not None and latents is not None:
            size = preview_max_size()
            image = ("JPEG", Image.fromarray(self.preview(latents, size)), size)
        self.bar.update_absolute(done, total, image)


# ----------------------------------------------------------------------------------------------------------------
# Training: folders, device memory, custom websocket messages
# ----------------------------------------------------------------------------------------------------------------

INPUT_DIR_ENV = "WANTUNER_INPUT_DIR"
TRAINING_EVENT = "wantuner.training"
EVENT_LOG: deque[tuple[str, dict[str, Any]]] = deque(maxlen=10_000)  # messages sent outside ComfyUI (newest last)


def input_directory() -> Path:
    """ComfyUI's input folder (relative dataset paths are read from there), else $WANTUNER_INPUT_DIR or ./input."""
    comfy = comfy_modules()
    if comfy is not None:
        return Path(comfy["folder_paths"].get_input_directory())
    return Path(os.environ.get(INPUT_DIR_ENV, "input"))


def model_folder(folder: str) -> Path:
    """Where new files of a model folder are written (e.g. trained LoRAs): ComfyUI's first path for it
    (models/loras), else the first fallback folder ($WANTUNER_MODELS_DIR/loras)."""
    comfy = comfy_modules()
    if comfy is not None:
        return Path(comfy["folder_paths"].get_folder_paths(folder)[0])
    return _fallback_dirs(folder)[0]


def ready_together(models: Sequence[ManagedModel]) -> list[Any]:
    """Put several models on the compute device for one job and return their objects. ComfyUI loads the registered
    ones in one call, so that loading one cannot offload another that the job still uses."""
    comfy = comfy_modules()
    patchers = [m.patcher for m in models if m.patcher is not None]
    if comfy is not None and patchers:
        comfy["mm"].load_models_gpu(patchers, force_full_load=True)
    return [m.obj if m.patcher is not None else m.ready() for m in models]


def release_device_memory() -> None:
    """Before a job that manages its own model (training): ComfyUI moves every model it manages off the GPU (they
    stay loaded in CPU memory and come back on their next use), then the allocator cache is emptied."""
    comfy = comfy_modules()
    if comfy is not None:
        comfy["mm"].unload_all_models()
    free_cache()


def _prompt_server() -> Any:
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def current_prompt_id() -> str | None:
    """The id of the prompt being executed (None outside ComfyUI)."""
    if comfy_modules() is None:
        return None
    context_module = sys.modules.get("comfy_execution.utils")
    context = context_module.get_executing_context() if context_module is not None else None
    if context is not None:
        return context.prompt_id
    return getattr(_prompt_server(), "last_prompt_id", None)


def send_event(event: str, data: dict[str, Any]) -> None:
    """A custom websocket message `{"type": event, "data": data}` to the client that queued the running prompt (as
    ComfyUI sends `progress`); outside ComfyUI (or without a server) it is appended to EVENT_LOG."""
    server = _prompt_server()
    if comfy_modules() is None or server is None:
        EVENT_LOG.append((event, data))
        logger.debug("%s: %s", event, data)
        return
    server.send_sync(event, data, server.client_id)


def _json_loss(loss: float) -> float | None:
    """JSON has no NaN/inf (the browser's JSON.parse rejects them): non-finite losses travel as null."""
    return float(loss) if math.isfinite(loss) else None


class LossStream:
    """Streams a training run's (step, loss) points to the node's live chart (event `wantuner.training`).

    A message goes out at most every `interval` seconds (plus the first step, the last step and the end of the run),
    and each carries every point since the previous one, so the chart misses nothing. Message data: `node` (the
    node id), `prompt_id`, `points` ([[step, loss or null], ...]), `total` (steps planned), `status` ("starting",
    "running", "done", "interrupted" or "error") and `reset` (true on the first message of a run: clear the chart).
    """

    def __init__(self, node_id: str | None, interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self.node_id, self.interval, self.clock = node_id, interval, clock
        self.pending: list[list[float | None]] = []
        self.total = 0
        self.last_sent: float | None = None
        self.started = False  # a message of this run went out
        self.first_point = True  # the next point is the run's first

    def start(self, total: int) -> None:
        self.total = total
        self._send("starting")

    def add(self, step: int, total: int, loss: float) -> None:
        self.pending.append([int(step), _json_loss(float(loss))])
        self.total = total
        due = self.last_sent is None or self.clock() - self.last_sent >= self.interval
        if due or step >= total or self.first_point:
            self.first_point = False
            self._send("running")

    def close(self, status: str) -> None:
        self._send(status)

    def _send(self, status: str) -> None:
        data = {"node": self.node_id, "prompt_id": current_prompt_id(), "points": self.pending, "total": self.total,
                "status": status, "reset": not self.started}
        send_event(TRAINING_EVENT, data)
        self.pending, self.started, self.last_sent = [], True, self.clock()
