"""Toy I2V, FLF2V and Fun-Control DiTs and a toy CLIP vision tower, built from the trained toy T2V DiT.

`python -m training.toy.variants --out DIR --work DIR --t2v T2V.safetensors --vae VAE --t5 UMT5 [--seed 0]`

Stages (each timed; figures to `<work>/variants_report.json`):
    1. clip      a small `wan_core.models.clip.CLIPVision` (224 px, patch 14 -> 257 tokens, width 64), seeded random
                 frozen
                 weights, its config in the safetensors metadata (`load_clip_vision(path)` needs no arguments)
    2. init      each variant DiT from the T2V DiT: every shared weight copied, the extra patch-embedding input
                 channels and every block's `cross_attn.v_img` zero (so the variant starts as exactly the T2V
                 model whatever its image inputs), `img_emb` / `k_img` with the official init (seeded), FLF2V's
                 `emb_pos` N(0, 0.02)
    3. data      toy-world clips (base training combinations): png frames for I2V/FLF2V; mp4 clips plus a
                 `control_directory` of white-on-black silhouettes (`wan_core.toy.world.coverage`) for Fun-Control
    4. cache     `python -m training cache-latents` (I2V/FLF2V with `--clip`) and `cache-text`; the FLF2V cache
                 entries are then rewritten with the FLF2V layout (`first_last_to_video`: mask on the first and last
                 frames, 514 CLIP tokens), which cache-latents has no mode for
    5. train     `python -m training train --network_module full` per variant
    6. evaluate  generation through wan_core.sampling.conditioning / pipeline.denoise / decode_latents, scored with
                 wan_core.toy.score (see `evaluate_variant`)

The variants carry the T2V file's sampling defaults (`wantuner_sampling`) with their own task name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from training.cache.latents import load_pixels
from training.cache.store import LatentSettings, latent_entries, load_latent_entry, read_entry_info, save_latent_entry
from training.dataset.items import scan_dataset_group
from training.dataset.schema import load_dataset_config
from training.toy.commands import TimedStages, run
from training.toy.evaluate import sampling_from_file
from wan_core.loading.checkpoint import read_metadata, save_safetensors, write_text_atomic
from wan_core.loading.model_set import SAMPLING_METADATA_KEY, TOY_FILES
from wan_core.models.clip import CLIPVision, load_clip_vision
from wan_core.models.config import CONFIG_METADATA_KEY, CLIPVisionConfig, DiTConfig, config_to_json
from wan_core.models.dit import WanModel, load_dit
from wan_core.models.t5 import load_t5
from wan_core.models.vae import load_vae
from wan_core.sampling.conditioning import first_last_to_video, fun_control, image_to_video
from wan_core.sampling.pipeline import SamplerSettings, decode_latents, denoise, encode_prompts
from wan_core.toy.score import analyze_clip
from wan_core.toy.world import (
    HELDOUT,
    MOTIONS,
    Combo,
    coverage,
    render_clip,
    sample_params,
    train_combos,
    write_dataset,
)

if TYPE_CHECKING:
    from training.toy.evaluate import Sampling
    from wan_core.models.dit import WanModel
    from wan_core.models.t5 import T5Encoder
    from wan_core.models.vae import WanVAE
    from wan_core.sampling.conditioning import Conditioning

logger = logging.getLogger(__name__)

KINDS = ("i2v", "flf2v", "fun_control")
TOY_CLIP_CONFIG = CLIPVisionConfig(dim=64, mlp_ratio=4.0, num_heads=2, num_layers=3)  # 2 blocks used (penultimate)
VARIANT_FILES = {
    "i2v": TOY_FILES["dit_i2v"],
    "flf2v": TOY_FILES["dit_flf2v"],
    "fun_control": TOY_FILES["dit_fun_control"],
    "clip": TOY_FILES["clip"],
}
VARIANT_TASKS = {"i2v": "i2v-14B", "flf2v": "flf2v-14B", "fun_control": "t2v-1.3B-FC"}
VARIANT_IN_DIM = {"i2v": 36, "flf2v": 36, "fun_control": 48}
EVAL_SEED_BASE = 7_300_000  # noise / clip seeds of the evaluation (disjoint from the evaluation of the T2V model)
POSITION_TOLERANCE = 6.0  # px (of 64): a frame's centroid within this of the reference counts as "in place"


@dataclass(frozen=True)
class VariantConfig:
    """Everything the variant build does is decided here and by `seed`."""

    seed: int = 0
    clips_per_combo: int = 4
    steps: int = 800
    flf2v_steps: int = 3000  # the last frame is learnt more slowly (1600 steps: last frame in place 0.42, 3000: 0.75)
    fun_control_steps: int = 0  # > 0: Fun-Control's own step count (0: `steps`)
    lr: float = 1e-3
    batch: int = 8
    caption_dropout: float = 0.1
    conflict_captions: float = 0.0  # Fun-Control: share of training clips whose caption names another motion
    timestep_sampling: str = "uniform"
    save_precision: str = "fp16"
    eval_pairs: int = 12
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        if not 0.0 <= self.conflict_captions <= 1.0:
            raise ValueError(f"conflict_captions must be in [0, 1], got {self.conflict_captions}")
        if self.fun_control_steps < 0:
            raise ValueError(f"fun_control_steps must be >= 0, got {self.fun_control_steps}")


# ----------------------------------------------------------------------------------------------------------------
# Toy CLIP vision tower
# ----------------------------------------------------------------------------------------------------------------


def toy_clip(seed: int, config: CLIPVisionConfig = TOY_CLIP_CONFIG) -> CLIPVision:
    """A CLIPVision with seeded random weights: default Linear/Conv init, N(0, 0.1) class and position embeddings."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPVision(config)
        torch.nn.init.normal_(model.visual.cls_embedding, std=0.1)
        torch.nn.init.normal_(model.visual.pos_embedding, std=0.1)
    return model.eval().requires_grad_(False)


def build_toy_clip(path: Path, seed: int, config: CLIPVisionConfig = TOY_CLIP_CONFIG) -> Path:
    """Write the toy CLIP (fp32) with its config in the `wantuner_config` metadata."""
    model = toy_clip(seed, config)
    return save_safetensors(model.state_dict(), Path(path), {CONFIG_METADATA_KEY: config_to_json(config)})


# ----------------------------------------------------------------------------------------------------------------
# Variant initialisation from the T2V DiT
# ----------------------------------------------------------------------------------------------------------------


def variant_config(t2v: DiTConfig, kind: str, clip_dim: int) -> DiTConfig:
    """The T2V architecture with the inputs of `kind` (I2V/FLF2V: 36 channels; Fun-Control: 48) and `clip_dim`."""
    if kind not in KINDS:
        raise ValueError(f"unknown variant {kind!r}; expected one of {KINDS}")
    if t2v.model_type != "t2v" or t2v.in_dim != t2v.out_dim:
        raise ValueError(f"the source must be a T2V DiT (in_dim == out_dim), got {t2v.model_type} with in_dim "
                         f"{t2v.in_dim} and out_dim {t2v.out_dim}")
    model_type = "flf2v" if kind == "flf2v" else "i2v"
    return dataclasses.replace(t2v, in_dim=VARIANT_IN_DIM[kind], model_type=model_type, clip_dim=clip_dim)


def init_variant(t2v_model: torch.nn.Module, kind: str, clip_dim: int, seed: int) -> torch.nn.Module:
    """A `kind` DiT that computes exactly what `t2v_model` computes, whatever its image/control inputs.

    Shared tensors are copied; the patch embedding's extra input channels and each block's `cross_attn.v_img` are
    zero (the image cross-attention then adds exactly 0); `img_emb` and `k_img` get the official init from `seed`.
    """
    cfg = variant_config(t2v_model.config, kind, clip_dim)
    source = {k: v.detach().float() for k, v in t2v_model.state_dict().items()}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WanModel(cfg)
        model.init_weights()
        if cfg.model_type == "flf2v":
            torch.nn.init.normal_(model.img_emb.emb_pos, std=0.02)
    state = model.state_dict()
    for key, value in source.items():
        target = state.get(key)
        if target is None:
            raise ValueError(f"T2V tensor {key!r} has no counterpart in the {kind} DiT")
        if key == "patch_embedding.weight":  # [dim, in_dim, 1, 2, 2]: the noise channels come first
            target.zero_()
            target[:, : value.shape[1]] = value
        elif target.shape == value.shape:
            target.copy_(value)
        else:
            raise ValueError(f"{key!r} has shape {list(value.shape)} in the T2V DiT but {list(target.shape)} in the "
                             f"{kind} DiT")
    for block in model.blocks:
        torch.nn.init.zeros_(block.cross_attn.v_img.weight)
        torch.nn.init.zeros_(block.cross_attn.v_img.bias)
    return model


def write_variant_init(t2v_path: Path, kind: str, clip_dim: int, seed: int, path: Path) -> Path:
    """The initial `kind` DiT file (fp32), its config and the T2V file's sampling defaults (task renamed)."""
    t2v = load_dit(t2v_path, dtype=torch.float32)
    model = init_variant(t2v, kind, clip_dim, seed)
    meta = {CONFIG_METADATA_KEY: config_to_json(model.config)}
    sampling = read_metadata(t2v_path).get(SAMPLING_METADATA_KEY)
    if sampling:
        meta[SAMPLING_METADATA_KEY] = json.dumps(json.loads(sampling) | {"task": VARIANT_TASKS[kind]})
    return save_safetensors(model.state_dict(), path, meta)


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


def silhouette(combo: Combo, seed: int, num_frames: int = 9, size: int = 64) -> np.ndarray:
    """The control video of a clip: its object's coverage, white on black, uint8 [T, H, W, 3]."""
    params = sample_params(combo, seed=seed, num_frames=num_frames, size=size)
    alpha = np.stack([coverage(combo.shape, c, params.object_size, size) for c in params.centres])  # [T, H, W]
    return np.repeat(np.rint(alpha * 255.0).astype(np.uint8)[..., None], 3, axis=-1)


def _write_frames(directory: Path, frames: np.ndarray) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp")
    tmp.mkdir(parents=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame, mode="RGB").save(tmp / f"{t:05d}.png")
    tmp.rename(directory)


def write_image_dataset(out: Path, combos: Sequence[Combo], clips_per_combo: int, seed: int, batch: int) -> Path:
    """Toy-world png clips for I2V/FLF2V; returns the dataset toml."""
    write_dataset(out, combos, clips_per_combo, seed=seed, batch_size=batch)
    return out / "dataset.toml"


def write_control_dataset(out: Path, combos: Sequence[Combo], clips_per_combo: int, seed: int, batch: int,
                          conflict: float = 0.0) -> Path:
    """Fun-Control dataset, musubi layout: mp4 clips in videos/ (+ captions) and, in control/, a frame folder per
    clip named like its stem holding the object's silhouette; the toml names `control_directory`. `conflict`: that
    share of the clips (seeded choice) gets a caption naming another motion (seeded) than the clip and its control
    show, so that the model learns to take the motion from the control when the two disagree."""
    if not 0.0 <= conflict <= 1.0:
        raise ValueError(f"conflict must be in [0, 1], got {conflict}")
    paths = write_dataset(out, combos, clips_per_combo, seed=seed, fmt="mp4", batch_size=batch)
    # write_dataset gives clip i the i-th seed spawned from SeedSequence(seed) (its documented rule)
    jobs = [combo for combo in combos for _ in range(int(clips_per_combo))]
    seeds = [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(len(jobs))]
    control = out / "control"
    control.mkdir()
    for path, combo, clip_seed in zip(paths, jobs, seeds):
        _write_frames(control / path.stem, silhouette(combo, clip_seed))
    rng = np.random.default_rng([seed, 7])
    for i in np.flatnonzero(rng.random(len(jobs)) < conflict):
        combo = jobs[i]
        other = str(rng.choice([m for m in MOTIONS if m != combo.motion]))
        caption = Combo(combo.colour, combo.shape, other).caption
        write_text_atomic(paths[i].with_suffix(".txt"), caption + "\n")
    toml = out / "dataset.toml"
    text = toml.read_text(encoding="utf-8").rstrip("\n")
    toml.write_text(f"{text}\ncontrol_directory = {json.dumps(str(control.resolve()))}\n", encoding="utf-8")
    return toml


# ----------------------------------------------------------------------------------------------------------------
# FLF2V cache entries
# ----------------------------------------------------------------------------------------------------------------


def to_image(frame: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> [3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float() / 127.5 - 1.0


def rewrite_flf2v_cache(dataset_toml: Path, vae: object, clip: object) -> int:
    """Turn an I2V latent cache (cache-latents --clip) into FLF2V entries, in place: `latents_image` becomes the
    official FLF2V y (mask 1 on the first and last frames, VAE of [first, grey..., last]) and `clip` the CLIP
    features of both frames [2, 257, D]. The entry keys stay (same media, preprocessing and encoders). Entries
    already in the FLF2V layout are left alone. Returns the number of entries rewritten."""
    scan = scan_dataset_group(load_dataset_config(dataset_toml))
    count = 0
    for entry in latent_entries(scan):
        info = read_entry_info(entry.path)
        if info is None or info.key is None or not info.settings.get("clip"):
            raise RuntimeError(f"{entry.path} is not an I2V cache entry with CLIP features: run cache-latents --clip "
                               "first")
        old = load_latent_entry(entry.path)
        if old["clip"].dim() == 3:  # [2, 257, D]: rewritten before (cache-latents re-encodes changed media as I2V)
            continue
        frames, _ = load_pixels(entry.item)  # uint8 [T, H, W, 3]
        height, width = frames.shape[1:3]
        with torch.no_grad():
            cond = first_last_to_video(vae, clip, to_image(frames[0]), to_image(frames[-1]), len(frames), height,
                                       width)
        latents = old["latents"]
        clip_fea = cond.clip_fea[0].unflatten(0, (2, -1))  # [2, 257, D]
        save_latent_entry(entry.path, entry.item, info.parts, LatentSettings(**info.settings), latents,
                          image_latents=cond.y[0].to(latents.dtype), clip=clip_fea)
        count += 1
    return count


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantPair:
    """A prompt x seed pair: noise seed `seed`; the reference clip (start/end images, control) is rendered from
    `seed + 1`. `prompt_motion` (Fun-Control only) makes the prompt name another motion than the control's."""

    combo: Combo
    seed: int
    heldout: bool
    prompt_motion: str | None = None

    @property
    def prompt(self) -> str:
        motion = self.prompt_motion or self.combo.motion
        return Combo(self.combo.colour, self.combo.shape, motion).caption


def variant_pairs(count: int = 12) -> list[VariantPair]:
    """`count` pairs: half held-out combinations, half training combinations, spread over colours/shapes/motions."""
    if count < 2:
        raise ValueError(f"count must be >= 2, got {count}")
    held = list(HELDOUT)
    train = train_combos()
    n_held = count // 2
    pairs = [VariantPair(held[(i * 5) % len(held)], EVAL_SEED_BASE + 10 * i, True) for i in range(n_held)]
    step = max(1, len(train) // (count - n_held))
    pairs += [VariantPair(train[(i * step + i // 5) % len(train)], EVAL_SEED_BASE + 5_000 + 10 * i, False)
              for i in range(count - n_held)]
    return pairs


def conflict_pairs(pairs: Sequence[VariantPair]) -> list[VariantPair]:
    """The same pairs with a prompt naming the next motion in MOTIONS (Fun-Control: does the control win?)."""
    return [dataclasses.replace(p, prompt_motion=MOTIONS[(MOTIONS.index(p.combo.motion) + 1) % len(MOTIONS)])
            for p in pairs]


def _conditioning(kind: str, pair: VariantPair, vae: WanVAE, clip: CLIPVision, frames: int, height: int,
                  width: int) -> Conditioning:
    ref = render_clip(pair.combo, seed=pair.seed + 1, num_frames=frames, size=height)
    if kind == "i2v":
        return image_to_video(vae, clip, to_image(ref[0]), frames, height, width)
    if kind == "flf2v":
        return first_last_to_video(vae, clip, to_image(ref[0]), to_image(ref[-1]), frames, height, width)
    control = torch.stack([to_image(f) for f in silhouette(pair.combo, pair.seed + 1, frames, height)])
    return fun_control(vae, None, control, frames, height, width)


@dataclass(frozen=True)
class VariantModels:
    """The loaded models a variant is generated with."""

    dit: WanModel
    vae: WanVAE
    t5: T5Encoder
    clip: CLIPVision


def generate_variant(kind: str, models: VariantModels, pairs: Sequence[VariantPair],
                     sampling: Sampling) -> torch.Tensor:
    """Clips [N, T, H, W, 3] in [0, 1], one per pair, through the nodes' path (conditioning -> denoise -> decode)."""
    dit, vae = models.dit, models.vae
    prompts = sorted({p.prompt for p in pairs} | {sampling.negative_prompt})
    embeds = dict(zip(prompts, encode_prompts(models.t5, prompts)))
    out = []
    for pair in pairs:
        with torch.no_grad():
            cond = _conditioning(kind, pair, vae, models.clip, sampling.frames, sampling.height, sampling.width)
        settings = SamplerSettings(steps=sampling.steps, guidance_scale=sampling.guidance, flow_shift=sampling.shift,
                                   seed=pair.seed, solver=sampling.solver)
        negative = [embeds[sampling.negative_prompt]] if sampling.guidance != 1.0 else None
        latents = denoise(dit, cond, [embeds[pair.prompt]], negative, settings)
        out.append(decode_latents(vae, latents)[0])
    return torch.stack(out)


@dataclass
class PairResult:
    colour: bool
    motion: bool
    first_error: float  # px between the generated and the reference centroid in the first frame (NaN: not found)
    last_error: float
    track_error: float  # mean over frames

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def judge(clip: np.ndarray, pair: VariantPair) -> PairResult:
    """Score a generated clip against the reference clip of `pair` (its object, path and motion)."""
    det = analyze_clip(clip)
    frames, size = clip.shape[0], clip.shape[1]
    ref = sample_params(pair.combo, seed=pair.seed + 1, num_frames=frames, size=size).centroids(pair.combo.shape)
    errors = np.linalg.norm(det.centroids - ref, axis=1)  # [T] (NaN where the object was not found)
    return PairResult(det.colour == pair.combo.colour, det.motion == pair.combo.motion, float(errors[0]),
                      float(errors[-1]), float(np.mean(errors)))


def _rate(values: Sequence[bool]) -> float:
    return round(sum(values) / max(len(values), 1), 3)


def _ok(error: float) -> bool:
    return not math.isnan(error) and error <= POSITION_TOLERANCE


def summarise(kind: str, results: Sequence[PairResult]) -> dict[str, object]:
    """Rates per variant. Success: I2V colour + motion + first frame in place; FLF2V colour + first and last frames
    in place; Fun-Control colour + the control's motion + the whole track in place (mean error)."""
    first = [_ok(r.first_error) for r in results]
    last = [_ok(r.last_error) for r in results]
    track = [_ok(r.track_error) for r in results]
    colour = [r.colour for r in results]
    motion = [r.motion for r in results]
    if kind == "i2v":
        success = [c and m and f for c, m, f in zip(colour, motion, first)]
    elif kind == "flf2v":
        success = [c and f and x for c, f, x in zip(colour, first, last)]
    else:
        success = [c and m and t for c, m, t in zip(colour, motion, track)]
    finite = [r.track_error for r in results if not math.isnan(r.track_error)]
    return {"n": len(results), "success": _rate(success), "colour": _rate(colour), "motion": _rate(motion),
            "first_in_place": _rate(first), "last_in_place": _rate(last), "track_in_place": _rate(track),
            "median_track_error_px": round(float(np.median(finite)), 2) if finite else None}


def evaluate_variant(kind: str, models: VariantModels, pairs: Sequence[VariantPair], sampling: Sampling,
                     conflict: bool = True) -> dict[str, object]:
    """Generate and score `pairs`; for Fun-Control (with `conflict`) also the same pairs with a prompt naming
    another motion than the control's."""
    start = time.perf_counter()
    clips = generate_variant(kind, models, pairs, sampling)
    results = [judge(c.numpy(), p) for c, p in zip(clips, pairs)]
    figures = summarise(kind, results)
    held = [r for r, p in zip(results, pairs) if p.heldout]
    figures["heldout_success"] = summarise(kind, held)["success"] if held else None
    if kind == "fun_control" and conflict:
        others = conflict_pairs(pairs)
        clips = generate_variant(kind, models, others, sampling)
        follows = [judge(c.numpy(), p) for c, p in zip(clips, others)]
        figures["conflicting_prompt"] = summarise(kind, follows)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    return figures


# ----------------------------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VariantBuild(TimedStages):
    REPORT_NAME = "variants_report.json"

    cfg: VariantConfig
    out: Path
    work: Path
    t2v: Path
    vae: Path
    t5: Path
    stages: dict[str, float] = field(default_factory=dict)
    figures: dict[str, object] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.work / "variants.log"

    def path(self, kind: str) -> Path:
        return self.out / VARIANT_FILES[kind]

    def dataset(self, kind: str) -> Path:
        return self.work / f"data_{kind}" / "dataset.toml"

    def stage_data(self, kind: str) -> None:
        """Write the dataset unless the same one is there (its caches are then reused by content key)."""
        cfg = self.cfg
        out = self.dataset(kind).parent
        recipe = {"kind": kind, "clips_per_combo": cfg.clips_per_combo, "seed": cfg.seed + 31 + KINDS.index(kind),
                  "batch": cfg.batch, "combos": [asdict(c) for c in train_combos()]}
        if kind == "fun_control" and cfg.conflict_captions:
            recipe["conflict_captions"] = cfg.conflict_captions
        marker = out / "variants_data.json"
        if marker.is_file() and json.loads(marker.read_text()) == recipe:
            logger.info("reusing the %s dataset in %s", kind, out)
            return
        if out.exists():
            shutil.rmtree(out)
        if kind == "fun_control":
            write_control_dataset(out, train_combos(), cfg.clips_per_combo, recipe["seed"], cfg.batch,
                                  cfg.conflict_captions)
        else:
            write_image_dataset(out, train_combos(), cfg.clips_per_combo, recipe["seed"], cfg.batch)
        marker.write_text(json.dumps(recipe) + "\n")

    def stage_cache(self, kind: str) -> None:
        toml = self.dataset(kind)
        clip = ["--clip", self.path("clip")] if kind != "fun_control" else []
        run(["-m", "training", "cache-latents", "--dataset_config", toml, "--vae", self.vae, "--vae_dtype", "float32",
             "--device", "cpu", *clip], self.log)
        run(["-m", "training", "cache-text", "--dataset_config", toml, "--t5", self.t5, "--device", "cpu"], self.log)
        if kind == "flf2v":
            count = rewrite_flf2v_cache(toml, load_vae(self.vae, dtype=torch.float32),
                                        load_clip_vision(self.path("clip")))
            logger.info("rewrote %d cache entries with the FLF2V layout", count)

    def stage_train(self, kind: str) -> None:
        cfg = self.cfg
        steps = {"flf2v": cfg.flf2v_steps, "fun_control": cfg.fun_control_steps or cfg.steps}.get(kind, cfg.steps)
        folder = self.work / f"train_{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        init = write_variant_init(self.t2v, kind, TOY_CLIP_CONFIG.dim, cfg.seed + 41 + KINDS.index(kind),
                                  folder / "init.safetensors")
        run(["-m", "training", "train", "--dit", init, "--dataset_config", self.dataset(kind), "--output_dir",
             folder, "--output_name", kind, "--max_train_steps", steps, "--learning_rate", cfg.lr,
             "--lr_scheduler", "cosine", "--lr_warmup_steps", max(1, steps // 20), "--seed", cfg.seed,
             "--max_data_loader_n_workers", 0, "--timestep_sampling", cfg.timestep_sampling, "--optimizer_type",
             "AdamW", "--save_precision", cfg.save_precision, "--network_module", "full", "--caption_dropout_rate",
             cfg.caption_dropout], self.log)
        shutil.copyfile(folder / f"{kind}.safetensors", self.path(kind))

    def stage_evaluate(self, kind: str) -> None:
        self.figures[kind] = evaluate_files(kind, self.path(kind), self.vae, self.t5, self.path("clip"),
                                            variant_pairs(self.cfg.eval_pairs), sampling_source=self.t2v)

    def run(self) -> dict[str, object]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        total = time.perf_counter()
        self.figures["config"] = asdict(self.cfg) | {"clip": json.loads(config_to_json(TOY_CLIP_CONFIG))}
        self.timed("clip", build_toy_clip, self.path("clip"), self.cfg.seed + 51)
        for kind in self.cfg.kinds:
            for stage in ("data", "cache", "train", "evaluate"):
                self.timed(f"{kind}_{stage}", getattr(self, f"stage_{stage}"), kind)
        self.stages["total"] = round(time.perf_counter() - total, 1)
        self.figures["file_sizes"] = {p.name: p.stat().st_size for p in sorted(self.out.glob("*.safetensors"))}
        self.save()
        return {"stages": self.stages, "figures": self.figures}


def evaluate_files(kind: str, dit: Path, vae: Path, t5: Path, clip: Path, pairs: Sequence[VariantPair],
                   sampling_source: Path | None = None, conflict: bool = True) -> dict[str, object]:
    """Load the files (CPU, fp32) and run `evaluate_variant` with the DiT's stored sampling defaults (or those of
    `sampling_source`)."""
    sampling = sampling_from_file(sampling_source or dit)
    models = VariantModels(load_dit(dit, dtype=torch.float32), load_vae(vae, dtype=torch.float32), load_t5(t5),
                           load_clip_vision(clip))
    return evaluate_variant(kind, models, pairs, sampling, conflict)


def build_variants(out_dir: Path, work_dir: Path, t2v_dit: Path, vae: Path, t5: Path, seed: int = 0,
                   steps: int = VariantConfig.steps, config: VariantConfig | None = None) -> dict[str, object]:
    """Write the toy CLIP and the I2V / FLF2V / Fun-Control DiTs into `out_dir` (datasets, caches, logs and the
    report in `work_dir`); returns {"stages": seconds per stage, "figures": behaviour rates, sizes, config}."""
    for name, path in (("t2v_dit", t2v_dit), ("vae", vae), ("t5", t5)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} file not found: {path}")
    cfg = dataclasses.replace(config or VariantConfig(), seed=seed, steps=steps)
    build = VariantBuild(cfg, Path(out_dir).resolve(), Path(work_dir).resolve(), Path(t2v_dit).resolve(),
                         Path(vae).resolve(), Path(t5).resolve())
    return build.run()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.toy.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the four model files (e.g. wan_core/toy_models)")
    p.add_argument("--work", required=True, help="folder for datasets, caches, logs and the report")
    p.add_argument("--t2v", default=None, help="trained T2V toy DiT (default: <out>/" + TOY_FILES["dit"] + ")")
    p.add_argument("--vae", default=None, help="toy VAE (default: <out>/" + TOY_FILES["vae"] + ")")
    p.add_argument("--t5", default=None, help="toy umT5 (default: <out>/" + TOY_FILES["t5"] + ")")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    for name, value in asdict(VariantConfig()).items():
        if name not in ("seed", "kinds"):
            p.add_argument(f"--{name}", type=type(value), default=value)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    fields = {k: getattr(args, k) for k in asdict(VariantConfig()) if k not in ("seed", "kinds")}
    try:
        cfg = VariantConfig(**fields, kinds=tuple(args.kinds))
        report = build_variants(out, Path(args.work), Path(args.t2v or out / TOY_FILES["dit"]),
                                Path(args.vae or out / TOY_FILES["vae"]), Path(args.t5 or out / TOY_FILES["t5"]),
                                args.seed, args.steps, cfg)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    raise SystemExit(main())
