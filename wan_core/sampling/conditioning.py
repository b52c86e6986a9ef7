"""Conditioning inputs of the Wan tasks: sizes, masks and latent layouts for T2V/T2I, I2V (+ end image),
FLF2V and Fun-Control, as the official image2video.py / first_last_frame2video.py and musubi's end-image and
Fun-Control code lay them out, and Wan2.2 TI2V-5B image-to-video (the image's latent as the first latent frame, as
the official textimage2video.py).

Every builder takes tensors (images [3, H, W] in [-1, 1], frames [T, 3, H, W] in [-1, 1]) and the encoders, and
returns a `Conditioning` for the denoiser: `y` (concatenated to the noise on channels), `clip_fea`, or
`first_latent` (the known latent frame 0, see `wan_core.sampling.first_frame`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from wan_core.models.config import DiTConfig, TaskPreset, describe_dit

VAE_SPATIAL = 8
PATCH = 2


class VAELike(Protocol):
    def encode(self, video: torch.Tensor) -> torch.Tensor: ...


class CLIPLike(Protocol):
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Conditioning:
    """What the DiT needs besides noise and text: y [1, C_y, F_lat, h, w] and clip_fea [1, N, 1280], or (TI2V)
    first_latent [1, C, 1, h, w], the image latent that latent frame 0 holds."""

    height: int
    width: int
    frames: int  # pixel frames the latent decodes to (before trimming)
    latent_frames: int
    y: torch.Tensor | None = None
    clip_fea: torch.Tensor | None = None
    spatial: int = VAE_SPATIAL  # pixels per latent cell along H and W (16 for the Wan2.2 VAE)
    first_latent: torch.Tensor | None = None

    def latent_shape(self, channels: int = 16) -> tuple[int, int, int, int, int]:
        return (1, channels, self.latent_frames, self.height // self.spatial, self.width // self.spatial)


def latent_frames(frames: int) -> int:
    """Pixel frames (4n+1) -> latent frames n+1."""
    return (frames - 1) // 4 + 1


def nearest_valid(value: int, step: int, first: int) -> str:
    """The valid values next to `value` on the grid first, first + step, ... ("9 or 13"; just "16" below it)."""
    below = first + (value - first) // step * step
    return " or ".join(str(v) for v in (below, below + step) if v >= first) or str(first)


def validate_video_size(height: int, width: int, frames: int) -> None:
    """Raise a ValueError saying what to change when a size cannot be generated."""
    problems = []
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % 16:
            problems.append(f"{name} must be a positive multiple of 16 (got {value}; try "
                            f"{nearest_valid(value, 16, 16)})")
    if frames < 1 or (frames - 1) % 4:
        problems.append(f"video length must be 4n+1 frames, e.g. 1, 5, 9, ..., 81 "
                        f"(got {frames}; try {nearest_valid(frames, 4, 1)})")
    if problems:
        raise ValueError("; ".join(problems))


def size_for_image(image_hw: tuple[int, int], area: int) -> tuple[int, int]:
    """Official I2V output size: the image's aspect ratio at `area` pixels, latent sides even (pixels % 16 == 0)."""
    aspect = image_hw[0] / image_hw[1]
    lat_h = int(math.sqrt(area * aspect) // VAE_SPATIAL // PATCH * PATCH)
    lat_w = int(math.sqrt(area / aspect) // VAE_SPATIAL // PATCH * PATCH)
    if lat_h < PATCH or lat_w < PATCH:
        raise ValueError(f"area {area} is too small for an image of aspect {aspect:.3f}")
    return lat_h * VAE_SPATIAL, lat_w * VAE_SPATIAL


def takes_first_frame(preset: TaskPreset) -> bool:
    """True for Wan2.2 TI2V-5B: a DiT without extra input channels on the Wan2.2 VAE's latents, whose
    image-to-video puts the start image's latent in the first latent frame."""
    return preset.vae.patch_size > 1 and preset.dit.in_dim == preset.dit.out_dim


def first_frame_size(image_hw: tuple[int, int], area: int, multiple: int = 32) -> tuple[int, int]:
    """Official TI2V output size: the image's aspect ratio at no more than `area` pixels, both sides multiples of
    `multiple` (VAE stride x patch). Of rounding the width first or the height first, the pair whose aspect ratio
    is nearer the image's wins (the height-first pair on a tie)."""
    ratio = image_hw[1] / image_hw[0]  # width / height
    width = math.sqrt(area * ratio)
    candidates = []
    for width_first in (True, False):
        if width_first:
            w = int(width // multiple * multiple)
            h = int(area / w // multiple * multiple) if w else 0
        else:
            h = int(area / width // multiple * multiple)
            w = int(area / h // multiple * multiple) if h else 0
        if h < multiple or w < multiple:
            raise ValueError(f"area {area} is too small for an image of aspect {ratio:.3f} (sides must be "
                             f"multiples of {multiple})")
        candidates.append((max(ratio / (w / h), (w / h) / ratio), h, w))
    (err1, h1, w1), (err2, h2, w2) = candidates
    return (h1, w1) if err1 < err2 else (h2, w2)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, H, W] -> [3, height, width] with bicubic interpolation (as the official I2V code)."""
    return F.interpolate(image[None].float(), size=(height, width), mode="bicubic", align_corners=False)[0]


def cover_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale [.., H, W] by the larger ratio to cover (height, width), then centre-crop (official FLF2V last frame)."""
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    lead = image.shape[:-3]
    resized = F.interpolate(image.reshape(-1, *image.shape[-3:]).float(), size=(new_h, new_w), mode="bicubic",
                            align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[..., top:top + height, left:left + width].reshape(*lead, image.shape[-3], height, width)


def frame_mask(frames: int, height: int, width: int, known: tuple[int, ...]) -> torch.Tensor:
    """The 4-channel mask [4, F_lat, h, w]: pixel frames in `known` are 1; frame 0's value is repeated 4 times and
    the frames regrouped into latent frames of 4 (official image2video.py)."""
    h, w = height // VAE_SPATIAL, width // VAE_SPATIAL
    msk = torch.zeros(frames, h, w)
    msk[list(known)] = 1.0
    msk = torch.cat([msk[:1].repeat(4, 1, 1), msk[1:]])  # [F + 3, h, w]
    return msk.view(-1, 4, h, w).transpose(0, 1)  # [4, F_lat, h, w]


def _encode(vae: VAELike, video: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1] -> normalized latents [16, T_lat, h, w] (float32, CPU)."""
    return vae.encode(video[None])[0].float().cpu()


def text_to_video(height: int, width: int, frames: int, spatial: int = VAE_SPATIAL) -> Conditioning:
    """No conditioning besides the text; `spatial` is the VAE's pixels per latent cell (8 Wan2.1, 16 Wan2.2)."""
    validate_video_size(height, width, frames)
    multiple = spatial * PATCH
    if height % multiple or width % multiple:
        raise ValueError(f"with a VAE of spatial stride {spatial}, height and width must be multiples of {multiple}, "
                         f"got {height}x{width}")
    return Conditioning(height, width, frames, latent_frames(frames), spatial=spatial)


def text_image_to_video(vae: VAELike, image: torch.Tensor, frames: int, height: int, width: int,
                        spatial: int = 16) -> Conditioning:
    """TI2V-5B image-to-video (official textimage2video.py): the image scaled to cover the video size and
    centre-cropped, encoded alone into one latent frame [1, C, 1, h, w], which becomes latent frame 0."""
    video = text_to_video(height, width, frames, spatial=spatial)
    check_vae_stride(vae, spatial)
    first = cover_crop(image, height, width)[:, None]  # [3, 1, H, W]
    latent = _encode(vae, first)[None]  # [1, C, 1, h, w]
    if latent.shape[2:] != (1, height // spatial, width // spatial):
        raise ValueError(f"the VAE encoded a {height}x{width} image to a latent of {list(latent.shape[2:])}; "
                         f"expected [1, {height // spatial}, {width // spatial}] (a VAE of spatial stride {spatial})")
    video.first_latent = latent
    return video


def check_vae_stride(vae: VAELike, spatial: int) -> None:
    """ValueError before any encoding when a VAE that states its stride (`space_stride`) has another one."""
    stride = getattr(vae, "space_stride", None)
    if stride is not None and stride != spatial:
        names = {VAE_SPATIAL: "the Wan2.1 VAE, wan_2.1_vae", 16: "the Wan2.2 VAE, wan2.2_vae"}
        raise ValueError(f"this conditioning needs a VAE of spatial stride {spatial} ({names.get(spatial, 'another')}"
                         f"), got one of stride {stride} with {getattr(vae, 'z_dim', '?')} latent channels "
                         f"({names.get(stride, 'another VAE')}); load the matching VAE")


def image_to_video(vae: VAELike, clip: CLIPLike | None, image: torch.Tensor, frames: int, height: int, width: int,
                   end_image: torch.Tensor | None = None) -> Conditioning:
    """I2V (official layout): y = [mask 4 | VAE(image, F−1 grey frames) 16]; CLIP of the original image.

    `end_image` (musubi's unofficial option for non-FLF2V models) appends one latent frame encoded from the end
    image alone with mask 1; the decoded video gets 4 extra tail frames (trim them with trim_tail_frames).
    """
    validate_video_size(height, width, frames)
    first = resize_image(image, height, width)
    video = torch.cat([first[:, None], first.new_zeros(3, frames - 1, height, width)], dim=1)
    y = torch.cat([frame_mask(frames, height, width, known=(0,)), _encode(vae, video)])
    n_lat = latent_frames(frames)
    if end_image is not None:
        end = _encode(vae, resize_image(end_image, height, width)[:, None])  # [16, 1, h, w]
        end_mask = torch.ones(4, 1, height // VAE_SPATIAL, width // VAE_SPATIAL)
        y = torch.cat([y, torch.cat([end_mask, end])], dim=1)
        n_lat += 1
    clip_fea = None if clip is None else clip.encode(image[None])
    return Conditioning(height, width, 1 + 4 * (n_lat - 1), n_lat, y=y[None], clip_fea=clip_fea)


def first_last_to_video(vae: VAELike, clip: CLIPLike, first: torch.Tensor, last: torch.Tensor, frames: int,
                        height: int, width: int) -> Conditioning:
    """FLF2V (official layout): VAE([first, F−2 grey, last]) with mask 1 on the first and last pixel frames;
    CLIP of both frames concatenated to 514 tokens. The last frame is cover-cropped to the first frame's size."""
    validate_video_size(height, width, frames)
    if frames < 5:
        raise ValueError(f"first-last-frame video needs at least 5 frames, got {frames}")
    first_r = resize_image(first, height, width)
    last_r = cover_crop(last, height, width)
    video = torch.cat([first_r[:, None], first_r.new_zeros(3, frames - 2, height, width), last_r[:, None]], dim=1)
    y = torch.cat([frame_mask(frames, height, width, known=(0, frames - 1)), _encode(vae, video)])
    feats = clip.encode(torch.stack([first, cover_crop(last, *first.shape[-2:])]))  # [2, 257, 1280]
    return Conditioning(height, width, frames, latent_frames(frames), y=y[None],
                        clip_fea=feats.reshape(1, -1, feats.shape[-1]))


def fun_control(vae: VAELike, clip: CLIPLike | None, control: torch.Tensor, frames: int, height: int, width: int,
                image: torch.Tensor | None = None, end_image: torch.Tensor | None = None) -> Conditioning:
    """Fun-Control: y = [VAE(control video) 16 | start-image latent in latent frame 0, zeros elsewhere 16].

    `control` is [T, 3, H, W] in [-1, 1] with T >= frames (+1 with an end image); it is cover-cropped to the size.
    Without a start image the CLIP context is left to the model (zeros)."""
    validate_video_size(height, width, frames)
    needed = frames + (1 if end_image is not None else 0)
    if control.shape[0] < needed:
        raise ValueError(f"the control video has {control.shape[0]} frames but {needed} are needed "
                         f"(video length {frames}{' + 1 for the end image' if end_image is not None else ''})")
    control_lat = _encode(vae, cover_crop(control[:frames], height, width).transpose(0, 1))  # [16, F_lat, h, w]
    image_lat = torch.zeros_like(control_lat)
    clip_fea = None
    if image is not None:
        image_lat[:, :1] = _encode(vae, resize_image(image, height, width)[:, None])
        clip_fea = None if clip is None else clip.encode(image[None])
    y = torch.cat([control_lat, image_lat])
    n_lat = latent_frames(frames)
    if end_image is not None:  # one more latent frame: the next control frame and the end image, each alone
        extra_control = _encode(vae, cover_crop(control[frames], height, width)[:, None])
        extra_image = _encode(vae, resize_image(end_image, height, width)[:, None])
        y = torch.cat([y, torch.cat([extra_control, extra_image])], dim=1)
        n_lat += 1
    return Conditioning(height, width, 1 + 4 * (n_lat - 1), n_lat, y=y[None], clip_fea=clip_fea)


# ----------------------------------------------------------------------------------------------------------------
# Agreement of a conditioning with a DiT; CLIP vision embeddings computed once, used by the builders above
# ----------------------------------------------------------------------------------------------------------------


def check_conditioning_fits(config: DiTConfig, cond: Conditioning, conditioning_kind: str) -> None:
    """Raise a ValueError naming the node to use when a conditioning does not fit the DiT."""
    channels = config.out_dim + (0 if cond.y is None else cond.y.shape[1])
    if channels != config.in_dim:
        hint = ("connect no conditioning (text-to-video)" if config.in_dim == config.out_dim else
                "connect an image-to-video, first-last-frame or Fun-Control conditioning node that fits it")
        raise ValueError(f"the DiT is {describe_dit(config)} but the {conditioning_kind} conditioning gives "
                         f"{channels} channels; {hint}")
    first = None if cond.first_latent is None else cond.first_latent.shape[1]
    if first is not None and first != config.out_dim:
        raise ValueError(f"the {conditioning_kind} conditioning's start-image latent has {first} channels but the DiT "
                         f"is {describe_dit(config)} with {config.out_dim}; a first latent frame is for Wan2.2 "
                         "TI2V-5B with the Wan2.2 VAE")
    tokens = None if cond.clip_fea is None else cond.clip_fea.shape[1]
    if tokens is not None and not config.has_image_input:
        raise ValueError(f"the {conditioning_kind} conditioning carries CLIP image embeddings but the DiT is "
                         f"{describe_dit(config)} without image cross-attention")
    if tokens is not None and tokens != config.image_tokens:
        raise ValueError(f"the DiT is {describe_dit(config)} and needs {config.image_tokens} CLIP tokens, got {tokens}"
                         f" from the {conditioning_kind} conditioning (first-last-frame models take two images)")


def encode_clip_images(clip: object, first: torch.Tensor, last: torch.Tensor | None = None,
                       crop: str | None = None) -> torch.Tensor:
    """CLIP features of one image [3, H, W] -> [1, N, C], or of a first/last pair -> [2, N, C].

    The pair is encoded as the official FLF2V code does: the last frame cover-cropped to the first frame's size,
    both on the batch axis.
    """
    images = first[None] if last is None else torch.stack([first, cover_crop(last, *first.shape[-2:])])
    return clip.encode(images, crop=crop)  # type: ignore[attr-defined]


class PrecomputedCLIP:
    """A CLIP stand-in for `wan_core.sampling.conditioning` builders that returns features computed earlier.

    The builders call `clip.encode(images)` with one image (I2V, Fun-Control) or a first/last pair (FLF2V); the
    stored features must have been computed for the same number of images.
    """

    def __init__(self, features: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            raise ValueError(f"image embeddings must be [N, tokens, C], got {getattr(features, 'shape', features)}")
        self.features = features

    def encode(self, images: torch.Tensor, crop: str | None = None) -> torch.Tensor:
        if images.shape[0] != self.features.shape[0]:
            raise ValueError(f"the image embeddings hold {self.features.shape[0]} image(s) but this conditioning "
                             f"needs {images.shape[0]}: for first-last-frame, encode both the start and the end "
                             f"image in the CLIP vision encode node")
        return self.features
