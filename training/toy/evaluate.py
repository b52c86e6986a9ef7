"""Behaviour evaluation of a toy model set: generate prompt x seed pairs through `wan_core.sampling.pipeline` and
score the
decoded clips with the toy-world scorer (`wan_core.toy.score`).

`python -m training.toy.evaluate [--models wan_core/toy_models] [--lora FILE] [--steps N --guidance G --shift S]`

Pair sets (`pairs`):
    * "base": every held-out combination (12) with `heldout_seeds` seeds each, plus `train_count` training
      combinations spread over colours/shapes/motions, one seed each;
    * "purple": every purple shape x motion (15), `purple_seeds` seeds each (the LoRA experiment).
Seeds are fixed and disjoint from everything the recipe trains on (noise seeds, not clip seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from training.toy.commands import emit_json
from wan_core.loading.checkpoint import load_state_dict, read_metadata, save_safetensors
from wan_core.loading.model_set import SAMPLING_METADATA_KEY, TOY_FILES, TOY_MODEL_DIR, sampling_defaults
from wan_core.lora.apply import apply_loras
from wan_core.models.dit import load_dit
from wan_core.models.t5 import load_t5
from wan_core.models.vae import load_vae
from wan_core.sampling.conditioning import text_to_video
from wan_core.sampling.pipeline import SamplerSettings, decode_latents, denoise, encode_prompts
from wan_core.toy.score import ScoreSummary, score_many
from wan_core.toy.world import HELDOUT, MOTIONS, SHAPES, Combo, train_combos

logger = logging.getLogger(__name__)

EVAL_SEED_BASE = 7_000_000  # noise seeds of the evaluation; the recipe never samples these


@dataclass(frozen=True)
class Pair:
    combo: Combo
    seed: int
    heldout: bool


@dataclass(frozen=True)
class Sampling:
    steps: int = 20
    guidance: float = 5.0
    shift: float = 3.0
    solver: str = "unipc"
    negative_prompt: str = ""
    height: int = 64
    width: int = 64
    frames: int = 9


def base_pairs(heldout_seeds: int = 2, train_count: int = 24) -> list[Pair]:
    """Held-out combinations x `heldout_seeds` seeds + `train_count` training combinations (one seed each)."""
    pairs = [Pair(c, EVAL_SEED_BASE + 100 * i + k, True) for i, c in enumerate(HELDOUT) for k in range(heldout_seeds)]
    train = train_combos()
    step = max(1, len(train) // max(train_count, 1))
    chosen = [train[(i * step + i // 8) % len(train)] for i in range(train_count)]
    pairs += [Pair(c, EVAL_SEED_BASE + 50_000 + i, False) for i, c in enumerate(chosen)]
    return pairs


def purple_pairs(seeds: int = 2) -> list[Pair]:
    combos = [Combo("purple", s, m) for s in SHAPES for m in MOTIONS]
    return [Pair(c, EVAL_SEED_BASE + 90_000 + 10 * i + k, True) for i, c in enumerate(combos) for k in range(seeds)]


def sampling_from_file(dit_path: str | Path) -> Sampling:
    """The recommended settings stored in the DiT file (`wantuner_sampling`), else the defaults."""
    meta = sampling_defaults(Path(dit_path))
    size = meta.get("video_size", (64, 64))
    return Sampling(steps=int(meta.get("infer_steps", 20)), guidance=float(meta.get("guidance_scale", 5.0)),
                    shift=float(meta.get("flow_shift", 3.0)), negative_prompt=str(meta.get("negative_prompt", "")),
                    height=int(size[0]), width=int(size[1]), frames=int(meta.get("video_length", 9)))


@dataclass
class ToySet:
    """The loaded DiT, VAE and umT5 of a model folder (CPU, fp32 compute)."""

    dit: torch.nn.Module
    vae: object
    t5: object
    dit_path: Path

    @classmethod
    def load(cls, folder: str | Path = TOY_MODEL_DIR, dit: str | Path | None = None) -> ToySet:
        folder = Path(folder)
        dit_path = Path(dit) if dit else folder / TOY_FILES["dit"]
        return cls(load_dit(dit_path, dtype=torch.float32), load_vae(folder / TOY_FILES["vae"]),
                   load_t5(folder / TOY_FILES["t5"]), dit_path)


def generate(models: ToySet, pairs: Sequence[Pair], sampling: Sampling, decode_batch: int = 16) -> torch.Tensor:
    """Clips [N, T, H, W, 3] in [0, 1] for each (prompt, seed) pair."""
    prompts = sorted({p.combo.caption for p in pairs} | {sampling.negative_prompt})
    embeds = dict(zip(prompts, encode_prompts(models.t5, prompts)))
    cond = text_to_video(sampling.height, sampling.width, sampling.frames)
    latents = []
    for pair in pairs:
        settings = SamplerSettings(steps=sampling.steps, guidance_scale=sampling.guidance, flow_shift=sampling.shift,
                                   seed=pair.seed, solver=sampling.solver)
        negative = [embeds[sampling.negative_prompt]] if sampling.guidance != 1.0 else None
        latents.append(denoise(models.dit, cond, [embeds[pair.combo.caption]], negative, settings))
    lat = torch.cat(latents)  # [N, 16, F, h, w]
    return torch.cat([decode_latents(models.vae, lat[i : i + decode_batch]) for i in range(0, len(lat), decode_batch)])


@dataclass(frozen=True)
class BehaviourReport:
    overall: ScoreSummary
    heldout: ScoreSummary | None
    seconds: float

    def as_dict(self) -> dict[str, float]:
        out = {"n": self.overall.n, "colour_motion": self.overall.colour_motion, "motion": self.overall.motion,
               "colour": self.overall.colour, "shape": self.overall.shape,
               "background_noise": round(self.overall.background_noise, 3), "seconds": round(self.seconds, 1)}
        if self.heldout is not None:
            out.update(heldout_n=self.heldout.n, heldout_colour_motion=self.heldout.colour_motion,
                       heldout_motion=self.heldout.motion)
        return out


def clip_noise(summary: ScoreSummary) -> list[float]:
    """Each scored clip's background noise (0..255, `wan_core.toy.score` step 5), in scoring order."""
    return [round(s.detection.background_noise, 3) for s in summary.scores]


def colour_rate(summary: ScoreSummary, colour: str) -> float:
    """Fraction of clips whose detected colour is `colour` (whatever the prompt asked for)."""
    return sum(s.detection.colour == colour for s in summary.scores) / max(summary.n, 1)


def evaluate(models: ToySet, pairs: Sequence[Pair], sampling: Sampling) -> BehaviourReport:
    start = time.perf_counter()
    clips = generate(models, pairs, sampling)
    overall = score_many(list(clips.numpy()), [p.combo for p in pairs])
    held = [s for s, p in zip(overall.scores, pairs) if p.heldout]
    heldout = None
    if held and len(held) < len(pairs):
        idx = [i for i, p in enumerate(pairs) if p.heldout]
        heldout = score_many([clips[i].numpy() for i in idx], [pairs[i].combo for i in idx])
    return BehaviourReport(overall, heldout, time.perf_counter() - start)


def apply_lora_file(models: ToySet, path: str | Path, multiplier: float = 1.0) -> object:
    """Wrap the DiT's layers with the LoRA (unmerged; `handle.remove()` restores the base model)."""
    return apply_loras(models.dit, [str(path)], [multiplier])


def write_sampling(dit_path: str | Path, sampling: Sampling, task: str = "t2v-1.3B") -> None:
    """Store `sampling` as the DiT file's recommended defaults (`wantuner_sampling` metadata), atomically."""
    meta = read_metadata(dit_path)
    meta[SAMPLING_METADATA_KEY] = json.dumps({
        "task": task, "video_size": [sampling.height, sampling.width], "video_length": sampling.frames,
        "infer_steps": sampling.steps, "flow_shift": sampling.shift, "guidance_scale": sampling.guidance,
        "negative_prompt": sampling.negative_prompt, "sample_solver": sampling.solver, "fps": 16})
    save_safetensors(dict(load_state_dict(dit_path)), dit_path, meta)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.toy.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=str(TOY_MODEL_DIR), help="folder with the toy files")
    p.add_argument("--dit", default=None, help="DiT file (default: the folder's T2V DiT)")
    p.add_argument("--lora", default=None, help="LoRA file to apply")
    p.add_argument("--set", choices=("base", "purple"), default="base")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--json", default=None, help="write the figures to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        models = ToySet.load(args.models, args.dit)
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    base = sampling_from_file(models.dit_path)
    sampling = Sampling(steps=args.steps or base.steps, guidance=base.guidance if args.guidance is None
                        else args.guidance, shift=args.shift or base.shift, negative_prompt=base.negative_prompt,
                        height=base.height, width=base.width, frames=base.frames)
    if args.lora:
        apply_lora_file(models, args.lora)
    pairs = base_pairs() if args.set == "base" else purple_pairs()
    report = evaluate(models, pairs, sampling)
    figures = report.as_dict() | {"purple_rate": colour_rate(report.overall, "purple")}
    emit_json(figures, args.json)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
