"""Command-line flags of `python -m training train`: musubi's `wan_train_network.py` names and defaults, plus
`--config_file` (a TOML holding any of them, see `training.config_file`) and this project's additions:

- `--network_module full`: train every DiT parameter and save the whole DiT (with its config in the metadata);
- `--caption_dropout_rate P`: replace a sample's caption embedding by the cached empty caption's with probability
  P (for classifier-free guidance);
- `--save_format musubi|comfyui`: LoRA key layout of the saved files;
- `--validation_split F` / `--validation_dataset_config X.toml`, `--validate_every_n_steps/_epochs`,
  `--validation_timesteps`: held-out loss at fixed timesteps with fixed noise;
- `--tokenizer` for T5 files without an embedded tokenizer (sampling).

Wan2.2 (musubi's flags): `--task t2v-A14B|i2v-A14B` with `--dit` (low-noise expert) and `--dit_high_noise` trains
one LoRA across both experts (`training.experts`), `--timestep_boundary` (0-1 or 0-1000; default: the task's),
`--offload_inactive_dit`; with `--dit` alone and `--min_timestep/--max_timestep` one expert is trained on its range.
`--task ti2v-5B` trains on latents cached with the Wan2.2 VAE.

`validate_args` rejects contradictory combinations with a message naming the flags.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from training.config_file import add_config_file_argument, parse_args
from training.optim import OptimizerConfig, SchedulerConfig
from training.timesteps import SCHEMES, WEIGHTING_SCHEMES, TimestepConfig
from training.train_config import (
    DEFAULT_VALIDATION_TIMESTEPS,
    DataConfig,
    MemoryConfig,
    ModelConfig,
    MonitorConfig,
    SaveConfig,
    ScheduleConfig,
    TrainConfig,
)
from training.trainable import NetworkConfig
from wan_core.loading.checkpoint import ensure_writable_dir
from wan_core.models.config import TASKS
from wan_core.runtime.offload import PINNED_MEMORY_HELP
from wan_core.sampling.experts import boundary_fraction

logger = logging.getLogger(__name__)

NETWORK_MODULES = ("networks.lora_wan", "lora_wan", "lora", "full")
FULL_NETWORK = "full"
ATTENTION_FLAGS = {"sdpa": "sdpa", "flash_attn": "flash2", "sage_attn": "sageattn", "xformers": "xformers",
                   "flash3": "flash3"}
SAVE_FORMATS = ("musubi", "comfyui")
SAVE_PRECISIONS = {"float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
REQUIRED = ("dataset_config", "dit", "output_dir")


def int_or_float(value: str) -> int | float:
    """musubi's `_int_or_float`: "10" -> 10, "0.1" -> 0.1, "5%" -> 0.05."""
    if value.endswith("%"):
        try:
            return float(value[:-1]) / 100.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a valid percentage") from None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an int or float") from None
    return int(number) if number >= 1 and number.is_integer() else number


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--task", choices=sorted(TASKS), default=None,
                   help="Wan task; checked against the DiT (inferred from the DiT when omitted)")
    g.add_argument("--dit", help="DiT checkpoint (official/ComfyUI/diffusers layout, or a file from init-dit); "
                                 "Wan2.2 A14B: the low-noise expert")
    g.add_argument("--dit_high_noise", default=None,
                   help="Wan2.2 A14B high-noise expert: one LoRA is trained across both experts, each batch on the "
                        "expert its drawn timesteps pick")
    g.add_argument("--timestep_boundary", type=float, default=None,
                   help="expert boundary, 0-1 or 0-1000: the high-noise expert takes t >= boundary (default: the "
                        "task's, 0.875 t2v-A14B / 0.9 i2v-A14B)")
    g.add_argument("--offload_inactive_dit", action="store_true",
                   help="keep only the active expert on the device, the other in CPU memory (not with "
                        "--blocks_to_swap)")
    g.add_argument("--dataset_config", help="dataset TOML (musubi schema) whose caches were built")
    g.add_argument("--vae", help="VAE checkpoint (needed for sampling during training)")
    g.add_argument("--vae_dtype", default=None, choices=["float32", "float16", "bfloat16"])
    g.add_argument("--t5", help="umT5 checkpoint (needed for sampling during training)")
    g.add_argument("--tokenizer", help="umT5 tokenizer (folder with spiece.model or the .model file) for --t5")
    g.add_argument("--fp8_t5", action="store_true", help="run the T5 in fp8 while encoding sample prompts")
    g.add_argument("--clip", help="CLIP vision checkpoint (sampling I2V models with a start image)")
    for flag, backend in ATTENTION_FLAGS.items():
        g.add_argument(f"--{flag}", action="store_true", help=f"attention kernel: {backend}")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--max_train_steps", type=int, default=1600, help="optimizer steps (default 1600)")
    g.add_argument("--max_train_epochs", type=int, default=None, help="epochs (overrides --max_train_steps)")
    g.add_argument("--max_data_loader_n_workers", type=int, default=8, help="DataLoader worker processes")
    g.add_argument("--persistent_data_loader_workers", action="store_true")
    g.add_argument("--seed", type=int, default=None, help="random seed (random when omitted)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--gradient_checkpointing_cpu_offload", action="store_true",
                   help="keep the saved block inputs in CPU memory (with --gradient_checkpointing)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast precision; the DiT weights are stored in it (default: no)")
    g.add_argument("--save_precision", choices=sorted(SAVE_PRECISIONS), default=None,
                   help="dtype of the saved weights (default fp32)")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0,
                   help="probability of training a sample with the empty caption's embedding")
    g.add_argument("--ddp_timeout", type=int, default=None, help="DDP timeout in minutes")


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer_type", default="", help="AdamW (default), AdamW8bit, Adafactor, Prodigy, or a class "
                                                        "path such as torch.optim.SGD / prodigyopt.Prodigy")
    g.add_argument("--optimizer_args", nargs="*", default=None, help="key=value items, e.g. weight_decay=0.01")
    g.add_argument("--learning_rate", type=float, default=2.0e-6)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm; 0 disables")
    g.add_argument("--lr_scheduler", default="constant", help="constant, constant_with_warmup, linear, cosine, "
                   "cosine_with_restarts, polynomial, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, "
                   "piecewise_constant")
    g.add_argument("--lr_warmup_steps", type=int_or_float, default=0, help="steps, or a ratio (< 1) of all steps")
    g.add_argument("--lr_decay_steps", type=int_or_float, default=0, help="steps, or a ratio (< 1) of all steps")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    g.add_argument("--lr_scheduler_power", type=float, default=1.0)
    g.add_argument("--lr_scheduler_timescale", type=int, default=None)
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None)
    g.add_argument("--lr_scheduler_type", default="", help="scheduler class path (with --lr_scheduler_args)")
    g.add_argument("--lr_scheduler_args", nargs="*", default=None)


def _add_memory_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory")
    g.add_argument("--fp8_base", action="store_true", help="store the frozen DiT Linear weights in fp8")
    g.add_argument("--fp8_scaled", action="store_true", help="block-wise scaled fp8 (with --fp8_base)")
    g.add_argument("--blocks_to_swap", type=int, default=None, help="DiT blocks kept in CPU memory")
    g.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help=PINNED_MEMORY_HELP)


def _add_timestep_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("timesteps and loss")
    g.add_argument("--timestep_sampling", choices=SCHEMES, default="sigma")
    g.add_argument("--discrete_flow_shift", type=float, default=1.0, help="shift of the `shift` scheme")
    g.add_argument("--sigmoid_scale", type=float, default=1.0)
    g.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="none")
    g.add_argument("--logit_mean", type=float, default=0.0)
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29)
    g.add_argument("--min_timestep", type=int, default=None)
    g.add_argument("--max_timestep", type=int, default=None)
    g.add_argument("--preserve_distribution_shape", action="store_true",
                   help="keep the distribution's shape inside [min, max] by rejection instead of rescaling")
    g.add_argument("--num_timestep_buckets", type=int, default=None, help="stratify the timestep draws")


def _add_network_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network")
    g.add_argument("--network_module", default=None,
                   help="networks.lora_wan (LoRA, the default) or full (train all DiT parameters)")
    g.add_argument("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    g.add_argument("--network_alpha", type=float, default=None, help="LoRA alpha (default 1; scale = alpha/rank)")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down output")
    g.add_argument("--network_args", nargs="*", default=None, help="rank_dropout=, module_dropout=, "
                   "include_patterns=[...], exclude_patterns=[...], loraplus_lr_ratio=, verbose=True")
    g.add_argument("--network_weights", default=None, help="start from this LoRA (any supported format)")
    g.add_argument("--dim_from_weights", action="store_true", help="take rank and alpha from --network_weights")
    g.add_argument("--training_comment", default=None)
    g.add_argument("--no_metadata", action="store_true", help="save only the minimum metadata keys")


def _add_save_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("saving")
    g.add_argument("--output_dir", default=None)
    g.add_argument("--output_name", default=None, help="file name stem (default: lora, or dit for full training)")
    g.add_argument("--save_format", choices=SAVE_FORMATS, default="musubi",
                   help="LoRA keys: musubi (lora_unet_*, default) or comfyui (diffusion_model.*.lora_A/B)")
    g.add_argument("--resume", default=None, help="state directory written by --save_state")
    g.add_argument("--save_every_n_epochs", type=int, default=None)
    g.add_argument("--save_every_n_steps", type=int, default=None)
    g.add_argument("--save_last_n_epochs", type=int, default=None)
    g.add_argument("--save_last_n_epochs_state", type=int, default=None)
    g.add_argument("--save_last_n_steps", type=int, default=None)
    g.add_argument("--save_last_n_steps_state", type=int, default=None)
    g.add_argument("--save_state", action="store_true", help="also save the training state at each save")
    g.add_argument("--save_state_on_train_end", action="store_true")
    for key in ("title", "author", "description", "license", "tags"):
        g.add_argument(f"--metadata_{key}", default=None)


def _add_logging_and_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging, sampling, validation")
    g.add_argument("--logging_dir", default=None, help="TensorBoard log folder")
    g.add_argument("--log_with", choices=["tensorboard", "wandb", "all"], default=None)
    g.add_argument("--log_prefix", default=None)
    g.add_argument("--log_tracker_name", default=None)
    g.add_argument("--sample_prompts", default=None, help="prompt file (inline --w --h --f --d --s --l --fs --n --i)")
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    g.add_argument("--sample_every_n_epochs", type=int, default=None)
    g.add_argument("--sample_at_first", action="store_true")
    g.add_argument("--validation_split", type=float, default=None, help="fraction of items held out")
    g.add_argument("--validation_dataset_config", default=None, help="dataset TOML of held-out data")
    g.add_argument("--validate_every_n_steps", type=int, default=None)
    g.add_argument("--validate_every_n_epochs", type=int, default=None, help="default 1 when validating")
    g.add_argument("--validation_timesteps", type=int, nargs="+", default=list(DEFAULT_VALIDATION_TIMESTEPS),
                   help="fixed timesteps (1..1000) of the validation loss")


WAN22_EPILOG = """Wan2.2 A14B: one LoRA for both experts (--dit LOW --dit_high_noise HIGH), or one expert alone
(--dit EXPERT with its timestep range). Recommended single-expert ranges (--min_timestep / --max_timestep):
  task       low-noise expert   high-noise expert   boundary
  t2v-A14B   0 - 875            875 - 1000          0.875
  i2v-A14B   0 - 900            900 - 1000          0.9
i2v-A14B has no CLIP branch: cache with `cache-latents --task i2v-A14B` (image latents, no --clip).
ti2v-5B: cache with the Wan2.2 VAE (48 channels; bucket sides multiples of 32 px)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flag help; the epilog's table kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training train", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter, epilog=WAN22_EPILOG)
    add_config_file_argument(parser)
    _add_model_args(parser)
    _add_training_args(parser)
    _add_optimizer_args(parser)
    _add_memory_args(parser)
    _add_timestep_args(parser)
    _add_network_args(parser)
    _add_save_args(parser)
    _add_logging_and_sampling_args(parser)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Validation of combinations
# ----------------------------------------------------------------------------------------------------------------

def attention_backend(args: argparse.Namespace) -> str:
    chosen = [flag for flag in ATTENTION_FLAGS if getattr(args, flag)]
    if len(chosen) > 1:
        raise ValueError(f"give one attention flag, got {' '.join('--' + f for f in chosen)}")
    if chosen == ["sage_attn"]:
        raise ValueError("--sage_attn has no backward pass (SageAttention is inference-only); use --sdpa, "
                         "--flash_attn, --flash3 or --xformers for training")
    return ATTENTION_FLAGS[chosen[0]] if chosen else "sdpa"


def is_full(args: argparse.Namespace) -> bool:
    return args.network_module == FULL_NETWORK


def _network_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.network_module is not None and args.network_module not in NETWORK_MODULES:
        problems.append(f"--network_module {args.network_module!r} is not supported; use networks.lora_wan (LoRA) "
                        f"or full")
    if is_full(args):
        given = [f"--{name}" for name in ("network_dim", "network_alpha", "network_dropout", "network_args",
                                          "network_weights") if getattr(args, name) is not None]
        given += ["--fp8_base"] if args.fp8_base else []
        given += ["--blocks_to_swap"] if args.blocks_to_swap else []
        given += ["--dim_from_weights"] if args.dim_from_weights else []
        given += [f"--save_format {args.save_format}"] if args.save_format != "musubi" else []
        if given:
            problems.append(f"--network_module full trains the whole DiT; {', '.join(given)} only apply to LoRA "
                            f"training (to continue full training, pass the saved DiT as --dit)")
    if args.dim_from_weights and not args.network_weights:
        problems.append("--dim_from_weights needs --network_weights")
    if args.network_dim is not None and args.network_dim < 1:
        problems.append(f"--network_dim must be >= 1, got {args.network_dim}")
    return problems


def _schedule_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    for name in ("max_train_steps", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps",
                 "sample_every_n_epochs", "validate_every_n_steps", "validate_every_n_epochs",
                 "save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name} must be >= 1, got {value}")
    if args.max_data_loader_n_workers < 0:
        problems.append(f"--max_data_loader_n_workers must be >= 0, got {args.max_data_loader_n_workers}")
    for unit in ("epochs", "steps"):
        for suffix in ("", "_state"):
            if getattr(args, f"save_last_n_{unit}{suffix}") is not None and \
                    getattr(args, f"save_every_n_{unit}") is None:
                problems.append(f"--save_last_n_{unit}{suffix} needs --save_every_n_{unit}")
    if args.max_grad_norm < 0:
        problems.append(f"--max_grad_norm must be >= 0, got {args.max_grad_norm}")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {args.learning_rate}")
    return problems


def _feature_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.fp8_scaled and not args.fp8_base:
        problems.append("--fp8_scaled is used together with --fp8_base")
    if args.gradient_checkpointing_cpu_offload and not args.gradient_checkpointing:
        problems.append("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing")
    if not 0.0 <= args.caption_dropout_rate < 1.0:
        problems.append(f"--caption_dropout_rate must be in [0, 1), got {args.caption_dropout_rate}")
    wants_samples = args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first
    if wants_samples and not args.sample_prompts:
        problems.append("--sample_every_n_steps/--sample_every_n_epochs/--sample_at_first need --sample_prompts")
    if args.sample_prompts and not (args.vae and args.t5):
        problems.append("--sample_prompts needs --vae and --t5 (and --clip for I2V start images)")
    if args.log_with in ("wandb", "all"):
        problems.append(f"--log_with {args.log_with}: only tensorboard is supported")
    if args.log_with and not args.logging_dir:
        problems.append("--log_with tensorboard needs --logging_dir")
    if args.validation_split is not None and args.validation_dataset_config:
        problems.append("give --validation_split or --validation_dataset_config, not both")
    if args.validation_split is not None and not 0.0 < args.validation_split < 1.0:
        problems.append(f"--validation_split must be in (0, 1), got {args.validation_split}")
    if any(not 0 < t <= 1000 for t in args.validation_timesteps):
        problems.append(f"--validation_timesteps must be in 1..1000, got {args.validation_timesteps}")
    if args.blocks_to_swap is not None and args.blocks_to_swap < 0:
        problems.append(f"--blocks_to_swap must be >= 0, got {args.blocks_to_swap}")
    return problems + _expert_problems(args)


def _expert_problems(args: argparse.Namespace) -> list[str]:
    """Wan2.2 expert-pair flags: they need --dit_high_noise, and a pair trains one LoRA without block swap
    offloading conflicts."""
    if not args.dit_high_noise:
        given = [flag for flag, value in (("timestep_boundary", args.timestep_boundary is not None),
                                          ("offload_inactive_dit", args.offload_inactive_dit)) if value]
        return [f"--{flag} needs --dit_high_noise (the high-noise expert)" for flag in given]
    problems = []
    if args.timestep_boundary is not None:
        try:
            boundary_fraction(args.timestep_boundary)
        except ValueError:
            problems.append(f"--timestep_boundary must be in [0, 1] or (1, 1000], got {args.timestep_boundary:g}")
    if args.offload_inactive_dit and args.blocks_to_swap:
        problems.append("--offload_inactive_dit cannot be combined with --blocks_to_swap (the swapped blocks already "
                        "live in CPU memory)")
    if is_full(args):
        problems.append("--dit_high_noise trains one LoRA across both experts; --network_module full is not "
                        "supported with it (train each expert alone)")
    return problems


def _output_problems(args: argparse.Namespace) -> list[str]:
    """The output (and TensorBoard) folders are created now and must be writable, so that a bad path fails before
    the models load rather than at the first save."""
    problems = []
    for flag in ("output_dir", "logging_dir"):
        folder = getattr(args, flag, None)
        if folder:
            try:
                ensure_writable_dir(folder, f"--{flag}")
            except ValueError as error:
                problems.append(str(error))
    return problems


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Raise one ValueError listing every contradictory or out-of-range flag or unusable output folder; returns
    `args`."""
    problems = _network_problems(args) + _schedule_problems(args) + _feature_problems(args)
    problems += _output_problems(args)
    try:
        attention_backend(args)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ValueError("invalid training flags:\n  - " + "\n  - ".join(problems))
    return args


def parse_train_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse (with `--config_file`), check required flags (exit code 2), then `validate_args` (ValueError)."""
    return validate_args(parse_args(build_parser(), argv, required=REQUIRED))


def _fields(cls: type, args: argparse.Namespace, *computed: str) -> dict[str, object]:
    """The flags named like the fields of the dataclass `cls`, except the `computed` ones."""
    return {name: getattr(args, name) for name in cls.__dataclass_fields__ if name not in computed}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed (and validated) training flags."""
    model = ModelConfig(**_fields(ModelConfig, args, "attention"), attention=attention_backend(args))
    monitor = MonitorConfig(**_fields(MonitorConfig, args, "validation_timesteps"),
                            validation_timesteps=tuple(args.validation_timesteps))
    return TrainConfig(model=model, data=DataConfig(**_fields(DataConfig, args)),
                       network=NetworkConfig.from_args(args), optimizer=OptimizerConfig.from_args(args),
                       scheduler=SchedulerConfig.from_args(args), timesteps=TimestepConfig.from_args(args),
                       schedule=ScheduleConfig(**_fields(ScheduleConfig, args)),
                       memory=MemoryConfig(**_fields(MemoryConfig, args)),
                       save=SaveConfig(**_fields(SaveConfig, args)), monitor=monitor)


def parse_train_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """`parse_train_args`, as a TrainConfig."""
    return config_from_args(parse_train_args(argv))
