"""The Wan causal 3-D VAEs (official `WanVAE_` semantics and state-dict names) and their user-facing wrapper.

The Wan2.2 VAE (`config.WAN22_VAE`: z 48, stride 4x16x16) is the same causal design with a 2x2 pixel patchify
around it, residual levels (AvgDown3D / DupUp3D shortcuts) and its own latent mean/std; the text below describes
Wan2.1's numbers (stride 4x8x8, 16 channels).

Video is [B, 3, T, H, W] in [-1, 1] with T = 4n + 1; latents are
[B, 16, (T - 1) // 4 + 1, H / 8, W / 8], normalised with the official per-channel mean/std.

Processing is chunked and causal exactly as in the official code: the encoder sees frame 0 alone and then chunks
of 4 frames, the decoder one latent frame at a time. Every causal convolution keeps the last `CACHE_T` frames of
its input in a `FeatureCache`, so the working set is one chunk whatever the video length; results are written
into a preallocated output, which is the only thing that grows with the frame count.

`WanVAE` options:
- `cache_device`: where the causal cache lives (e.g. "cpu" while computing on a GPU = musubi's --vae_cache_cpu).
- `tiling`: spatial tiles of `tile_size` pixels overlapping by `tile_overlap` pixels, each run through all frames
  with its own cache and blended linearly across the overlaps. `"auto"` (default) tiles frames of at least
  720 x 1280 pixels (`AUTO_TILE_PIXELS`), i.e. 720p and above; smaller frames are processed whole.
- `output_device`: where the result is assembled (default: the compute device).
The compute dtype is the dtype of the module (fp32 by default, as the official pipeline; bf16/fp16 allowed).
Outputs are always float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from wan_core.loading.checkpoint import CheckpointError, build_on_meta, load_into, load_state_dict, read_metadata
from wan_core.loading.convert import rename, vae22_diffusers_rules, vae_diffusers_rules
from wan_core.models.config import VAEConfig, stored_config
from wan_core.runtime.devices import same_device

logger = logging.getLogger(__name__)

# Official latent normalisation constants (wan/modules/vae.py WanVAE.__init__; = diffusers latents_mean/std).
VAE_MEAN: tuple[float, ...] = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
VAE_STD: tuple[float, ...] = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# The Wan2.2 VAE's (official Wan2_2_VAE.__init__; = diffusers latents_mean/std of the TI2V-5B VAE).
VAE22_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
VAE22_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)

CACHE_T = 2  # frames each causal conv carries over from the previous chunk
TIME_STRIDE = 4
SPACE_STRIDE = 8  # the Wan2.1 VAE's; a VAE's own stride is VAEConfig.space_stride (16 for Wan2.2)
AUTO_TILE_PIXELS = 720 * 1280  # tiling="auto" tiles frames with at least this many pixels
DEFAULT_TILE_SIZE = 512
DEFAULT_TILE_OVERLAP = 64

OFFICIAL_SENTINEL = "decoder.middle.0.residual.0.gamma"  # ComfyUI's Wan VAE marker
DIFFUSERS_SENTINEL = "decoder.conv_in.weight"  # = convert.VAE_DIFFUSERS_SENTINEL
WAN22_SENTINEL = "decoder.upsamples.0.upsamples.0.residual.2.weight"  # the 48-channel Wan2.2 VAE

Progress = Callable[[int, int], None]  # progress(chunks_done, chunks_total)
Tiling = bool | Literal["auto"]


def latent_stats(z_dim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The official per-channel latent (mean, std) of the VAE with `z_dim` channels (16: Wan2.1, 48: Wan2.2)."""
    stats = {len(VAE_MEAN): (VAE_MEAN, VAE_STD), len(VAE22_MEAN): (VAE22_MEAN, VAE22_STD)}
    if z_dim not in stats:
        raise ValueError(f"no latent normalisation for a VAE with z_dim {z_dim}; expected 16 (Wan2.1) or 48 (Wan2.2)")
    return stats[z_dim]


# ----------------------------------------------------------------------------------------------------------------
# Frame-count helpers
# ----------------------------------------------------------------------------------------------------------------


def _valid_frame_hint(num_frames: int) -> str:
    below = (num_frames - 1) // TIME_STRIDE * TIME_STRIDE + 1
    options = [n for n in (below, below + TIME_STRIDE) if n >= 1]
    return " or ".join(str(n) for n in options)


def latent_frames(num_frames: int) -> int:
    """Pixel frames (4n + 1) -> latent frames (n + 1)."""
    if num_frames < 1 or (num_frames - 1) % TIME_STRIDE:
        raise ValueError(f"got {num_frames} frames, but the Wan VAE needs 4n+1 frames (1, 5, 9, ..., 81); "
                         f"nearest valid: {_valid_frame_hint(max(num_frames, 1))}")
    return (num_frames - 1) // TIME_STRIDE + 1


def pixel_frames(latent_frames: int) -> int:
    """Latent frames F -> the 1 + 4 (F - 1) pixel frames they decode to."""
    if latent_frames < 1:
        raise ValueError(f"got {latent_frames} latent frames; at least 1 is needed")
    return 1 + TIME_STRIDE * (latent_frames - 1)


# ----------------------------------------------------------------------------------------------------------------
# Causal feature cache
# ----------------------------------------------------------------------------------------------------------------

_FIRST_CHUNK = "first-chunk"  # time upsampler marker: it has seen only the first chunk (official "Rep")
Slot = torch.Tensor | str | None


class FeatureCache:
    """Causal state of one encode or decode pass over one tile.

    Slots are claimed in call order, once per chunk (`next_chunk` rewinds the cursor), exactly as the official
    `feat_cache` list indexed by `feat_idx`. Tensors are stored on `device` (None: where they were computed) and
    moved back to the compute device when used.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        self._slots: list[Slot] = []
        self._cursor = 0

    def next_chunk(self) -> None:
        self._cursor = 0

    @property
    def is_fresh(self) -> bool:
        """True before the first chunk has used the cache."""
        return not self._slots

    def take(self) -> tuple[int, Slot]:
        index = self._cursor
        self._cursor += 1
        if index == len(self._slots):
            self._slots.append(None)
        return index, self._slots[index]

    def put(self, index: int, value: Slot, *, fresh: bool = False) -> None:
        """Store `value`; a view into a chunk (not `fresh`) is copied so the chunk itself can be freed."""
        if isinstance(value, torch.Tensor):
            target = self.device or value.device
            value = value.to(target) if not same_device(value.device, target) else (value if fresh else value.clone())
        self._slots[index] = value

    def tensors(self) -> list[torch.Tensor]:
        return [s for s in self._slots if isinstance(s, torch.Tensor)]


def _past(slot: Slot, like: torch.Tensor) -> torch.Tensor | None:
    return slot.to(like.device) if isinstance(slot, torch.Tensor) else None


def _cached_frames(slot: Slot, like: torch.Tensor) -> torch.Tensor:
    """The frames a slot holds (only called where an earlier chunk stored frames)."""
    if not isinstance(slot, torch.Tensor):
        raise RuntimeError(f"feature cache slot holds {slot!r} where cached frames were expected")
    return slot.to(like.device)


# ----------------------------------------------------------------------------------------------------------------
# Layers (official names: residual.{0,2,3,6}, shortcut, norm/to_qkv/proj, resample.1, time_conv, head.{0,2})
# ----------------------------------------------------------------------------------------------------------------


def _inplace() -> bool:
    return not torch.is_grad_enabled()  # in-place saves memory; autograd needs the out-of-place form


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=_inplace())


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time on the left only (2 p frames), so output frame t sees input frames <= t.

    Frames cached from the previous chunk (`past`) replace that many of the zero frames.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        time_pad = self.time_pad
        if past is not None and time_pad > 0:
            x = torch.cat([past.to(x.device), x], dim=2)
            time_pad -= past.shape[2]
        if time_pad or any(self.space_pad):
            x = F.pad(x, (*self.space_pad, time_pad, 0))
        return super().forward(x)


def cached_conv(conv: CausalConv3d, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    """Run `conv` on a chunk using, then replacing, its cached frames (the last CACHE_T frames of its input)."""
    index, slot = cache.take()
    past = _past(slot, x)
    keep, fresh = x[:, :, -CACHE_T:], False
    if keep.shape[2] < CACHE_T and past is not None:  # a 1-frame chunk: carry the previous chunk's last frame
        keep, fresh = torch.cat([past[:, :, -1:], keep], dim=2), True
    out = conv(x, past)
    cache.put(index, keep, fresh=fresh)
    return out


class RMSNorm(nn.Module):
    """F.normalize over channels x sqrt(dim) x gamma (official RMS_norm without bias); fp32 math for half inputs."""

    def __init__(self, dim: int, images: bool) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            y = F.normalize(x.float(), dim=1).to(x.dtype)
        else:
            y = F.normalize(x, dim=1)
        if _inplace():
            return y.mul_(self.scale).mul_(self.gamma)
        return y * self.scale * self.gamma


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D op to every frame: [B, C, T, H, W] -> [B*T, C, H, W] -> fn -> [B, C', T, H', W']."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Upsample2x(nn.Module):
    """Nearest-exact x2 in H and W, computed in float32 (as the official bf16 fix)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").to(x.dtype)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, dropout, conv2 = self.residual
        skip = x if self.shortcut is None else self.shortcut(x)
        h = cached_conv(cast(CausalConv3d, conv1), _silu(norm1(x)), cache)
        h = cached_conv(cast(CausalConv3d, conv2), dropout(_silu(norm2(h))), cache)
        return h.add_(skip) if _inplace() else h + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no causal state)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(2, 3).contiguous()  # [N, 1, HW, 3C]
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [N, 1, HW, C]
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        return _per_frame(self._attend, x) + x  # operand order fixes the output memory layout (as official)


class Resample(nn.Module):
    """x2 spatial up/down-sampling per frame; the 3d modes also double (up) or halve (down) the frame rate."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, up_dim: int | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown Resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode.startswith("up"):  # Wan2.1 halves the channels when upsampling; Wan2.2 keeps them (up_dim)
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, up_dim or dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        index, slot = cache.take()
        if slot is None:  # the first chunk passes through: latent frame 0 becomes a single frame
            cache.put(index, _FIRST_CHUNK)
            return x
        keep, fresh = x[:, :, -CACHE_T:], False
        if keep.shape[2] < CACHE_T:
            before = torch.zeros_like(keep) if isinstance(slot, str) else slot.to(x.device)[:, :, -1:]
            keep, fresh = torch.cat([before, keep], dim=2), True
        y = self.time_conv(x, _past(slot, x))  # after the first chunk the conv still pads with zeros (official)
        cache.put(index, keep, fresh=fresh)
        b, c2, t, h, w = y.shape  # [B, 2C, T, H, W] -> [B, C, 2T, H, W]: frame 2t from the first half of channels
        return y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

    def _halve_frames(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        index, slot = cache.take()
        if slot is None:  # the first (1-frame) chunk is not downsampled in time
            cache.put(index, x[:, :, -1:])
            return x
        y = self.time_conv(torch.cat([_cached_frames(slot, x)[:, :, -1:], x], dim=2))
        cache.put(index, x[:, :, -1:])
        return y


def avg_down(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """Wan2.2's AvgDown3D shortcut: space-to-channel by (factor_t, factor_s, factor_s), then the mean over groups
    of consecutive channels down to `out_dim`. Time is zero-padded at the front to a multiple of factor_t."""
    pad_t = -x.shape[2] % factor_t
    if pad_t:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    b, c, t, h, w = x.shape
    t, h, w = t // factor_t, h // factor_s, w // factor_s
    x = x.view(b, c, t, factor_t, h, factor_s, w, factor_s).permute(0, 1, 3, 5, 7, 2, 4, 6).contiguous()
    factor = factor_t * factor_s * factor_s
    return x.view(b, out_dim, c * factor // out_dim, t, h, w).mean(dim=2)


def dup_up(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool) -> torch.Tensor:
    """Wan2.2's DupUp3D shortcut (inverse layout of `avg_down`): every channel repeated, then channel-to-space by
    (factor_t, factor_s, factor_s). On the first chunk only the last of the factor_t frames is kept."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_dim * factor_t * factor_s * factor_s // c, dim=1)
    x = x.view(b, out_dim, factor_t, factor_s, factor_s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).contiguous()
    x = x.view(b, out_dim, t * factor_t, h * factor_s, w * factor_s)
    return x[:, :, factor_t - 1 :] if first_chunk else x


class DownResidualBlock(nn.Module):
    """One Wan2.2 encoder level: residual blocks (+ Resample) in `downsamples`, plus the AvgDown3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.factor_t, self.factor_s = (2 if temporal else 1), (2 if down else 1)
        if (in_dim * self.factor_t * self.factor_s**2) % out_dim:
            raise ValueError(f"AvgDown3D: {in_dim} channels x factor {self.factor_t * self.factor_s**2} is not "
                             f"divisible by {out_dim}")
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim)
                                   for i in range(num_res_blocks)]
        if down:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        skip = avg_down(x, self.out_dim, self.factor_t, self.factor_s)
        for block in self.downsamples:
            x = block(x, cache)
        return x.add_(skip) if _inplace() else x + skip


class UpResidualBlock(nn.Module):
    """One Wan2.2 decoder level: residual blocks (+ Resample) in `upsamples`, plus the DupUp3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.out_dim, self.up = out_dim, up
        self.factor_t = 2 if temporal else 1
        if up and (out_dim * self.factor_t * 4) % in_dim:
            raise ValueError(f"DupUp3D: {out_dim} channels x factor {self.factor_t * 4} is not divisible by {in_dim}")
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim)
                                   for i in range(num_res_blocks + 1)]
        if up:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", up_dim=out_dim))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        skip = dup_up(x, self.out_dim, self.factor_t, 2, first_chunk) if self.up else None
        for block in self.upsamples:
            x = block(x, cache)
        if skip is None:
            return x
        return x.add_(skip) if _inplace() else x + skip


Block = ResidualBlock | AttentionBlock | Resample


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(cfg.pixel_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0
        last = len(cfg.dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if cfg.is_residual:
                temporal = level < last and cfg.temperal_downsample[level]
                blocks.append(DownResidualBlock(in_dim, out_dim, cfg.num_res_blocks, temporal, level < last))
                continue
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[level] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.ModuleList(blocks)
        top = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top)])
        self.head = nn.Sequential(RMSNorm(top, images=False), nn.SiLU(),
                                  CausalConv3d(top, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """[B, 3 p^2, T, H/p, W/p] (T = 1 or 4) -> [B, 2 z_dim, 1, H/s, W/s] (p = patch_size, s = space stride)."""
        x = cached_conv(self.conv1, x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return cached_conv(cast(CausalConv3d, self.head[2]), _silu(self.head[0](x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        base = cfg.decoder_dim
        top = base * cfg.dim_mult[-1]
        dims = [top, *(base * m for m in reversed(cfg.dim_mult))]
        time_up = tuple(reversed(cfg.temperal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, top, 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top)])
        blocks: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(cfg.dim_mult) - 2)
        last = len(cfg.dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if cfg.is_residual:
                temporal = level < last and time_up[level]
                blocks.append(UpResidualBlock(in_dim, out_dim, cfg.num_res_blocks, temporal, level < last))
                continue
            if level > 0:
                in_dim //= 2  # the previous level's upsampler halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if time_up[level] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.ModuleList(blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], cfg.pixel_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool = False) -> torch.Tensor:
        """[B, z_dim, 1, h, w] -> [B, 3 p^2, 1 (first chunk) or 4, h s/p, w s/p] (p = patch_size, s = stride)."""
        x = cached_conv(self.conv1, x, cache)
        for block in self.middle:
            x = block(x, cache)
        for block in self.upsamples:
            x = block(x, cache, first_chunk) if isinstance(block, UpResidualBlock) else block(x, cache)
        return cached_conv(cast(CausalConv3d, self.head[2]), _silu(self.head[0](x)), cache)


class WanVAEModel(nn.Module):
    """The official `WanVAE_` module: encoder, conv1 (-> mu, logvar), conv2, decoder. Inference only."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if len(config.temperal_downsample) != len(config.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(config.dim_mult) - 1} entries for dim_mult "
                             f"{config.dim_mult}, got {config.temperal_downsample}")
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)

    def encode_chunk(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """One RGB chunk (frame 0 alone, then 4 frames) -> mu [B, z_dim, 1, H/s, W/s] (unnormalised)."""
        cache.next_chunk()
        x = patchify(x, self.config.patch_size)
        return self.conv1(self.encoder(x, cache))[:, : self.config.z_dim]

    def decode_chunk(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """One latent frame, already through conv2 -> 1 (first) or 4 RGB frames, unclamped.

        The first chunk is the one decoded with a fresh cache."""
        first_chunk = cache.is_fresh
        cache.next_chunk()
        return unpatchify(self.decoder(x, cache, first_chunk), self.config.patch_size)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C p^2, T, H/p, W/p]; channel index c p^2 + (column offset) p + (row offset)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5).contiguous()
    return x.view(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `patchify`."""
    if p == 1:
        return x
    b, cp, t, h, w = x.shape
    x = x.view(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2).contiguous()
    return x.view(b, cp // (p * p), t, h * p, w * p)


# ----------------------------------------------------------------------------------------------------------------
# Spatial tiles
# ----------------------------------------------------------------------------------------------------------------


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover [0, length) with tiles of `tile` cells overlapping by at least `overlap`, spread evenly."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return [(s, s + tile) for s in starts]


def _ramp(spans: list[tuple[int, int]], i: int, scale: int) -> torch.Tensor:
    """1-D blend weights of span i (in units of `scale` cells): linear ramps across the overlaps with its
    neighbours, 1 elsewhere; never 0, so the weighted average is defined everywhere."""
    start, end = spans[i]
    n = (end - start) * scale
    pos = torch.arange(n, dtype=torch.float32)
    w = torch.ones(n)
    if i > 0:
        left = (spans[i - 1][1] - start) * scale
        w = w * torch.clamp((pos + 1) / (left + 1), max=1.0)
    if i < len(spans) - 1:
        right = (end - spans[i + 1][0]) * scale
        w = w * torch.clamp((n - pos) / (right + 1), max=1.0)
    return w


@dataclass(frozen=True)
class Tile:
    """A spatial tile in latent cells; pixel coordinates are 8x these."""

    y0: int
    y1: int
    x0: int
    x1: int
    weight_y: torch.Tensor  # blend weights at the resolution the tile is written at
    weight_x: torch.Tensor

    def weight(self) -> torch.Tensor:
        return self.weight_y[:, None] * self.weight_x[None, :]


def make_tiles(h: int, w: int, tile: int, overlap: int, scale: int) -> list[Tile]:
    """Tiles over an h x w latent grid; weights at `scale` x the latent resolution (1 = latents, 8 = pixels)."""
    rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    return [Tile(*rows[i], *cols[j], _ramp(rows, i, scale), _ramp(cols, j, scale))
            for i in range(len(rows)) for j in range(len(cols))]


# ----------------------------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------------------------


class WanVAE:
    """Wan2.1 VAE: `encode(video) -> normalized latents`, `decode(latents) -> video`, chunked and causal.

    Inference only (runs under no_grad). See the module docstring for `cache_device`, `tiling`, `tile_size`,
    `tile_overlap` (pixels) and `output_device`; each may also be changed on the instance between calls.
    """

    def __init__(self, model: WanVAEModel, *, cache_device: torch.device | str | None = None,
                 tiling: Tiling = "auto", tile_size: int = DEFAULT_TILE_SIZE,
                 tile_overlap: int = DEFAULT_TILE_OVERLAP, output_device: torch.device | str | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.config: VAEConfig = model.config
        self.cache_device = cache_device
        self.tiling = tiling
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.output_device = output_device
        self._check_tiling()

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def space_stride(self) -> int:
        """Pixels per latent cell along H and W (s: 8 for Wan2.1, 16 for Wan2.2)."""
        return self.config.space_stride

    @property
    def out_device(self) -> torch.device:
        """Where results are assembled: `output_device`, else the compute device."""
        return torch.device(self.output_device) if self.output_device is not None else self.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WanVAE:
        self.model.to(device=device, dtype=dtype)
        return self

    # -- options ----------------------------------------------------------------------------------------------
    def _check_tiling(self) -> None:
        if self.tiling not in (True, False, "auto"):
            raise ValueError(f"tiling must be True, False or 'auto', got {self.tiling!r}")
        size, overlap, stride = self.tile_size, self.tile_overlap, self.space_stride
        if size % self.space_stride or size < 8 * self.space_stride:
            raise ValueError(f"tile_size must be a multiple of {stride} pixels and at least {8 * stride}, got {size}")
        if overlap % self.space_stride or not 0 <= overlap <= size // 2:
            raise ValueError(f"tile_overlap must be a multiple of {stride} pixels between 0 and tile_size/2 "
                             f"({size // 2}), got {overlap}")

    def uses_tiling(self, height: int, width: int) -> bool:
        """Whether a frame of height x width pixels is processed in tiles under the current settings."""
        if self.tiling == "auto":
            return height * width >= AUTO_TILE_PIXELS
        return bool(self.tiling)

    def tiles(self, height: int, width: int, scale: int | None = None) -> list[Tile]:
        """The tile grid for a height x width pixel frame (one tile when tiling is off or the frame fits); weights
        at `scale` x the latent resolution (default: pixels)."""
        self._check_tiling()
        scale = self.space_stride if scale is None else scale
        h, w = height // self.space_stride, width // self.space_stride
        if not self.uses_tiling(height, width):
            return make_tiles(h, w, max(h, w), 0, scale)
        return make_tiles(h, w, self.tile_size // self.space_stride, self.tile_overlap // self.space_stride, scale)

    # -- normalisation ----------------------------------------------------------------------------------------
    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean_values, std_values = latent_stats(self.z_dim)
        mean = torch.tensor(mean_values, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(std_values, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        return mean, inv_std

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw encoder mean -> normalized latents, (mu - mean) * (1 / std) in fp32 as the official wrapper."""
        mean, inv_std = self._stats(mu.device)
        return (mu.float() - mean) * inv_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._stats(z.device)
        return z.float() / inv_std + mean

    # -- encode -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 4n+1, H and W multiples of s -> [B, z_dim, n+1, H/s, W/s] float32."""
        b, frames, height, width = self._check_video(video)
        n, h, w = latent_frames(frames), height // self.space_stride, width // self.space_stride
        out_device = self.out_device
        tiles = self.tiles(height, width, scale=1)
        chunks = [(0, 1), *((1 + TIME_STRIDE * i, 1 + TIME_STRIDE * (i + 1)) for i in range(n - 1))]
        counter = _Counter(progress, len(tiles) * len(chunks))
        if len(tiles) == 1:
            out = torch.empty(b, self.z_dim, n, h, w, device=out_device)
            for i, mu in enumerate(self._encode_tile(video, chunks, counter)):
                out[:, :, i : i + 1] = mu
            return out
        out = torch.zeros(b, self.z_dim, n, h, w, device=out_device)
        weights = torch.zeros(h, w, device=out_device)
        for tile in tiles:
            y0, y1, x0, x1 = (v * self.space_stride for v in (tile.y0, tile.y1, tile.x0, tile.x1))
            wt = tile.weight().to(out_device)
            for i, mu in enumerate(self._encode_tile(video[..., y0:y1, x0:x1], chunks, counter)):
                out[:, :, i : i + 1, tile.y0 : tile.y1, tile.x0 : tile.x1] += mu * wt
            weights[tile.y0 : tile.y1, tile.x0 : tile.x1] += wt
        return out.div_(weights)

    def _encode_tile(self, video: torch.Tensor, chunks: list[tuple[int, int]],
                     counter: _Counter) -> Iterator[torch.Tensor]:
        cache = FeatureCache(self.cache_device)
        out_device = self.out_device
        for t0, t1 in chunks:
            x = video[:, :, t0:t1].to(device=self.device, dtype=self.dtype)
            yield self.normalize(self.model.encode_chunk(x, cache)).to(out_device)
            counter.step()

    def _check_video(self, video: torch.Tensor) -> tuple[int, int, int, int]:
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            shape = list(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a tensor [B, 3, T, H, W] in [-1, 1], got {shape}")
        b, c, frames, height, width = video.shape
        if c != 3:
            raise ValueError(f"video must have 3 (RGB) channels in dim 1 ([B, 3, T, H, W]), got shape "
                             f"{list(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"video must be a floating-point tensor in [-1, 1], got {video.dtype}")
        bad = [(name, v) for name, v in (("height", height), ("width", width)) if v % self.space_stride or v == 0]
        if bad:
            hints = "; ".join(f"{name} {v} -> {_size_hint(v, self.space_stride)}" for name, v in bad)
            raise ValueError(f"video height and width must be positive multiples of {self.space_stride}, got "
                             f"{height}x{width} ({hints})")
        latent_frames(frames)
        return b, frames, height, width

    # -- decode -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Normalized latents [B, z_dim, F, h, w] -> video [B, 3, 1 + 4(F-1), s h, s w] in [-1, 1], float32."""
        b, n, h, w = self._check_latents(z)
        out_device = self.out_device
        shape = (b, 3, pixel_frames(n), h * self.space_stride, w * self.space_stride)
        tiles = self.tiles(h * self.space_stride, w * self.space_stride, scale=self.space_stride)
        counter = _Counter(progress, len(tiles) * n)
        if len(tiles) == 1:
            out = torch.empty(shape, device=out_device)
            for t0, frames in self._decode_tile(z, counter):
                out[:, :, t0 : t0 + frames.shape[2]] = frames
            return out.clamp_(-1.0, 1.0)
        out = torch.zeros(shape, device=out_device)
        weights = torch.zeros(shape[-2:], device=out_device)
        for tile in tiles:
            y0, y1, x0, x1 = (v * self.space_stride for v in (tile.y0, tile.y1, tile.x0, tile.x1))
            wt = tile.weight().to(out_device)
            for t0, frames in self._decode_tile(z[..., tile.y0 : tile.y1, tile.x0 : tile.x1], counter):
                out[:, :, t0 : t0 + frames.shape[2], y0:y1, x0:x1] += frames.clamp_(-1.0, 1.0) * wt
            weights[y0:y1, x0:x1] += wt
        return out.div_(weights).clamp_(-1.0, 1.0)

    def _decode_tile(self, z: torch.Tensor, counter: _Counter) -> Iterator[tuple[int, torch.Tensor]]:
        out_device = self.out_device
        x = self.model.conv2(self.denormalize(z.to(self.device)).to(self.dtype))
        cache = FeatureCache(self.cache_device)
        for i in range(x.shape[2]):
            frames = self.model.decode_chunk(x[:, :, i : i + 1], cache)
            yield (0 if i == 0 else 1 + TIME_STRIDE * (i - 1)), frames.to(device=out_device, dtype=torch.float32)
            counter.step()

    def _check_latents(self, z: torch.Tensor) -> tuple[int, int, int, int]:
        if not isinstance(z, torch.Tensor) or z.dim() != 5:
            shape = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latents must be a tensor [B, {self.z_dim}, F, h, w], got {shape}")
        b, c, n, h, w = z.shape
        if c != self.z_dim:
            raise ValueError(f"latents must have {self.z_dim} channels (z_dim of this VAE) in dim 1, got shape "
                             f"{list(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"latents must be a floating-point tensor, got {z.dtype}")
        if n < 1 or h < 1 or w < 1:
            raise ValueError(f"latents must have at least one frame and a non-empty frame, got shape {list(z.shape)}")
        return b, n, h, w


def _size_hint(v: int, stride: int) -> str:
    below = v // stride * stride
    return " or ".join(str(s) for s in (below, below + stride) if s > 0)


class _Counter:
    def __init__(self, callback: Progress | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def step(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _strip_to(sd: Mapping[str, torch.Tensor], sentinel: str) -> dict[str, torch.Tensor] | None:
    """Keep the keys under the (shortest) prefix that holds `sentinel`, without that prefix; None if absent."""
    prefixes = sorted((k[: -len(sentinel)] for k in sd if k.endswith(sentinel)), key=len)
    if not prefixes:
        return None
    p = prefixes[0]
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def _diffusers_to_official(sd: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    levels = {int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks.")}
    resnets = {int(k.split(".")[4]) for k in sd if k.startswith("decoder.up_blocks.0.resnets.")}
    if not levels or not resnets:
        raise CheckpointError(f"{what}: diffusers-style VAE without decoder.up_blocks.*.resnets.* keys")
    if any(k.startswith("encoder.down_blocks.0.resnets.") for k in sd):  # Wan2.2: residual down blocks
        rules = vae22_diffusers_rules(len(resnets) - 1, len(levels))
    else:
        rules = vae_diffusers_rules(len(resnets) - 1, len(levels))
    return rename(sd, rules, to_ours=True, what=what)


def official_vae_state_dict(sd: Mapping[str, torch.Tensor], what: str = "VAE") -> dict[str, torch.Tensor]:
    """Any supported layout (official / ComfyUI, prefixed or not; diffusers AutoencoderKLWan) -> official names."""
    diffusers = _strip_to(sd, DIFFUSERS_SENTINEL)
    if diffusers is not None:
        return _diffusers_to_official(diffusers, f"{what} (diffusers layout)")
    official = _strip_to(sd, OFFICIAL_SENTINEL)
    if official is None:
        sample = ", ".join(list(sd)[:3]) or "none"
        raise CheckpointError(f"{what} is not a Wan2.1 VAE checkpoint: no {OFFICIAL_SENTINEL!r} (official/ComfyUI) "
                              f"or {DIFFUSERS_SENTINEL!r} (diffusers) key under any prefix (first keys: {sample})")
    return official


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"cannot detect the VAE configuration: key {key!r} is missing")
    return tuple(sd[key].shape)


def _residual_levels(sd: Mapping[str, torch.Tensor]) -> tuple[list[list[int]], list[bool]]:
    """Wan2.2 layout: per encoder level, the residual blocks' output channels and (between levels) whether its
    Resample downsamples in time."""
    levels: list[list[int]] = []
    temporal: list[bool] = []
    for level in sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")}):
        p = f"encoder.downsamples.{level}.downsamples."
        blocks = sorted({int(k[len(p):].split(".")[0]) for k in sd if k.startswith(p)})
        levels.append([sd[f"{p}{i}.residual.2.weight"].shape[0] for i in blocks if f"{p}{i}.residual.2.weight" in sd])
        resample = [i for i in blocks if f"{p}{i}.resample.1.weight" in sd]
        if resample:
            temporal.append(f"{p}{resample[0]}.time_conv.weight" in sd)
    return levels, temporal


def _flat_levels(sd: Mapping[str, torch.Tensor]) -> tuple[list[list[int]], list[bool], set[int]]:
    """Wan2.1 layout (flat encoder.downsamples list): residual output channels per level, temporal flags, and the
    levels holding attention."""
    indices = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    attn_levels: set[int] = set()
    for i in indices:
        p = f"encoder.downsamples.{i}."
        if p + "residual.2.weight" in sd:
            levels[-1].append(sd[p + "residual.2.weight"].shape[0])
        elif p + "to_qkv.weight" in sd:
            attn_levels.add(len(levels) - 1)
        elif p + "resample.1.weight" in sd:
            temporal.append(p + "time_conv.weight" in sd)
            levels.append([])
        else:
            raise ValueError(f"cannot detect the VAE configuration: encoder.downsamples.{i} is not a known block")
    return levels, temporal, attn_levels


def detect_vae_config(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    """Infer a `VAEConfig` from a state dict with official names (prefix stripped).

    dim = encoder.conv1 output channels (also = decoder.head.0.gamma length x dim_mult[0]); z_dim = conv2 channels
    (encoder.head.2 outputs 2 z_dim); the flat encoder.downsamples list gives, per level, the residual blocks (their
    output channels / dim = dim_mult), an attention block if any (attn_scales) and a Resample between levels, whose
    time_conv marks temporal downsampling. The real Wan2.1 VAE gives dim 96, z 16, (1, 2, 4, 4), 2, (), (F, T, T).
    """
    dim = _shape(sd, "encoder.conv1.weight")[0]
    z_dim = _shape(sd, "conv2.weight")[0]
    if _shape(sd, "encoder.head.2.weight")[0] != 2 * z_dim:
        raise ValueError(f"inconsistent VAE: encoder.head.2 outputs {_shape(sd, 'encoder.head.2.weight')[0]} "
                         f"channels but conv2 has z_dim {z_dim} (expected {2 * z_dim})")
    is_residual = WAN22_SENTINEL in sd
    attn_levels: set[int]
    if is_residual:
        (levels, temporal), attn_levels = _residual_levels(sd), set()
    else:
        levels, temporal, attn_levels = _flat_levels(sd)
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts or any(c % dim for level in levels for c in level):
        raise ValueError(f"cannot detect the VAE configuration: irregular encoder levels {levels} for dim {dim}")
    dim_mult = tuple(level[0] // dim for level in levels)
    head = _shape(sd, "decoder.head.0.gamma")[0]
    if head % dim_mult[0] or (not is_residual and head != dim * dim_mult[0]):
        raise ValueError(f"inconsistent VAE: decoder.head.0.gamma has {head} channels, expected {dim * dim_mult[0]}")
    pixel_channels = _shape(sd, "encoder.conv1.weight")[1]
    patch_size = math.isqrt(pixel_channels // 3)
    if 3 * patch_size**2 != pixel_channels:
        raise ValueError(f"cannot detect the VAE configuration: encoder.conv1 takes {pixel_channels} channels, "
                         "expected 3 x patch_size^2")
    return VAEConfig(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=counts.pop(),
                     attn_scales=tuple(1.0 / 2**lvl for lvl in sorted(attn_levels)),
                     temperal_downsample=tuple(temporal), dec_dim=head // dim_mult[0], patch_size=patch_size,
                     is_residual=is_residual)


def load_vae(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             config: VAEConfig | None = None, *, cache_device: torch.device | str | None = None,
             tiling: Tiling = "auto", tile_size: int = DEFAULT_TILE_SIZE, tile_overlap: int = DEFAULT_TILE_OVERLAP,
             output_device: torch.device | str | None = None) -> WanVAE:
    """Load the Wan2.1 VAE from `Wan2.1_VAE.pth`, ComfyUI `wan_2.1_vae.safetensors` (any prefix, e.g.
    `first_stage_model.` / `vae.`) or a diffusers `AutoencoderKLWan` file; fp32/fp16/bf16 weights.

    The architecture comes from `config`, else the file's `wantuner_config` metadata, else the tensor shapes
    (`detect_vae_config`). `dtype` is the compute dtype (default float32, as the official pipeline). The other
    keywords are `WanVAE` options (see the module docstring).
    """
    name = Path(path).name
    sd = official_vae_state_dict(load_state_dict(path), what=f"VAE {name}")
    if config is None:
        config = stored_config(read_metadata(path), VAEConfig, name)
    cfg = config or detect_vae_config(sd)
    dtype = dtype or torch.float32
    model = build_on_meta(lambda: WanVAEModel(cfg))
    load_into(model, {k: v.to(dtype) for k, v in sd.items()}, what=f"VAE {name}")
    logger.info("loaded VAE %s: dim %d, z_dim %d, %s on %s", name, cfg.dim, cfg.z_dim, dtype, device)
    return WanVAE(model.to(device), cache_device=cache_device, tiling=tiling, tile_size=tile_size,
                  tile_overlap=tile_overlap, output_device=output_device)
