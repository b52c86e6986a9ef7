"""Frame and latent tensor layouts of host applications, converted to and from wan_core's, and latent previews.

Plain tensor functions (no host import). The host layouts are the ones ComfyUI uses (the node pack's `nodes/` does
no tensor math itself):
- frames: [N, H, W, 3] float in [0, 1]; a video is its frames stacked on N (ComfyUI's IMAGE).
- latents: [B, C, F, h, w] holding the Wan VAE's *raw* (un-normalised) encoder mean (ComfyUI's LATENT samples;
  C = 16 for the Wan2.1 VAE with 8 pixels per latent cell, 48 for the Wan2.2 VAE with 16;
  as its own Wan nodes and VAEEncode produce them; ComfyUI normalises per channel inside its sampler). wan_core's
  VAE and sampler work on normalised latents, so latents are converted at the boundary with `latent_to_comfy` /
  `latent_from_comfy`.
- previews: `LatentRGB`, a linear latent -> RGB map fitted to the VAE decoder, for step previews.
wan_core's layouts: images [3, H, W] / batches [N, 3, H, W] and videos [B, 3, T, H, W] in [-1, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from wan_core.models.config import WAN21_VAE, WAN22_VAE
from wan_core.models.vae import SPACE_STRIDE, TIME_STRIDE, latent_stats, pixel_frames

if TYPE_CHECKING:
    from wan_core.models.config import WAN21_VAE, WAN22_VAE
from wan_core.models.vae import WanVAE

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Frames [N, H, W, 3] in [0, 1] <-> wan_core images and videos
# ----------------------------------------------------------------------------------------------------------------


def _check_image(images: object, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (3, 4):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a ComfyUI IMAGE [N, H, W, 3] with values in [0, 1], got {shape}")
    if images.shape[0] < 1:
        raise ValueError(f"{what} holds no image (batch size 0)")
    return images[..., :3]  # an alpha channel (RGBA loaders) is dropped


def check_image_frames(images: object, what: str = "images") -> torch.Tensor:
    """An IMAGE batch as frames [T, H, W, 3] float in [0, 1] (alpha dropped), with a clear error otherwise."""
    return _check_image(images, what).float()


def image_batch_to_wan(images: torch.Tensor, what: str = "image") -> torch.Tensor:
    """IMAGE [N, H, W, 3] in [0, 1] -> [N, 3, H, W] float32 in [-1, 1]."""
    rgb = _check_image(images, what)
    return rgb.float().permute(0, 3, 1, 2).mul(2.0).sub(1.0).contiguous()


def image_to_wan(images: torch.Tensor, what: str = "image", index: int = 0) -> torch.Tensor:
    """One image of an IMAGE batch (the first by default) -> [3, H, W] float32 in [-1, 1]."""
    batch = image_batch_to_wan(images, what)
    if not -batch.shape[0] <= index < batch.shape[0]:
        raise ValueError(f"{what} has {batch.shape[0]} image(s); image {index} was asked for")
    return batch[index]


def frames_to_wan_video(images: torch.Tensor, what: str = "frames") -> torch.Tensor:
    """IMAGE frames [T, H, W, 3] -> a video [1, 3, T, H, W] in [-1, 1] (for the VAE encoder)."""
    return image_batch_to_wan(images, what).permute(1, 0, 2, 3)[None]


def video_to_image(frames: torch.Tensor) -> torch.Tensor:
    """Decoded videos [B, T, H, W, 3] in [0, 1] -> IMAGE [B*T, H, W, 3] (ComfyUI stacks all frames on N)."""
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"decoded frames must be [B, T, H, W, 3], got {list(frames.shape)}")
    return frames.reshape(-1, *frames.shape[2:]).float().clamp(0.0, 1.0).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Raw VAE latents <-> normalised latents
# ----------------------------------------------------------------------------------------------------------------


def latent_space_stride(channels: int) -> int:
    """Pixels per latent cell along H and W of a latent with `channels` channels (8 Wan2.1, 16 Wan2.2 VAE)."""
    return WAN22_VAE.space_stride if channels == WAN22_VAE.z_dim else WAN21_VAE.space_stride


def _stats(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean_values, std_values = latent_stats(channels)
    mean = torch.tensor(mean_values, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(std_values, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    return mean, std


def check_latent(samples: object, what: str = "latent") -> torch.Tensor:
    if not isinstance(samples, torch.Tensor) or samples.dim() != 5:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"{what} must be a video LATENT with samples [B, 16 or 48, F, h, w] (from a Wan VAE encode "
                         f"or sampler), got {shape}")
    return samples


def latent_to_comfy(latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, C, F, h, w] -> raw VAE latents for a ComfyUI LATENT (z·std + mean), float32 CPU."""
    mean, std = _stats(check_latent(latents).shape[1], latents.device)
    return (latents.float() * std + mean).cpu()


def latent_from_comfy(samples: torch.Tensor, what: str = "latent") -> torch.Tensor:
    """A ComfyUI LATENT's raw samples [B, C, F, h, w] -> normalised latents ((x − mean) / std), float32."""
    mean, std = _stats(check_latent(samples, what).shape[1], samples.device)
    return (samples.float() - mean) / std


def video_size_of_latent(samples: torch.Tensor) -> tuple[int, int, int]:
    """(height, width, frames) in pixels of the video a latent [B, C, F, h, w] decodes to."""
    _, channels, n, h, w = check_latent(samples).shape
    stride = latent_space_stride(channels)
    return h * stride, w * stride, pixel_frames(n)


def latent_frame_count(frames: int) -> int:
    """Pixel frames (4n+1) -> latent frames (n+1), without validation (validation is elsewhere)."""
    return (frames - 1) // TIME_STRIDE + 1


# ----------------------------------------------------------------------------------------------------------------
# Step previews: a linear latent -> RGB map fitted to the VAE decoder
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentRGB:
    """rgb ≈ latent · weight + bias per latent pixel (weight [C, 3], bias [3]; rgb in [0, 1])."""

    weight: torch.Tensor
    bias: torch.Tensor


def fit_latent_rgb(vae: WanVAE, size: int = 16, seed: int = 0) -> LatentRGB:
    """Least-squares fit of the decoder's mean colour per latent cell (8x8 or 16x16 pixels) on normalised latents.

    Decodes one latent frame of seeded N(0, 1) noise (size x size latent pixels) and regresses the average colour
    of each cell on its latent vector. One small decode; cache the result per VAE.
    """
    channels = vae.z_dim
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, channels, 1, size, size, generator=gen)
    video = vae.decode(z.to(vae.device))  # [1, 3, 1, stride·s, stride·s] in [-1, 1]
    cells = F.avg_pool2d(video[0, :, 0].float().cpu(), vae.space_stride)  # [3, s, s]
    targets = ((cells + 1.0) / 2.0).reshape(3, -1).T.double()  # [s*s, 3]
    inputs = torch.cat([z[0, :, 0].reshape(channels, -1).T, torch.ones(size * size, 1)], dim=1).double()
    solution = torch.linalg.lstsq(inputs, targets).solution  # [C+1, 3]
    return LatentRGB(weight=solution[:-1].float(), bias=solution[-1].float())


def latent_preview(latents: torch.Tensor, rgb: LatentRGB, max_size: int = 512) -> np.ndarray:
    """The middle latent frame of [B, C, F, h, w] as a uint8 RGB image [h', w', 3], upscaled by whole factors up
    to `max_size` on the longer side (nearest neighbour)."""
    frame = latents[0, :, latents.shape[2] // 2].float().cpu()  # [C, h, w]
    rgb01 = torch.einsum("chw,ck->hwk", frame, rgb.weight) + rgb.bias
    factor = max(1, min(SPACE_STRIDE, max_size // max(frame.shape[-2:])))
    image = rgb01.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    image = image.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1)
    return image.numpy()
