"""One training step as a pure function: batch + model + per-sample seeds -> flow-matching loss.

For each sample i of a batch:
    σ_i from the timestep scheme, ε_i ~ N(0, I), x_t = (1 − σ_i)·x0_i + σ_i·ε_i,
    v̂_i = DiT(x_t, 1000·σ_i, context_i, clip_fea_i, y_i),
    loss = mean_i( w(σ_i) · mean((v̂_i − (ε_i − x0_i))²) ).

Every random draw of sample i (σ, ε, caption dropout) comes from generators seeded by `sample_seeds[i]`, which the
loop derives from (seed, optimizer step, accumulation micro-step, index in the global batch). Noise therefore
depends only on *which* sample it is, not on the process that computes it: a DDP run with per-rank batches of B
draws exactly what one process with the combined batch of P·B draws, and resuming needs no RNG state for them.

Model inputs per kind (`InputSpec`):
- t2v (also Wan2.2 TI2V-5B, 48 latent channels in and out): x only;
- i2v / flf2v: y = `latents_image` [B, 20, F, h, w] (4 mask + 16 first-frame latent channels), clip_fea = `clip`
  ([B, 257, 1280]; FLF2V [B, 2, 257, 1280] or [B, 514, 1280] -> [B, 514, 1280]); Wan2.2 i2v-A14B has no CLIP
  branch: y only;
- Fun-Control: y = [`latents_control` 16 | image latent 16]: the image latent is `latents_image` without its mask
  and with every latent frame after the first zeroed (i2v-14B-FC), or zeros (t2v-FC); clip_fea = `clip` if given.

Wan2.2 A14B expert pairs (`training.experts.ExpertPair` passed as the model): every sample of a batch is drawn on
one side of the boundary, the side that the timestep of the batch's lead sample falls on (musubi's rule): the lead
sample (the global batch's first, so every process agrees) is drawn as usual, and each sample is re-drawn from its
own generator until its timestep is on that side (`draw_sigmas`); that side's expert runs the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.experts import ExpertPair, expert_of
from training.timesteps import (
    TimestepConfig,
    loss_weights,
    mix_seed,
    model_timesteps,
    sample_sigmas,
    stratified_uniform,
)
from wan_core.models.config import DiTConfig, get_task
from wan_core.sampling.experts import HIGH

logger = logging.getLogger(__name__)

Batch = dict[str, object]
AutocastFactory = Callable[[], contextlib.AbstractContextManager]

INPUT_KINDS = ("t2v", "i2v", "flf2v", "fun_control")


@dataclass(frozen=True)
class InputSpec:
    """Which cached tensors the DiT takes besides the noisy latents."""

    kind: str = "t2v"
    control_image: bool = False  # Fun-Control with a start image (i2v-14B-FC)
    clip: bool = True  # i2v / flf2v: the DiT has a CLIP branch (Wan2.1); Wan2.2 i2v-A14B has none

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"unknown input kind {self.kind!r}; expected one of {', '.join(INPUT_KINDS)}")

    @classmethod
    def for_model(cls, config: DiTConfig, task: str | None) -> InputSpec:
        if config.in_dim == config.out_dim:
            return cls("t2v")
        if config.in_dim == config.out_dim + 32:
            control_image = get_task(task).needs_clip if task else False
            return cls("fun_control", control_image)
        if config.in_dim == config.out_dim + 20:
            return cls("flf2v" if config.model_type == "flf2v" else "i2v", clip=config.has_image_input)
        raise ValueError(f"cannot train a DiT with {config.in_dim} input channels and {config.out_dim} output "
                         f"channels: expected 16 or 48 (T2V, TI2V-5B), 36 (I2V/FLF2V) or 48 with 16 out "
                         f"(Fun-Control)")

    def required_keys(self) -> tuple[str, ...]:
        if self.kind in ("i2v", "flf2v"):
            return ("latents_image", "clip") if self.clip else ("latents_image",)
        if self.kind == "fun_control":
            return ("latents_control", "latents_image", "clip") if self.control_image else ("latents_control",)
        return ()


@dataclass(frozen=True)
class StepConfig:
    timesteps: TimestepConfig
    inputs: InputSpec = InputSpec()
    caption_dropout_rate: float = 0.0
    seed: int = 0  # stratified timestep buckets are seeded with it
    boundary: float | None = None  # expert pair: high-noise expert for timesteps >= boundary * 1000 (0..1)


@dataclass(frozen=True)
class StepResult:
    loss: torch.Tensor  # scalar, differentiable
    per_sample: torch.Tensor  # [B] weighted per-sample losses (detached)
    sigmas: torch.Tensor  # [B] float64


def sample_seeds(seed: int, step: int, micro: int, offset: int, count: int) -> list[int]:
    """Seeds of the samples `offset .. offset+count-1` of the global batch at (optimizer step, micro-step)."""
    return [mix_seed(seed, step, micro, offset + i) for i in range(count)]


def _generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(seed, purpose))


Lead = tuple[int, "int | None"]  # (seed, draw index) of the sample whose timestep picks the expert
SIDE_REDRAWS = 1000  # re-draws per sample to land on the lead sample's side of the expert boundary


def _uniforms(seed: int) -> Callable[[int], torch.Tensor]:
    gen = _generator(seed, "timestep")
    return lambda n: torch.rand(n, generator=gen, dtype=torch.float64)


def _draw(cfg: StepConfig, rand: Callable[[int], torch.Tensor], latent_hw: tuple[int, int],
          draw_index: int | None) -> torch.Tensor:
    """σ [1] from the uniforms `rand` (stratified when `num_timestep_buckets` and a draw index are given)."""
    u = rand(1)
    buckets = cfg.timesteps.num_timestep_buckets
    if buckets and buckets > 1 and draw_index is not None:
        u = torch.tensor([stratified_uniform(buckets, draw_index, cfg.seed, float(u))], dtype=torch.float64)
    return sample_sigmas(cfg.timesteps, u, rand, latent_hw)


def _is_high(sigma: torch.Tensor, boundary: float) -> bool:
    return expert_of(sigma, boundary) == HIGH


def _on_side(cfg: StepConfig, rand: Callable[[int], torch.Tensor], first: torch.Tensor, high: bool,
             latent_hw: tuple[int, int]) -> torch.Tensor:
    """`first`, or re-draws (unstratified) from `rand` until σ is on the `high` side of the boundary; after
    SIDE_REDRAWS misses, a uniform σ on that side's part of [t_min, t_max] (with a warning)."""
    boundary = cfg.boundary
    sigma = first
    for _ in range(SIDE_REDRAWS):
        if _is_high(sigma, boundary) == high:
            return sigma
        sigma = sample_sigmas(cfg.timesteps, rand(1), rand, latent_hw)
    t_min, t_max = cfg.timesteps.t_min / 1000.0, cfg.timesteps.t_max / 1000.0
    low, high_end = (max(t_min, boundary), t_max) if high else (t_min, min(t_max, boundary))
    logger.warning("no timestep on the %s-noise side of the boundary %g in %d draws; drawing it uniformly in "
                   "[%g, %g]", "high" if high else "low", boundary, SIDE_REDRAWS, low, high_end)
    return low + rand(1) * (high_end - low)


def draw_sigmas(cfg: StepConfig, seeds: Sequence[int], latent_hw: tuple[int, int],
                draw_indices: Sequence[int] | None = None, lead: Lead | None = None) -> torch.Tensor:
    """σ [B] (float64): one independent draw per sample seed (stratified when `num_timestep_buckets`).

    With `cfg.boundary` (an expert pair) every σ lies on the side of the boundary that the lead sample's draw falls
    on: `lead` = (seed, draw index) of that sample (default: this batch's first)."""
    indices = list(draw_indices) if draw_indices is not None else [None] * len(seeds)
    if cfg.boundary is None:
        return torch.cat([_draw(cfg, _uniforms(seed), latent_hw, index) for seed, index in zip(seeds, indices)])
    lead_seed, lead_index = lead if lead is not None else (seeds[0], indices[0])
    high = _is_high(_draw(cfg, _uniforms(lead_seed), latent_hw, lead_index), cfg.boundary)
    out = []
    for seed, index in zip(seeds, indices):
        rand = _uniforms(seed)
        out.append(_on_side(cfg, rand, _draw(cfg, rand, latent_hw, index), high, latent_hw))
    return torch.cat(out)


def draw_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """ε [B, *shape] float32, drawn on the CPU from each sample's own generator."""
    return torch.stack([torch.randn(tuple(shape), generator=_generator(s, "noise")) for s in seeds])


def caption_dropped(seeds: Sequence[int], rate: float) -> list[bool]:
    if rate <= 0.0:
        return [False] * len(seeds)
    return [bool(torch.rand(1, generator=_generator(s, "caption")) < rate) for s in seeds]


def _require(batch: Batch, key: str, spec: InputSpec) -> torch.Tensor:
    value = batch.get(key)
    if value is None:
        if key in ("latents_image", "clip"):
            hint = "re-run cache-latents with --i2v and --clip" if spec.clip else "re-run cache-latents with --i2v"
        else:
            hint = "give the dataset a control_directory and re-run cache-latents"
        raise ValueError(f"a {spec.kind} model needs {key!r} in every batch but the cache has none ({hint})")
    return value  # type: ignore[return-value]


def conditioning(batch: Batch, spec: InputSpec, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(y, clip_fea) for the DiT from the cached tensors."""
    if spec.kind == "t2v":
        return None, None
    if spec.kind in ("i2v", "flf2v"):
        y = _require(batch, "latents_image", spec).to(device, dtype)
        if not spec.clip:
            return y, None
        clip = _require(batch, "clip", spec)
        if clip.dim() == 4:  # [B, n_images, 257, 1280] -> [B, n_images·257, 1280]
            clip = clip.flatten(1, 2)
        return y, clip.to(device, dtype)
    control = _require(batch, "latents_control", spec).to(device, dtype)
    if spec.control_image:
        image = _require(batch, "latents_image", spec)[:, 4:].to(device, dtype).clone()
        image[:, :, 1:] = 0
        clip = _require(batch, "clip", spec).to(device, dtype)
    else:
        image, clip = torch.zeros_like(control), None
    return torch.cat([control, image], dim=1), clip


def contexts(batch: Batch, dropped: Sequence[bool], empty_t5: torch.Tensor | None,
             device: torch.device) -> list[torch.Tensor]:
    """The T5 context list, with dropped captions replaced by the empty caption's embedding."""
    t5 = batch["t5"]
    if isinstance(t5, torch.Tensor):
        t5 = list(t5.unbind(0))
    if any(dropped) and empty_t5 is None:
        raise ValueError("caption dropout needs the cached empty-caption T5 embedding (re-run cache-text)")
    return [(empty_t5 if drop else c).to(device) for c, drop in zip(t5, dropped)]


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean squared error [B], times the loss weights if any."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    return per_sample if weights is None else per_sample * weights.to(per_sample)


@dataclass(frozen=True)
class LossInputs:
    """One batch on the model's device: clean latents x0 [B, 16, F, h, w] (float32), their noise ε, the text
    contexts and the conditioning (`y`, `clip_fea`, None when the model takes none)."""

    latents: torch.Tensor
    noise: torch.Tensor
    context: list[torch.Tensor]
    y: torch.Tensor | None
    clip_fea: torch.Tensor | None


def flow_matching_loss(model: torch.nn.Module, inputs: LossInputs, sigmas: torch.Tensor, weights: torch.Tensor | None,
                       autocast: AutocastFactory | None = None) -> torch.Tensor:
    """Per-sample weighted velocity MSE [B] of `model` at noise levels `sigmas` [B]."""
    latents, noise = inputs.latents, inputs.noise
    s = sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1.0 - s) * latents + s * noise
    timesteps = model_timesteps(sigmas).to(latents.device, torch.float32)
    with (autocast or contextlib.nullcontext)():
        pred = model(noisy, timesteps, inputs.context, clip_fea=inputs.clip_fea, y=inputs.y)
    return weighted_mse(pred, noise - latents, weights)


Denoiser = torch.nn.Module | ExpertPair  # one DiT, or a Wan2.2 expert pair whose timesteps pick the DiT


def _device(model: torch.nn.Module) -> torch.device:
    return next(p for p in model.parameters()).device


def _model_for(model: Denoiser, sigmas: torch.Tensor) -> torch.nn.Module:
    return model.select(sigmas) if isinstance(model, ExpertPair) else model


def training_step(model: Denoiser, batch: Batch, cfg: StepConfig, seeds: Sequence[int], *,
                  empty_t5: torch.Tensor | None = None, draw_indices: Sequence[int] | None = None,
                  autocast: AutocastFactory | None = None, lead: Lead | None = None) -> StepResult:
    """The flow-matching loss of one batch (no backward, no optimizer: the caller owns those). An expert pair
    needs `cfg.boundary`; `lead` is the sample whose timestep picks the expert (see `draw_sigmas`)."""
    latents = batch["latents"]
    if len(seeds) != latents.shape[0]:
        raise ValueError(f"got {len(seeds)} sample seeds for a batch of {latents.shape[0]}")
    if isinstance(model, ExpertPair) and cfg.boundary is None:
        raise ValueError("training an expert pair needs StepConfig.boundary")
    sigmas = draw_sigmas(cfg, seeds, tuple(latents.shape[-2:]), draw_indices, lead)
    model = _model_for(model, sigmas)
    device = _device(model)
    noise = draw_noise(seeds, latents.shape[1:]).to(device)
    latents = latents.to(device, torch.float32)
    y, clip_fea = conditioning(batch, cfg.inputs, device, torch.float32)
    context = contexts(batch, caption_dropped(seeds, cfg.caption_dropout_rate), empty_t5, device)
    inputs = LossInputs(latents, noise, context, y, clip_fea)
    per_sample = flow_matching_loss(model, inputs, sigmas, loss_weights(cfg.timesteps, sigmas), autocast)
    return StepResult(per_sample.mean(), per_sample.detach(), sigmas)


def validation_losses(model: Denoiser, batch: Batch, cfg: StepConfig, seeds: Sequence[int],
                      timesteps: Sequence[int], autocast: AutocastFactory | None = None) -> dict[int, torch.Tensor]:
    """Unweighted per-sample losses [B] at each fixed timestep, with each sample's fixed noise (no dropout); an
    expert pair evaluates each timestep with the expert it picks."""
    latents = batch["latents"]
    device = model.device if isinstance(model, ExpertPair) else _device(model)
    noise = draw_noise(seeds, latents.shape[1:]).to(device)
    latents = latents.to(device, torch.float32)
    y, clip_fea = conditioning(batch, cfg.inputs, device, torch.float32)
    inputs = LossInputs(latents, noise, contexts(batch, [False] * len(seeds), None, device), y, clip_fea)
    out = {}
    with torch.no_grad():
        for t in timesteps:
            sigmas = torch.full((len(seeds),), t / 1000.0, dtype=torch.float64)
            out[t] = flow_matching_loss(_model_for(model, sigmas), inputs, sigmas, None, autocast).cpu()
    return out
