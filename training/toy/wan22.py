"""Toy Wan2.2 T2V-A14B expert pair, fine-tuned from the trained toy T2V DiT.

`python -m training.toy.wan22 --out DIR --work DIR --dataset DATASET.toml [--t2v T2V] [--vae VAE] [--t5 UMT5]`

Steps (each timed; figures to `<work>/wan22_report.json`):
    1. boundary  from the T2V file's stored sampling defaults (`wantuner_sampling`: solver, steps, shift): the
                 midpoint between the timesteps of step `n_high - 1` and `n_high`, n_high = `high_share` x steps,
                 so that the high-noise expert runs n_high of the sampling steps and the low-noise expert the rest
                 (Wan2.2's own 0.875 runs 4 of the toy's 12 steps at shift 3, and 26 of its 40 at shift 12)
    2. init      the T2V DiT's weights, with its sampling defaults renamed to task t2v-A14B plus
                 `timestep_boundary` and `guidance_scale_high_noise` (full training carries `wantuner_*` metadata
                 into the trained file, so the CLI takes these as its defaults)
    3. high, low `python -m training train --task t2v-A14B --network_module full` on the T2V DiT's dataset cache,
                 each expert on its side of the boundary (`--min_timestep` / `--max_timestep`, with
                 `--preserve_distribution_shape`: the T2V DiT's own timestep distribution, cut to the range)
    4. evaluate  the single T2V DiT, the pair switched at the boundary, and the pair with the experts swapped
                 (high <-> low, same per-step guidance), on the same prompts and noise seeds: the toy scorer
                 (`training.toy.evaluate`) and the independent pixel audit (`training.toy.audit`); and what each
                 expert learnt: the velocity error of the single DiT and of each expert at the sampling schedule's
                 timesteps on each side of the boundary, with fixed noise on every `error_every`-th cached clip
                 (the trainer's validation loss, `training.validation`)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from training.cache.store import open_training_source
from training.step import StepConfig
from training.timesteps import TimestepConfig
from training.toy import audit
from training.toy.commands import TimedStages, run, run_all
from training.toy.evaluate import Sampling, ToySet, base_pairs, clip_noise, evaluate
from training.validation import Validator
from wan_core.loading.checkpoint import load_state_dict, read_metadata, save_safetensors
from wan_core.loading.model_set import SAMPLING_METADATA_KEY, TOY_EXPERT_FILES, TOY_FILES, sampling_defaults
from wan_core.models.dit import load_dit
from wan_core.models.t5 import load_t5
from wan_core.models.vae import load_vae
from wan_core.sampling.experts import ExpertSwitch, expert_for
from wan_core.sampling.solvers import NUM_TRAIN_TIMESTEPS, get_schedule

logger = logging.getLogger(__name__)

TASK = "t2v-A14B"
EXPERTS = ("high", "low")
EXPERT_FILES = dict(zip(EXPERTS, TOY_EXPERT_FILES[TASK]))
SETUPS = ("single", "pair", "swapped")
CLEANER_SHARE = 0.75  # "swapping visibly hurts": the pair's sample is the cleaner one on at least this share of the
# prompt x seed pairs (scorer background noise, same noise seeds), and the swapped median is higher


@dataclass(frozen=True)
class Wan22Config:
    """Everything the expert-pair build does is decided here and by `seed`."""

    seed: int = 0
    high_share: float = 0.5  # share of the toy sampling steps the high-noise expert runs
    # Per expert. With 800 steps at 5e-4 the experts stayed too alike to see a swap (background noise 2.07 -> 2.33);
    # 2400 at 2e-3 specialise them: each doubles to quadruples its error on the other side of the boundary, and
    # swapping them leaves grainy backgrounds and lumpy shapes.
    steps: int = 2400
    lr: float = 2e-3
    parallel: bool = True  # train both experts at once, one process each (their runs are independent)
    timestep_sampling: str = "shift"  # the T2V stage's scheme, cut to each expert's range
    flow_shift: float = 3.0
    caption_dropout: float = 0.1
    save_precision: str = "fp16"
    guidance_high: float = -1.0  # the high-noise expert's guidance; < 0: the T2V file's guidance
    evaluate: bool = True
    eval_heldout_seeds: int = 2  # scorer pairs (training.toy.evaluate.base_pairs)
    eval_train_count: int = 24
    audit_seeds: int = 1  # audit: every base combination x this many noise seeds
    error_every: int = 8  # denoising errors on every n-th cached clip of the dataset

    def __post_init__(self) -> None:
        if not 0.0 < self.high_share < 1.0:
            raise ValueError(f"high_share must be in (0, 1), got {self.high_share}")
        for name in ("steps", "audit_seeds", "error_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0.0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


# ----------------------------------------------------------------------------------------------------------------
# Boundary and metadata
# ----------------------------------------------------------------------------------------------------------------


def toy_boundary(steps: int, shift: float, solver: str, high_share: float) -> float:
    """The expert boundary (fraction of 1000, 3 decimals) that gives the high-noise expert round(high_share x
    steps) of the `solver` schedule's steps (at least 1, and at least 1 left to the low-noise expert)."""
    if steps < 2:
        raise ValueError(f"an expert pair needs at least 2 sampling steps to split, got {steps}")
    if not 0.0 < high_share < 1.0:
        raise ValueError(f"high_share must be in (0, 1), got {high_share}")
    timesteps = [float(t) for t in get_schedule(solver, steps, shift).timesteps]
    n_high = min(max(round(high_share * steps), 1), steps - 1)
    boundary = round((timesteps[n_high - 1] + timesteps[n_high]) / 2.0 / NUM_TRAIN_TIMESTEPS, 3)
    split = sum(expert_for(t, boundary) == "high" for t in timesteps)
    if split != n_high:
        raise ValueError(f"steps {n_high - 1} and {n_high} of the {solver} schedule ({steps} steps, shift {shift}) "
                         f"are too close to put a 3-decimal boundary between them")
    return boundary


def expert_sampling(t2v_sampling: dict, boundary: float, guidance_high: float) -> dict:
    """The experts' `wantuner_sampling`: the T2V file's defaults for task t2v-A14B with the boundary and the
    high-noise guidance."""
    return t2v_sampling | {"task": TASK, "timestep_boundary": boundary, "guidance_scale_high_noise": guidance_high}


def write_expert_init(t2v: Path, path: Path, sampling: dict) -> Path:
    """The T2V DiT's weights (fp32) and `wantuner_*` metadata, with `sampling` as its `wantuner_sampling`."""
    meta = {k: v for k, v in read_metadata(t2v).items() if k.startswith("wantuner_")}
    meta[SAMPLING_METADATA_KEY] = json.dumps(sampling)
    weights = {k: v.float() for k, v in load_state_dict(t2v).items()}
    return save_safetensors(weights, path, meta)


def timestep_range(expert: str, boundary: float) -> tuple[int, int]:
    """(min, max) training timestep of `expert`: high noise [boundary x 1000, 1000], low noise [0, that]."""
    edge = round(boundary * NUM_TRAIN_TIMESTEPS)
    if not 0 < edge < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"boundary {boundary} leaves one expert no timesteps")
    return (edge, NUM_TRAIN_TIMESTEPS) if expert == "high" else (0, edge)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def setup_model(setup: str, single: torch.nn.Module, high: torch.nn.Module, low: torch.nn.Module,
                sampling: dict) -> torch.nn.Module | ExpertSwitch:
    """The model a setup samples with: the T2V DiT, the pair switched at the boundary, or the pair with the experts
    in each other's place (each step keeps the guidance of its side of the boundary)."""
    if setup == "single":
        return single
    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}; expected one of {SETUPS}")
    first, second = (high, low) if setup == "pair" else (low, high)
    return ExpertSwitch(first, second, float(sampling["timestep_boundary"]),
                        float(sampling["guidance_scale_high_noise"]), float(sampling["guidance_scale"]),
                        torch.device("cpu"))


def evaluate_setups(t2v: Path, high: Path, low: Path, vae: Path, t5: Path,
                    cfg: Wan22Config) -> dict[str, dict[str, object]]:
    """Scorer and audit figures of each setup (`SETUPS`) on the same prompts and noise seeds."""
    models = {"single": load_dit(t2v, dtype=torch.float32), "high": load_dit(high, dtype=torch.float32),
              "low": load_dit(low, dtype=torch.float32)}
    vae_model, t5_model = load_vae(vae), load_t5(t5)
    pair_sampling = sampling_defaults(low)
    pairs = base_pairs(cfg.eval_heldout_seeds, cfg.eval_train_count)
    figures: dict[str, dict[str, object]] = {}
    for setup in SETUPS:
        meta = sampling_defaults(t2v) if setup == "single" else pair_sampling
        model = setup_model(setup, models["single"], models["high"], models["low"], pair_sampling)
        sampling = Sampling(steps=int(meta["infer_steps"]), guidance=float(meta["guidance_scale"]),
                            shift=float(meta["flow_shift"]), solver=str(meta.get("sample_solver", "unipc")),
                            negative_prompt=str(meta.get("negative_prompt", "")), height=int(meta["video_size"][0]),
                            width=int(meta["video_size"][1]), frames=int(meta["video_length"]))
        report = evaluate(ToySet(model, vae_model, t5_model, low), pairs, sampling)  # type: ignore[arg-type]
        score = report.as_dict() | {"clip_noise": clip_noise(report.overall)}
        start = time.perf_counter()
        looked = audit.audit_models(model, vae_model, t5_model, meta, cfg.audit_seeds)
        looked = {k: round(v, 4) if isinstance(v, float) else v for k, v in looked.items()}
        looked["seconds"] = round(time.perf_counter() - start, 1)
        figures[setup] = {"score": score, "audit": looked}
        if isinstance(model, ExpertSwitch):  # model calls per expert, scorer and audit together
            figures[setup]["expert_calls"] = {name: model.used.count(name) for name in EXPERTS}
        logger.info("%s: scorer colour+motion %.3f, audit colour+motion %.3f", setup, score["colour_motion"],
                    looked["colour_motion"])
    return figures


def denoising_errors(models: dict[str, torch.nn.Module], dataset: Path, sampling: dict,
                     every: int, seed: int) -> dict[str, object]:
    """Mean velocity MSE of each model (fixed noise per clip, no caption dropout) over the sampling schedule's
    timesteps on each side of the boundary, on every `every`-th cached clip of `dataset`: {"timesteps": {side:
    [t]}, "clips": n, "errors": {model: {side: mse}}}. A pair whose experts specialised has each expert below the
    other on its own side."""
    schedule = get_schedule(str(sampling.get("sample_solver", "unipc")), int(sampling["infer_steps"]),
                            float(sampling["flow_shift"]))
    boundary = float(sampling["timestep_boundary"])
    sides: dict[str, list[int]] = {name: [] for name in EXPERTS}
    for t in schedule.timesteps:
        sides[expert_for(float(t), boundary)].append(min(max(round(float(t)), 1), NUM_TRAIN_TIMESTEPS))
    source = open_training_source(dataset, caption_dropout_rate=0.0)
    items = source.items()[::every]
    validator = Validator(source, items, seed, [t for ts in sides.values() for t in ts])
    step_cfg = StepConfig(TimestepConfig())
    errors = {}
    for name, model in models.items():
        logs = validator.run(model, step_cfg)
        errors[name] = {side: round(sum(logs[f"val_loss/t{t:04d}"] for t in ts) / len(ts), 5)
                        for side, ts in sides.items()}
    return {"timesteps": sides, "clips": len(items), "errors": errors}


def specialised(denoising: dict[str, object]) -> bool:
    """Each expert's error on its own side of the boundary is below the other expert's there."""
    err = denoising["errors"]  # type: ignore[index]
    return all(err[own][own] < err[other][own] for own, other in (EXPERTS, EXPERTS[::-1]))  # type: ignore[index]


def cleaner_share(figures: dict[str, dict[str, object]], setup: str, other: str) -> float:
    """Share of the scorer's prompt x seed pairs on which `setup`'s sample has less background noise than
    `other`'s (the same prompts and noise seeds, in the same order)."""
    mine, theirs = figures[setup]["score"]["clip_noise"], figures[other]["score"]["clip_noise"]  # type: ignore[index]
    if len(mine) != len(theirs) or not mine:
        raise ValueError(f"{setup} and {other} were scored on {len(mine)} and {len(theirs)} clips")
    return sum(a < b for a, b in zip(mine, theirs)) / len(mine)


def claims(figures: dict[str, dict[str, object]]) -> dict[str, bool]:
    """The pair scores at least as well as the single DiT (scorer and audit colour+motion); swapping the experts
    scores worse than the pair by colour+motion (scorer, audit), leaves visibly noisier samples (scorer
    background noise higher on at least CLEANER_SHARE of the pairs and in the median) or draws the shapes worse
    (lower shape rate by the scorer and by the audit)."""
    def cm(setup: str, judge: str) -> float:
        return float(figures[setup][judge]["colour_motion"])  # type: ignore[index]

    def noise(setup: str) -> float:
        return float(figures[setup]["score"]["background_noise"])  # type: ignore[index]

    return {"pair_at_least_single_score": cm("pair", "score") >= cm("single", "score"),
            "pair_at_least_single_audit": cm("pair", "audit") >= cm("single", "audit"),
            "swap_hurts_score": cm("swapped", "score") < cm("pair", "score"),
            "swap_hurts_audit": cm("swapped", "audit") < cm("pair", "audit"),
            "swap_hurts_noise": (noise("swapped") > noise("pair")
                                 and cleaner_share(figures, "pair", "swapped") >= CLEANER_SHARE),
            "swap_hurts_shape": all(float(figures["swapped"][judge]["shape"])  # type: ignore[index]
                                    < float(figures["pair"][judge]["shape"]) for judge in ("score", "audit"))}


def readme_rows(figures: dict[str, object]) -> list[str]:
    """Markdown table rows (setup | scorer colour+motion / motion / held-out / background noise, cleaner than the pair,
    scorer shape | audit colour+motion / shape / still / smooth / forward) of a wan22 report's figures."""
    rows = ["| setup | scorer colour+motion | scorer motion | scorer held-out colour+motion | scorer background noise "
            "(median, 0..255) | cleaner than the pair | scorer shape | audit colour+motion | audit shape | audit "
            "still | audit smooth | audit forward |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for setup in SETUPS:
        s, a = figures[setup]["score"], figures[setup]["audit"]  # type: ignore[index]
        cleaner = "" if setup == "pair" else f"{cleaner_share(figures, setup, 'pair'):.3f}"
        rows.append(f"| {setup} | {s['colour_motion']:.3f} | {s['motion']:.3f} | "
                    f"{s.get('heldout_colour_motion', float('nan')):.3f} | {s['background_noise']:.2f} | {cleaner} | "
                    f"{s['shape']:.3f} | {a['colour_motion']:.3f} | {a['shape']:.3f} | {a['still_ok']:.3f} | "
                    f"{a['smooth']:.3f} | {a['forward']:.3f} |")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Wan22Build(TimedStages):
    REPORT_NAME = "wan22_report.json"

    cfg: Wan22Config
    out: Path
    work: Path
    t2v: Path
    vae: Path
    t5: Path
    dataset: Path
    stages: dict[str, float] = field(default_factory=dict)
    figures: dict[str, object] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.work / "wan22.log"

    def path(self, expert: str) -> Path:
        return self.out / EXPERT_FILES[expert]

    def sampling(self) -> dict:
        """The experts' sampling defaults (boundary from the T2V file's own defaults)."""
        base = sampling_defaults(self.t2v)
        missing = [k for k in ("infer_steps", "flow_shift", "guidance_scale") if k not in base]
        if missing:
            raise ValueError(f"{self.t2v} has no {SAMPLING_METADATA_KEY} {', '.join(missing)}: run the recipe's "
                             f"evaluate stage first (it stores the T2V DiT's sampling defaults)")
        boundary = toy_boundary(int(base["infer_steps"]), float(base["flow_shift"]),
                                str(base.get("sample_solver", "unipc")), self.cfg.high_share)
        guidance_high = self.cfg.guidance_high if self.cfg.guidance_high >= 0 else float(base["guidance_scale"])
        return expert_sampling(base, boundary, guidance_high)

    def train_args(self, expert: str, init: Path, boundary: float) -> list[object]:
        """The `python -m training train` arguments that fine-tune `expert` from `init` on its timestep range."""
        cfg = self.cfg
        low, high = timestep_range(expert, boundary)
        folder = self.work / f"train_{expert}"
        folder.mkdir(parents=True, exist_ok=True)
        return ["-m", "training", "train", "--task", TASK, "--dit", init, "--dataset_config", self.dataset,
                "--output_dir", folder, "--output_name", f"{expert}_noise", "--max_train_steps", cfg.steps,
                "--learning_rate", cfg.lr, "--lr_scheduler", "cosine", "--lr_warmup_steps", max(1, cfg.steps // 20),
                "--seed", cfg.seed, "--max_data_loader_n_workers", 0, "--timestep_sampling", cfg.timestep_sampling,
                "--discrete_flow_shift", cfg.flow_shift, "--min_timestep", low, "--max_timestep", high,
                "--preserve_distribution_shape", "--optimizer_type", "AdamW", "--save_precision",
                cfg.save_precision, "--network_module", "full", "--caption_dropout_rate", cfg.caption_dropout]

    def keep(self, expert: str) -> None:
        shutil.copyfile(self.work / f"train_{expert}" / f"{expert}_noise.safetensors", self.path(expert))

    def stage_train(self, expert: str, init: Path, boundary: float) -> None:
        run(self.train_args(expert, init, boundary), self.log)
        self.keep(expert)

    def train_both(self, init: Path, boundary: float) -> None:
        """Both experts at once, each logging to work/train_<expert>.log."""
        run_all([(self.train_args(e, init, boundary), self.work / f"train_{e}.log") for e in EXPERTS])
        for expert in EXPERTS:
            self.keep(expert)

    def expert_errors(self, sampling: dict) -> dict[str, object]:
        models = {"single": load_dit(self.t2v, dtype=torch.float32), "high": load_dit(self.path("high"),
                  dtype=torch.float32), "low": load_dit(self.path("low"), dtype=torch.float32)}
        return denoising_errors(models, self.dataset, sampling, self.cfg.error_every, self.cfg.seed)

    def run(self) -> dict[str, object]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        total = time.perf_counter()
        sampling = self.sampling()
        boundary = float(sampling["timestep_boundary"])
        schedule = get_schedule(str(sampling.get("sample_solver", "unipc")), int(sampling["infer_steps"]),
                                float(sampling["flow_shift"]))
        high_steps = sum(expert_for(float(t), boundary) == "high" for t in schedule.timesteps)
        self.figures["config"] = asdict(self.cfg)
        self.figures["sampling"] = sampling
        self.figures["ranges"] = {e: list(timestep_range(e, boundary)) for e in EXPERTS}
        self.figures["high_noise_steps"] = f"{high_steps} of {schedule.steps}"
        init = write_expert_init(self.t2v, self.work / "expert_init.safetensors", sampling)
        if self.cfg.parallel:
            self.timed("train", self.train_both, init, boundary)
        else:
            for expert in EXPERTS:
                self.timed(f"{expert}_train", self.stage_train, expert, init, boundary)
        if self.cfg.evaluate:
            setups = self.timed("evaluate", evaluate_setups, self.t2v, self.path("high"), self.path("low"), self.vae,
                                self.t5, self.cfg)
            self.figures["setups"] = setups
            self.figures["claims"] = claims(setups)  # type: ignore[arg-type]
            self.figures["readme_rows"] = readme_rows(setups)  # type: ignore[arg-type]
            self.figures["denoising"] = self.timed("errors", self.expert_errors, sampling)
            self.figures["claims"]["experts_specialised"] = specialised(self.figures["denoising"])  # type: ignore
        self.stages["total"] = round(time.perf_counter() - total, 1)
        self.figures["file_sizes"] = {self.path(e).name: self.path(e).stat().st_size for e in EXPERTS}
        self.save()
        return {"stages": self.stages, "figures": self.figures}


def build_wan22(out_dir: Path, work_dir: Path, t2v_dit: Path, vae: Path, t5: Path, dataset: Path,
                config: Wan22Config | None = None) -> dict[str, object]:
    """Write the toy T2V-A14B expert pair into `out_dir` (logs, training folders and the report in `work_dir`),
    trained on the cached dataset `dataset` (the T2V DiT's); returns {"stages": seconds, "figures": ...}."""
    for name, path in (("t2v_dit", t2v_dit), ("vae", vae), ("t5", t5), ("dataset", dataset)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} file not found: {path}")
    build = Wan22Build(config or Wan22Config(), Path(out_dir).resolve(), Path(work_dir).resolve(),
                       Path(t2v_dit).resolve(), Path(vae).resolve(), Path(t5).resolve(), Path(dataset).resolve())
    return build.run()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.toy.wan22", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the two expert files (e.g. wan_core/toy_models)")
    p.add_argument("--work", required=True, help="folder for logs, training outputs and the report")
    p.add_argument("--dataset", required=True, help="dataset TOML whose latent and text caches exist (the T2V DiT's)")
    p.add_argument("--t2v", default=None, help="trained T2V toy DiT (default: <out>/" + TOY_FILES["dit"] + ")")
    p.add_argument("--vae", default=None, help="toy VAE (default: <out>/" + TOY_FILES["vae"] + ")")
    p.add_argument("--t5", default=None, help="toy umT5 (default: <out>/" + TOY_FILES["t5"] + ")")
    for name, value in asdict(Wan22Config()).items():
        if isinstance(value, bool):
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(f"--{name}", type=type(value), default=value)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    cfg = Wan22Config(**{k: getattr(args, k) for k in asdict(Wan22Config())})
    try:
        report = build_wan22(out, Path(args.work), Path(args.t2v or out / TOY_FILES["dit"]),
                             Path(args.vae or out / TOY_FILES["vae"]), Path(args.t5 or out / TOY_FILES["t5"]),
                             Path(args.dataset), cfg)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    raise SystemExit(main())
