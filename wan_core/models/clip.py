"""The CLIP ViT-H/14 visual encoder that Wan2.1 I2V / FLF2V / Fun-Control use for image conditioning.

Written from the semantics of the official `wan/modules/clip.py` (the visual tower of open-clip
xlm-roberta-large-vit-huge-14, i.e. LAION ViT-H/14): a pre-norm ViT with a CLS token, no
patch-conv bias, exact GELU and LayerNorm eps 1e-5. Module paths equal the official checkpoint keys under
`visual.` (patch_embedding, cls_embedding, pos_embedding, pre_norm, transformer.N.{norm1, attn.{to_qkv, proj},
norm2, mlp.{0,2}}).

Wan uses the output of the **penultimate** block (official `use_31_block=True`; HF `hidden_states[-2]`): no
post-LayerNorm and no projection, [B, 257, 1280] for 224 px input. The last block, `post_norm` and `head` are
therefore never built and never read from the file (the key filter skips them, as it skips the official file's
unused text tower `textual.*` and `log_scale`); `CLIPVisionConfig.num_layers` still counts every block in the
file (32 for ViT-H), the module holds `num_layers - 1`.

Precision follows the official code (fp16 weights under fp16 autocast on the GPU): linear layers and the patch
conv compute in the weight dtype, LayerNorms in fp32 with the result cast back, the residual stream stays in the
weight dtype. Preprocessing runs in fp32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from wan_core.loading.checkpoint import CheckpointError, build_on_meta, load_into, load_state_dict, read_metadata
from wan_core.loading.convert import CLIP_OPEN_CLIP, clip_hf_to_ours, rename
from wan_core.models.attention import attention, resolve_backend
from wan_core.models.config import CONFIG_METADATA_KEY, CLIPVisionConfig, config_from_json
from wan_core.models.dit import layer_norm
from wan_core.models.ops import CastLinear

logger = logging.getLogger(__name__)

CROP_MODES = ("none", "center")
# Attention heads by tower width, for files that carry no config (head dim 80 for ViT-H/14: 1280 / 16).
HEADS_BY_WIDTH = {1280: 16}


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = CastLinear(dim, 3 * dim)  # q, k, v stacked along the output dim, in that order
        self.proj = CastLinear(dim, dim)
        self.attn_backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, C] -> [B, L, C] (unmasked self-attention)."""
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # 3 x [B, L, H, D]
        return self.proj(attention(q, k, v, self.attn_backend).flatten(2))


class CLIPBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) with exact GELU."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = CLIPAttention(cfg.dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(CastLinear(cfg.dim, hidden), nn.GELU(), CastLinear(hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(layer_norm(x, self.norm1))
        return x + self.mlp(layer_norm(x, self.norm2))


class CLIPVisionTower(nn.Module):
    """The official `VisionTransformer` up to its penultimate block: normalised pixels -> [B, tokens, dim]."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        # only the blocks whose output Wan uses: the last block (and post_norm / head after it) are not built
        self.transformer = nn.ModuleList(CLIPBlock(cfg) for _ in range(cfg.num_layers - 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] (normalised, S = image_size) -> output of block num_layers-2: [B, tokens, dim]."""
        size = self.cfg.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"CLIP tower expects {size}x{size} pixels, got {tuple(pixels.shape)}; use "
                             f"CLIPVision.encode() to resize")
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixels.to(dtype)).flatten(2).transpose(1, 2)  # [B, N, C]
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding  # [B, L, C]
        x = layer_norm(x, self.pre_norm)
        for block in self.transformer:
            x = block(x)
        return x


def _check_config(cfg: CLIPVisionConfig) -> None:
    if cfg.num_layers < 1 or cfg.dim % cfg.num_heads or cfg.image_size % cfg.patch_size:
        raise ValueError(f"invalid CLIP vision config {cfg}: needs num_layers >= 1, dim divisible by num_heads and "
                         f"image_size divisible by patch_size")


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------


def preprocess(images: torch.Tensor, cfg: CLIPVisionConfig, crop: str = "none") -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1], any size -> normalised fp32 pixels [B, 3, S, S] (S = cfg.image_size).

    crop="none" (official Wan): squash to SxS with bicubic interpolation (align_corners=False, no antialias).
    crop="center" (diffusers CLIPImageProcessor / ComfyUI default): scale the shorter side to S (bicubic with
    antialias, as ComfyUI does; close to PIL's resampling), then take the centre SxS window.
    Then x*0.5+0.5 -> [0, 1] and (x - mean) / std with the OpenAI constants.
    """
    _check_images(images)
    if crop not in CROP_MODES:
        raise ValueError(f"unknown CLIP crop mode {crop!r}; expected one of {', '.join(CROP_MODES)}")
    size = cfg.image_size
    x = images.float()
    if crop == "none":
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    else:
        x = _resize_center_crop(x, size)
    x = x * 0.5 + 0.5
    mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, size, size]: shorter side to `size`, centre window (offsets rounded down)."""
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new = (max(size, round(height * scale)), max(size, round(width * scale)))
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def _check_images(images: object) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"CLIP expects images as a torch.Tensor [B, 3, H, W] in [-1, 1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"CLIP expects images of shape [B, 3, H, W] in [-1, 1] (RGB, channels first), got "
                         f"{tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"CLIP expects floating-point images in [-1, 1], got dtype {images.dtype}")


# ----------------------------------------------------------------------------------------------------------------
# Wrapper
# ----------------------------------------------------------------------------------------------------------------


class CLIPVision(nn.Module):
    """Preprocessing + tower. State-dict keys are the official ones (`visual.` prefix, unused parts absent)."""

    def __init__(self, cfg: CLIPVisionConfig | None = None, crop: str = "none") -> None:
        super().__init__()
        if crop not in CROP_MODES:
            raise ValueError(f"unknown CLIP crop mode {crop!r}; expected one of {', '.join(CROP_MODES)}")
        self.cfg = cfg or CLIPVisionConfig()
        self.crop = crop
        self.visual = CLIPVisionTower(self.cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.patch_embedding.weight.device

    def set_attention_backend(self, name: str) -> None:
        backend = resolve_backend(name).value
        for block in self.visual.transformer:
            cast(CLIPBlock, block).attn.attn_backend = backend

    @torch.no_grad()
    def encode(self, images: torch.Tensor, crop: str | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> penultimate-block features [B, 257, 1280] in the model dtype.

        For FLF2V stack the first and last frames on the batch axis (official behaviour).
        """
        _check_images(images)
        pixels = preprocess(images.to(self.device), self.cfg, self.crop if crop is None else crop)
        return self.visual(pixels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    name: str
    sentinel: str  # key (after the prefix) that identifies the layout
    scope: str  # keys of the visual tower start with this (after the prefix)
    block: re.Pattern[str]  # captures the block index
    unused: tuple[str, ...]  # exact names or dotted prefixes (after the prefix) that are never read


_LAYOUTS = (
    _Layout("HF/ComfyUI", "vision_model.embeddings.class_embedding", "vision_model.",
            re.compile(r"^vision_model\.encoder\.layers\.(\d+)\."),
            ("vision_model.post_layernorm.", "vision_model.embeddings.position_ids")),
    _Layout("official Wan", "cls_embedding", "", re.compile(r"^transformer\.(\d+)\."), ("post_norm.", "head")),
    _Layout("open_clip", "class_embedding", "", re.compile(r"^transformer\.resblocks\.(\d+)\."), ("ln_post.", "proj")),
)
_LAYOUT_HELP = ("official Wan (`visual.cls_embedding`, `visual.transformer.N...`), HF/ComfyUI clip_vision_h "
                "(`vision_model.embeddings.class_embedding`) or open_clip (`visual.class_embedding`, "
                "`visual.conv1...`)")


def _checkpoint_keys(path: Path) -> list[str]:
    """All tensor names of a checkpoint without reading any tensor data (a filter that accepts nothing)."""
    names: list[str] = []

    def collect(key: str) -> bool:
        names.append(key)
        return False

    load_state_dict(path, keys=collect)
    return names


def _detect_layout(names: list[str], path: Path) -> tuple[_Layout, str]:
    """(layout, key prefix) of the visual tower; the HF sentinel is tested first (it ends in `class_embedding`)."""
    for layout in _LAYOUTS:
        prefixes = sorted({n[:-len(layout.sentinel)] for n in names if n.endswith(layout.sentinel)
                           and (n == layout.sentinel or n[-len(layout.sentinel) - 1] == ".")})
        if layout.name == "open_clip":
            prefixes = [p for p in prefixes if not p.endswith("embeddings.") and f"{p}conv1.weight" in names]
        if len(prefixes) > 1:
            raise CheckpointError(f"{path} holds several CLIP vision towers ({layout.name} layout, prefixes "
                                  f"{prefixes}); pass a file with one")
        if prefixes:
            return layout, prefixes[0]
    sample = ", ".join(names[:5]) or "no tensors"
    raise CheckpointError(f"unknown key layout for CLIP vision in {path}: expected {_LAYOUT_HELP}; the file starts "
                          f"with {sample}")


def _is_unused(rest: str, unused: tuple[str, ...]) -> bool:
    """`unused` entries ending in '.' are prefixes; others name a tensor or a module (its `.weight` etc.)."""
    return any(rest.startswith(u) if u.endswith(".") else rest == u or rest.startswith(u + ".") for u in unused)


def _key_filter(layout: _Layout, prefix: str, last_block: int) -> Callable[[str], bool]:
    """True for the tensors the penultimate-block model needs: in the tower, not unused, not the last block."""

    def wanted(key: str) -> bool:
        if not key.startswith(prefix):
            return False
        rest = key[len(prefix):]
        if not rest.startswith(layout.scope) or _is_unused(rest, layout.unused):
            return False
        match = layout.block.match(rest)
        return not (match and int(match[1]) >= last_block)

    return wanted


def _count_blocks(names: list[str], layout: _Layout, prefix: str) -> int:
    indices = {int(m[1]) for n in names if n.startswith(prefix) and (m := layout.block.match(n[len(prefix):]))}
    if not indices:
        raise CheckpointError(f"CLIP vision ({layout.name} layout, prefix {prefix!r}) has no transformer blocks")
    return max(indices) + 1


def clip_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int]:
    """Read the used part of a CLIP visual tower in any supported layout.

    Returns (state dict with our names, without the `visual.` prefix; number of blocks in the file). Tensors not
    needed (text tower, `log_scale`, last block, post-norm, projection) are filtered out before reading.
    """
    path = Path(path)
    names = _checkpoint_keys(path)
    layout, prefix = _detect_layout(names, path)
    num_blocks = _count_blocks(names, layout, prefix)
    stored = _stored_config(path)
    # a file written from a CLIPVision module holds only the used blocks: its config counts one more block
    used = num_blocks if stored is not None and stored.num_layers == num_blocks + 1 else num_blocks - 1
    sd = load_state_dict(path, keys=_key_filter(layout, prefix, used))
    sd = {k[len(prefix):]: v for k, v in sd.items()}
    what = f"CLIP vision {path.name} ({layout.name} layout)"
    if layout.name == "HF/ComfyUI":
        sd = clip_hf_to_ours(sd)
    elif layout.name == "open_clip":
        sd = rename(sd, CLIP_OPEN_CLIP, to_ours=True, what=what)
    logger.debug("%s: %d blocks in the file, %d tensors read", what, num_blocks, len(sd))
    return sd, num_blocks


def detect_clip_config(sd: dict[str, torch.Tensor], num_layers: int,
                       hf_config: dict | None = None) -> CLIPVisionConfig:
    """Architecture from tensor shapes (our names). Heads and eps come from `hf_config` (a transformers
    config.json) when given, else heads from HEADS_BY_WIDTH (ViT-H/14: 16); other widths need a config."""
    for key in ("pos_embedding", "patch_embedding.weight"):
        if key not in sd:
            raise CheckpointError(f"CLIP vision checkpoint has no {key!r} tensor")
    tokens, dim = sd["pos_embedding"].shape[-2:]
    patch = sd["patch_embedding.weight"].shape[-1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise CheckpointError(f"CLIP pos_embedding has {tokens} positions; expected a square grid + 1 CLS token")
    mlp = sd.get("transformer.0.mlp.0.weight")
    mlp_ratio = mlp.shape[0] / dim if mlp is not None else 4.0
    eps = 1e-5
    if hf_config is not None:
        heads = int(hf_config["num_attention_heads"])
        eps = float(hf_config.get("layer_norm_eps", eps))
    elif dim in HEADS_BY_WIDTH:
        heads = HEADS_BY_WIDTH[dim]
    else:
        raise ValueError(f"cannot infer the number of attention heads of a CLIP vision tower of width {dim} (known "
                         f"widths: {sorted(HEADS_BY_WIDTH)}); pass config=CLIPVisionConfig(...) or store the config "
                         f"in the file's '{CONFIG_METADATA_KEY}' metadata")
    return CLIPVisionConfig(image_size=grid * patch, patch_size=patch, dim=dim, mlp_ratio=mlp_ratio,
                            num_heads=heads, num_layers=num_layers, eps=eps)


def _hf_config_json(path: Path) -> dict | None:
    """The vision part of a transformers `config.json` next to the weights (diffusers `image_encoder/`), if any."""
    candidate = path.parent / "config.json"
    if not candidate.is_file():
        return None
    try:
        data = json.loads(candidate.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    data = data.get("vision_config", data)
    if not isinstance(data, dict) or "num_attention_heads" not in data:
        return None
    act = data.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{candidate} declares hidden_act={act!r}; the Wan CLIP tower uses exact 'gelu'")
    return data


def _resolve_path(path: str | os.PathLike) -> Path:
    """A diffusers/HF model folder (`image_encoder/`) stands for its `model.safetensors`."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    return path


def _stored_config(path: Path) -> CLIPVisionConfig | None:
    metadata = read_metadata(path)
    if CONFIG_METADATA_KEY not in metadata:
        return None
    config = config_from_json(metadata[CONFIG_METADATA_KEY])
    if not isinstance(config, CLIPVisionConfig):
        raise ValueError(f"{path} metadata holds a {type(config).__name__}, not a CLIPVisionConfig")
    return config


def _resolve_config(path: Path, sd: dict[str, torch.Tensor], num_blocks: int,
                    config: CLIPVisionConfig | None) -> CLIPVisionConfig:
    """config argument > `wantuner_config` metadata > config.json beside the file > tensor shapes."""
    if config is None:
        config = _stored_config(path)
    if config is None:
        config = detect_clip_config(sd, num_blocks, _hf_config_json(path))
    # files written from a CLIPVision module itself hold only the blocks that are used (num_layers - 1)
    if config.num_layers not in (num_blocks, num_blocks + 1):
        raise ValueError(f"CLIP vision config has num_layers={config.num_layers} but {path.name} holds "
                         f"{num_blocks} transformer blocks")
    return config


def default_clip_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on the GPU as the official code; fp32 on the CPU (where the official code also forces fp32)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_clip_vision(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                     config: CLIPVisionConfig | None = None, attn: str = "sdpa", crop: str = "none") -> CLIPVision:
    """Load the Wan2.1 CLIP visual tower from any supported file; returns an eval-mode, frozen CLIPVision.

    Files: official `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (or its safetensors conversion),
    ComfyUI `clip_vision_h.safetensors` / HF / diffusers `CLIPVisionModel(WithProjection)` (a model folder is
    accepted), open_clip naming with or without `visual.`; fp32/fp16/bf16. Only the used tensors are read.
    The architecture comes from `config`, else the file's `wantuner_config` metadata, else a transformers
    `config.json` beside the file, else the tensor shapes (ViT-H/14 width 1280 -> 16 heads; tiny or unusual
    towers need one of the former). `dtype` defaults to fp16 on CUDA and fp32 on the CPU.
    """
    backend = resolve_backend(attn).value  # fail before reading anything
    path = _resolve_path(path)
    sd, num_blocks = clip_state_dict(path)
    cfg = _resolve_config(path, sd, num_blocks, config)
    dtype = dtype or default_clip_dtype(device)
    model = build_on_meta(lambda: CLIPVision(cfg, crop=crop))
    sd = {f"visual.{k}": v.to(dtype) for k, v in sd.items()}
    load_into(model, sd, what=f"CLIP vision {path.name}")
    model.set_attention_backend(backend)
    logger.info("loaded CLIP vision %s: width %d, %d of %d blocks used, %s", path.name, cfg.dim, cfg.num_layers - 1,
                cfg.num_layers, dtype)
    return model.to(device).eval().requires_grad_(False)
