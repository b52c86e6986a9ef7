"""`python -m training train`: LoRA (or full) flow-matching training of a Wan2.1 DiT from cached latents and T5
outputs. Runs plainly or under `accelerate launch` (DDP: gradients are averaged after each accumulation, every
process holds identical weights; with an accelerate FSDP config the DiT is sharded, `training.sharding`).
`train(config)` takes a `training.train_config.TrainConfig`; the command line (`training.args`) parses into one. A
caller holding a loaded DiT (the ComfyUI Train LoRA node) passes it as `model=` and it is trained in place of a
loaded copy, then handed back as it was.

The recipe (`train`) reads as its steps: setup_run, load_model, apply_lora, build_dataloader, build_optimizer,
resume, then per optimizer step `run_step` (micro-batches through the pure `training.step.training_step`,
backward, gradient sync, clipping, optimizer/scheduler step) followed by `after_step` (log, save, sample,
validate), and `after_epoch` / `finish`.

Non-finite numbers stop the run (NonFiniteTrainingError, exit 1): a NaN/inf loss (averaged over processes) is
caught before the optimizer step, and the trained weights are checked after every step with one fused reduction
(their total 2-norm); the message names the step, the items (cache files) and the last good checkpoint. Weight and
state saves refuse NaN/inf tensors, so no saved file holds them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from training import sharding
from training import state as st
from training.args import config_from_args, parse_train_args
from training.cache.store import open_training_source, vae_name
from training.dataset.batches import (
    BatchLoader,
    BatchSource,
    TrainItem,
    max_batch_size,
    split_validation,
    steps_per_epoch,
)
from training.experts import ExpertPair
from training.optim import build_optimizer as make_optimizer
from training.optim import build_scheduler, current_lrs
from training.previews import SampleSettings, generate_samples, prepare_samples
from training.step import InputSpec, StepConfig, sample_seeds, training_step
from training.train_config import TrainConfig, fingerprint
from training.trainable import (
    DiTInfo,
    Trainable,
    apply_network,
    borrowed_dit,
    given_dit_info,
    inspect_dit,
    load_training_dit,
    resolve_task,
)
from training.validation import Validator
from wan_core.loading.checkpoint import non_finite_count, require_finite
from wan_core.models.config import describe_dit, get_task
from wan_core.sampling.experts import boundary_fraction

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from training.experts import ExpertPair
from training.previews import SamplePlan

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Run context
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    seed: int
    name: str
    output_dir: Path
    info: DiTInfo
    task: str | None
    step_cfg: StepConfig
    started_at: float = field(default_factory=time.time)
    session_id: int = 0
    writer: SummaryWriter | None = None
    last_saved: Path | None = None  # the newest weights file this run wrote (main process)
    high_noise_model: torch.nn.Module | None = None  # a given (borrowed) high-noise expert, see `train`
    sharding: sharding.ShardingConfig | None = None  # FSDP (an accelerate config with distributed_type: FSDP)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.autocast())
        if self.cfg.memory.gradient_checkpointing_cpu_offload and torch.is_grad_enabled():
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda"))
        return stack


@dataclass
class Data:
    source: BatchSource
    items: list[TrainItem]
    loader: BatchLoader
    micro_per_epoch: int
    steps_per_epoch: int
    num_epochs: int
    total_steps: int
    stride: int  # samples per global micro-step slot (timestep stratification)
    validator: Validator | None = None


@dataclass
class Optim:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    name: str
    schedule_free: bool
    scaler: torch.amp.GradScaler | None  # the accelerator's (fp16 on a GPU)

    def train_mode(self) -> None:
        if self.schedule_free:
            self.optimizer.train()  # type: ignore[attr-defined]

    def eval_mode(self) -> None:
        if self.schedule_free:
            self.optimizer.eval()  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------------------
# Setup steps
# ----------------------------------------------------------------------------------------------------------------

def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    """accelerate's Accelerator: CUDA when available, else the CPU (several CPU processes use gloo); its fp16
    gradient scaler (GPU only) scales the loss in `backward`. A second run in the same process with another mixed
    precision resets accelerate's shared state (not the process group). The process group lives as long as the
    process (`main` ends it): later runs in the same process reuse it."""
    # accelerate is imported when a run starts: it takes ~0.1 s and pulls in much of torch.distributed
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    timeout = cfg.memory.ddp_timeout
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=timeout))] if timeout else []
    kwargs = {"mixed_precision": cfg.memory.mixed_precision or "no", "cpu": not torch.cuda.is_available(),
              "kwargs_handlers": handlers}
    try:
        return Accelerator(**kwargs)
    except ValueError as error:
        if "already been initialized" not in str(error):
            raise
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


def _check_sharding(cfg: TrainConfig, world: int, given_model: bool) -> None:
    """A sharded run's settings, checked before anything is loaded."""
    monitor = cfg.monitor
    sharding.check_sharded_run(world, fp8=bool(cfg.memory.fp8_base), blocks_to_swap=cfg.memory.blocks_to_swap,
                               given_model=given_model, previews=bool(monitor.sample_prompts),
                               validation=monitor.validation_split is not None
                               or bool(monitor.validation_dataset_config),
                               expert_pair=bool(cfg.model.dit_high_noise))


def setup_run(cfg: TrainConfig, model: torch.nn.Module | None = None,
              high_noise_model: torch.nn.Module | None = None) -> Run:
    """Accelerator, seed, output folder, DiT header (or the given model's), task and the step configuration."""
    plan = sharding.sharding_from_env()  # an unsupported accelerate config fails before the Accelerator starts
    info = inspect_dit(cfg.model.dit) if model is None else given_dit_info(model, cfg.model.dit)
    task = resolve_task(cfg.model.task, info)
    boundary = expert_boundary(cfg, task, model is not None, high_noise_model is not None)
    accelerator = _make_accelerator(cfg)
    if plan is not None:
        _check_sharding(cfg, accelerator.num_processes, model is not None)
    seed = cfg.schedule.seed if cfg.schedule.seed is not None else random.randint(0, 2**31 - 1)
    torch.manual_seed(seed)
    step_cfg = StepConfig(cfg.timesteps, InputSpec.for_model(info.config, task), cfg.data.caption_dropout_rate,
                          seed, boundary)
    name = cfg.output_name
    output_dir = Path(cfg.save.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    logger.info("task %s, %s inputs, seed %d, %d process(es) on %s", task or "(from the DiT)", step_cfg.inputs.kind,
                seed, accelerator.num_processes, accelerator.device)
    return Run(cfg, accelerator, seed, name, output_dir, info, task, step_cfg,
               session_id=random.Random(seed).randint(0, 2**32 - 1), sharding=plan)


def expert_boundary(cfg: TrainConfig, task: str | None, given_model: bool, given_high: bool = False) -> float | None:
    """The expert boundary (0..1) of a Wan2.2 expert pair (--dit_high_noise), None for one DiT. An A14B expert
    trained alone without a timestep range gets a warning: each expert is meant for its side of the boundary.
    Given (loaded) models: both experts or the low-noise one alone, with the high-noise expert's file named by
    --dit_high_noise (its metadata) and without --offload_inactive_dit (a given model stays where it is)."""
    preset = get_task(task) if task else None
    if given_high and not (given_model and cfg.model.dit_high_noise):
        raise ValueError("a given high-noise expert needs the given low-noise expert (model) and its file name in "
                         "--dit_high_noise (model.dit_high_noise)")
    if given_high and cfg.memory.offload_inactive_dit:
        raise ValueError("--offload_inactive_dit moves the experts between devices; given experts stay where they "
                         "were loaded: leave it off")
    if not cfg.model.dit_high_noise:
        ts = cfg.timesteps
        if preset is not None and preset.boundary is not None and ts.min_timestep is None and ts.max_timestep is None:
            edge = round(preset.boundary * 1000)
            logger.warning("training one %s expert on all timesteps: pass its range, --min_timestep 0 "
                           "--max_timestep %d (low-noise expert) or --min_timestep %d --max_timestep 1000 "
                           "(high-noise expert), or both experts with --dit_high_noise", task, edge, edge)
        return None
    if given_model and not given_high:
        raise ValueError("a given DiT trains alone; --dit_high_noise needs both experts loaded from files, or both "
                         "given (model and high_noise_model)")
    if preset is None or preset.boundary is None:
        raise ValueError(f"--dit_high_noise needs --task t2v-A14B or i2v-A14B (the task has the expert boundary), "
                         f"got {task or 'no task'}")
    given = cfg.model.timestep_boundary
    boundary = preset.boundary if given is None else boundary_fraction(given)
    logger.info("one LoRA across the %s experts: high-noise expert for t >= %g, low-noise below", task,
                boundary * 1000)
    return boundary


def load_model(run: Run) -> torch.nn.Module:
    cfg = run.cfg
    return load_training_dit(cfg.model, cfg.memory, run.info, run.device, cfg.network.full)


def load_high_expert(run: Run) -> torch.nn.Module:
    """The high-noise expert (--dit_high_noise), in CPU memory with --offload_inactive_dit (the low-noise expert
    starts active)."""
    cfg, path = run.cfg, run.cfg.model.dit_high_noise
    given = run.high_noise_model
    info = inspect_dit(path) if given is None else given_dit_info(given, path)
    if info.config != run.info.config:
        raise ValueError(f"--dit_high_noise {path} is {describe_dit(info.config)} of another size than --dit "
                         f"{cfg.model.dit} ({describe_dit(run.info.config)}); give two experts of one task")
    if given is not None:
        return given
    device = torch.device("cpu") if cfg.memory.offload_inactive_dit else run.device
    return load_training_dit(cfg.model, cfg.memory, info, device, cfg.network.full, path=path)


def apply_lora(run: Run, model: torch.nn.Module) -> Trainable:
    trainable = apply_network(model, run.cfg.network)
    if run.step_cfg.boundary is not None:
        experts = ExpertPair(model, load_high_expert(run), run.step_cfg.boundary, run.device,
                             run.cfg.memory.offload_inactive_dit)
        trainable.attach_experts(experts)
    trainable.train()
    return trainable


def shard(run: Run, trainable: Trainable) -> None:
    """FSDP2 over the processes when the accelerate config asks for it (after the LoRA is attached, before the
    optimizer is built over the parameters): the DiT is sharded, a LoRA network stays whole."""
    if run.sharding is not None:
        sharding.shard_dit(trainable.model, run.sharding, run.device)


def open_source(run: Run, path: str) -> BatchSource:
    """The checked caches of a dataset TOML (`training.cache.store`): entries must match the media, the preprocessing
    and, when --vae/--clip/--t5 are given, those encoders; the task's extra tensors must be cached. Caption dropout
    is the loop's (`training.step`), so the reader's own is left off."""
    needed, models = run.step_cfg.inputs.required_keys(), run.cfg.model
    return open_training_source(path, need_image="latents_image" in needed, need_clip="clip" in needed,
                                need_control="latents_control" in needed, seed=run.seed, vae=models.vae,
                                clip=models.clip if "clip" in needed else None, t5=models.t5,
                                tokenizer=models.tokenizer, caption_dropout_rate=0.0,
                                latent_channels=run.info.config.out_dim)


def _check_source(run: Run, source: BatchSource, items: list[TrainItem]) -> None:
    if not items:
        raise ValueError(f"{run.cfg.data.dataset_config}: no cached training items (run cache-latents and "
                         f"cache-text)")
    if run.cfg.data.caption_dropout_rate and source.empty_t5 is None:
        raise ValueError("--caption_dropout_rate needs the empty caption's T5 embedding in the text cache "
                         "(re-run cache-text)")
    needed = run.step_cfg.inputs.required_keys()
    sample = source.load([items[0]])
    channels, want = sample["latents"].shape[1], run.info.config.out_dim
    if channels != want:
        raise ValueError(f"{describe_item(source, items[0])} holds {channels}-channel latents of "
                         f"{vae_name(channels)}, but the DiT takes {want}-channel latents: re-run cache-latents with "
                         f"{vae_name(want)}")
    missing = [k for k in needed if sample.get(k) is None]
    if missing:
        raise ValueError(f"a {run.step_cfg.inputs.kind} model needs {', '.join(missing)} in the latent cache, "
                         f"which has none: re-run cache-latents with --i2v/--clip (I2V) or a control dataset")


def build_dataloader(run: Run, source: BatchSource | None = None,
                     validation_source: BatchSource | None = None) -> Data:
    """Items, optional validation set, epoch/step counts, and the loader of this process's share."""
    data, monitor, schedule = run.cfg.data, run.cfg.monitor, run.cfg.schedule
    source = source if source is not None else open_source(run, data.dataset_config)
    items = list(source.items())
    validator = None
    timesteps = list(monitor.validation_timesteps)
    if monitor.validation_split is not None:
        items, held = split_validation(items, monitor.validation_split, run.seed)
        validator = Validator(source, held, run.seed, timesteps, run.rank, run.world)
    elif monitor.validation_dataset_config or validation_source is not None:
        val = validation_source or open_source(run, monitor.validation_dataset_config)
        validator = Validator(val, list(val.items()), run.seed, timesteps, run.rank, run.world)
    _check_source(run, source, items)
    loader = BatchLoader(source, items, run.seed, run.rank, run.world, data.max_data_loader_n_workers,
                         data.persistent_data_loader_workers)
    micro = len(loader.plan(0))
    per_epoch = steps_per_epoch(micro, schedule.gradient_accumulation_steps)
    epochs = schedule.max_train_epochs or math.ceil(schedule.max_train_steps / per_epoch)
    total = epochs * per_epoch if schedule.max_train_epochs else schedule.max_train_steps
    logger.info("%d items, %d micro-batches (%d optimizer steps) per epoch per process, %d epochs, %d steps",
                len(items), micro, per_epoch, epochs, total)
    return Data(source, items, loader, micro, per_epoch, epochs, total, run.world * max_batch_size(source, items),
                validator)


def build_optimizer(run: Run, trainable: Trainable, data: Data) -> Optim:
    cfg = run.cfg
    built = make_optimizer(cfg.optimizer, trainable.param_groups(cfg.optimizer.learning_rate))
    scheduler = build_scheduler(cfg.scheduler, built, data.total_steps, cfg.optimizer.learning_rate)
    # accelerate's optimizer wrapper steps through the accelerator's fp16 scaler (and unscales for clipping); the
    # scheduler stays unwrapped: accelerate's would step once per process
    optimizer = run.accelerator.prepare_optimizer(built.optimizer, device_placement=False)
    optim = Optim(optimizer, scheduler, built.name, built.schedule_free, run.accelerator.scaler)
    optim.train_mode()
    return optim


def resume(run: Run, trainable: Trainable, optim: Optim) -> st.Progress:
    """Restore a `--resume` state folder (weights, optimizer, scheduler, scaler, RNG, counters)."""
    folder = run.cfg.save.resume
    if not folder:
        return st.Progress()
    weights, payload = st.read_state(folder)
    trainable.load_state_dict(weights)
    load = None
    if trainable.sharded:
        def load(state: dict) -> None:
            sharding.load_optimizer_state(trainable.module, _torch_optimizer(optim), state)
    progress = st.restore_state(payload, st.TrainingObjects({}, optim.optimizer, optim.scheduler, optim.scaler),
                                load)
    st.check_resumed_run(payload.get("run", {}), fingerprint(run.cfg))
    logger.info("resumed from %s at step %d (epoch %d, %d micro-batches into it)", folder,
                progress.global_step, progress.epoch + 1, progress.micro_in_epoch)
    return progress


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------------

SYNC_BUCKET_BYTES = 256 << 20


def sync_gradients(run: Run, params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients over processes (all-reduce of flat buckets of up to 256 MiB); no-op in one process.
    A missing gradient counts as zeros, so every process reduces the same buckets. FSDP shards are left alone:
    their gradients were averaged by FSDP's reduce-scatter in the backward pass.

    Not DDP through `accelerator.prepare(model)`: DDP reduces the parameters of the module whose forward it runs
    and broadcasts that module's whole state at wrapping, but the LoRA parameters live outside the DiT's module
    tree (the DiT runs with patched Linear forwards) and a block-swapped DiT holds its weights on two devices."""
    params = [p for p in params if not sharding.is_sharded(p)]
    if run.world == 1:
        return
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for index, param in enumerate(params):
        bucket.append(param)
        size += param.numel() * 4
        if size >= SYNC_BUCKET_BYTES or index == len(params) - 1:
            grads = [p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                     for p in bucket]
            flat = run.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
            offset = 0
            for p, g in zip(bucket, grads):
                p.grad = flat[offset: offset + g.numel()].view_as(g).to(p.dtype).clone()
                offset += g.numel()
            bucket, size = [], 0


def run_step(run: Run, trainable: Trainable, optim: Optim, data: Data, group: list[tuple[int, dict]],
             progress: st.Progress) -> float:
    """Forward/backward over the micro-batches of one accumulation group, then the optimizer step; mean loss."""
    plan = data.loader.plan(progress.epoch)
    losses, per_sample = [], []
    for a, (position, batch) in enumerate(group):
        offset, count = plan.offsets[position], len(plan.batches[position])
        seeds = sample_seeds(run.seed, progress.global_step, a, offset, count)
        first = (progress.global_step * run.cfg.schedule.gradient_accumulation_steps + a) * data.stride
        lead = (sample_seeds(run.seed, progress.global_step, a, 0, 1)[0], first)  # the global batch's first sample
        result = training_step(trainable.denoiser, batch, run.step_cfg, seeds, empty_t5=data.source.empty_t5,
                               draw_indices=[first + offset + i for i in range(count)], autocast=run.autocast,
                               lead=lead)
        run.accelerator.backward(result.loss / len(group))
        losses.append(result.loss.detach())
        per_sample.append(result.per_sample)
    loss = torch.stack(losses).mean()
    if run.world > 1:
        loss = run.accelerator.reduce(loss, reduction="mean")
    if not bool(torch.isfinite(loss)):  # before the optimizer step: the weights in memory stay the last good ones
        raise NonFiniteTrainingError(non_finite_loss_message(run, data, group, per_sample, progress, float(loss)))
    params = trainable.parameters()
    sync_gradients(run, params)
    if run.cfg.optimizer.max_grad_norm > 0:
        run.accelerator.clip_grad_norm_(params, run.cfg.optimizer.max_grad_norm)  # unscales fp16 gradients first
    optim.optimizer.step()  # fp16: the scaler's step (skipped after inf/NaN gradients) and update
    optim.scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    check_weights(run, trainable, params, progress)
    return float(loss)


class NonFiniteTrainingError(RuntimeError):
    """A NaN/inf loss or NaN/inf trained weights: the run stops and writes nothing more."""


def _last_good(run: Run) -> str:
    if run.last_saved is not None:
        return f"last good checkpoint: {run.last_saved}"
    if run.cfg.save.resume:
        return f"no checkpoint saved by this run yet (it resumed from {run.cfg.save.resume})"
    return "last good checkpoint: none saved yet"


def describe_item(source: BatchSource, item: TrainItem) -> str:
    """The cache files of an item when the source knows them (`describe`), else its key."""
    describe = getattr(source, "describe", None)
    return describe(item) if describe is not None else f"item {item.key!r}"


def _input_problem(batch: dict, index: int) -> str:
    """Which cached input of sample `index` holds NaN/inf, or '' when all are finite."""
    bad = []
    for name in ("latents", "latents_image", "latents_control", "clip"):
        value = batch.get(name)
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value[index].float()).all()):
            bad.append(name)
    t5 = batch.get("t5")
    if t5 is not None and not bool(torch.isfinite(t5[index].float()).all()):
        bad.append("t5")
    return f" (its cached {', '.join(bad)} hold NaN/inf)" if bad else ""


def non_finite_loss_message(run: Run, data: Data, group: list[tuple[int, dict]], per_sample: list[torch.Tensor],
                            progress: st.Progress, loss: float) -> str:
    """One line: the step, the items whose loss is NaN/inf (with their cache files), the last good checkpoint."""
    plan = data.loader.plan(progress.epoch)
    culprits, inputs_bad = [], False
    for (position, batch), losses in zip(group, per_sample):
        for index, (item, value) in enumerate(zip(plan.batches[position], losses.tolist())):
            if not math.isfinite(value):
                problem = _input_problem(batch, index)
                inputs_bad = inputs_bad or bool(problem)
                culprits.append(f"{describe_item(data.source, item)} (loss {value}){problem}")
    where = "; ".join(culprits) if culprits else "the batch of another process"
    hint = ("re-run the cache commands for these files" if inputs_bad
            else "the model diverged: lower --learning_rate or set --max_grad_norm")
    return (f"training stopped at step {progress.global_step + 1} (epoch {progress.epoch + 1}): the loss is {loss} "
            f"for {where}; {_last_good(run)}; {hint}")


def check_weights(run: Run, trainable: Trainable, params: Sequence[torch.nn.Parameter],
                  progress: st.Progress) -> None:
    """Stop when an optimizer step left NaN/inf in the trained weights. One fused reduction (the total 2-norm of
    the trained tensors, a NaN/inf when any value is); the exact per-tensor check runs only when it is not finite
    (a norm can also overflow for huge finite weights)."""
    total = sharding.total_norm([p.detach() for p in params])
    if bool(torch.isfinite(total)):
        return
    bad = [name for name, tensor in trainable.full_state_dict(everywhere=True).items() if non_finite_count(tensor)]
    if bad:
        raise NonFiniteTrainingError(
            f"training stopped at step {progress.global_step + 1} (epoch {progress.epoch + 1}): the optimizer step "
            f"left NaN/inf values in {len(bad)} trained tensor(s) (first: {bad[0]}) although the loss was finite; "
            f"{_last_good(run)}; lower --learning_rate or set --max_grad_norm")


def accumulation_groups(data: Data, epoch: int, start: int, size: int):
    """Groups of up to `size` (position, batch) micro-batches of `epoch` from micro-step `start`."""
    group: list[tuple[int, dict]] = []
    for position, batch in data.loader.iterate(epoch, start):
        group.append((position, batch))
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# ----------------------------------------------------------------------------------------------------------------
# Saving, sampling, validation, logging
# ----------------------------------------------------------------------------------------------------------------

SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def training_metadata(run: Run, data: Data, optim: Optim, trainable: Trainable,
                      progress: st.Progress) -> dict[str, str]:
    """musubi's `ss_*` keys and the SAI model spec (`modelspec.*`), as strings."""
    cfg, net, ts, mem = run.cfg, run.cfg.network, run.cfg.timesteps, run.cfg.memory
    minimal = {"ss_base_model_version": "wan", "ss_network_module": net.module, "ss_network_dim": str(net.rank),
               "ss_network_alpha": str(trainable.cfg.alpha),
               "ss_network_args": json.dumps(dict(a.split("=", 1) for a in trainable.cfg.raw_args))}
    if cfg.save.no_metadata:
        return minimal
    values = {"ss_session_id": run.session_id, "ss_training_started_at": run.started_at, "ss_output_name": run.name,
              "ss_learning_rate": cfg.optimizer.learning_rate, "ss_num_train_items": len(data.items),
              "ss_num_batches_per_epoch": data.micro_per_epoch, "ss_num_epochs": data.num_epochs,
              "ss_gradient_checkpointing": mem.gradient_checkpointing,
              "ss_gradient_checkpointing_cpu_offload": mem.gradient_checkpointing_cpu_offload,
              "ss_gradient_accumulation_steps": cfg.schedule.gradient_accumulation_steps,
              "ss_max_train_steps": data.total_steps, "ss_lr_warmup_steps": cfg.scheduler.warmup_steps,
              "ss_lr_scheduler": cfg.scheduler.name, "ss_network_dropout": net.dropout,
              "ss_mixed_precision": mem.mixed_precision, "ss_seed": run.seed,
              "ss_training_comment": cfg.save.training_comment, "ss_optimizer": optim.name,
              "ss_max_grad_norm": cfg.optimizer.max_grad_norm, "ss_fp8_base": bool(mem.fp8_base),
              "ss_full_fp16": False, "ss_full_bf16": False, "ss_weighting_scheme": ts.weighting_scheme,
              "ss_logit_mean": ts.logit_mean, "ss_logit_std": ts.logit_std, "ss_mode_scale": ts.mode_scale,
              "ss_guidance_scale": 1.0, "ss_timestep_sampling": ts.sampling, "ss_sigmoid_scale": ts.sigmoid_scale,
              "ss_discrete_flow_shift": ts.discrete_flow_shift,
              "ss_datasets": json.dumps([str(cfg.data.dataset_config)]),
              "ss_sd_model_name": Path(cfg.model.dit).name if cfg.model.dit else "",
              "ss_vae_name": Path(cfg.model.vae).name if cfg.model.vae else None,
              "ss_training_finished_at": time.time(), "ss_steps": progress.global_step, "ss_epoch": progress.epoch,
              "ss_caption_dropout_rate": cfg.data.caption_dropout_rate, "wantuner_task": run.task or ""}
    if run.step_cfg.boundary is not None:  # one LoRA for both experts
        values["wantuner_experts"] = "high_noise,low_noise"
        values["wantuner_timestep_boundary"] = run.step_cfg.boundary
        values["ss_sd_model_name_high_noise"] = Path(cfg.model.dit_high_noise).name
    spec = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "wan2.1" + ("" if trainable.is_full
                                                                                      else "/lora"),
            "modelspec.implementation": "https://github.com/Wan-Video/Wan2.1",
            "modelspec.title": cfg.save.metadata_title or f"{run.name}@{int(run.started_at)}",
            "modelspec.date": datetime.datetime.fromtimestamp(int(run.started_at)).isoformat(),
            "modelspec.resolution": "1280x720"}
    for key in ("author", "description", "license", "tags"):
        if getattr(cfg.save, f"metadata_{key}"):
            spec[f"modelspec.{key}"] = getattr(cfg.save, f"metadata_{key}")
    if ts.min_timestep is not None or ts.max_timestep is not None:
        spec["modelspec.timestep_range"] = f"{ts.min_timestep or 0},{ts.max_timestep or 1000}"
    return {**minimal, **{k: str(v) for k, v in values.items()}, **spec}


def _torch_optimizer(optim: Optim) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optim.optimizer, "optimizer", optim.optimizer)


@dataclass(frozen=True)
class Snapshot:
    """What a save writes: the full trained weights and, for a sharded optimizer, its gathered state (on the main
    process; gathering is a collective that every process joins)."""

    weights: dict[str, torch.Tensor]
    optimizer: dict | None = None


def snapshot(trainable: Trainable, optim: Optim, with_optimizer: bool) -> Snapshot:
    if not trainable.sharded:
        return Snapshot(trainable.state_dict())
    optimizer = sharding.gather_optimizer_state(trainable.module, _torch_optimizer(optim)) if with_optimizer else None
    return Snapshot(trainable.full_state_dict(), optimizer)


def save_weights(run: Run, trainable: Trainable, meta: dict[str, str], file_name: str, snap: Snapshot) -> Path:
    """Write the trained weights; NaN/inf weights are refused (NonFiniteError) and nothing is written."""
    dtype = SAVE_DTYPES[run.cfg.save.save_precision or "fp32"]
    require_finite(snap.weights, f"{run.output_dir / file_name} (not written)")
    path = trainable.save(run.output_dir / file_name, run.cfg.save.save_format, meta, dtype, run.info.metadata,
                          snap.weights)
    run.last_saved = path
    logger.info("saved %s", path)
    return path


def save_training_state(run: Run, optim: Optim, progress: st.Progress, folder: str, snap: Snapshot) -> None:
    objects = st.TrainingObjects(snap.weights, optim.optimizer, optim.scheduler, optim.scaler, snap.optimizer)
    st.save_state(run.output_dir / folder, objects, progress, fingerprint(run.cfg))


StepCallback = Callable[[int, int, float], None]  # (step, total steps, loss); raising stops the run


@dataclass
class Extras:
    """Sampling plan, TensorBoard writer, progress bar, step callback, and the histories returned to callers."""

    samples: SamplePlan | None = None
    writer: SummaryWriter | None = None
    bar: tqdm | None = None
    on_step: StepCallback | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def checkpoint(run: Run, trainable: Trainable, optim: Optim, data: Data, progress: st.Progress, unit: str,
               number: int) -> None:
    """Save `{name}-stepN` / `{name}-N` (+ state) on the main process, applying --save_last_n_* retention."""
    save = run.cfg.save
    optim.eval_mode()
    snap = snapshot(trainable, optim, save.save_state)
    if run.is_main:
        meta = training_metadata(run, data, optim, trainable, progress)
        every, keep, keep_state = (getattr(save, f"save_every_n_{unit}s"), getattr(save, f"save_last_n_{unit}s"),
                                   getattr(save, f"save_last_n_{unit}s_state"))
        file_of, state_of, remove = ((st.step_file, st.step_state, st.step_to_remove) if unit == "step"
                                     else (st.epoch_file, st.epoch_state, st.epoch_to_remove))
        save_weights(run, trainable, meta, file_of(run.name, number), snap)
        old = remove(number, every, keep)
        if old is not None:
            st.remove_path(run.output_dir / file_of(run.name, old))
        if save.save_state:
            save_training_state(run, optim, progress, state_of(run.name, number), snap)
            old = remove(number, every, keep_state if keep_state is not None else keep)
            if old is not None:
                st.remove_path(run.output_dir / state_of(run.name, old))
    run.accelerator.wait_for_everyone()
    optim.train_mode()


def sample_now(run: Run, trainable: Trainable, optim: Optim, extras: Extras, step: int, epoch: int | None) -> None:
    if extras.samples is None:
        return
    optim.eval_mode()
    trainable.eval()
    generate_samples(extras.samples, trainable.denoiser, step, epoch, run.autocast, extras.writer)
    trainable.train()
    optim.train_mode()
    run.accelerator.wait_for_everyone()


def validate_now(run: Run, trainable: Trainable, optim: Optim, data: Data, extras: Extras, step: int) -> None:
    if data.validator is None:
        return
    optim.eval_mode()
    trainable.eval()
    reduce = (lambda t: run.accelerator.reduce(t.to(run.device), reduction="sum").cpu()) if run.world > 1 else None
    logs = data.validator.run(trainable.denoiser, run.step_cfg, run.autocast, reduce)
    trainable.train()
    optim.train_mode()
    if run.is_main:
        logger.info("validation at step %d: %s", step,
                    ", ".join(f"{k.split('/')[-1]} {v:.5f}" for k, v in logs.items()))
    extras.validation.append((step, logs))
    if extras.writer is not None:
        for key, value in logs.items():
            extras.writer.add_scalar(key, value, step)


def _due(every: int | None, count: int) -> bool:
    return every is not None and count % every == 0


def after_step(run: Run, trainable: Trainable, optim: Optim, data: Data, extras: Extras, progress: st.Progress,
               loss: float) -> None:
    """Moving-average loss, progress bar and TensorBoard; step-based saving, sampling and validation."""
    save, monitor, step = run.cfg.save, run.cfg.monitor, progress.global_step
    progress.recent_losses = (progress.recent_losses + [loss])[-data.steps_per_epoch:]
    extras.losses.append((step, loss))
    if extras.on_step is not None:
        extras.on_step(step, data.total_steps, loss)
    lrs = current_lrs(optim.optimizer, optim.scheduler)
    if extras.bar is not None:
        extras.bar.update(1)
        extras.bar.set_postfix(avr_loss=f"{progress.moving_average():.4f}", lr=f"{lrs[0]:.3g}")
    if extras.writer is not None:
        extras.writer.add_scalar("loss/current", loss, step)
        extras.writer.add_scalar("loss/average", progress.moving_average(), step)
        for i, lr in enumerate(lrs):
            extras.writer.add_scalar(f"lr/group{i}", lr, step)
    if _due(save.save_every_n_steps, step):
        checkpoint(run, trainable, optim, data, progress, "step", step)
    if _due(monitor.sample_every_n_steps, step):
        sample_now(run, trainable, optim, extras, step, None)
    if _due(monitor.validate_every_n_steps, step):
        validate_now(run, trainable, optim, data, extras, step)


def after_epoch(run: Run, trainable: Trainable, optim: Optim, data: Data, extras: Extras,
                progress: st.Progress) -> None:
    """Epoch-based saving (not after the last epoch: the final save covers it), sampling and validation."""
    monitor, epoch = run.cfg.monitor, progress.epoch  # `epoch` epochs are complete
    if extras.writer is not None and progress.recent_losses:
        extras.writer.add_scalar("loss/epoch", progress.moving_average(), epoch)
    if _due(run.cfg.save.save_every_n_epochs, epoch) and epoch < data.num_epochs:
        checkpoint(run, trainable, optim, data, progress, "epoch", epoch)
    if _due(monitor.sample_every_n_epochs, epoch):
        sample_now(run, trainable, optim, extras, progress.global_step, epoch)
    every = monitor.validate_every_n_epochs or (None if monitor.validate_every_n_steps else 1)
    if _due(every, epoch):
        validate_now(run, trainable, optim, data, extras, progress.global_step)


def finish(run: Run, trainable: Trainable, optim: Optim, data: Data, progress: st.Progress) -> Path | None:
    """The final `{name}.safetensors` (and `{name}-state` with --save_state / --save_state_on_train_end)."""
    optim.eval_mode()
    path = None
    with_state = run.cfg.save.save_state or run.cfg.save.save_state_on_train_end
    snap = snapshot(trainable, optim, with_state)
    if run.is_main:
        path = save_weights(run, trainable, training_metadata(run, data, optim, trainable, progress),
                            st.last_file(run.name), snap)
        if with_state:
            save_training_state(run, optim, progress, st.last_state(run.name), snap)
    run.accelerator.wait_for_everyone()
    return path


def sampling_settings(cfg: TrainConfig) -> SampleSettings:
    """The flags `training.previews.prepare_samples` reads, by their CLI names."""
    m = cfg.model
    return SampleSettings(sample_prompts=cfg.monitor.sample_prompts, vae=m.vae, vae_dtype=m.vae_dtype, t5=m.t5,
                          tokenizer=m.tokenizer, fp8_t5=m.fp8_t5, clip=m.clip, output_dir=cfg.save.output_dir,
                          output_name=cfg.output_name)


def prepare_sampling(run: Run) -> SamplePlan | None:
    """Encode the sample prompts (T5, CLIP and VAE come and go before the DiT is loaded)."""
    if not run.cfg.monitor.sample_prompts:
        return None
    return prepare_samples(sampling_settings(run.cfg), run.task, run.info.config, run.device, run.seed, run.rank,
                           run.world)


def open_extras(run: Run, data: Data, progress: st.Progress, samples: SamplePlan | None,
                on_step: StepCallback | None) -> Extras:
    """Open TensorBoard (main process) and the tqdm bar."""
    monitor = run.cfg.monitor
    extras = Extras(samples=samples, on_step=on_step)
    if monitor.log_with and run.is_main:
        from torch.utils.tensorboard import SummaryWriter  # only with --log_with: ~0.3 s to import

        folder = ((monitor.log_prefix or "") + (monitor.log_tracker_name or "network_train")
                  + time.strftime("%Y%m%d%H%M%S"))
        extras.writer = SummaryWriter(str(Path(monitor.logging_dir) / folder))
    extras.bar = tqdm(total=data.total_steps, initial=progress.global_step, desc="steps", smoothing=0,
                      disable=not run.accelerator.is_local_main_process)
    return extras


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    output: Path | None  # the final file (main process)
    progress: st.Progress
    losses: list[tuple[int, float]]  # (step, loss) of this run
    validation: list[tuple[int, dict[str, float]]]  # (step, val_loss/*) of this run
    weights: dict[str, torch.Tensor]  # the trained tensors (LoRA network or DiT state dict; gathered when sharded)


def train(config: TrainConfig, source: BatchSource | None = None, validation_source: BatchSource | None = None,
          on_step: StepCallback | None = None, model: torch.nn.Module | None = None,
          high_noise_model: torch.nn.Module | None = None) -> TrainResult:
    """Train as `config` says. `source`/`validation_source` replace the dataset caches and `on_step(step, total,
    loss)` is called after every optimizer step (in-process callers such as the ComfyUI nodes; tests).

    `model`: a loaded DiT to train a LoRA on instead of loading `config.model.dit` (whose file then only gives the
    metadata). It is used as it is (its dtype, fp8 and block swap; no copy of its weights) and handed back
    unchanged when this returns or raises: LoRA removed, requires_grad, train/eval modes, attention backend and
    gradient checkpointing as they were.

    `high_noise_model`: with `model`, the loaded high-noise expert of a Wan2.2 pair (`config.model.dit_high_noise`
    names its file): one LoRA is trained across both (`training.experts`), each lent and handed back as `model` is."""
    run = setup_run(config, model, high_noise_model)
    # the caches are checked before any model loads
    if source is None:
        source = open_source(run, config.data.dataset_config)
    if validation_source is None and config.monitor.validation_dataset_config:
        validation_source = open_source(run, config.monitor.validation_dataset_config)
    samples = prepare_sampling(run)
    if model is None:
        return _train_loaded(run, samples, load_model(run), source, validation_source, on_step)
    with contextlib.ExitStack() as stack:
        borrowed = stack.enter_context(borrowed_dit(model, config, run.device))
        if high_noise_model is not None:
            run.high_noise_model = stack.enter_context(borrowed_dit(high_noise_model, config, run.device))
        return _train_loaded(run, samples, borrowed, source, validation_source, on_step)


def _train_loaded(run: Run, samples: SamplePlan | None, model: torch.nn.Module, source: BatchSource | None,
                  validation_source: BatchSource | None, on_step: StepCallback | None) -> TrainResult:
    trainable = apply_lora(run, model)
    shard(run, trainable)
    try:
        return _train_steps(run, samples, trainable, source, validation_source, on_step)
    finally:
        trainable.remove_network()


def _train_steps(run: Run, samples: SamplePlan | None, trainable: Trainable, source: BatchSource | None,
                 validation_source: BatchSource | None, on_step: StepCallback | None) -> TrainResult:
    accumulation = run.cfg.schedule.gradient_accumulation_steps
    data = build_dataloader(run, source, validation_source)
    optim = build_optimizer(run, trainable, data)
    progress = resume(run, trainable, optim)
    extras = open_extras(run, data, progress, samples, on_step)
    if progress.global_step == 0:
        validate_now(run, trainable, optim, data, extras, 0)
        if run.cfg.monitor.sample_at_first:
            sample_now(run, trainable, optim, extras, 0, 0)
    try:
        while progress.global_step < data.total_steps and progress.epoch < data.num_epochs:
            groups = accumulation_groups(data, progress.epoch, progress.micro_in_epoch, accumulation)
            for group in groups:
                loss = run_step(run, trainable, optim, data, group, progress)
                progress.global_step += 1
                progress.micro_in_epoch += len(group)
                after_step(run, trainable, optim, data, extras, progress, loss)
                if progress.global_step >= data.total_steps:
                    break
            if progress.micro_in_epoch >= data.micro_per_epoch:
                progress.epoch, progress.micro_in_epoch = progress.epoch + 1, 0
                after_epoch(run, trainable, optim, data, extras, progress)
        if not extras.validation or extras.validation[-1][0] != progress.global_step:
            validate_now(run, trainable, optim, data, extras, progress.global_step)
        output = finish(run, trainable, optim, data, progress)
    finally:
        if extras.bar is not None:
            extras.bar.close()
        if extras.writer is not None:
            extras.writer.close()
    weights = trainable.full_state_dict(everywhere=True)
    return TrainResult(output, progress, extras.losses, extras.validation, weights)


def _end_process_group() -> None:
    """Destroy the process group of a multi-process run (`accelerate launch`) before the process exits."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(parse_train_args(argv))
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    try:
        result = train(config)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    finally:
        _end_process_group()
    if result.output is not None:
        sys.stdout.write(f"{result.output}\n")
    return 0
