"""Which model files to use, and loading them lazily so that a batch run holds only what each phase needs.

With no paths given, the embedded toy model set (wan_core/toy_models/) is used.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from wan_core.loading.checkpoint import peek_shapes, read_metadata
from wan_core.lora.apply import lora_multiplier
from wan_core.models.clip import load_clip_vision
from wan_core.models.config import CONFIG_METADATA_KEY, DiTConfig, config_from_json, detect_config, get_task
from wan_core.models.dit import check_task, check_task_family, normalize_dit_keys
from wan_core.models.t5 import load_t5
from wan_core.models.vae import load_vae
from wan_core.runtime.fp8 import fp8_t5
from wan_core.runtime.offload import release_block_swap
from wan_core.runtime.prepare import prepare_dit

if TYPE_CHECKING:
    from wan_core.models.clip import CLIPVision
    from wan_core.models.dit import WanModel
    from wan_core.models.t5 import T5Encoder
    from wan_core.models.vae import WanVAE

logger = logging.getLogger(__name__)

TOY_MODEL_DIR = Path(__file__).resolve().parents[1] / "toy_models"
TOY_FILES = {
    "dit": "wan21_toy_t2v_dit.safetensors",
    "dit_i2v": "wan21_toy_i2v_dit.safetensors",
    "dit_flf2v": "wan21_toy_flf2v_dit.safetensors",
    "dit_fun_control": "wan21_toy_fun_control_dit.safetensors",
    "vae": "wan21_toy_vae.safetensors",
    "t5": "wan21_toy_umt5.safetensors",
    "clip": "wan21_toy_clip_vision.safetensors",
    "lora": "wan21_toy_purple_lora.safetensors",
}
# The toy Wan2.2 expert pairs (task -> high-noise expert, low-noise expert): the default for the task when no DiT is
# given and both files are in the toy folder
TOY_EXPERT_FILES = {
    "t2v-A14B": ("wan22_toy_t2v_high_noise_dit.safetensors", "wan22_toy_t2v_low_noise_dit.safetensors"),
}
SAMPLING_METADATA_KEY = "wantuner_sampling"  # JSON of default settings stored in a DiT file (the toy models)
TOY_RECIPE = "python -m training.toy.recipe --out wan_core/toy_models --seed 0"


def toy_path(kind: str) -> Path:
    return TOY_MODEL_DIR / TOY_FILES[kind]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ModelSpec:
    """Paths and options of a model set (what the CLI flags describe)."""

    dit: str | None = None
    vae: str | None = None
    t5: str | None = None
    clip: str | None = None
    tokenizer: str | None = None
    task: str | None = None
    device: str | None = None
    attn: str = "sdpa"
    vae_dtype: torch.dtype | None = None
    vae_cache_cpu: bool = False
    vae_tiling: bool | None = None
    fp8: str | None = None  # None, "fp8", "fp8_scaled", "fp8_fast"
    fp8_t5: bool = False
    blocks_to_swap: int | str | None = None
    pinned_block_swap: bool = False  # page-locked CPU copy of the swapped blocks (faster copies, RAM held)
    compile: bool = False
    loras: tuple[tuple[str, float, str | None, str | None], ...] = ()  # (path, multiplier, include, exclude)
    # Wan2.2 A14B: the high-noise expert (`dit` is the low-noise one), its LoRAs, and whether only the active
    # expert stays on the device
    dit_high: str | None = None
    loras_high: tuple[tuple[str, float, str | None, str | None], ...] = ()
    offload_inactive: bool = False
    lazy_loading: bool = False  # load each expert when the sampler first needs it
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for path, multiplier, *_ in (*self.loras, *self.loras_high):  # refuse NaN/inf before any model loads
            lora_multiplier(multiplier, path)
        if self.lazy_loading and not self.dit_high:
            raise ValueError("--lazy_loading loads the two Wan2.2 experts one at a time: it needs the high-noise "
                             "expert (--dit_high_noise, or the official model folder as --dit)")
        if self.offload_inactive and self.blocks_to_swap not in (None, 0):
            raise ValueError("--offload_inactive_dit moves whole experts between CPU and device; it cannot be "
                             f"combined with --blocks_to_swap {self.blocks_to_swap}")

    def path(self, kind: str) -> Path:
        """The file for `kind` ('dit', 'vae', 't5', 'clip'), falling back to the toy set."""
        given = getattr(self, kind)
        if given:
            return Path(given)
        if kind == "dit" and self.task:
            return toy_path(toy_dit_key(self.task))
        return toy_path(kind)


def toy_dit_key(task: str) -> str:
    """The TOY_FILES key of the toy DiT that stands in for `task` (T2V, I2V, FLF2V or Fun-Control)."""
    preset = get_task(task)
    if preset.is_wan22:
        built = (f" (the toy experts {' and '.join(TOY_EXPERT_FILES[preset.name])} are not in {TOY_MODEL_DIR}; "
                 f"the recipe's wan22 stage builds them: {TOY_RECIPE} --stages wan22)"
                 if preset.name in TOY_EXPERT_FILES else "")
        raise ValueError(f"there is no embedded toy model for the Wan2.2 task {task}: give its DiT with --dit{built}")
    dit = preset.dit
    if dit.in_dim == 48:
        return "dit_fun_control"
    return {"i2v": "dit_i2v", "flf2v": "dit_flf2v"}.get(dit.model_type, "dit")


def toy_expert_pair(task: str | None) -> tuple[Path, Path] | None:
    """(high-noise, low-noise) toy expert files of `task` when both are in the toy folder, else None."""
    if task is None or get_task(task).name not in TOY_EXPERT_FILES:
        return None
    high, low = (TOY_MODEL_DIR / name for name in TOY_EXPERT_FILES[get_task(task).name])
    return (high, low) if high.is_file() and low.is_file() else None


def with_toy_experts(task: str | None, dit: str | None, dit_high: str | None) -> tuple[str | None, str | None]:
    """(--dit, --dit_high_noise) with the toy expert pair of `task` filled in when neither is given and both toy
    files exist; otherwise as given (a missing toy pair is reported when the DiT is looked up: `toy_dit_key`)."""
    pair = None if dit or dit_high else toy_expert_pair(task)
    if pair is None:
        return dit, dit_high
    logger.info("task %s with no --dit: the toy expert pair, high noise %s, low noise %s", task, pair[0].name,
                pair[1].name)
    return str(pair[1]), str(pair[0])


def sampling_defaults(dit_path: Path) -> dict[str, Any]:
    """Recommended settings stored in a DiT file's metadata (steps, shift, guidance, size, frames, fps, ...)."""
    try:
        text = read_metadata(dit_path).get(SAMPLING_METADATA_KEY)
    except (OSError, ValueError):
        return {}
    return json.loads(text) if text else {}


# What each kind of model file is called in messages, and the key endings (under any prefix) that identify it.
KIND_NAMES = {"dit": "Wan2.1 DiT (diffusion transformer)", "vae": "Wan VAE", "t5": "umT5 text encoder",
              "clip": "CLIP vision encoder", "lora": "LoRA"}
_CONFIG_KINDS = {"DiTConfig": "dit", "VAEConfig": "vae", "T5Config": "t5", "CLIPVisionConfig": "clip"}
_KEY_ENDINGS = (  # checked in this order: a LoRA's keys name DiT modules, so LoRA markers come first
    ("lora", (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", ".hada_w1_a", ".lokr_w1",
              ".lokr_w1_a", ".diff_b")),
    ("dit", ("head.modulation", "condition_embedder.time_proj.weight")),
    ("vae", ("decoder.middle.0.residual.0.gamma", "decoder.conv_in.weight")),
    ("clip", ("cls_embedding", "class_embedding")),
    ("t5", ("blocks.0.attn.q.weight", "encoder.final_layer_norm.weight")),
)


def model_file_kind(path: str | Path) -> str | None:
    """'dit', 'vae', 't5', 'clip' or 'lora' from a checkpoint's stored config class or its key names (header only
    for safetensors); None when the file is none of them or cannot be read."""
    try:
        config = read_metadata(path).get(CONFIG_METADATA_KEY)
        if config:
            return _CONFIG_KINDS.get(json.loads(config).get("class", ""))
        keys = list(peek_shapes(path))
    except (OSError, ValueError, RuntimeError):
        return None
    for kind, endings in _KEY_ENDINGS:
        if any(key.endswith(ending) for key in keys for ending in endings):
            return kind
    return None


def check_model_file(path: str | Path, kind: str, flag: str) -> None:
    """ValueError when `path` is recognisably another kind of model file than `flag` expects (one line saying
    both); unknown files are left to the loader's own checks."""
    found = model_file_kind(path)
    if found is not None and found != kind:
        raise ValueError(f"{flag} {path} is a {KIND_NAMES[found]} file; {flag} expects a {KIND_NAMES[kind]} file")


# Root folders that hold a Wan2.2 A14B pair of experts: layout name -> subfolder of each expert (flag -> folder).
EXPERT_FOLDER_LAYOUTS: dict[str, dict[str, str]] = {
    "the official Wan2.2 expert folder": {"dit_high": "high_noise_model", "dit": "low_noise_model"},
    "a diffusers Wan2.2 pipeline folder": {"dit_high": "transformer", "dit": "transformer_2"},  # transformer: t >= b
}


def expert_layout(path: str | Path | None) -> tuple[str, dict[str, str]] | None:
    """(layout name, flag -> subfolder) of a root folder holding both experts, else None."""
    if path is None:
        return None
    for name, folders in EXPERT_FOLDER_LAYOUTS.items():
        if all((Path(path) / sub).is_dir() for sub in folders.values()):
            return name, folders
    return None


def is_expert_root(path: str | Path | None) -> TypeGuard[str | Path]:
    """True for a root folder holding both Wan2.2 A14B experts (`EXPERT_FOLDER_LAYOUTS`)."""
    return expert_layout(path) is not None


def expert_paths(dit: str | None, dit_high: str | None) -> tuple[str | None, str | None]:
    """(--dit, --dit_high_noise) with a root folder of both experts (the official one: high_noise_model/ and
    low_noise_model/; diffusers': transformer/ = high noise, transformer_2/ = low noise) resolved to the expert each
    flag names; the root given as --dit alone gives both experts."""
    high_layout = expert_layout(dit_high)
    resolved_high = dit_high if high_layout is None else str(Path(str(dit_high)) / high_layout[1]["dit_high"])
    layout = expert_layout(dit)
    if layout is None:
        return dit, resolved_high
    name, folders = layout
    low = str(Path(str(dit)) / folders["dit"])
    if resolved_high is None:
        resolved_high = str(Path(str(dit)) / folders["dit_high"])
        logger.info("--dit %s is %s: using both experts, high noise from %s/ and low noise from %s/", dit, name,
                    folders["dit_high"], folders["dit"])
    return low, resolved_high


def read_dit_config(path: str | Path) -> DiTConfig:
    """A DiT file's architecture without reading its weights: the stored config, else detected from the header's
    shapes."""
    metadata = read_metadata(path)
    if CONFIG_METADATA_KEY in metadata:
        config = config_from_json(metadata[CONFIG_METADATA_KEY])
        if not isinstance(config, DiTConfig):
            raise ValueError(f"{Path(path).name} holds a {type(config).__name__}, not a DiT")
        return config
    return detect_config(normalize_dit_keys(peek_shapes(path), Path(path).name))


def check_dit_file_task(path: str | Path, task: str) -> None:
    """Header-only check that a DiT file fits `task` (raises the loader's ValueError when it does not)."""
    metadata = read_metadata(path)
    if CONFIG_METADATA_KEY in metadata:
        config = config_from_json(metadata[CONFIG_METADATA_KEY])
        if not isinstance(config, DiTConfig):
            raise ValueError(f"{Path(path).name} holds a {type(config).__name__}, not a DiT")
        check_task_family(task, config)
        return
    check_task(task, normalize_dit_keys(peek_shapes(path), Path(path).name))


class ModelSet:
    """Loads each model on first use; `release(kind)` frees it (phases of a batch run)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device) if spec.device else default_device()
        self._models: dict[str, Any] = {}
        self.size_hint: tuple[int, int, int] | None = None  # largest (height, width, frames): sizes auto swap

    def _check(self, kind: str) -> Path:
        path = self.spec.path(kind)
        if not path.exists():
            hint = (f" (the embedded toy models are missing: rebuild them with `{TOY_RECIPE}`)"
                    if path.parent == TOY_MODEL_DIR else "")
            raise FileNotFoundError(f"{kind} checkpoint not found: {path}{hint}")
        return path

    def get(self, kind: str) -> Any:
        if kind not in self._models:
            path = self._check(kind)
            logger.info("loading %s from %s", kind, path)
            self._models[kind] = getattr(self, f"_load_{kind}")(path)
        return self._models[kind]

    def release(self, kind: str) -> None:
        """Drop the `kind` model; a block-swapped DiT first detaches its swapper, which unpins its CPU memory."""
        model = self._models.pop(kind, None)
        if isinstance(model, torch.nn.Module):
            release_block_swap(model)
        if model is not None:
            del model
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _load_dit(self, path: Path) -> WanModel:
        """The DiT (with two experts: the low-noise one, which waits on the CPU when the inactive one is offloaded:
        sampling starts with the high-noise expert; loaded lazily, it is loaded when needed, onto the device)."""
        offloaded = self.spec.dit_high is not None and self.spec.offload_inactive and not self.spec.lazy_loading
        return prepare_dit(path, self.spec, torch.device("cpu") if offloaded else self.device, self.size_hint)

    def _load_dit_high(self, path: Path) -> WanModel:
        """The Wan2.2 high-noise expert, with the high-noise LoRAs."""
        spec = dataclasses.replace(self.spec, loras=self.spec.loras_high)
        return prepare_dit(path, spec, self.device, self.size_hint)

    def _load_vae(self, path: Path) -> WanVAE:
        vae = load_vae(path, dtype=self.spec.vae_dtype, device=self.device)
        return configure_vae(vae, self.spec)

    def _load_t5(self, path: Path) -> T5Encoder:
        t5 = load_t5(path, tokenizer=self.spec.tokenizer, device=self.device)
        if self.spec.fp8_t5:
            fp8_t5(t5)
        return t5

    def _load_clip(self, path: Path) -> CLIPVision:
        return load_clip_vision(path, device=self.device)


def configure_vae(vae: WanVAE, spec: ModelSpec) -> WanVAE:
    """Apply the VAE memory options (feature cache on the CPU, spatial tiling)."""
    if spec.vae_cache_cpu:
        vae.cache_device = torch.device("cpu")
    if spec.vae_tiling is not None:
        vae.tiling = spec.vae_tiling
    return vae
