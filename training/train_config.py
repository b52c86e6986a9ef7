"""`TrainConfig`: everything a training run is told, typed and grouped. `training.train.train` takes it; the CLI
(`training.args.config_from_args`) and the ComfyUI Train LoRA node build it. Defaults equal the CLI defaults
(musubi's), so `TrainConfig(model=ModelConfig(dit=...), data=DataConfig(dataset_config=...),
save=SaveConfig(output_dir=...))` is the run `python -m training train` makes with only the required flags.

The timestep, network, optimizer and scheduler sections are the configs of the modules that use them
(`training.timesteps`, `training.trainable`, `training.optim`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.optim import OptimizerConfig, SchedulerConfig
from training.timesteps import TimestepConfig
from training.trainable import NetworkConfig

DEFAULT_VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass(frozen=True)
class ModelConfig:
    """The DiT (file and task), its attention kernel, and the encoders used for sampling during training."""

    dit: str | None = None  # DiT file (for a given model: where its metadata and name come from, may be None)
    dit_high_noise: str | None = None  # Wan2.2 A14B high-noise expert (dit is then the low-noise one)
    timestep_boundary: float | None = None  # 0..1 or 0..1000; None: the task's
    task: str | None = None  # checked against the DiT; inferred when None
    attention: str = "sdpa"  # wan_core.models.attention backend name
    vae: str | None = None
    vae_dtype: str | None = None  # float32 / float16 / bfloat16
    t5: str | None = None
    tokenizer: str | None = None
    fp8_t5: bool = False
    clip: str | None = None


@dataclass(frozen=True)
class DataConfig:
    dataset_config: str | None = None  # dataset TOML whose caches were built
    max_data_loader_n_workers: int = 8
    persistent_data_loader_workers: bool = False
    caption_dropout_rate: float = 0.0


@dataclass(frozen=True)
class ScheduleConfig:
    """How long the run is and how its randomness is seeded."""

    max_train_steps: int = 1600
    max_train_epochs: int | None = None  # overrides max_train_steps
    gradient_accumulation_steps: int = 1
    seed: int | None = None  # random when None


@dataclass(frozen=True)
class MemoryConfig:
    """Precision and memory options, and the process group timeout."""

    mixed_precision: str | None = None  # "no", "fp16", "bf16" (None = "no")
    gradient_checkpointing: bool = False
    gradient_checkpointing_cpu_offload: bool = False
    fp8_base: bool = False
    fp8_scaled: bool = False
    blocks_to_swap: int | None = None
    use_pinned_memory_for_block_swap: bool = False
    offload_inactive_dit: bool = False  # expert pair: only the active expert on the device
    ddp_timeout: int | None = None  # minutes


@dataclass(frozen=True)
class SaveConfig:
    output_dir: str | None = None
    output_name: str | None = None  # default: lora, or dit for full training
    save_format: str = "musubi"  # or "comfyui"
    save_precision: str | None = None  # float / fp32 / fp16 / bf16 (None = fp32)
    resume: str | None = None  # state folder written with save_state
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    no_metadata: bool = False
    training_comment: str | None = None
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None


@dataclass(frozen=True)
class MonitorConfig:
    """TensorBoard logging, sample generation and the validation loss."""

    logging_dir: str | None = None
    log_with: str | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    validation_split: float | None = None
    validation_dataset_config: str | None = None
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    validation_timesteps: tuple[int, ...] = DEFAULT_VALIDATION_TIMESTEPS


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def output_name(self) -> str:
        return self.save.output_name or ("dit" if self.network.full else "lora")


def fingerprint(cfg: TrainConfig) -> dict[str, object]:
    """The settings a resumed run is compared with (a difference is warned about)."""
    values = {"seed": cfg.schedule.seed, "learning_rate": cfg.optimizer.learning_rate,
              "gradient_accumulation_steps": cfg.schedule.gradient_accumulation_steps,
              "max_train_steps": cfg.schedule.max_train_steps, "lr_scheduler": cfg.scheduler.name,
              "timestep_sampling": cfg.timesteps.sampling, "network_dim": cfg.network.rank,
              "network_alpha": cfg.network.alpha, "network_module": cfg.network.module,
              "dataset_config": cfg.data.dataset_config}
    return {k: str(v) for k, v in values.items()}
