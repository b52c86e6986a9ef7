"""Wan2.2 training on tiny random files (CPU): one LoRA across the A14B experts (the drawn timesteps pick the expert
per batch), one expert alone on its timestep range, i2v-A14B without CLIP, and TI2V-5B on Wan2.2 VAE latents."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from media_helpers import write_image

from tests.cache_helpers import image_dataset, write_models
from tests.model_set import write_model_set
from tests.tiny import randomize_
from tests.tiny_training import memory_source, tiny_dit_file, train_args
from training.__main__ import main as training_main
from training.cache.store import CachedDataset
from training.experts import ExpertPair, expert_of
from training.step import StepConfig, draw_sigmas, sample_seeds
from training.timesteps import TimestepConfig
from training.train import train
from wan_core.loading.checkpoint import load_state_dict, read_metadata, save_safetensors
from wan_core.lora.formats import load_lora
from wan_core.models.config import CONFIG_METADATA_KEY, VAEConfig, config_to_json
from wan_core.models.dit import load_dit
from wan_core.models.vae import WanVAEModel
from wan_core.sampling.experts import HIGH, LOW

TINY_VAE22 = VAEConfig(dim=8, dec_dim=12, z_dim=48, patch_size=2, is_residual=True)  # stride 16, 48 channels


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("experts")
    return {"low": tiny_dit_file(folder / "low.safetensors", seed=21),
            "high": tiny_dit_file(folder / "high.safetensors", seed=22),
            "i2v_low": tiny_dit_file(folder / "i2v_low.safetensors", "i2v-A14B", seed=23),
            "i2v_high": tiny_dit_file(folder / "i2v_high.safetensors", "i2v-A14B", seed=24),
            "ti2v": tiny_dit_file(folder / "ti2v.safetensors", "ti2v-5B", seed=25)}


def _pair(experts: dict[str, Path], out: Path, *extra: str):
    return train_args(experts["low"], out, "--task", "t2v-A14B", "--dit_high_noise", str(experts["high"]), *extra)


def _record_timesteps(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[float]]:
    """id(DiT) -> the timesteps of its training forwards (recorded by wrapping WanModel.forward)."""
    from wan_core.models.dit import WanModel

    seen: dict[int, list[float]] = {}
    forward = WanModel.forward

    def spy(self, x, t, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.setdefault(id(self), []).extend(float(v) for v in torch.as_tensor(t).flatten())
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(WanModel, "forward", spy)
    return seen


# ----------------------------------------------------------------------------------------------------------------
# The boundary rule
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["uniform", "sigma", "shift"])
def test_a_batch_stays_on_the_side_of_its_lead_sample(sampling: str) -> None:
    plain = StepConfig(TimestepConfig(sampling, discrete_flow_shift=3.0), seed=3)
    paired = StepConfig(plain.timesteps, seed=3, boundary=0.875)
    sides = []
    for step in range(300):
        seeds = sample_seeds(3, step, 0, 0, 4)
        free = draw_sigmas(plain, seeds, (4, 4))  # the same generators without the boundary
        sigmas = draw_sigmas(paired, seeds, (4, 4))
        lead_high = float((free[0] * 1000).float()) >= 875.0
        side = expert_of(sigmas, 0.875)  # raises when the batch mixes sides
        assert side == (HIGH if lead_high else LOW)
        kept = [(float(f) * 1000 >= 875.0) == lead_high for f in free]
        assert torch.equal(sigmas[torch.tensor(kept)], free[torch.tensor(kept)])  # draws on the side are kept
        sides.append(side)
    high_share = sides.count(HIGH) / len(sides)
    # P(t >= 875) of the lead draw: uniform 0.125; sigma (t = 1..1000) 126/1000; shift 3 of sigmoid(z): σ >= 0.875
    # <=> sigmoid(z) >= 0.7 <=> z >= ln(7/3) = 0.8473, P = 0.1984. 300 batches: within 4 binomial standard deviations
    expected = {"uniform": 0.125, "sigma": 0.126, "shift": 0.1984}[sampling]
    assert abs(high_share - expected) < 4 * (expected * (1 - expected) / len(sides)) ** 0.5


def test_expert_of_applies_the_sampler_rule_and_refuses_mixed_batches() -> None:
    assert expert_of(torch.tensor([0.875, 0.99], dtype=torch.float64), 0.875) == HIGH
    assert expert_of(torch.tensor([0.874, 0.1], dtype=torch.float64), 0.875) == LOW
    with pytest.raises(ValueError, match="both sides of the expert boundary 875"):
        expert_of(torch.tensor([0.874, 0.875], dtype=torch.float64), 0.875)


def test_each_batch_runs_the_expert_its_timesteps_pick(experts, tmp_path: Path, monkeypatch) -> None:
    seen = _record_timesteps(monkeypatch)
    result = train(_pair(experts, tmp_path, "--max_train_steps", "12", "--timestep_boundary", "500"),
                   source=memory_source(4, batch_size=2))
    assert result.output is not None
    times = list(seen.values())
    assert len(times) == 2  # both experts ran
    by_side = {min(t) >= 500.0: t for t in times}
    assert set(by_side) == {True, False} and max(by_side[False]) < 500.0
    assert sum(len(t) for t in times) == 12 * 2  # 12 steps of 2 samples, each sample once


# ----------------------------------------------------------------------------------------------------------------
# One LoRA across both experts
# ----------------------------------------------------------------------------------------------------------------

def _lora(result) -> dict[str, torch.Tensor]:
    return load_state_dict(result.output)


def test_boundary_0_and_1000_train_exactly_one_expert(experts, tmp_path: Path) -> None:
    source = memory_source(4, batch_size=2)
    steps = ("--max_train_steps", "3")
    only_high = train(_pair(experts, tmp_path / "b0", *steps, "--timestep_boundary", "0"), source=source)
    high = train(train_args(experts["high"], tmp_path / "high", *steps, "--task", "t2v-A14B", "--min_timestep", "0",
                            "--max_timestep", "1000"), source=source)
    assert only_high.losses == high.losses
    assert all(torch.equal(_lora(only_high)[k], v) for k, v in _lora(high).items())
    only_low = train(_pair(experts, tmp_path / "b1000", *steps, "--timestep_boundary", "1000"), source=source)
    low = train(train_args(experts["low"], tmp_path / "low", *steps), source=source)
    assert only_low.losses == low.losses
    assert all(torch.equal(_lora(only_low)[k], v) for k, v in _lora(low).items())
    assert only_low.losses != only_high.losses


def test_the_shared_lora_loads_for_both_experts_in_the_cli(experts, tmp_path: Path, caplog) -> None:
    result = train(_pair(experts, tmp_path / "pair", "--max_train_steps", "4"), source=memory_source(4))
    meta = read_metadata(result.output)
    assert meta["wantuner_task"] == "t2v-A14B" and meta["wantuner_timestep_boundary"] == "0.875"
    assert meta["ss_sd_model_name_high_noise"] == "high.safetensors"
    from wan_core.generate.cli import main as generate

    models = write_model_set(tmp_path / "models")
    caplog.set_level(logging.INFO)
    lora = str(result.output)
    assert generate(["--task", "t2v-A14B", "--dit", str(experts["low"]), "--dit_high_noise", str(experts["high"]),
                     "--lora_weight", lora, "--lora_weight_high_noise", lora, "--vae", str(models["vae"]), "--t5",
                     str(models["t5"]), "--video_size", "32", "32", "--video_length", "1", "--infer_steps", "2",
                     "--output_type", "latent", "--prompt", "a red square", "--save_path", str(tmp_path / "gen"),
                     "--quiet", "--device", "cpu"]) == 0
    reports = [r.getMessage() for r in caplog.records
               if r.name == "wan_core.runtime.prepare" and r.getMessage().startswith(f"LoRA {lora}")]
    assert len(reports) == 2, reports  # merged into each expert
    assert all(r.endswith("20 modules, 0 filtered out, 0 unmatched keys") for r in reports), reports


def test_offloading_the_inactive_expert_changes_nothing(experts, tmp_path: Path) -> None:
    source = memory_source(4, batch_size=2)
    flags = ("--max_train_steps", "6", "--timestep_boundary", "0.5")
    plain = train(_pair(experts, tmp_path / "plain", *flags), source=source)
    offloaded = train(_pair(experts, tmp_path / "off", *flags, "--offload_inactive_dit"), source=source)
    assert plain.losses == offloaded.losses
    assert all(torch.equal(_lora(offloaded)[k], v) for k, v in _lora(plain).items())


def test_expert_pair_moves_only_on_a_switch_and_only_with_offload() -> None:
    from tests.tiny import TINY_DIT
    from wan_core.models.dit import WanModel

    low, high = WanModel(TINY_DIT), WanModel(TINY_DIT)
    moves: list[tuple[str, str]] = []
    for name, model in (("low", low), ("high", high)):
        model.to = lambda where, name=name: moves.append((name, str(where)))  # type: ignore[method-assign]
    device = torch.device("cuda")  # never touched: `to` only records
    sigma_high, sigma_low = torch.tensor([0.95]), torch.tensor([0.2])
    pair = ExpertPair(low, high, 0.875, device, offload=True)
    assert pair.select(sigma_low) is low and moves == []  # the low-noise expert starts on the device
    assert pair.select(sigma_high) is high and moves == [("low", "cpu"), ("high", "cuda")]
    assert pair.select(sigma_high) is high and len(moves) == 2
    assert pair.select(sigma_low) is low and moves[2:] == [("high", "cpu"), ("low", "cuda")]
    moves.clear()
    kept = ExpertPair(low, high, 0.875, device)
    assert kept.select(sigma_high) is high and kept.select(sigma_low) is low and moves == []
    assert kept.switches == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--timestep_boundary", "0.9"], "--timestep_boundary needs --dit_high_noise"),
    (["--timestep_boundary", "0"], "--timestep_boundary needs --dit_high_noise"),
    (["--offload_inactive_dit"], "--offload_inactive_dit needs --dit_high_noise"),
    (["--dit_high_noise", "h.safetensors", "--timestep_boundary", "1500"], "--timestep_boundary must be in [0, 1]"),
    (["--dit_high_noise", "h.safetensors", "--offload_inactive_dit", "--blocks_to_swap", "1"],
     "--offload_inactive_dit cannot be combined with --blocks_to_swap"),
])
def test_contradictory_expert_flags(flags: list[str], message: str, experts, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        train_args(experts["low"], tmp_path, *flags)


def test_a_pair_needs_an_a14b_task(experts, tmp_path: Path) -> None:
    args = train_args(experts["low"], tmp_path, "--dit_high_noise", str(experts["high"]))
    with pytest.raises(ValueError, match="--dit_high_noise needs --task t2v-A14B or i2v-A14B"):
        train(args, source=memory_source(2))


def test_given_experts_train_as_a_pair_only_both_and_without_offload(experts, tmp_path: Path) -> None:
    """train(model=, high_noise_model=): the loaded pair trains exactly as the pair loaded from the files; a given
    high-noise expert alone, a given low-noise expert with a high-noise file, or offloading given experts is
    refused before training."""
    files = train(_pair(experts, tmp_path / "files", "--max_train_steps", "3"), source=memory_source(4))
    given = train(_pair(experts, tmp_path / "given", "--max_train_steps", "3"), source=memory_source(4),
                  model=load_dit(experts["low"]), high_noise_model=load_dit(experts["high"]))
    assert given.weights.keys() == files.weights.keys()
    assert all(torch.equal(given.weights[k], files.weights[k]) for k in files.weights)
    cases = [({"high_noise_model": load_dit(experts["high"])}, _pair(experts, tmp_path / "a"),
              "a given high-noise expert needs the given low-noise expert"),
             ({"model": load_dit(experts["low"])}, _pair(experts, tmp_path / "b"),
              "a given DiT trains alone; --dit_high_noise needs both experts loaded from files, or both given"),
             ({"model": load_dit(experts["low"]), "high_noise_model": load_dit(experts["high"])},
              _pair(experts, tmp_path / "c", "--offload_inactive_dit"), "given experts stay where they were loaded")]
    for given_models, args, message in cases:
        with pytest.raises(ValueError, match=message):
            train(args, source=memory_source(4), **given_models)


# ----------------------------------------------------------------------------------------------------------------
# One expert alone
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sampling", "low", "high"), [
    (["--timestep_sampling", "sigma"], 0, 875),
    (["--timestep_sampling", "sigma"], 875, 1000),
    (["--timestep_sampling", "shift", "--discrete_flow_shift", "3"], 0, 900),
    (["--timestep_sampling", "shift", "--discrete_flow_shift", "3", "--preserve_distribution_shape"], 900, 1000),
    (["--timestep_sampling", "logsnr", "--preserve_distribution_shape"], 0, 875),
])
def test_one_expert_trains_only_on_its_range(sampling: list[str], low: int, high: int, experts, tmp_path: Path,
                                             monkeypatch) -> None:
    seen = _record_timesteps(monkeypatch)
    args = train_args(experts["low"], tmp_path, "--task", "t2v-A14B", "--max_train_steps", "20", *sampling,
                      "--min_timestep", str(low), "--max_timestep", str(high))
    train(args, source=memory_source(4, batch_size=2))
    (times,) = seen.values()
    assert len(times) == 40 and all(low <= t <= high for t in times), times


def test_one_a14b_expert_without_a_range_is_warned_about(experts, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    train(train_args(experts["low"], tmp_path, "--task", "t2v-A14B", "--max_train_steps", "1"),
          source=memory_source(2))
    assert "--min_timestep 0 --max_timestep 875 (low-noise expert)" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# i2v-A14B and TI2V-5B from real caches
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("enc")
    models = write_models(root / "models")
    vae22 = save_safetensors(randomize_(WanVAEModel(TINY_VAE22), 0, scale=0.1).state_dict(),
                             root / "vae22.safetensors", {CONFIG_METADATA_KEY: config_to_json(TINY_VAE22)})
    return models, vae22


def _cache(config: Path, vae: Path, t5: Path, *extra: str) -> None:
    assert training_main(["cache-latents", "--dataset_config", str(config), "--vae", str(vae), "--vae_dtype",
                          "float32", "--num_workers", "0", "--device", "cpu", *extra]) == 0
    assert training_main(["cache-text", "--dataset_config", str(config), "--t5", str(t5), "--device", "cpu"]) == 0


def _train_cli(config: Path, out: Path, *extra: str) -> int:
    return training_main(["train", "--dataset_config", str(config), "--output_dir", str(out),
                          "--max_data_loader_n_workers", "0", "--seed", "3", *extra])


def test_i2v_a14b_caches_image_latents_without_clip_and_trains_both_experts(encoders, experts,
                                                                            tmp_path: Path) -> None:
    models, _ = encoders
    config = image_dataset(tmp_path, {"x": "an image", "y": "another"})
    _cache(config, models.vae, models.t5, "--task", "i2v-A14B")
    (entry,) = [p for p in (tmp_path / "cache").glob("x_*_wan.safetensors")]
    names = set(load_state_dict(entry))
    assert any(n.startswith("latents_image_") for n in names) and not any(n.startswith("clip_") for n in names)
    out = tmp_path / "out"
    assert _train_cli(config, out, "--task", "i2v-A14B", "--dit", str(experts["i2v_low"]), "--dit_high_noise",
                      str(experts["i2v_high"]), "--max_train_steps", "3", "--timestep_boundary", "0.5") == 0
    lora = load_lora(out / "lora.safetensors")
    assert len(lora.adapters) == 20 and not lora.unmatched  # no CLIP branch: no k_img/v_img adapters


def test_ti2v_5b_trains_on_wan22_vae_latents(encoders, experts, tmp_path: Path) -> None:
    models, vae22 = encoders
    config = image_dataset(tmp_path, {"x": "an image", "y": "another"})
    _cache(config, vae22, models.t5, "--task", "ti2v-5B")
    (entry,) = [p for p in (tmp_path / "cache").glob("x_*_wan.safetensors")]
    (latents,) = load_state_dict(entry).values()
    assert latents.shape == (48, 1, 2, 2)  # 32x32 px / 16
    from training.args import parse_train_config

    args = parse_train_config(["--dataset_config", str(config), "--validation_dataset_config", str(config),
                               "--output_dir", str(tmp_path / "out"), "--max_data_loader_n_workers", "0",
                               "--seed", "3", "--task", "ti2v-5B", "--dit", str(experts["ti2v"]),
                               "--max_train_steps", "40", "--learning_rate", "1e-2", "--network_dim", "4",
                               "--network_alpha", "4", "--validate_every_n_steps", "40", "--timestep_sampling",
                               "uniform", "--validation_timesteps", "200", "500", "800"])
    result = train(args)
    means = [logs["val_loss/mean"] for _, logs in result.validation]
    assert len(means) == 2 and means[1] < 0.8 * means[0], means  # overfitting the two cached items
    model = load_dit(experts["ti2v"])
    assert len(load_lora(result.output, {n for n, _ in model.named_modules()}).unmatched) == 0


def test_latents_of_the_other_vae_are_refused_in_one_line(encoders, experts, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    models, vae22 = encoders
    wan21 = image_dataset(tmp_path / "21", {"x": "an image"})
    _cache(wan21, models.vae, models.t5)
    capsys.readouterr()
    assert _train_cli(wan21, tmp_path / "o1", "--task", "ti2v-5B", "--dit", str(experts["ti2v"])) == 1
    err = capsys.readouterr().err
    (entry,) = (tmp_path / "21" / "cache").glob("x_*_wan.safetensors")
    assert err == (f"error: {entry} holds 16-channel latents of the Wan2.1 VAE (wan_2.1_vae), but the DiT takes "
                   f"48-channel latents: re-run cache-latents with the Wan2.2 VAE (wan2.2_vae)\n")
    wan22 = image_dataset(tmp_path / "22", {"x": "an image"})
    _cache(wan22, vae22, models.t5)
    capsys.readouterr()
    assert _train_cli(wan22, tmp_path / "o2", "--dit", str(experts["low"])) == 1
    err = capsys.readouterr().err
    (entry,) = (tmp_path / "22" / "cache").glob("x_*_wan.safetensors")
    assert err.count("\n") == 1 and str(entry) in err and "but the DiT takes 16-channel latents" in err


def test_cache_latents_refuses_wan22_buckets_off_32_px_and_a_task_of_the_other_vae(
        encoders, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models, vae22 = encoders
    config = image_dataset(tmp_path, {"x": "an image"}, size=(48, 32), resolution=[48, 32])
    base = ["cache-latents", "--dataset_config", str(config), "--vae_dtype", "float32", "--num_workers", "0"]
    assert training_main([*base, "--vae", str(vae22)]) == 2
    err = capsys.readouterr().err
    assert "1 items resize to buckets that are not multiples of 32 px on each side" in err and "48x32" in err
    assert not list((tmp_path / "cache").glob("*_wan.safetensors"))
    assert training_main([*base, "--vae", str(models.vae), "--task", "ti2v-5B"]) == 2
    assert "task ti2v-5B needs the Wan2.2 VAE (wan2.2_vae) with 48" in capsys.readouterr().err
    assert training_main([*base, "--vae", str(models.vae)]) == 0  # 48x32 is fine for the Wan2.1 VAE (16 px)


def _bucketed_dataset(root: Path) -> Path:
    """Images of 48x32 (aspect 1.5) and 32x96 (aspect 1/3), bucketed around 64x64."""
    config = image_dataset(root, {"x": "wide", "y": "tall"}, size=(48, 32), resolution=[64, 64], enable_bucket=True)
    write_image(root / "images" / "y.png", size=(32, 96), index=5)
    return config


def _cached_latent_shapes(cache: Path) -> dict[str, tuple[int, ...]]:
    return {entry.name[0]: tuple(next(iter(load_state_dict(entry).values())).shape)
            for entry in cache.glob("*_wan.safetensors")}


def test_cache_latents_buckets_in_the_vae_steps_and_the_reader_agrees(encoders, tmp_path: Path) -> None:
    """Candidates around 64x64: in 16 px steps (Wan2.1) 32x128, 48x80, 64x64 and their transposes; in 32 px steps
    (Wan2.2) only 32x128, 64x64 and 128x32. The nearest aspect ratio wins."""
    models, vae22 = encoders
    config = _bucketed_dataset(tmp_path / "22")
    _cache(config, vae22, models.t5, "--task", "ti2v-5B")
    # [C, F, H/16, W/16]: x 48x32 -> 64x64, y 32x96 -> 32x128 (multiples of 32)
    assert _cached_latent_shapes(tmp_path / "22" / "cache") == {"x": (48, 1, 4, 4), "y": (48, 1, 8, 2)}
    reader = CachedDataset(config, latent_channels=48)  # the trainer's reader finds the same buckets, up to date
    assert sorted(item.bucket for item in reader.scan.items) == [(32, 128), (64, 64)]
    config = _bucketed_dataset(tmp_path / "21")
    _cache(config, models.vae, models.t5)
    # [C, F, H/8, W/8]: x 48x32 -> 80x48, y 32x96 -> 32x128 (Wan2.1: 16 px steps, as before)
    assert _cached_latent_shapes(tmp_path / "21" / "cache") == {"x": (16, 1, 6, 10), "y": (16, 1, 16, 4)}
    assert sorted(item.bucket for item in CachedDataset(config, latent_channels=16).scan.items) == [
        (32, 128), (80, 48)]


def test_help_shows_the_recommended_expert_ranges(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        training_main(["train", "--help"])
    out = capsys.readouterr().out
    assert "t2v-A14B   0 - 875            875 - 1000          0.875" in out
    assert "i2v-A14B   0 - 900            900 - 1000          0.9" in out
    assert "--dit_high_noise" in out and "--offload_inactive_dit" in out
