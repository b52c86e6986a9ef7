"""The training loop on a tiny DiT (CPU): overfitting lowers the held-out loss, saved files reload exactly in
every format, resuming is bit-exact, full training writes a loadable DiT, and bad input fails clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.numerics import assert_float32_parity, float64_run
from tests.tiny import TINY_DIT_BY_TYPE
from tests.tiny_training import memory_source, tiny_dit_file, tiny_samples, train_args
from training.dataset.batches import MemorySource
from training.init_dit import main as init_dit_main
from training.step import InputSpec, StepConfig, conditioning, draw_noise, draw_sigmas, sample_seeds, training_step
from training.timesteps import TimestepConfig
from training.train import main as train_main
from training.train import train
from wan_core.loading.checkpoint import load_state_dict, read_metadata
from wan_core.lora.apply import linear_modules
from wan_core.lora.formats import load_lora
from wan_core.lora.network import LoRANetwork
from wan_core.models.config import CONFIG_METADATA_KEY, config_from_json
from wan_core.models.dit import WanModel, load_dit


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dit_file(tmp_path_factory.mktemp("dit") / "tiny_t2v.safetensors")


def _modules(path: Path) -> set[str]:
    return set(linear_modules(load_dit(path)))


# ----------------------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------------------

def test_training_step_is_velocity_mse_at_the_drawn_noise_level(dit: Path) -> None:
    model = load_dit(dit)
    source = memory_source(2, batch_size=2)
    batch = source.load(source.items())
    cfg = StepConfig(TimestepConfig("shift", discrete_flow_shift=3.0, weighting_scheme="cosmap"))
    seeds = sample_seeds(11, 0, 0, 0, 2)
    result = training_step(model, batch, cfg, seeds)
    sigma = draw_sigmas(cfg, seeds, (4, 4))
    noise = draw_noise(seeds, batch["latents"].shape[1:])
    x0 = batch["latents"]
    cosmap = 2 / (torch.pi * (1 - 2 * sigma + 2 * sigma**2))

    def per_sample(dtype: torch.dtype, run) -> torch.Tensor:
        s, x, eps = (v.to(dtype) for v in (sigma.view(-1, 1, 1, 1, 1), x0, noise))
        pred = run(model, (1 - s) * x + s * eps, (sigma * 1000).to(dtype), batch["t5"])
        return ((pred - (eps - x)) ** 2).mean(dim=(1, 2, 3, 4)) * cosmap.to(dtype)

    with torch.no_grad():
        expected = per_sample(torch.float32, lambda m, *args: m(*args)), per_sample(torch.float64, float64_run)
    assert_float32_parity(result.per_sample, *expected)
    assert_float32_parity(result.loss.detach(), *(e.mean() for e in expected))


def test_conditioning_layouts_for_i2v_flf2v_and_fun_control() -> None:
    device, dtype = torch.device("cpu"), torch.float32
    samples = tiny_samples(2, "fc", shape=(16, 3, 4, 4))
    batch = MemorySource(samples).load(MemorySource(samples).items())
    y, clip = conditioning(batch, InputSpec("i2v"), device, dtype)
    assert torch.equal(y, batch["latents_image"]) and torch.equal(clip, batch["clip"])
    y, clip = conditioning(batch, InputSpec("fun_control", control_image=True), device, dtype)
    assert y.shape == (2, 32, 3, 4, 4) and torch.equal(y[:, :16], batch["latents_control"])
    assert torch.equal(y[:, 16:, :1], batch["latents_image"][:, 4:, :1]) and not y[:, 16:, 1:].any()
    assert torch.equal(clip, batch["clip"])
    y, clip = conditioning(batch, InputSpec("fun_control"), device, dtype)
    assert torch.equal(y[:, :16], batch["latents_control"]) and not y[:, 16:].any() and clip is None
    two_images = dict(batch, clip=torch.randn(2, 2, 257, 1280))
    _, clip = conditioning(two_images, InputSpec("flf2v"), device, dtype)
    assert clip.shape == (2, 514, 1280) and torch.equal(clip[:, 257:], two_images["clip"][:, 1])
    with pytest.raises(ValueError, match="needs 'latents_image'.*re-run cache-latents with --i2v and --clip"):
        conditioning({"latents": batch["latents"]}, InputSpec("i2v"), device, dtype)
    assert InputSpec.for_model(TINY_DIT_BY_TYPE["fc"], "i2v-14B-FC") == InputSpec("fun_control", True)
    assert InputSpec.for_model(TINY_DIT_BY_TYPE["fc"], "t2v-1.3B-FC") == InputSpec("fun_control", False)
    assert InputSpec.for_model(TINY_DIT_BY_TYPE["flf2v"], None).kind == "flf2v"


@pytest.mark.parametrize("kind", ["i2v", "fc"])
def test_image_and_control_models_train(kind: str, tmp_path: Path) -> None:
    dit = tiny_dit_file(tmp_path / f"{kind}.safetensors", kind)
    source = MemorySource(tiny_samples(2, kind, shape=(16, 2, 4, 4)), batch_size=2)
    result = train(train_args(dit, tmp_path, "--max_train_steps", "2"), source=source)
    lora = load_lora(result.output, _modules(dit))
    assert not lora.unmatched and any(m.endswith("k_img") for m in lora.adapters)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)


# ----------------------------------------------------------------------------------------------------------------
# Learning, saving and reloading
# ----------------------------------------------------------------------------------------------------------------

def test_overfitting_lowers_the_held_out_loss(dit: Path, tmp_path: Path) -> None:
    source = memory_source(2, batch_size=2)
    args = train_args(dit, tmp_path, "--max_train_steps", "40", "--validate_every_n_steps", "20",
                      "--validation_timesteps", "200", "500", "800")
    result = train(args, source=source, validation_source=source)
    steps = [step for step, _ in result.validation]
    means = [logs["val_loss/mean"] for _, logs in result.validation]
    assert steps == [0, 20, 40]
    assert means[2] < 0.6 * means[0], means
    # the saved LoRA, merged into a fresh DiT, reproduces the trained model's held-out loss
    from training.validation import Validator
    from wan_core.lora.apply import merge_loras

    model = load_dit(dit)
    merge_loras(model, result.output)
    logs = Validator(source, source.items(), 5, [200, 500, 800]).run(model, StepConfig(TimestepConfig("uniform")))
    assert logs["val_loss/mean"] == pytest.approx(means[2], rel=1e-4)


def _train_saving(dit: Path, out: Path, *extra: str):
    return train(train_args(dit, out, "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state",
                            "--network_args", "rank_dropout=0.1", "verbose=True", *extra),
                 source=memory_source(3, batch_size=2))


def test_saved_files_reload_to_the_trained_weights(dit: Path, tmp_path: Path) -> None:
    musubi = _train_saving(dit, tmp_path / "m")
    comfy = _train_saving(dit, tmp_path / "c", "--save_format", "comfyui")
    modules = _modules(dit)
    state = load_state_dict(tmp_path / "m" / "lora-state" / "weights.safetensors")
    lora_m, lora_c = load_lora(musubi.output, modules), load_lora(comfy.output, modules)
    assert lora_m.format.startswith("musubi") and lora_c.format.startswith("comfyui"), (lora_m.format, lora_c.format)
    assert not lora_m.unmatched and not lora_c.unmatched and len(lora_m.adapters) == len(lora_c.adapters) == 20
    sd = load_state_dict(musubi.output)
    for key, value in sd.items():  # the musubi file holds the trained tensors exactly
        assert torch.equal(value, state[key]), key
    assert sorted(sd) == sorted(state)
    for name, adapter in lora_m.adapters.items():  # the ComfyUI file gives the same weight delta
        torch.testing.assert_close(lora_c.adapters[name].delta(), adapter.delta(), rtol=1e-5, atol=1e-7)
    assert any(adapter.delta().abs().max() > 0 for adapter in lora_m.adapters.values())
    meta = read_metadata(musubi.output)
    assert meta["ss_network_module"] == "networks.lora_wan" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_base_model_version"] == "wan"
    assert json.loads(meta["ss_network_args"]) == {"rank_dropout": "0.1", "verbose": "True"}
    assert meta["ss_steps"] == "4" and meta["ss_seed"] == "5" and meta["ss_timestep_sampling"] == "uniform"
    assert meta["modelspec.architecture"] == "wan2.1/lora" and len(meta["sshs_model_hash"]) == 64
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "lora-state", "lora-step00000002-state", "lora-step00000002.safetensors", "lora-step00000004-state",
        "lora-step00000004.safetensors", "lora.safetensors"]


def test_retention_keeps_the_last_saves(dit: Path, tmp_path: Path) -> None:
    train(train_args(dit, tmp_path, "--max_train_steps", "6", "--save_every_n_steps", "2", "--save_last_n_steps",
                     "2", "--save_state", "--save_last_n_steps_state", "1", "--save_precision", "bf16",
                     "--no_metadata"), source=memory_source(2))
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("lora"))
    assert names == ["lora-state", "lora-step00000004.safetensors", "lora-step00000006-state",
                     "lora-step00000006.safetensors", "lora.safetensors"]
    sd = load_state_dict(tmp_path / "lora.safetensors")
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert set(read_metadata(tmp_path / "lora.safetensors")) == {
        "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
        "sshs_model_hash", "sshs_legacy_hash"}


def test_network_weights_continue_from_a_lora(dit: Path, tmp_path: Path) -> None:
    first = train(train_args(dit, tmp_path / "a", "--max_train_steps", "2"), source=memory_source(2))
    model = load_dit(dit)
    network = LoRANetwork(model, 4, 4)
    network.load_weights(first.output)
    second = train(train_args(dit, tmp_path / "b", "--max_train_steps", "1", "--network_weights", str(first.output),
                              "--learning_rate", "1e-12"), source=memory_source(2))
    a, b = load_lora(first.output), load_lora(second.output)
    for name in a.adapters:
        torch.testing.assert_close(b.adapters[name].up, a.adapters[name].up, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="has rank 4 but the network has rank 8"):
        train(train_args(dit, tmp_path / "c", "--max_train_steps", "1", "--network_weights", str(first.output),
                         "--network_dim", "8"), source=memory_source(2))
    shaped = train(train_args(dit, tmp_path / "d", "--max_train_steps", "1", "--network_weights",
                              str(first.output), "--network_dim", "8", "--dim_from_weights"), source=memory_source(2))
    assert read_metadata(shaped.output)["ss_network_dim"] == "8"  # as musubi: the flag value is recorded
    assert {a.rank for a in load_lora(shaped.output).adapters.values()} == {4}


# ----------------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------------

RESUME_FLAGS = ("--max_train_steps", "7", "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine",
                "--lr_warmup_steps", "2", "--network_dropout", "0.1", "--network_args", "rank_dropout=0.2",
                "module_dropout=0.1", "--caption_dropout_rate", "0.3", "--timestep_sampling", "shift",
                "--discrete_flow_shift", "2.0", "--num_timestep_buckets", "4", "--max_grad_norm", "0.5")


def test_resume_is_bit_exact(dit: Path, tmp_path: Path) -> None:
    """7 steps in one go == 3 steps, a state, a new process state, 4 more steps (mid-epoch, with accumulation,
    LoRA/rank/module/caption dropout, warmup + cosine, clipping and stratified timesteps)."""
    source = memory_source(5, batch_size=1)  # 5 micro-batches per epoch: groups of 2, 2, 1
    full = train(train_args(dit, tmp_path / "full", *RESUME_FLAGS, "--save_every_n_steps", "3", "--save_state"),
                 source=source)
    state = tmp_path / "full" / "lora-step00000003-state"
    assert state.is_dir()
    resumed = train(train_args(dit, tmp_path / "resumed", *RESUME_FLAGS, "--resume", str(state)), source=source)
    assert resumed.progress.global_step == 7 and [s for s, _ in resumed.losses] == [4, 5, 6, 7]
    assert [loss for _, loss in resumed.losses] == [loss for s, loss in full.losses if s > 3]
    a, b = load_state_dict(full.output), load_state_dict(resumed.output)
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_errors(dit: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such state folder"):
        train(train_args(dit, tmp_path, "--resume", str(tmp_path / "missing")), source=memory_source(2))
    (tmp_path / "empty-state").mkdir()
    with pytest.raises(ValueError, match="not a training state folder: weights.safetensors, state.pt missing"):
        train(train_args(dit, tmp_path, "--resume", str(tmp_path / "empty-state")), source=memory_source(2))
    train(train_args(dit, tmp_path / "a", "--max_train_steps", "1", "--save_state"), source=memory_source(2))
    with pytest.raises(ValueError, match="does not fit this run's LoRA"):
        train(train_args(dit, tmp_path / "b", "--network_dim", "8", "--resume", str(tmp_path / "a" / "lora-state")),
              source=memory_source(2))


# ----------------------------------------------------------------------------------------------------------------
# Full training and init-dit
# ----------------------------------------------------------------------------------------------------------------

def test_full_training_writes_a_loadable_dit(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY_DIT_BY_TYPE["t2v"], num_layers=1)
    init = tmp_path / "init.safetensors"
    assert init_dit_main(["--config", json.dumps(dataclasses.asdict(cfg)), "--output", str(init), "--seed", "3",
                          "--metadata", 'wantuner_sampling={"infer_steps": 8}']) == 0
    assert config_from_json(read_metadata(init)[CONFIG_METADATA_KEY]) == cfg
    start = load_dit(init)
    assert not start.head.head.weight.any()  # the official init zeroes the head
    result = train(train_args(init, tmp_path, "--network_module", "full", "--max_train_steps", "3",
                              "--learning_rate", "1e-3", "--output_name", "toy"), source=memory_source(2))
    assert result.output == tmp_path / "toy.safetensors"
    trained = load_dit(result.output)
    assert trained.config == cfg and trained.head.head.weight.abs().max() > 0
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert len(changed) > len(trained.state_dict()) // 2
    meta = read_metadata(result.output)
    assert meta["wantuner_sampling"] == '{"infer_steps": 8}' and meta["modelspec.architecture"] == "wan2.1"
    with pytest.raises(SystemExit):
        init_dit_main(["--output", str(tmp_path / "x.safetensors")])
    assert init_dit_main(["--config", '{"dim": 64, "heads": 4}', "--output", str(tmp_path / "y.safetensors")]) == 2


def test_caption_dropout_uses_the_empty_caption(dit: Path) -> None:
    model = load_dit(dit)
    source = memory_source(4, batch_size=4)
    batch = source.load(source.items())
    seeds = sample_seeds(1, 0, 0, 0, 4)
    base = StepConfig(TimestepConfig("uniform"))
    dropped = StepConfig(TimestepConfig("uniform"), caption_dropout_rate=0.999)
    empty_batch = dict(batch, t5=[source.empty_t5] * 4)
    expected = training_step(model, empty_batch, base, seeds).per_sample
    got = training_step(model, batch, dropped, seeds, empty_t5=source.empty_t5).per_sample
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(training_step(model, batch, base, seeds).per_sample, expected)
    with pytest.raises(ValueError, match="caption dropout needs the cached empty-caption"):
        training_step(model, batch, dropped, seeds)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def test_wrong_task_for_the_dit(dit: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="task 'i2v-14B' needs a i2v model with 36 input channels.*t2v model with 16"):
        train(train_args(dit, tmp_path, "--task", "i2v-14B"), source=memory_source(2))


def test_image_model_with_text_only_cache(tmp_path: Path) -> None:
    dit = tiny_dit_file(tmp_path / "i2v.safetensors", "i2v")
    with pytest.raises(ValueError, match="i2v model needs latents_image, clip in the latent cache"):
        train(train_args(dit, tmp_path, "--max_train_steps", "1"), source=memory_source(2))


def test_unknown_optimizer_and_missing_files(dit: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'AdamQ'"):
        train(train_args(dit, tmp_path, "--optimizer_type", "AdamQ"), source=memory_source(2))
    with pytest.raises(FileNotFoundError, match="DiT checkpoint not found"):
        train(train_args(tmp_path / "nope.safetensors", tmp_path), source=memory_source(2))
    code = train_main(["--dit", str(dit), "--dataset_config", str(tmp_path / "missing.toml"), "--output_dir",
                       str(tmp_path), "--optimizer_type", "AdamQ"])
    assert code == 1 and "error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="caption_dropout_rate needs the empty caption"):
        train(train_args(dit, tmp_path, "--caption_dropout_rate", "0.1"), source=memory_source(2, empty_t5=False))


@pytest.mark.parametrize("flags, message", [
    (["--sdpa", "--xformers"], "give one attention flag"),
    (["--sage_attn"], "SageAttention is inference-only"),
    (["--fp8_scaled"], "--fp8_scaled is used together with --fp8_base"),
    (["--network_module", "full", "--network_dim", "8"], "--network_dim only apply to LoRA"),
    (["--network_module", "lycoris.kohya"], "is not supported"),
    (["--sample_every_n_steps", "5"], "need --sample_prompts"),
    (["--sample_prompts", "p.txt"], "needs --vae and --t5"),
    (["--save_last_n_steps", "2"], "--save_last_n_steps needs --save_every_n_steps"),
    (["--gradient_checkpointing_cpu_offload"], "needs --gradient_checkpointing"),
    (["--validation_split", "1.5"], "must be in \\(0, 1\\)"),
    (["--log_with", "tensorboard"], "needs --logging_dir"),
    (["--log_with", "wandb", "--logging_dir", "x"], "only tensorboard"),
    (["--caption_dropout_rate", "1.0"], "must be in \\[0, 1\\)"),
])
def test_contradictory_flags(flags: list[str], message: str, dit: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        train_args(dit, tmp_path, *flags)


def test_missing_required_flags_and_config_file(dit: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--dit", str(dit)])
    assert exit_info.value.code == 2 and "--dataset_config, --output_dir" in capsys.readouterr().err
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\ndit = "{dit}"\ndataset_config = "d.toml"\noutput_dir = "{tmp_path}"\n'
                      '[training]\nlearning_rate = 3e-4\nnetwork_args = ["rank_dropout=0.1"]\n'
                      'gradient_checkpointing = true\nlr_warmup_steps = 0.1\n', encoding="utf-8")
    from training.args import parse_train_args

    args = parse_train_args(["--config_file", str(config), "--learning_rate", "1e-4"])
    assert args.learning_rate == 1e-4 and args.network_args == ["rank_dropout=0.1"]
    assert args.gradient_checkpointing and args.lr_warmup_steps == 0.1 and args.dit == str(dit)


def test_model_is_not_the_trained_module(dit: Path) -> None:
    """The DiT itself stays frozen in LoRA training: only the network's down/up weights require grad."""
    model = load_dit(dit)
    from training.trainable import NetworkConfig, apply_network

    trainable = apply_network(model, NetworkConfig(rank=2, alpha=2.0))
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in trainable.parameters()) and len(trainable.parameters()) == 40
    assert isinstance(model, WanModel)


# ----------------------------------------------------------------------------------------------------------------
# Memory and precision options
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def baseline(dit: Path, tmp_path_factory: pytest.TempPathFactory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(train_args(dit, tmp_path_factory.mktemp("base"), "--max_train_steps", "2"),
                     source=memory_source(2))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("flags", [["--gradient_checkpointing"],
                                   ["--gradient_checkpointing", "--gradient_checkpointing_cpu_offload"],
                                   ["--blocks_to_swap", "1"]], ids=["checkpointing", "cpu_offload", "block_swap"])
def test_memory_options_do_not_change_the_result(flags: list[str], dit: Path, baseline, tmp_path: Path) -> None:
    result = train(train_args(dit, tmp_path, "--max_train_steps", "2", *flags), source=memory_source(2))
    assert result.losses == baseline.losses
    for key, value in baseline.weights.items():
        assert torch.equal(result.weights[key], value), key


@pytest.mark.parametrize("flags", [["--fp8_base"], ["--fp8_base", "--fp8_scaled"], ["--mixed_precision", "bf16"],
                                   ["--mixed_precision", "fp16"]], ids=["fp8", "fp8_scaled", "bf16", "fp16"])
def test_reduced_precision_trains_close_to_fp32(flags: list[str], dit: Path, baseline, tmp_path: Path) -> None:
    result = train(train_args(dit, tmp_path, "--max_train_steps", "2", *flags), source=memory_source(2))
    for (_, loss), (_, reference) in zip(result.losses, baseline.losses):
        assert loss == pytest.approx(reference, rel=0.02)
    assert {v.dtype for v in load_state_dict(result.output).values()} == {torch.float32}  # LoRA kept in fp32
    assert all(v.dtype == torch.float32 for v in result.weights.values())


def test_epochs_epoch_saves_and_sampling_points(dit: Path, tmp_path: Path) -> None:
    """3 micro-batches per epoch with accumulation 2 = 2 optimizer steps per epoch; 3 epochs = 6 steps; epoch saves
    after epochs 1 and 2 (the final file covers epoch 3), as musubi names them."""
    result = train(train_args(dit, tmp_path, "--max_train_epochs", "3", "--gradient_accumulation_steps", "2",
                              "--save_every_n_epochs", "1", "--max_train_steps", "999"), source=memory_source(3))
    assert result.progress.global_step == 6 and result.progress.epoch == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == [
        "lora-000001.safetensors", "lora-000002.safetensors", "lora.safetensors"]
    assert read_metadata(tmp_path / "lora-000001.safetensors")["ss_steps"] == "2"


def test_loraplus_gives_the_up_weights_a_higher_learning_rate(dit: Path) -> None:
    from training.trainable import NetworkConfig, apply_network, parse_network_args

    extra = parse_network_args(["loraplus_lr_ratio=16", "exclude_patterns=['.*ffn.*']", "include_patterns=[]"])
    trainable = apply_network(load_dit(dit), NetworkConfig(rank=2, alpha=1.0, extra=extra))
    groups = trainable.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3] and len(groups[0]["params"]) == 16  # 8 attention layers x 2
    with pytest.raises(ValueError, match="--network_args 'rank=4'"):
        parse_network_args(["rank=4"])


def test_sample_prompt_problems_are_reported_before_training(tmp_path: Path) -> None:
    dit = tiny_dit_file(tmp_path / "i2v.safetensors", "i2v")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat walks --i cat.png --f 5\n", encoding="utf-8")
    flags = ("--vae", str(tmp_path / "vae.safetensors"), "--t5", str(tmp_path / "t5.safetensors"))
    with pytest.raises(ValueError, match="an I2V model needs --clip"):
        train(train_args(dit, tmp_path, "--sample_prompts", str(prompts), *flags), source=memory_source(2, "i2v"))
    toml = tmp_path / "prompts.toml"
    toml.write_text("[prompt]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="use a .txt file"):
        train(train_args(dit, tmp_path, "--sample_prompts", str(toml), *flags), source=memory_source(2, "i2v"))
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        train(train_args(dit, tmp_path, "--sample_prompts", str(tmp_path / "none.txt"), *flags),
              source=memory_source(2, "i2v"))


def test_train_config_defaults_are_the_cli_defaults(tmp_path: Path) -> None:
    """Only the required flags: the parsed TrainConfig equals the dataclass defaults with those three set."""
    from training.args import parse_train_config
    from training.train_config import DataConfig, ModelConfig, SaveConfig, TrainConfig

    parsed = parse_train_config(["--dit", "d.safetensors", "--dataset_config", "x.toml", "--output_dir",
                                 str(tmp_path)])
    assert parsed == TrainConfig(model=ModelConfig(dit="d.safetensors"), data=DataConfig(dataset_config="x.toml"),
                                 save=SaveConfig(output_dir=str(tmp_path)))
