"""Reconstruction training of a small Wan2.1 VAE (`wan_core.models.vae.WanVAEModel`, any `dim`) on toy-world clips.

`python -m training.toy.vae_train --out toy_vae.safetensors --seed 0 [--steps N ...]`

Design for colour (a tiny VAE otherwise keeps shape and motion but loses hue):
    * clips are rendered on the fly from every colour of the palette (the reserved purple included: the VAE is a
      generic codec, only the DiT must never see purple), every shape and motion, with fresh seeds each step;
    * most steps train on object-centred crops (`crop` px, 5 frames), so the coloured object fills a large part of
      each sample; a fraction of steps uses whole 64 px clips of 9 frames (the inference chunking 1 + 4 + 4);
    * the loss is a per-pixel squared error weighted `1 + object_weight` on the object and its anti-aliased edge
      (known exactly from the renderer's background colour), plus a small KL term (the decoder learns to tolerate
      noisy latents, which DiT samples are);
    * the forward pass is the official chunked causal one (frame 0, then chunks of 4 frames, with the feature cache),
      with autograd through the cache.

Starting points (`--init`): "identity" (`identity_path_init`: colour carried through every level, residual branches
at zero), "haar" (the same plus temporal Haar paths, `haar_path_init`: each frame's colour reaches the decoder, not
the mean of its 4-frame chunk), "colour" (identity path on the colour channels only) or "default" (PyTorch's init).
`--fan_in_lr` scales the Adam rate of wide weights down (`param_groups`): plain Adam steps at lr 1e-3 undo the
identity path in one step.

`--polish_steps N` ends the run with N decoder-only steps (`polish_decoder`): the encoder and its latents stay as
they are, and the loss adds the mean L1 error over background pixels (`--polish_background_l1`). The squared error
weighted towards the object leaves the flat background a few levels off (a tint and faint cell edges: audit
background MAD 4.56 / 255 on the design-2 VAE); 300 such steps bring it to 2.61 and keep the shapes. A DiT trained on
the latents of the VAE before the polish works unchanged with the polished one.

After training, `fold_latent_statistics` makes the file use the official latent normalisation: the raw encoder mean
mu of the toy VAE has its own per-channel mean m and std s; rows of `conv1` (the mu half) are rescaled so that the
new mu' = (mu - m) / s * VAE_STD + VAE_MEAN, and `conv2` (which the decoder applies to the de-normalised latent) gets
the inverse map folded into its input. The normalised latents `WanVAE.encode` returns are then zero-mean unit-std
per channel, and any loader that applies the official constants (ours, ComfyUI) decodes the toy latents correctly.

The defaults (per-channel fold, no decoder-input noise) are the ones a tiny DiT learns on. Measured with the
recipe's DiT stage (same data, seed and steps) on two VAEs of equal reconstruction figures (27.2 dB, colour+motion
1.00): per-channel fold without decoder noise -> DiT colour+motion 0.98; one common scale (three colour channels at
std ~2, the thirteen channels that carry position and shape at ~0.5) with `latent_noise` 0.25 -> 0.33 (colour learned,
motion not).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wan_core.loading.checkpoint import read_metadata, save_safetensors, write_text_atomic
from wan_core.models.config import CONFIG_METADATA_KEY, VAEConfig, config_to_json
from wan_core.models.vae import (
    VAE_MEAN,
    VAE_STD,
    AttentionBlock,
    CausalConv3d,
    FeatureCache,
    Resample,
    ResidualBlock,
    WanVAE,
    WanVAEModel,
    latent_frames,
    load_vae,
)
from wan_core.toy.score import score_many
from wan_core.toy.world import COLOURS, DEFAULT_SIZE, MOTIONS, SHAPES, Combo, render_params, sample_params

logger = logging.getLogger(__name__)

TRAIN_METADATA_KEY = "wantuner_toy_vae_train"
POLISH_METADATA_KEY = "wantuner_toy_vae_polish"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INITS = ("identity", "colour", "haar", "default")


@dataclass(frozen=True)
class VAETrainConfig:
    """Hyper-parameters of one VAE training run (all of it is reproducible from `seed`)."""

    dim: int = 16
    z_dim: int = 16
    steps: int = 600
    batch_size: int = 4
    crop: int = 32  # object-centred crop side in pixels (multiple of 8); 64 = whole frames
    crop_frames: int = 5
    full_fraction: float = 0.2  # fraction of steps on whole 64 px clips of `full_frames` frames
    full_frames: int = 9
    full_batch_size: int = 2
    image_fraction: float = 0.0  # fraction of the other steps on single frames (object-centred crops, the first-frame
    image_batch_size: int = 16  # path): spatial detail at a fifth of a clip's cost per sample
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    object_weight: float = 4.0
    edge_weight: float = 0.0  # L1 between the finite differences (x, y, t) of reconstruction and clip: sharp edges
    l1_weight: float = 0.0  # weighted L1 pixel error beside the squared one: flat backgrounds, no faint grid
    kl_weight: float = 1e-4
    shape_weight: float = 0.0  # cross-entropy of a linear shape probe on the latent cells the object covers
    latent_noise: float = 0.0  # > 0: decoder inputs get N(0, (u * spread_c)^2) noise, u ~ U(0, latent_noise)
    max_grad_norm: float = 1.0
    fan_in_lr: int = 0  # > 0: a weight whose rows have fan-in f > this gets lr x fan_in_lr / f (see param_groups)
    init: str = "identity"  # "identity" / "colour" (identity_path_init, all or colour-only paths), "haar"
    # (identity plus temporal Haar paths: each frame's colour, not the 4-frame mean, reaches the decoder) or "default"
    late_constant: bool = False  # identity inits: the head's constant channel comes from the block before each head
    detail_gain: float = 1.0  # identity inits: RMSNorm gain of the residual branches' detail channels (see docstring)
    image_first: int = 0  # the first this many steps train on single frames only (spatial detail first)
    frame_wise: bool = False  # identity inits: 3x3x3 convs start with zero past-frame taps (`zero_past_taps`)
    latent_scale: str = "channel"  # normalised latents: unit std per "channel" or one "common" scale (see docstring)
    # Decoder polish (`polish_decoder`), after training and the latent fold: the encoder is frozen (the latents do
    # not change), the decoder side trains with an extra L1 term on the background pixels.
    polish_steps: int = 0
    polish_lr: float = 3e-4
    polish_background_l1: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop % 8 or not 16 <= self.crop <= DEFAULT_SIZE:
            raise ValueError(f"crop must be a multiple of 8 in [16, {DEFAULT_SIZE}], got {self.crop}")
        for name in ("crop_frames", "full_frames"):
            latent_frames(getattr(self, name))  # 4n+1 check with a clear message
        for name in ("full_fraction", "image_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.latent_scale not in ("common", "channel"):
            raise ValueError(f"latent_scale must be 'common' or 'channel', got {self.latent_scale!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.fan_in_lr < 0:
            raise ValueError(f"fan_in_lr must be >= 0, got {self.fan_in_lr}")
        if self.detail_gain <= 0.0:
            raise ValueError(f"detail_gain must be > 0, got {self.detail_gain}")
        if self.init == "default" and (self.detail_gain != 1.0 or self.frame_wise):
            raise ValueError("detail_gain and frame_wise shape the identity inits; init 'default' takes neither, got "
                             f"detail_gain {self.detail_gain}, frame_wise {self.frame_wise}")
        if not 0 <= self.image_first <= self.steps:
            raise ValueError(f"image_first must be in [0, steps = {self.steps}], got {self.image_first}")
        if self.polish_steps < 0 or self.polish_lr <= 0.0 or self.polish_background_l1 < 0.0:
            raise ValueError("polish_steps must be >= 0, polish_lr > 0 and polish_background_l1 >= 0, got "
                             f"{self.polish_steps}, {self.polish_lr}, {self.polish_background_l1}")
        if min(self.steps, self.batch_size, self.full_batch_size, self.image_batch_size) < 1:
            raise ValueError("steps, batch_size, full_batch_size and image_batch_size must be >= 1")

    @property
    def vae_config(self) -> VAEConfig:
        return VAEConfig(dim=self.dim, z_dim=self.z_dim)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

ALL_COMBOS: tuple[Combo, ...] = tuple(Combo(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS)


def render_sample(rng: np.random.Generator, frames: int, crop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One random clip -> (pixels [T, crop, crop, 3] float32 in [-1, 1], object weight mask [T, crop, crop] 0/1,
    the index of its shape in SHAPES).

    Crops are centred on the object's mean position, jittered by up to a quarter of the crop."""
    combo = ALL_COMBOS[int(rng.integers(len(ALL_COMBOS)))]
    params = sample_params(combo, seed=int(rng.integers(2**31)), num_frames=frames, placement="free")
    clip = render_params(combo, params).astype(np.float32)  # [T, H, W, 3] 0..255
    background = np.asarray(params.background_rgb, dtype=np.float32)
    mask = (np.abs(clip - background).max(axis=-1) > 3.0).astype(np.float32)  # object + anti-aliased edge
    if crop < DEFAULT_SIZE:
        cx, cy = np.mean(np.asarray(params.centres), axis=0) + rng.uniform(-crop / 4, crop / 4, size=2)
        x0 = int(np.clip(round(cx - crop / 2), 0, DEFAULT_SIZE - crop))
        y0 = int(np.clip(round(cy - crop / 2), 0, DEFAULT_SIZE - crop))
        clip, mask = clip[:, y0 : y0 + crop, x0 : x0 + crop], mask[:, y0 : y0 + crop, x0 : x0 + crop]
    return clip / 127.5 - 1.0, mask, SHAPES.index(combo.shape)


def render_batch(rng: np.random.Generator, batch: int, frames: int,
                 crop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> video [B, 3, T, S, S] in [-1, 1], mask [B, 1, T, S, S], shape indices [B]."""
    samples = [render_sample(rng, frames, crop) for _ in range(batch)]
    video = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 4, 1, 2, 3).contiguous()
    mask = torch.from_numpy(np.stack([s[1] for s in samples]))[:, None]
    return video, mask, torch.tensor([s[2] for s in samples])


# ----------------------------------------------------------------------------------------------------------------
# Differentiable chunked forward (the official causal chunking, with gradients through the feature cache)
# ----------------------------------------------------------------------------------------------------------------


def encode_train(model: WanVAEModel, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """video [B, 3, T, H, W] -> (mu, logvar) [B, z, F, H/8, W/8], unnormalised, chunk by chunk as at inference."""
    z = model.config.z_dim
    frames = video.shape[2]
    chunks = [(0, 1), *((1 + 4 * i, 5 + 4 * i) for i in range(latent_frames(frames) - 1))]
    cache = FeatureCache()
    moments = []
    for t0, t1 in chunks:
        cache.next_chunk()
        moments.append(model.conv1(model.encoder(video[:, :, t0:t1], cache)))  # [B, 2z, 1, h, w]
    out = torch.cat(moments, dim=2)
    return out[:, :z], out[:, z:]


def decode_train(model: WanVAEModel, mu: torch.Tensor) -> torch.Tensor:
    """Unnormalised latents [B, z, F, h, w] -> video [B, 3, 1 + 4 (F - 1), 8h, 8w] (unclamped)."""
    x = model.conv2(mu)
    cache = FeatureCache()
    return torch.cat([model.decode_chunk(x[:, :, i : i + 1], cache) for i in range(x.shape[2])], dim=2)


# ----------------------------------------------------------------------------------------------------------------
# Identity-path initialisation
# ----------------------------------------------------------------------------------------------------------------

RGB = 3  # feature channels 0..2 carry the colour (offset by COLOUR_OFFSET), channel 3 a large constant
COLOUR_OFFSET = 3.0
CONSTANT = 20.0
DETAIL_INIT_SCALE = 0.1  # init "colour": the random rows of the detail channels, relative to PyTorch's init
SILU_TARGET = 6.0  # pre-SiLU value of a zero colour after an RMSNorm: SiLU is nearly linear around it


def _centre(weight: torch.Tensor) -> tuple[int, int, int]:
    """The current-frame, centre tap of a causal conv weight [out, in, kt, kh, kw]."""
    return weight.shape[2] - 1, weight.shape[3] // 2, weight.shape[4] // 2


def _identity_(weight: torch.Tensor, channels: int, tap: tuple[int, ...], value: float = 1.0) -> None:
    """weight [out, in, *k]: zero, then `value` at `tap` from input channel c to output channel c (c < channels)."""
    weight.zero_()
    for c in range(channels):
        weight[(c, c, *tap)] = value


def _colour_in(conv: torch.nn.Module, gain: float, offset: float, constant: float = CONSTANT) -> None:
    """Output channels 0..2 = gain x input channels 0..2 (current frame, centre tap) + offset; channel 3 =
    `constant`. The other output channels keep their random initialisation."""
    w, b = conv.weight, conv.bias  # [out, in, kt, kh, kw]
    centre = _centre(w)
    w[: RGB + 1].zero_()
    for c in range(RGB):
        w[(c, c, *centre)] = gain
    b[:RGB] = offset
    b[RGB] = constant


def _normalised_head(norm: torch.nn.Module, conv: torch.nn.Module, outputs: int,
                     extra: Sequence[tuple[int, int]] = ()) -> None:
    """RMSNorm -> SiLU -> conv whose outputs 0..outputs-1 give back the colour of feature channels 0..2, and each
    (input, output) pair of `extra` the offset value of that input channel (the temporal Haar paths).

    With the constant channel dominating the norm, normalised offset channels are ~ (value + OFFSET) x scale; the
    gain puts a zero value at SILU_TARGET where SiLU is nearly the identity, the conv undoes the scale and offset."""
    pairs = [(c, c) for c in range(min(outputs, RGB))] + list(extra)
    channels = norm.gamma.shape[0]
    typical_norm = math.sqrt(CONSTANT**2 + len(pairs) * COLOUR_OFFSET**2)
    gain = SILU_TARGET * typical_norm / (COLOUR_OFFSET * math.sqrt(channels))
    scale = SILU_TARGET / COLOUR_OFFSET  # normalised, gained offset channel = (value + OFFSET) * scale
    w, b = conv.weight, conv.bias
    centre = _centre(w)
    w[:outputs].zero_()
    b[:outputs] = 0.0
    for src, dst in pairs:
        norm.gamma[src] = gain
        w[dst].zero_()
        w[(dst, src, *centre)] = 1.0 / scale
        b[dst] = -COLOUR_OFFSET


def _colour_rows(channels: int, paired: bool = False) -> torch.Tensor:
    """Boolean mask over `channels` output rows: the colour and constant channels 0..3 (both halves when the rows
    are two frames' worth, as in the temporal upsampler)."""
    rows = torch.zeros(channels, dtype=torch.bool)
    rows[: RGB + 1] = True
    if paired:
        rows[channels // 2 : channels // 2 + RGB + 1] = True
    return rows


@torch.no_grad()
def _restore_detail_rows(module: torch.nn.Module, fresh: dict[str, torch.Tensor], paired: bool = False) -> None:
    """Give the output rows other than the colour path back their random initialisation `fresh`, scaled by
    DETAIL_INIT_SCALE (full-size random rows grow the detail channels until they dominate the RMS norms that the
    colour path's scale relies on)."""
    rows = ~_colour_rows(module.weight.shape[0], paired)
    module.weight[rows] = fresh["weight"][rows] * DETAIL_INIT_SCALE
    module.bias[rows] = fresh["bias"][rows] * DETAIL_INIT_SCALE


@torch.no_grad()
def identity_path_init(model: WanVAEModel, colour_only: bool = False, late_constant: bool = False) -> None:
    """Start from an autoencoder that already works coarsely: colour travels through channels 0..2 of every level
    (8x8 average pooling and 4-frame averaging in the encoder, nearest upsampling and frame repetition in the
    decoder), every residual branch and attention projection starts at zero (identity blocks, as in SkipInit), and
    the remaining channels keep their random initialisation for training to put detail into. The architecture and
    key names are unchanged; only the starting point differs.

    `colour_only`: only the colour and constant channels 0..3 get the identity path; the other rows of the
    residual branches' output convs and of the spatial and temporal resampling convs keep their random
    initialisation, so detail channels see sub-cell structure (a random strided conv, not an average) from the
    first step.

    `late_constant`: channel 3 is zero through the trunk and the output conv bias of the last residual block before
    each head (encoder middle, decoder last level) adds CONSTANT there. Only the heads' RMSNorms need the constant
    (the colour travels on the un-normalised residual stream); carried through the trunk it dominates the norm at
    every residual branch's input (RMS ~20 against ~0.3 for the detail channels of a trained decoder's low-resolution
    blocks), which keeps the branches that would draw detail nearly silent."""
    z = model.config.z_dim
    detail_convs = {}  # id -> (conv, rows in two frame halves)
    if colour_only:
        for module in model.modules():
            if isinstance(module, ResidualBlock):
                detail_convs[id(module.residual[6])] = (module.residual[6], False)
            elif isinstance(module, Resample):
                detail_convs[id(module.resample[1])] = (module.resample[1], False)
                if module.mode in ("downsample3d", "upsample3d"):
                    detail_convs[id(module.time_conv)] = (module.time_conv, module.mode == "upsample3d")
        saved = {key: {"weight": m.weight.clone(), "bias": m.bias.clone()} for key, (m, _) in detail_convs.items()}
    for module in model.modules():
        if isinstance(module, ResidualBlock):
            module.residual[6].weight.zero_()
            module.residual[6].bias.zero_()
            if module.shortcut is not None:
                w = module.shortcut.weight
                _identity_(w, min(w.shape[0], w.shape[1]), (0, 0, 0))
                module.shortcut.bias.zero_()
        elif isinstance(module, AttentionBlock):
            module.proj.weight.zero_()
            module.proj.bias.zero_()
        elif isinstance(module, Resample):
            conv = module.resample[1]
            if module.mode.startswith("down"):
                _identity_(conv.weight, conv.weight.shape[0], (0, 0))
                conv.weight[:, :, :2, :2] = conv.weight[:, :, :1, :1] * 0.25  # 2x2 average
            else:
                _identity_(conv.weight, conv.weight.shape[0], (1, 1))
            conv.bias.zero_()
            if module.mode == "downsample3d":  # frames (past, f1, f2, ...) -> (f1 + f2) / 2, (f3 + f4) / 2
                _identity_(module.time_conv.weight, module.time_conv.weight.shape[0], (1, 0, 0), 0.5)
                module.time_conv.weight[:, :, 2] = module.time_conv.weight[:, :, 1]
                module.time_conv.bias.zero_()
            elif module.mode == "upsample3d":  # both output frames repeat the current one
                w = module.time_conv.weight  # [2C, C, 3, 1, 1]
                c = w.shape[1]
                w.zero_()
                for i in range(c):
                    w[i, i, 2] = 1.0
                    w[c + i, i, 2] = 1.0
                module.time_conv.bias.zero_()
    for key, (module, paired) in detail_convs.items():
        _restore_detail_rows(module, saved[key], paired)
    constant = 0.0 if late_constant else CONSTANT
    _colour_in(model.encoder.conv1, 1.0, COLOUR_OFFSET, constant)
    _normalised_head(model.encoder.head[0], model.encoder.head[2], RGB)
    head = model.encoder.head[2]
    head.weight[z:].mul_(0.1)
    head.bias[z:] = -8.0  # logvar: tiny posterior noise at the start
    _identity_(model.conv1.weight, 2 * z, (0, 0, 0))
    model.conv1.bias.zero_()
    _identity_(model.conv2.weight, z, (0, 0, 0))
    model.conv2.bias.zero_()
    _colour_in(model.decoder.conv1, 1.0, COLOUR_OFFSET, constant)
    _normalised_head(model.decoder.head[0], model.decoder.head[2], 3)
    if late_constant:
        for block in (model.encoder.middle[-1], model.decoder.upsamples[-1]):
            if not isinstance(block, ResidualBlock):
                raise TypeError(f"late_constant needs a residual block before each head, found {type(block).__name__}")
            block.residual[6].bias[RGB] = CONSTANT


@torch.no_grad()
def scale_detail_gain(model: WanVAEModel, gain: float) -> None:
    """Multiply the RMSNorm gains of every residual branch by `gain` on the channels other than the identity path's
    colour and constant (0..3). The branches start at zero (`identity_path_init`), so the initial model is
    unchanged; what changes is the size of the detail channels the branches see. Behind the large constant
    channel those are ~0.1 of a normal normalised input, and the branches that would draw sub-cell detail learn
    slowly: on single 32 px frames (batch 16, lr 2e-3, 900 steps) gain 3 classified 0.96 of the reconstructed
    shapes right and gain 1 0.87, the same steps earlier 0.93 against 0.71."""
    for module in model.modules():
        if isinstance(module, ResidualBlock):
            for sub in module.residual:
                if hasattr(sub, "gamma"):
                    sub.gamma.view(-1)[RGB + 1 :] *= gain


@torch.no_grad()
def zero_past_taps(model: WanVAEModel) -> None:
    """Zero the past-frame taps of every 3x3x3 causal conv (the temporal resampling convs keep theirs): each frame
    then goes through the spatial convs on its own, as frame 0 does. Single-frame steps train only the current
    taps (the past ones see zero padding), so after `image_first` steps random past taps would add noise to every
    later frame; starting them at zero, the clip steps begin from the frame-wise model the image steps trained."""
    for module in model.modules():
        if isinstance(module, CausalConv3d) and tuple(module.kernel_size) == (3, 3, 3):
            module.weight[:, :, :-1] = 0.0


HAAR_Z = 3  # latent channels 3..11: the temporal Haar paths (fine differences of both frame pairs, coarse difference)
HAAR_GAIN = 10.0  # latent scale of the Haar paths: cell-mean colour differences are small (std ~0.03 at init), and
# the posterior noise at init (std 0.018) would drown them


def _resamples(module: torch.nn.Module, mode: str) -> list[Resample]:
    return [m for m in module.modules() if isinstance(m, Resample) and m.mode == mode]


def haar_channels(model: WanVAEModel) -> dict[str, list[int]]:
    """Feature channels of the temporal Haar paths: `d1` (the colour difference within a frame pair) from the first
    temporal downsampling on, `d1b` (the second pair's) and `d2` (between the pairs) at the second; each set of 3
    sits where no shortcut of the identity path writes (the upper half of the channels at that level)."""
    downs, ups = _resamples(model.encoder, "downsample3d"), _resamples(model.decoder, "upsample3d")
    if len(downs) != 2 or len(ups) != 2:
        raise ValueError(f"the Haar init needs 2 temporal down- and 2 upsamplings, found {len(downs)} / {len(ups)}")
    h1, h2 = downs[0].time_conv.weight.shape[0] // 2, downs[1].time_conv.weight.shape[0] // 2
    chans = {"d1": [h1 + c for c in range(RGB)], "d1b": [h2 + c for c in range(RGB)],
             "d2": [h2 + RGB + c for c in range(RGB)]}
    u1, u2 = ups[0].time_conv.weight.shape[1], ups[1].time_conv.weight.shape[1]
    if model.config.z_dim < HAAR_Z + 3 * RGB or h1 + RGB > min(h2, u1 // 2) or h2 + 2 * RGB > min(u1, 2 * h2):
        raise ValueError(f"the Haar init needs z_dim >= {HAAR_Z + 3 * RGB} and room for its channels, got z_dim "
                         f"{model.config.z_dim}, channels {2 * h1} / {2 * h2} (encoder) and {u1} / {u2} (decoder)")
    return chans


def _add_half_difference(w: torch.Tensor, row: int, channel: int) -> None:
    """Time conv row `row` (taps past / earlier / later frame) += half the (later - earlier) difference of
    `channel`; the row keeps what it had (the average of its own channel, which carries COLOUR_OFFSET)."""
    w[row, channel, 2] += 0.5
    w[row, channel, 1] -= 0.5


@torch.no_grad()
def haar_path_init(model: WanVAEModel) -> None:
    """On top of `identity_path_init`: temporal Haar paths so that every frame's colour, not the mean of its 4-frame
    chunk, reaches the decoder (the plain identity path averages the frames of a chunk and repeats the mean, which
    smears a moving object into a blob that training has to undo). The encoder's temporal downsamplings write
    half the colour difference within each frame pair (d1), then keep both pairs' d1 and add the difference between
    the pairs (d2); latent channels 3..11 carry them; the decoder's temporal upsamplings invert the steps (earlier
    frame = mean - difference, later = mean + difference). Every path channel carries COLOUR_OFFSET like the colour,
    also on frame 0 (no difference), so the heads' normalisation treats them alike."""
    ch = haar_channels(model)
    down1, down2 = _resamples(model.encoder, "downsample3d")
    up1, up2 = _resamples(model.decoder, "upsample3d")
    for c in range(RGB):  # encoder: d1 = (f2 - f1) / 2, then d1 of each pair and d2 = (g2 - g1) / 2
        down1.resample[1].bias[ch["d1"][c]] = COLOUR_OFFSET
        _add_half_difference(down1.time_conv.weight, ch["d1"][c], c)
        for key in ("d1b", "d2"):
            down2.resample[1].bias[ch[key][c]] = COLOUR_OFFSET
        w = down2.time_conv.weight  # [C, C, 3, 1, 1]
        w[ch["d1"][c]].zero_()
        w[ch["d1"][c], ch["d1"][c], 1] = 1.0  # the first pair's d1
        w[ch["d1b"][c]].zero_()
        w[ch["d1b"][c], ch["d1"][c], 2] = 1.0  # the second pair's d1
        _add_half_difference(w, ch["d2"][c], c)
    extra = [(ch[key][c], HAAR_Z + RGB * i + c) for i, key in enumerate(("d1", "d1b", "d2")) for c in range(RGB)]
    _normalised_head(model.encoder.head[0], model.encoder.head[2], RGB, extra)
    for _, z_c in extra:
        model.encoder.head[2].weight[z_c] *= HAAR_GAIN
        model.encoder.head[2].bias[z_c] *= HAAR_GAIN
    dec = model.decoder.conv1
    for feat, z_c in extra:  # the decoder reads latent channel z_c back into feature channel feat
        dec.weight[feat].zero_()
        dec.weight[(feat, z_c, *_centre(dec.weight))] = 1.0 / HAAR_GAIN
        dec.bias[feat] = COLOUR_OFFSET
    for up, diff in ((up1, ch["d2"]), (up2, ch["d1"])):  # earlier frame = mean - diff, later = mean + diff
        w, b = up.time_conv.weight, up.time_conv.bias  # [2C, C, 3, 1, 1]: first half -> earlier frame
        half = w.shape[1]
        for c in range(RGB):
            for row, sign in ((c, -1.0), (half + c, 1.0)):
                w[row, diff[c], 2] = sign
                b[row] = -sign * COLOUR_OFFSET
            if up is up1:  # the later frame takes the later pair's d1
                w[half + ch["d1"][c]].zero_()
                w[half + ch["d1"][c], ch["d1b"][c], 2] = 1.0


def latent_cells(mask: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Object mask [B, 1, T, H, W] -> [B, F, H/8, W/8] bool: latent cells whose frames (frame 0, then chunks of 4)
    the object covers by more than `threshold` of the cell in at least one frame."""
    chunks = [mask[:, :, :1], *(mask[:, :, t : t + 4] for t in range(1, mask.shape[2], 4))]
    per_frame = torch.cat([c.amax(dim=2, keepdim=True) for c in chunks], dim=2)  # [B, 1, F, H, W]
    return F.avg_pool3d(per_frame, (1, 8, 8))[:, 0] > threshold


def shape_probe_loss(probe: torch.nn.Module, mu: torch.Tensor, mask: torch.Tensor,
                     shapes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a linear shape classifier applied to each object-covered latent cell of mu [B, z, F, h, w]:
    it pulls the shape into the latent linearly, where a small DiT and the decoder can use it."""
    cells = latent_cells(mask)  # [B, F, h, w]
    feats = mu.permute(0, 2, 3, 4, 1)[cells]  # [N, z]
    labels = shapes.view(-1, 1, 1, 1).expand_as(cells)[cells]  # [N]
    return F.cross_entropy(probe(feats), labels) if len(labels) else mu.new_zeros(())


def vae_loss(model: WanVAEModel, video: torch.Tensor, mask: torch.Tensor, cfg: VAETrainConfig,
             generator: torch.Generator, shapes: torch.Tensor | None = None,
             probe: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    mu, logvar = encode_train(model, video)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mu + torch.randn(mu.shape, generator=generator) * torch.exp(0.5 * logvar) if cfg.kl_weight > 0 else mu
    if cfg.latent_noise > 0:  # noise relative to each channel's spread: the decoder learns to clean up latents
        spread = mu.detach().std(dim=(0, 2, 3, 4), keepdim=True)  # [1, z, 1, 1, 1]
        level = torch.rand((mu.shape[0], 1, 1, 1, 1), generator=generator) * cfg.latent_noise  # [B, 1, 1, 1, 1]
        z = z + torch.randn(mu.shape, generator=generator) * spread * level
    recon = decode_train(model, z)
    weight = 1.0 + cfg.object_weight * mask  # [B, 1, T, H, W]
    err = recon - video
    rec = (weight * err.square()).mean() / weight.mean()
    if cfg.l1_weight > 0:
        rec = rec + cfg.l1_weight * (weight * err.abs()).mean() / weight.mean()
    if cfg.edge_weight > 0:
        rec = rec + cfg.edge_weight * edge_error(recon, video)
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()
    mse = F.mse_loss(recon.detach().clamp(-1, 1), video).item()
    total, logs = rec + cfg.kl_weight * kl, {"rec": rec.item(), "kl": kl.item(), "psnr": _psnr(mse / 4.0)}
    if probe is not None and shapes is not None and cfg.shape_weight > 0:
        probe_loss = shape_probe_loss(probe, mu, mask, shapes)
        total, logs["shape_ce"] = total + cfg.shape_weight * probe_loss, probe_loss.item()
    return total, logs


def edge_error(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the neighbour differences of `recon` and `video` [B, 3, T, H, W] along W, H and T
    (each axis once): a blurred edge, a grid seam or a jump between frames all show as differences."""
    total = recon.new_zeros(())
    for dim in (4, 3, 2):
        if recon.shape[dim] > 1:
            total = total + (torch.diff(recon, dim=dim) - torch.diff(video, dim=dim)).abs().mean()
    return total


def _psnr(mse01: float) -> float:
    """PSNR in dB of a mean squared error measured on [0, 1] pixels."""
    return 10.0 * math.log10(1.0 / max(mse01, 1e-12))


def lr_at(step: int, cfg: VAETrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` x lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(params: Sequence[torch.nn.Parameter], fan_in_lr: int) -> list[dict]:
    """Optimizer groups with a relative rate `lr_scale` per tensor: 1, or fan_in_lr / f for a weight of fan-in f >
    fan_in_lr (fan_in_lr 0: all 1).

    Adam's steps have about the same size on every weight, so a conv's output moves by ~lr x its fan-in x its input
    size per step when its inputs share one sign; in the identity-path VAE every conv input is a SiLU of normalised
    features dominated by large positive channels, and one plain Adam step at lr 1e-3 (1e-4) takes a fresh model's
    reconstruction from 20.8 dB to 5.9 dB (7.7 dB)."""
    groups = []
    for p in params:
        fan = p[0].numel() if p.dim() > 1 else 1
        groups.append({"params": [p], "lr_scale": fan_in_lr / fan if 0 < fan_in_lr < fan else 1.0})
    return groups


def step_kinds(cfg: VAETrainConfig) -> list[str]:
    """What each training step renders: "image" for the first `image_first` steps, then "full" (whole clips) with
    probability `full_fraction`, "image" (single frames) on `image_fraction` of the rest, else "crop" (clip crops);
    drawn from `seed`."""
    draws = np.random.default_rng(cfg.seed + 1).random(cfg.steps)
    image_from = 1.0 - (1.0 - cfg.full_fraction) * cfg.image_fraction
    kinds = ["full" if d < cfg.full_fraction else "image" if d >= image_from else "crop" for d in draws]
    return ["image"] * cfg.image_first + kinds[cfg.image_first :]


def render_step(rng: np.random.Generator, kind: str,
                cfg: VAETrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of one step of `kind` (`step_kinds`): whole clips, single-frame crops or clip crops."""
    if kind == "full":
        return render_batch(rng, cfg.full_batch_size, cfg.full_frames, DEFAULT_SIZE)
    if kind == "image":
        return render_batch(rng, cfg.image_batch_size, 1, cfg.crop)
    return render_batch(rng, cfg.batch_size, cfg.crop_frames, cfg.crop)


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Sequence[torch.nn.Parameter],
           max_grad_norm: float, what: str) -> None:
    """One optimiser step on `loss` (gradients of `params` clipped to `max_grad_norm` when > 0); a non-finite loss
    stops the run before the update, naming `what`."""
    if not torch.isfinite(loss):
        raise RuntimeError(f"{what}: the loss is {loss.item()} (not finite); stopped before the update")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


def train_vae(cfg: VAETrainConfig, log_every: int = 10) -> WanVAEModel:
    """Train a fresh `WanVAEModel(cfg.vae_config)` and return it (eval mode, raw latent statistics)."""
    torch.manual_seed(cfg.seed)
    model = WanVAEModel(cfg.vae_config)
    if cfg.init != "default":
        identity_path_init(model, colour_only=cfg.init == "colour", late_constant=cfg.late_constant)
    if cfg.init == "haar":
        haar_path_init(model)
    if cfg.detail_gain != 1.0:
        scale_detail_gain(model, cfg.detail_gain)
    if cfg.frame_wise:
        zero_past_taps(model)
    model.train()
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    kinds = step_kinds(cfg)
    # the shape probe (cfg.shape_weight > 0) trains alongside and is not saved
    probe = torch.nn.Linear(cfg.z_dim, len(SHAPES)) if cfg.shape_weight > 0 else None
    params = [*model.parameters(), *(probe.parameters() if probe is not None else ())]
    optimizer = torch.optim.AdamW(param_groups(params, cfg.fan_in_lr), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, recent = time.perf_counter(), []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg) * group["lr_scale"]
        video, mask, shapes = render_step(rng, kinds[step], cfg)
        loss, logs = vae_loss(model, video, mask, cfg, generator, shapes, probe)
        update(optimizer, loss, list(model.parameters()), cfg.max_grad_norm, f"vae step {step + 1}")
        recent = (recent + [logs])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            mean = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]}
            logger.info("vae step %d/%d  rec %.5f  kl %.3f  psnr %.2f dB%s  lr %.2e  %.0f s", step + 1, cfg.steps,
                        mean["rec"], mean["kl"], mean["psnr"],
                        f"  shape ce {mean['shape_ce']:.3f}" if "shape_ce" in mean else "", lr_at(step, cfg),
                        time.perf_counter() - start)
    return model.eval()


def polish_loss(model: WanVAEModel, video: torch.Tensor, mask: torch.Tensor,
                cfg: VAETrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The object-weighted squared error of the frozen encoder's mean latents, decoded, plus `polish_background_l1`
    x the mean L1 error per colour value over the background pixels (mask 0)."""
    with torch.no_grad():
        mu, _ = encode_train(model, video)
    recon = decode_train(model, mu)
    err = recon - video  # [B, 3, T, H, W]
    weight = 1.0 + cfg.object_weight * mask  # [B, 1, T, H, W]
    rec = (weight * err.square()).mean() / weight.mean()
    background = (mask == 0).to(err.dtype)
    flat = (background * err.abs()).sum() / (err.shape[1] * background.sum()).clamp_min(1.0)
    mse = F.mse_loss(recon.detach().clamp(-1, 1), video).item()
    return rec + cfg.polish_background_l1 * flat, {"rec": rec.item(), "background_l1": flat.item(),
                                                   "psnr": _psnr(mse / 4.0)}


def polish_decoder(model: WanVAEModel, cfg: VAETrainConfig, log_every: int = 50) -> WanVAEModel:
    """`cfg.polish_steps` steps on the decoder side only (`conv2` and the decoder; the encoder and `conv1` stay
    frozen), the same mix of clip crops, whole clips and single frames as training (drawn from seed + 2), cosine
    decay from `polish_lr` to 0. Returns `model` in eval mode."""
    model.requires_grad_(False)
    params = [*model.conv2.parameters(), *model.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    model.train()
    seed = cfg.seed + 2
    kinds = step_kinds(VAETrainConfig(steps=cfg.polish_steps, full_fraction=cfg.full_fraction,
                                      image_fraction=cfg.image_fraction, seed=seed)) if cfg.polish_steps else []
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(params, lr=cfg.polish_lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, recent = time.perf_counter(), []
    for step, kind in enumerate(kinds):
        for group in optimizer.param_groups:
            group["lr"] = cfg.polish_lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.polish_steps))
        video, mask, _ = render_step(rng, kind, cfg)
        loss, logs = polish_loss(model, video, mask, cfg)
        update(optimizer, loss, params, cfg.max_grad_norm, f"vae polish step {step + 1}")
        recent = (recent + [logs])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == cfg.polish_steps:
            mean = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]}
            logger.info("vae polish %d/%d  rec %.5f  background L1 %.5f  psnr %.2f dB  %.0f s", step + 1,
                        cfg.polish_steps, mean["rec"], mean["background_l1"], mean["psnr"],
                        time.perf_counter() - start)
    return model.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------------------------
# Latent statistics and saving
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def raw_latent_statistics(model: WanVAEModel, clips: torch.Tensor,
                          batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [z] of the raw encoder mean mu over `clips` [N, 3, T, H, W] in [-1, 1]."""
    mus = [encode_train(model, clips[i : i + batch])[0] for i in range(0, len(clips), batch)]
    mu = torch.cat(mus).transpose(0, 1).reshape(model.config.z_dim, -1).double()  # [z, N*F*h*w]
    return mu.mean(dim=1), mu.std(dim=1)


@torch.no_grad()
def fold_latent_statistics(model: WanVAEModel, mean: torch.Tensor, std: torch.Tensor,
                           per_channel: bool = True) -> None:
    """Rescale conv1's mu rows and conv2's input columns in place so that the official latent normalisation maps
    this model's raw mu to zero mean per channel and unit std per channel (`per_channel`) or, otherwise, one common
    scale that keeps the channels' relative spread with unit mean variance (see the module docstring). Decoding is
    unchanged."""
    z = model.config.z_dim
    target_mean = torch.tensor(VAE_MEAN, dtype=torch.float64)
    target_std = torch.tensor(VAE_STD, dtype=torch.float64)
    mean, std = mean.double(), std.double().clamp_min(1e-6)
    if not per_channel:
        std = torch.full_like(std, float(std.square().mean().sqrt()))
    scale = target_std / std  # mu' = scale * mu + shift
    shift = target_mean - scale * mean
    w1, b1 = model.conv1.weight, model.conv1.bias  # [2z, 2z, 1, 1, 1], [2z]
    w1[:z] = (w1[:z].double() * scale.view(-1, 1, 1, 1, 1)).to(w1.dtype)
    b1[:z] = (b1[:z].double() * scale + shift).to(b1.dtype)
    # conv2(mu) = W mu + b with mu = (mu' - shift) / scale  ->  W' = W / scale (columns), b' = b - W' shift
    w2, b2 = model.conv2.weight, model.conv2.bias  # [z, z, 1, 1, 1], [z]
    w2_new = w2.double() / scale.view(1, -1, 1, 1, 1)
    b2[:] = (b2.double() - (w2_new.flatten(1) @ shift)).to(b2.dtype)
    w2[:] = w2_new.to(w2.dtype)


def save_vae(model: WanVAEModel, path: str | Path, dtype: torch.dtype = torch.float16,
             extra_metadata: dict[str, str] | None = None) -> Path:
    """Official key names, `dtype` storage, the VAEConfig in the `wantuner_config` metadata."""
    tensors = {k: v.to(dtype) for k, v in model.state_dict().items()}
    metadata = {CONFIG_METADATA_KEY: config_to_json(model.config), **(extra_metadata or {})}
    return save_safetensors(tensors, path, metadata)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of reconstructions
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconstructionReport:
    psnr: float  # mean per-clip PSNR in dB ([0, 1] pixels)
    psnr_object: float  # PSNR over object pixels only
    colour_motion: float
    motion: float
    colour: float
    shape: float
    n: int


def evaluation_clips(seed: int, count: int, frames: int = 9) -> tuple[list[np.ndarray], list[Combo]]:
    """`count` ground-truth clips (uint8 [T, 64, 64, 3]) cycling through every colour/shape/motion combination, with
    seeds from a stream no training run uses (`seed` + 10**6)."""
    rng = np.random.default_rng(seed + 10**6)
    combos = [ALL_COMBOS[i % len(ALL_COMBOS)] for i in rng.permutation(max(count, len(ALL_COMBOS)))[:count]]
    clips = [render_params(c, sample_params(c, seed=int(rng.integers(2**31)), num_frames=frames, placement="free"))
             for c in combos]
    return clips, combos


def to_video(clips: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 clips [T, H, W, 3] -> [N, 3, T, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


@torch.no_grad()
def evaluate_reconstruction(vae: WanVAE, clips: Sequence[np.ndarray], combos: Sequence[Combo],
                            batch: int = 8) -> ReconstructionReport:
    """Encode + decode through the inference wrapper; PSNR and the toy-world scorer on the reconstructions."""
    recon = []
    for i in range(0, len(clips), batch):
        video = to_video(clips[i : i + batch])
        out = vae.decode(vae.encode(video))  # [B, 3, T, H, W] in [-1, 1]
        recon.append(((out + 1.0) / 2.0).permute(0, 2, 3, 4, 1).numpy())  # [B, T, H, W, 3] in [0, 1]
    frames = np.concatenate(recon)
    truth = np.stack(clips).astype(np.float64) / 255.0
    err = (frames - truth) ** 2
    psnr = float(np.mean([_psnr(float(e.mean())) for e in err]))
    obj = np.abs(truth - np.median(truth, axis=(1, 2, 3), keepdims=True)).max(axis=-1) > 3.0 / 255.0
    psnr_object = _psnr(float(err.mean(axis=-1)[obj].mean()))
    summary = score_many(list(frames), list(combos))
    return ReconstructionReport(psnr, psnr_object, summary.colour_motion, summary.motion, summary.colour,
                                summary.shape, summary.n)


def build_toy_vae(cfg: VAETrainConfig, out: str | Path, *, stats_clips: int = 48, eval_clips: int = 75,
                  dtype: torch.dtype = torch.float16) -> ReconstructionReport:
    """Train, fold the latent statistics, polish the decoder (`polish_steps`), save, reload through `load_vae` and
    evaluate held-out clips."""
    start = time.perf_counter()
    model = train_vae(cfg)
    train_s = time.perf_counter() - start
    stats, _ = evaluation_clips(cfg.seed + 1, stats_clips)
    mean, std = raw_latent_statistics(model, to_video(stats))
    logger.info("raw latent mean %s", np.round(mean.numpy(), 3).tolist())
    logger.info("raw latent std  %s", np.round(std.numpy(), 3).tolist())
    fold_latent_statistics(model, mean, std, per_channel=cfg.latent_scale == "channel")
    start = time.perf_counter()
    polish_decoder(model, cfg)
    polish_s = time.perf_counter() - start
    record = {**asdict(cfg), "train_seconds": round(train_s, 1), "polish_seconds": round(polish_s, 1)}
    path = save_vae(model, out, dtype, {TRAIN_METADATA_KEY: json.dumps(record, sort_keys=True)})
    return _report(path, cfg.seed, eval_clips, train_s + polish_s)


def polish_toy_vae(cfg: VAETrainConfig, source: str | Path, out: str | Path, *, eval_clips: int = 75,
                   dtype: torch.dtype = torch.float16) -> ReconstructionReport:
    """The decoder polish of `cfg` applied to a trained toy VAE file `source` (its other metadata kept, the polish
    settings added), saved to `out` and evaluated like `build_toy_vae`."""
    if cfg.polish_steps < 1:
        raise ValueError(f"polishing {source} needs polish_steps >= 1, got {cfg.polish_steps}")
    model = load_vae(source, dtype=torch.float32).model
    start = time.perf_counter()
    polish_decoder(model, cfg)
    polish_s = time.perf_counter() - start
    meta = {k: v for k, v in read_metadata(source).items() if k != CONFIG_METADATA_KEY}
    meta[POLISH_METADATA_KEY] = json.dumps({"polish_steps": cfg.polish_steps, "polish_lr": cfg.polish_lr,
                                            "polish_background_l1": cfg.polish_background_l1, "seed": cfg.seed,
                                            "source": Path(source).name, "polish_seconds": round(polish_s, 1)},
                                           sort_keys=True)
    return _report(save_vae(model, out, dtype, meta), cfg.seed, eval_clips, polish_s)


def _report(path: Path, seed: int, eval_clips: int, seconds: float) -> ReconstructionReport:
    clips, combos = evaluation_clips(seed, eval_clips)
    report = evaluate_reconstruction(load_vae(path), clips, combos)
    logger.info("VAE %s: %.1f s training; held-out PSNR %.2f dB (object %.2f dB), colour+motion %.3f, motion "
                "%.3f, colour %.3f, shape %.3f on %d clips", path, seconds, report.psnr, report.psnr_object,
                report.colour_motion, report.motion, report.colour, report.shape, report.n)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.toy.vae_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output .safetensors")
    for field, value in asdict(VAETrainConfig()).items():
        if isinstance(value, bool):
            p.add_argument(f"--{field}", action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(f"--{field}", type=type(value), default=value)
    p.add_argument("--save_dtype", choices=sorted(SAVE_DTYPES), default="float16")
    p.add_argument("--eval_clips", type=int, default=75)
    p.add_argument("--report", default=None, help="write the training time and held-out figures to this JSON file")
    p.add_argument("--polish_from", default=None,
                   help="skip training: apply the decoder polish (--polish_steps ...) to this trained toy VAE file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fields = {k: getattr(args, k) for k in asdict(VAETrainConfig())}
    try:
        cfg = VAETrainConfig(**fields)
        start = time.perf_counter()
        dtype = SAVE_DTYPES[args.save_dtype]
        if args.polish_from:
            report = polish_toy_vae(cfg, args.polish_from, args.out, eval_clips=args.eval_clips, dtype=dtype)
        else:
            report = build_toy_vae(cfg, args.out, eval_clips=args.eval_clips, dtype=dtype)
        if args.report:
            figures = asdict(report) | {"seconds": round(time.perf_counter() - start, 1)}
            write_text_atomic(args.report, json.dumps(figures, sort_keys=True) + "\n")
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    raise SystemExit(main())
