"""The Wan2.1 diffusion transformer (DiT).

Reimplemented from the semantics of Wan-Video/Wan2.1 `wan/modules/model.py` (Apache-2.0); module attribute paths
equal the official checkpoint keys, so official and ComfyUI files load with `strict=True`.

Precision follows the official code, which runs the DiT under bf16 autocast with the time embedding, modulation,
residual additions and head under fp32 autocast: linear layers compute in their weight dtype, norms and the
modulation in fp32, the residual stream is fp32, the timestep sinusoid and RoPE are computed in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from wan_core.loading.checkpoint import build_on_meta, load_into, load_state_dict, read_metadata, strip_prefix
from wan_core.loading.convert import DIT_DIFFUSERS, DIT_DIFFUSERS_SENTINEL, rename
from wan_core.models.attention import AttnFn, attention, resolve_backend
from wan_core.models.config import (
    TASKS,
    DiTConfig,
    detect_config,
    get_task,
    stored_config,
    tasks_matching,
)
from wan_core.models.ops import FP8_DTYPES, CastLinear, FP8Linear, Fp32Linear, compute_dtype, dequantize_weight
from wan_core.runtime.fp8 import (
    FP8Mode,
    convert_to_fp8_modules,
    drop_fp8_markers,
    get_fp8_mode,
    quantize_state_dict,
    weight_bytes,
)

if TYPE_CHECKING:
    from wan_core.runtime.offload import BlockSwapper

logger = logging.getLogger(__name__)

ROPE_THETA = 10000.0


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[B] timesteps -> [B, dim] float64 embedding [cos(t·ω) | sin(t·ω)], ω_i = 10000^(-i/(dim/2))."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_band_sizes(head_dim: int) -> tuple[int, int, int]:
    """Complex-pair counts for (frame, height, width): 22/21/21 for head dim 128."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_table(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, 1, head_dim/2] (float64) for a token grid (F, H, W) in raster order."""
    angles = []
    for size, pairs, axis in zip(grid, rope_band_sizes(head_dim), range(3)):
        real_dims = 2 * pairs
        exponents = torch.arange(0, real_dims, 2, dtype=torch.float64, device=device) / real_dims
        inv = 1.0 / torch.pow(ROPE_THETA, exponents)
        band = torch.outer(torch.arange(size, dtype=torch.float64, device=device), inv)  # [size, pairs]
        shape = [1, 1, 1, pairs]
        shape[axis] = size
        angles.append(band.view(shape).expand(*grid, pairs))
    angle = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2)
    return torch.cos(angle), torch.sin(angle)


ROPE_CHUNK_ELEMENTS = 1 << 24  # float64 work is done in slices of ~16M elements (~128 MB) to bound peak memory


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.to(torch.float64).unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate consecutive (interleaved) pairs of [B, L, H, D] in float64; returns x's dtype.

    Long sequences are rotated one token slice at a time so the float64 temporaries stay small (75,600 tokens
    at 720p would otherwise need several GB)."""
    cos, sin = rope
    step = max(1, ROPE_CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[2] * x.shape[3]))
    if step >= x.shape[1]:
        return _rotate(x, cos, sin).to(x.dtype)
    out = torch.empty_like(x)
    for start in range(0, x.shape[1], step):
        part = slice(start, start + step)
        out[:, part].copy_(_rotate(x[:, part], cos[part], sin[part]))
    return out


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm computed in fp32 (weights upcast), returned in x's dtype."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).type_as(x)


class RMSNorm(nn.Module):
    """x·rsqrt(mean(x²)+eps) in fp32, cast back, times `weight` (over the full dim, not per head)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x)
        return normed * self.weight.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (CastLinear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attn_backend: str | AttnFn = "sdpa"  # a kernel object under sequence parallel

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, L, C] -> [B, L, C]."""
        query = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # [B, L, H, D]
        key = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        value = self.v(x).unflatten(-1, (self.num_heads, -1))
        out = attention(apply_rope(query, rope), apply_rope(key, rope), value, self.attn_backend)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Text cross-attention; with `image_input`, also attends to the image tokens prepended to the context.

    The split follows the official rule: image tokens = context length − text_len (257 for I2V, 514 for FLF2V).
    """

    def __init__(self, dim: int, num_heads: int, eps: float, text_len: int, image_input: bool) -> None:
        super().__init__()
        self.num_heads, self.text_len = num_heads, text_len
        self.q, self.k, self.v, self.o = (CastLinear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        if image_input:
            self.k_img, self.v_img = CastLinear(dim, dim), CastLinear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)
        self.attn_backend = "sdpa"

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], context [B, (image tokens +) text_len, C] -> [B, L, C]."""
        query = self._heads(self.norm_q(self.q(x)))
        image_len = context.shape[1] - self.text_len
        text = context[:, image_len:]
        out = attention(query, self._heads(self.norm_k(self.k(text))), self._heads(self.v(text)), self.attn_backend)
        if hasattr(self, "k_img"):
            image = context[:, :image_len]
            key_img = self._heads(self.norm_k_img(self.k_img(image)))
            out = out + attention(query, key_img, self._heads(self.v_img(image)), self.attn_backend)
        return self.o(out.flatten(2))


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, cfg.text_len, cfg.has_image_input)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(CastLinear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 CastLinear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, L, C] fp32 residual stream, e0 [B, 6, C] (or per token [B, L, 6, C]) fp32, context [B, Lc, C]
        -> [B, L, C] fp32."""
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = _modulate(self.modulation, e0)
        y = self.self_attn(layer_norm(x, self.norm1).float() * (1 + scale_msa) + shift_msa, rope)
        x = x + y.float() * gate_msa
        x = x + self.cross_attn(layer_norm(x, self.norm3), context).float()
        y = self.ffn(layer_norm(x, self.norm2).float() * (1 + scale_ffn) + shift_ffn)
        return x + y.float() * gate_ffn


def _modulate(table: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """table [1, k, C] + e: per sample [B, k, C] -> k x [B, 1, C]; per token [B, L, k, C] -> k x [B, L, C]."""
    if e.dim() == 3:
        return (table.float() + e).chunk(table.shape[1], dim=1)
    return tuple(m.squeeze(2) for m in (table.float().unsqueeze(0) + e).chunk(table.shape[1], dim=2))


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = Fp32Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], e [B, C] (or per token [B, L, C]) -> [B, L, prod(patch)·out_dim] fp32."""
        shift, scale = _modulate(self.modulation, e.float().unsqueeze(-2))
        return self.head(layer_norm(x, self.norm).float() * (1 + scale) + shift)


class MLPProj(nn.Module):
    """CLIP image tokens [B, N, 1280] -> [B, N, dim]; FLF2V adds a learned position embedding over 514 tokens."""

    def __init__(self, in_dim: int, out_dim: int, flf2v_tokens: int | None) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), CastLinear(in_dim, in_dim), nn.GELU(),
                                  CastLinear(in_dim, out_dim), nn.LayerNorm(out_dim))
        if flf2v_tokens:
            self.emb_pos = nn.Parameter(torch.zeros(1, flf2v_tokens, in_dim))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "emb_pos"):
            image_embeds = image_embeds + self.emb_pos.to(image_embeds.dtype)
        norm_in, fc1, act, fc2, norm_out = self.proj
        x = fc2(act(fc1(layer_norm(image_embeds, cast(nn.LayerNorm, norm_in)).float())))
        return layer_norm(x, cast(nn.LayerNorm, norm_out))


class WanModel(nn.Module):
    """Wan2.1 DiT. Build with a `DiTConfig`; load weights with `wan_core.load_dit`."""

    block_swapper: BlockSwapper | None = None  # set by wan_core.runtime.prepare when blocks stream from CPU memory

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(CastLinear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            CastLinear(dim, dim))
        self.time_embedding = nn.Sequential(Fp32Linear(cfg.freq_dim, dim), nn.SiLU(), Fp32Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Fp32Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.has_image_input:
            flf_tokens = cfg.image_tokens if cfg.model_type == "flf2v" else None
            self.img_emb = MLPProj(cfg.clip_dim, dim, flf_tokens)
        self.gradient_checkpointing = False
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- construction helpers --------------------------------------------------------------------------------

    @classmethod
    def expected_shapes(cls, cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = cls(cfg)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def init_weights(self) -> None:
        """The official initialisation (only useful for training from scratch)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding.modules(), *self.time_embedding.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def set_attention_backend(self, name: str) -> None:
        """Select the attention kernel for every block (fails now if its package is missing)."""
        backend = resolve_backend(name).value
        for m in self.modules():
            if isinstance(m, (SelfAttention, CrossAttention)):
                m.attn_backend = backend

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(cast(WanAttentionBlock, self.blocks[0]).self_attn.q)

    # -- forward ----------------------------------------------------------------------------------------------

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, device)
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_table(grid, self.config.head_dim, device)}
        return self._rope_cache[key]

    def _embed_context(self, context: torch.Tensor | Sequence[torch.Tensor], batch: int,
                       clip_fea: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """T5 outputs (list of [L_i, text_dim] or [B, L, text_dim]) zero-padded to text_len, embedded;
        image tokens prepended for image models. Returns [B, (N_img +) text_len, dim]."""
        cfg = self.config
        if isinstance(context, torch.Tensor) and context.dim() == 3:
            context = list(context.unbind(0))
        if len(context) != batch:
            raise ValueError(f"got {len(context)} text contexts for a batch of {batch}")
        padded = []
        for c in context:
            if c.shape[0] > cfg.text_len or c.shape[-1] != cfg.text_dim:
                raise ValueError(f"text context must be [L<={cfg.text_len}, {cfg.text_dim}], got {list(c.shape)}")
            padded.append(torch.cat([c, c.new_zeros(cfg.text_len - c.shape[0], c.shape[1])]))
        text = self.text_embedding(torch.stack(padded).to(device))
        if not cfg.has_image_input:
            if clip_fea is not None:
                raise ValueError("clip_fea was given but this is a text-to-video model (no image cross-attention)")
            return text
        if clip_fea is None:  # Fun-Control without a start image: zero CLIP context (VideoX-Fun semantics)
            clip_fea = text.new_zeros(batch, cfg.image_tokens, cfg.clip_dim)
        if tuple(clip_fea.shape[1:]) != (cfg.image_tokens, cfg.clip_dim):
            raise ValueError(f"clip_fea must be [B, {cfg.image_tokens}, {cfg.clip_dim}] for a {cfg.model_type} model,"
                             f" got {list(clip_fea.shape)}")
        return torch.cat([self.img_emb(clip_fea.to(device)).to(text.dtype), text], dim=1)

    def _run_block(self, block: nn.Module, *args: torch.Tensor | tuple) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | Sequence[torch.Tensor],
                clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None,
                skip_blocks: Collection[int] | None = None) -> torch.Tensor:
        """Predict the flow velocity.

        x [B, C, F, H, W] latents; t [B] timesteps in [0, 1000], or [B, L] one per token (Wan2.2; L = F·H/2·W/2,
        the token order of `patchify`); context: T5 outputs, a list of [L_i, text_dim]
        or [B, L, text_dim]; clip_fea [B, 257|514, 1280] for image models; y [B, C_y, F, H, W] conditioning
        concatenated to x on channels; skip_blocks: block indices to skip (skip-layer guidance).
        Returns [B, out_dim, F, H, W] in float32.
        """
        cfg = self.config
        # 1. Inputs: conditioning channels, patch embedding, token grid
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"the model takes {cfg.in_dim} input channels (noise + conditioning), got {x.shape[1]}")
        _, ph, pw = cfg.patch_size
        if x.shape[-2] % ph or x.shape[-1] % pw:
            raise ValueError(f"latent size {x.shape[-2]}x{x.shape[-1]} is not divisible by the patch size {ph}x{pw}: "
                             f"the video height and width must be multiples of 16")
        batch = x.shape[0]
        x, grid = self.patchify(x)  # [B, L, C] fp32, grid (F, H/2, W/2)
        rope = self._rope(grid, x.device)

        # 2. Time embedding (fp32) and text/image context
        e, e0 = self._time_embedding(t, batch, x.shape[1], x.device)
        context = self._embed_context(context, batch, clip_fea, x.device)

        # 3. Transformer blocks
        skip = set(skip_blocks or ())
        for i, block in enumerate(self.blocks):
            if i not in skip:
                x = self._run_block(block, x, e0, context, rope)

        # 4. Head and unpatchify
        out = self.head(x, e)  # [B, L, pt·ph·pw·C_out]
        return self.unpatchify(out, grid)

    def _time_embedding(self, t: torch.Tensor, batch: int, tokens: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] (or a scalar) -> e [B, C], e0 [B, 6, C]; t [B, L] -> per token e [B, L, C], e0 [B, L, 6, C]."""
        dim = self.config.dim
        if t.dim() == 2:
            if tuple(t.shape) != (batch, tokens):
                raise ValueError(f"per-token timesteps must have shape [B, L] = [{batch}, {tokens}] (L = tokens "
                                 f"after patchify), got {list(t.shape)}")
            e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t.reshape(-1).to(device)).float())
            return e.unflatten(0, (batch, tokens)), self.time_projection(e).unflatten(1, (6, dim)).unflatten(
                0, (batch, tokens))
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t.to(device)).float())  # [B, C]
        return e, self.time_projection(e).unflatten(1, (6, dim))  # [B, 6, C]

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The patch embedding as a matmul: [B, C_in, F, H, W] -> tokens [B, L, dim] (fp32) and the token grid.

        Same weights and result as the Conv3d (kernel = stride = patch size), but CPU conv3d has no fast kernel
        for this shape; a matmul over the gathered patches is fast everywhere."""
        pt, ph, pw = self.config.patch_size
        b, c, f, h, w = x.shape
        grid = (f // pt, h // ph, w // pw)
        weight = self.patch_embedding.weight  # [dim, C_in, pt, ph, pw]
        patches = x.to(weight.dtype).view(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * pt * ph * pw)  # [B, L, C_in·p]
        tokens = F.linear(patches, weight.flatten(1), self.patch_embedding.bias)
        return tokens.float(), grid

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """[B, L, pt·ph·pw·C] -> [B, C, F·pt, H·ph, W·pw] (the official einsum fhwpqrc->cfphqwr)."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")


def dequantize_scaled_fp8(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Scaled fp8 files (ComfyUI per-tensor `.scale_weight` / `.weight_scale`, or per-channel / block-wise scales
    as written by wan_core.runtime.fp8) -> `dtype` weights (the product is formed in fp32, rounded once)."""
    out = {}
    for key, value in sd.items():
        if key == "scaled_fp8" or key.endswith(_SCALE_SUFFIXES) or key.endswith(".scale_input"):
            continue
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        scale = next((sd[base + s] for s in _SCALE_SUFFIXES if base and base + s in sd), None)
        if scale is not None:
            value = (dequantize_weight(value, scale, dtype) if value.dim() == 2
                     else (value.float() * scale.float().reshape(())).to(dtype))
        out[key] = value
    return out


def is_scaled_fp8(sd: dict[str, torch.Tensor]) -> bool:
    return "scaled_fp8" in sd or any(k.endswith(_SCALE_SUFFIXES) for k in sd)


def checkpoint_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the weights were saved in (read from a cross-attention weight, as musubi does)."""
    for key in ("blocks.0.cross_attn.k.weight", "blocks.0.self_attn.q.weight"):
        if key in sd:
            return sd[key].dtype
    return next(v.dtype for v in sd.values() if v.is_floating_point())


def normalize_dit_keys(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Any supported DiT key layout (official, prefixed, diffusers) -> official names."""
    if DIT_DIFFUSERS_SENTINEL not in sd and any(k.endswith(DIT_DIFFUSERS_SENTINEL) for k in sd):
        sd = strip_prefix(sd, DIT_DIFFUSERS_SENTINEL, ("transformer.", "model.", "diffusion_model."))
    if DIT_DIFFUSERS_SENTINEL in sd:
        return rename(sd, DIT_DIFFUSERS, to_ours=True, what=f"DiT {name} (diffusers layout)")
    sd = strip_prefix(sd, "head.modulation")
    if "head.modulation" not in sd:
        sample = ", ".join(list(sd)[:3])
        raise ValueError(f"{name} is not a Wan2.1 DiT checkpoint: no 'head.modulation' key under any known prefix "
                         f"(first keys: {sample})")
    return sd


def dit_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a DiT file in any supported layout and return (official-named state dict, metadata)."""
    return normalize_dit_keys(load_state_dict(path), str(path)), read_metadata(path)


def load_dit(path: str | Path, task: str | None = None, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu", attn: str = "sdpa", config: DiTConfig | None = None,
             fp8: str | None = None) -> WanModel:
    """Load a Wan2.1 DiT from an official / ComfyUI / diffusers file (bf16, fp16, fp8, ComfyUI scaled fp8).

    The architecture comes from `config` if given, else from the file's `wantuner_config` metadata, else from the
    tensor shapes. An explicit `task` must agree with the weights (a ValueError names the key and both shapes).
    `dtype` is the compute dtype; it defaults to the checkpoint's dtype (bf16 for fp8 files).
    `fp8` (a `wan_core.runtime.fp8.FP8_MODES` name) stores the block Linear weights in fp8; pre-quantised files keep
    their
    stored fp8 weights and scales. Without `fp8`, fp8 files are dequantised to `dtype`. To merge LoRAs, load
    without `fp8`, merge, then call `wan_core.runtime.fp8.apply_fp8`.
    """
    backend = resolve_backend(attn).value  # fail before reading gigabytes
    sd, metadata = dit_state_dict(path)
    source_dtype = checkpoint_dtype(sd)
    if dtype is None:
        dtype = torch.bfloat16 if source_dtype in FP8_DTYPES else source_dtype
    if fp8 is not None:
        get_fp8_mode(fp8)
        sd = drop_fp8_markers(sd)
    elif is_scaled_fp8(sd):
        sd = dequantize_scaled_fp8(sd, dtype)
    if config is None:
        config = stored_config(metadata, DiTConfig, f"DiT {Path(path).name}")
    if task is not None:
        if config is None:
            check_task(task, sd)
        else:
            check_task_family(task, config)
    cfg = config or detect_config(sd)
    if fp8 is not None:
        model = build_fp8_dit(cfg, sd, fp8, dtype, what=f"DiT {Path(path).name}")
    else:
        model = build_on_meta(lambda: WanModel(cfg))
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        load_into(model, sd, what=f"DiT {Path(path).name}")
    model.set_attention_backend(backend)
    logger.info("loaded DiT %s: %s, %d layers, dim %d, %s", Path(path).name, cfg.model_type, cfg.num_layers,
                cfg.dim, dtype)
    return model.to(device).eval().requires_grad_(False)


def check_task_family(task: str, cfg: DiTConfig) -> None:
    """A model with its own (non-preset) config still has to be of the task's kind: same type and inputs."""
    want = get_task(task).dit
    if (want.model_type, want.in_dim) != (cfg.model_type, cfg.in_dim):
        fits = [n for n, t in TASKS.items() if (t.dit.model_type, t.dit.in_dim) == (cfg.model_type, cfg.in_dim)]
        raise ValueError(f"task {task!r} needs a {want.model_type} model with {want.in_dim} input channels, but the "
                         f"checkpoint is a {cfg.model_type} model with {cfg.in_dim} (patch_embedding.weight); "
                         f"tasks that fit: {', '.join(fits) or 'none'}")


def check_task(task: str, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the offending key, both shapes and the task that would fit."""
    preset = get_task(task)
    expected = WanModel.expected_shapes(preset.dit)
    for key, shape in expected.items():
        if key not in sd:
            if key.startswith("blocks.") and not key.startswith("blocks.0."):
                continue  # block-count mismatch is reported through the last-block key below
            break_msg = f"key {key!r} (shape {list(shape)}) is missing from the checkpoint"
            raise ValueError(f"checkpoint does not fit task {task!r}: {break_msg}; {_fitting_hint(sd)}")
        got = tuple(sd[key].shape)
        if got != shape:
            raise ValueError(
                f"checkpoint does not fit task {task!r}: {key!r} has shape {list(got)} but {task} expects "
                f"{list(shape)}; {_fitting_hint(sd)}"
            )
    extra = sorted(k for k in sd if k not in expected and not k.endswith(("scale_weight", "weight_scale")))
    if extra:
        raise ValueError(f"checkpoint does not fit task {task!r}: unexpected key {extra[0]!r} "
                         f"(shape {list(sd[extra[0]].shape)}); {_fitting_hint(sd)}")


def _fitting_hint(sd: Mapping[str, torch.Tensor]) -> str:
    try:
        fits = tasks_matching(detect_config(sd))
    except ValueError as exc:
        return f"and no task fits ({exc})"
    return f"the weights fit task {' / '.join(fits)}" if fits else "the weights match no known task"


def build_fp8_dit(cfg: DiTConfig, sd: Mapping[str, torch.Tensor], mode: str | FP8Mode,
                  compute_dtype: torch.dtype, what: str = "DiT") -> WanModel:
    """A WanModel with fp8 target layers straight from a state dict (bf16/fp16/fp8/scaled_fp8): the loader path
    of `load_dit(..., fp8=mode)`; never materialises a bf16 copy of pre-quantised weights."""
    quantized = quantize_state_dict(sd, mode, compute_dtype)
    model = build_on_meta(lambda: WanModel(cfg))
    convert_to_fp8_modules(model, quantized, mode, compute_dtype)
    load_into(model, quantized, what=what)
    n_fp8 = sum(isinstance(m, FP8Linear) for m in model.modules())
    logger.info("%s: %d fp8 Linear layers (%s), weights %.2f GB", what, n_fp8, get_fp8_mode(mode).name,
                weight_bytes(model) / 1e9)
    return model
