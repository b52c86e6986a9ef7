"""Model configurations and task presets for Wan2.1, plus shape-based detection from a state dict.

Every architecture is a frozen dataclass; the task table (`TASKS`) pairs a DiT architecture with its sampling
defaults. Values follow the official Wan2.1 configs (wan/configs/*.py, Apache-2.0) and musubi-tuner's task table.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

ModelType = Literal["t2v", "i2v", "flf2v"]

TEXT_LEN = 512  # T5 context is zero-padded to this length before text_embedding
CLIP_TOKENS = 257  # 16x16 patches + CLS
VAE_STRIDE = (4, 8, 8)
PATCH_SIZE = (1, 2, 2)

# The official negative prompt (wan/configs/shared_config.py).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
FLF2V_NEGATIVE_PREFIX = "镜头切换，"


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a Wan2.1 diffusion transformer (`WanModel`)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = TEXT_LEN
    patch_size: tuple[int, int, int] = PATCH_SIZE
    eps: float = 1e-6
    model_type: ModelType = "t2v"
    clip_dim: int = 1280  # MLPProj input width (hard-coded 1280 in the official code)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_input(self) -> bool:
        """True when the model has CLIP image cross-attention (I2V, FLF2V, Fun-InP, Fun-Control)."""
        return self.model_type in ("i2v", "flf2v")

    @property
    def image_tokens(self) -> int:
        return 2 * CLIP_TOKENS if self.model_type == "flf2v" else CLIP_TOKENS


@dataclass(frozen=True)
class VAEConfig:
    """The causal 3-D VAE (`WanVAE_`): Wan2.1's by default; `WAN22_VAE` is the Wan2.2 (TI2V-5B) one.

    Wan2.2 adds `patch_size` (2x2 pixel patchify before the encoder, unpatchify after the decoder), `is_residual`
    (each level is one residual down/up block with a parameter-free AvgDown3D / DupUp3D shortcut) and a wider
    decoder (`dec_dim`; None = `dim`).
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dec_dim: int | None = None
    patch_size: int = 1
    is_residual: bool = False

    def __post_init__(self) -> None:
        if self.dec_dim == self.dim:
            object.__setattr__(self, "dec_dim", None)  # one spelling per architecture, so presets compare equal
        if self.patch_size < 1:
            raise ValueError(f"VAE patch_size must be >= 1, got {self.patch_size}")
        if self.is_residual and self.attn_scales:
            raise ValueError(f"residual (Wan2.2) VAE blocks have no attention, got attn_scales {self.attn_scales}")

    @property
    def decoder_dim(self) -> int:
        return self.dim if self.dec_dim is None else self.dec_dim

    @property
    def pixel_channels(self) -> int:
        """Channels the encoder sees and the decoder writes: RGB x patch_size^2."""
        return 3 * self.patch_size**2

    @property
    def space_stride(self) -> int:
        """Pixels per latent cell along H and W: 2 per spatial downsampling level, times patch_size."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size


WAN21_VAE = VAEConfig()
WAN22_VAE = VAEConfig(dim=160, dec_dim=256, z_dim=48, patch_size=2, is_residual=True)


def latent_space_stride(cfg: DiTConfig) -> int:
    """Pixels per latent cell (H and W) of the VAE whose latents the DiT takes: 16 for the 48-channel Wan2.2 VAE
    (TI2V-5B), 8 for the Wan2.1 VAE (every other DiT)."""
    return WAN22_VAE.space_stride if cfg.out_dim == WAN22_VAE.z_dim else WAN21_VAE.space_stride


@dataclass(frozen=True)
class T5Config:
    """The umT5 encoder (official `umt5_xxl`, encoder only)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = TEXT_LEN


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The visual tower of open-clip xlm-roberta-large-vit-huge-14 (= LAION ViT-H/14)."""

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: float = 4.0
    num_heads: int = 16
    num_layers: int = 32
    eps: float = 1e-5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class TaskPreset:
    """A task: a DiT architecture plus the sampling defaults musubi uses for it."""

    name: str
    dit: DiTConfig
    sample_steps: int = 50
    sample_shift: float = 5.0
    guide_scale: float = 5.0
    fps: int = 16
    frame_num: int = 81
    is_fun_control: bool = False
    is_t2i: bool = False
    needs_clip: bool = False  # I2V-type tasks take a start image (CLIP + VAE)
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    sizes: tuple[tuple[int, int], ...] = field(default=((720, 1280), (1280, 720), (480, 832), (832, 480)))
    # Wan2.2 A14B: two experts; the high-noise one runs the steps with t >= boundary * 1000, with its own guidance
    boundary: float | None = None
    guide_scale_high: float | None = None
    vae: VAEConfig = WAN21_VAE  # the VAE whose latents the DiT works on

    @property
    def is_wan22(self) -> bool:
        return self.boundary is not None or self.vae.z_dim != WAN21_VAE.z_dim

    @property
    def takes_image(self) -> bool:
        """True when the DiT's extra input channels carry a start image (mask 4 + image latents), with or without
        CLIP (Wan2.1 I2V/FLF2V; Wan2.2 i2v-A14B has no CLIP branch)."""
        return self.dit.has_image_input or (not self.is_fun_control and self.dit.in_dim == self.dit.out_dim + 20)

    def shift_for(self, height: int, width: int) -> float:
        """Flow shift default: 3.0 for I2V-type tasks at 480x832 / 832x480 (official rule), else the preset."""
        if self.needs_clip and not self.dit.model_type == "flf2v" and {height, width} == {480, 832}:
            return 3.0
        return self.sample_shift


_T2V_1_3B = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_T2V_14B = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_I2V_14B = dataclasses.replace(_T2V_14B, in_dim=36, model_type="i2v")
_FLF2V_14B = dataclasses.replace(_I2V_14B, model_type="flf2v")
_480P = ((480, 832), (832, 480))
# Wan2.2 TI2V-5B: one DiT on the Wan2.2 VAE's 48-channel latents, no CLIP branch, per-token timesteps (the first
# latent frame of image-to-video gets t = 0).
WAN22_TI2V_5B_DIT = DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)

TASKS: dict[str, TaskPreset] = {
    "t2v-1.3B": TaskPreset("t2v-1.3B", _T2V_1_3B, sizes=_480P),
    "t2v-14B": TaskPreset("t2v-14B", _T2V_14B),
    "i2v-14B": TaskPreset("i2v-14B", _I2V_14B, sample_steps=40, needs_clip=True),
    "t2i-14B": TaskPreset("t2i-14B", _T2V_14B, frame_num=1, is_t2i=True,
                          sizes=((720, 1280), (1280, 720), (480, 832), (832, 480), (1024, 1024))),
    "flf2v-14B": TaskPreset("flf2v-14B", _FLF2V_14B, sample_steps=40, needs_clip=True,
                            negative_prompt=FLF2V_NEGATIVE_PREFIX + DEFAULT_NEGATIVE_PROMPT),
    "t2v-1.3B-FC": TaskPreset("t2v-1.3B-FC", dataclasses.replace(_T2V_1_3B, in_dim=48, model_type="i2v"),
                              is_fun_control=True, sizes=_480P),
    "t2v-14B-FC": TaskPreset("t2v-14B-FC", dataclasses.replace(_T2V_14B, in_dim=48, model_type="i2v"),
                             is_fun_control=True),
    "i2v-14B-FC": TaskPreset("i2v-14B-FC", dataclasses.replace(_T2V_14B, in_dim=48, model_type="i2v"),
                             sample_steps=40, is_fun_control=True, needs_clip=True),
    # Wan2.2: the A14B experts have Wan2.1 14B shapes; i2v-A14B takes mask + image latents but has no CLIP branch
    "t2v-A14B": TaskPreset("t2v-A14B", _T2V_14B, sample_steps=40, sample_shift=12.0, guide_scale=3.0,
                           boundary=0.875, guide_scale_high=4.0),
    "i2v-A14B": TaskPreset("i2v-A14B", dataclasses.replace(_T2V_14B, in_dim=36), sample_steps=40, sample_shift=5.0,
                           guide_scale=3.5, boundary=0.9, guide_scale_high=3.5),
    "ti2v-5B": TaskPreset("ti2v-5B", WAN22_TI2V_5B_DIT, sample_steps=50, sample_shift=5.0, guide_scale=5.0, fps=24,
                          frame_num=121, sizes=((704, 1280), (1280, 704)), vae=WAN22_VAE),
}


def get_task(name: str) -> TaskPreset:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Serialisation (configs travel in safetensors metadata so tiny models load without guessing)
# ----------------------------------------------------------------------------------------------------------------

CONFIG_METADATA_KEY = "wantuner_config"


ArchitectureConfig = DiTConfig | VAEConfig | T5Config | CLIPVisionConfig
ConfigT = TypeVar("ConfigT", DiTConfig, VAEConfig, T5Config, CLIPVisionConfig)


def config_to_json(config: ArchitectureConfig) -> str:
    return json.dumps({"class": type(config).__name__, **dataclasses.asdict(config)})


def config_from_json(text: str) -> ArchitectureConfig:
    data = json.loads(text)
    classes: dict[str, type[ArchitectureConfig]] = {
        c.__name__: c for c in (DiTConfig, VAEConfig, T5Config, CLIPVisionConfig)}
    cls = classes.get(data.pop("class", ""))
    if cls is None:
        raise ValueError(f"config metadata names no known config class: {text[:200]}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
    return cls(**kwargs)


def stored_config(metadata: Mapping[str, str], cls: type[ConfigT], what: str) -> ConfigT | None:
    """The config a file's metadata holds (None when it holds none); ValueError when it is not a `cls`."""
    if CONFIG_METADATA_KEY not in metadata:
        return None
    config = config_from_json(metadata[CONFIG_METADATA_KEY])
    if not isinstance(config, cls):
        raise ValueError(f"{what}: its {CONFIG_METADATA_KEY} metadata holds a {type(config).__name__}, "
                         f"not a {cls.__name__}")
    return config


# ----------------------------------------------------------------------------------------------------------------
# Detection from tensor shapes (each size is read from the shape of one sentinel key)
# ----------------------------------------------------------------------------------------------------------------


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"not a Wan2.1 DiT state dict: key {key!r} is missing")
    return tuple(sd[key].shape)


def detect_config(sd: Mapping[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Infer a `DiTConfig` from a DiT state dict with official key names (prefix already stripped).

    The head count is not stored in the weights: real Wan models use head dim 128 (num_heads = dim // 128);
    pass `num_heads` (or store the config in the file's metadata) for other head sizes.
    """
    dim = _shape(sd, "head.modulation")[-1]
    ffn_dim = _shape(sd, "blocks.0.ffn.0.weight")[0]
    in_dim = _shape(sd, "patch_embedding.weight")[1]
    out_dim = _shape(sd, "head.head.weight")[0] // 4
    text_dim = _shape(sd, "text_embedding.0.weight")[1]
    freq_dim = _shape(sd, "time_embedding.0.weight")[1]
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if "img_emb.emb_pos" in sd:
        model_type: ModelType = "flf2v"
    elif "img_emb.proj.0.weight" in sd:
        model_type = "i2v"
    else:
        model_type = "t2v"
    clip_dim = _shape(sd, "img_emb.proj.0.weight")[0] if model_type != "t2v" else DiTConfig.clip_dim  # LayerNorm
    if num_heads is None:
        if dim % 128:
            raise ValueError(f"cannot infer the head count for dim {dim} (not a multiple of 128); pass num_heads")
        num_heads = dim // 128
    return DiTConfig(dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, in_dim=in_dim,
                     out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim, model_type=model_type, clip_dim=clip_dim)


def tasks_matching(config: DiTConfig) -> list[str]:
    """Tasks whose architecture equals `config`."""
    return [name for name, task in TASKS.items() if task.dit == config]


def describe_dit(config: DiTConfig) -> str:
    """What a DiT does, for messages: 'a text-to-video model (16 input channels)'."""
    if config.in_dim == config.out_dim:
        kind = "text-to-video"
    elif config.model_type == "flf2v":
        kind = "first-last-frame"
    elif config.in_dim == config.out_dim + 32:
        kind = "Fun-Control"
    else:
        kind = "image-to-video"
    return f"a {kind} model ({config.in_dim} input channels)"
