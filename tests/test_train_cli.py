"""`python -m training train` end to end on real caches: dataset TOML -> cache-latents / cache-text -> train with
held-out validation, caption dropout, TensorBoard and sample videos -> a LoRA that the project's loader reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.cache_helpers import image_dataset, write_models
from tests.tiny import TINY_DIT_BY_TYPE, randomize_
from training.__main__ import main as training_main
from training.init_dit import write_dit
from wan_core.loading.checkpoint import read_metadata
from wan_core.lora.formats import load_lora
from wan_core.models.dit import WanModel


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cli")
    models = write_models(root / "models")
    captions = {"a": "a red square", "b": "a blue circle", "c": "a green triangle"}
    config = image_dataset(root, captions, batch_size=1)
    assert training_main(["cache-latents", "--dataset_config", str(config), "--vae", str(models.vae),
                          "--vae_dtype", "float32", "--num_workers", "0", "--device", "cpu"]) == 0
    assert training_main(["cache-text", "--dataset_config", str(config), "--t5", str(models.t5),
                          "--device", "cpu"]) == 0
    torch.manual_seed(0)
    dit = write_dit(randomize_(WanModel(TINY_DIT_BY_TYPE["t2v"]), 0), root / "dit.safetensors")
    return root, models, config, dit


def _event_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for run in folder.iterdir():
        accumulator = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"]) | set(accumulator.Tags()["images"])
    return tags


def test_train_from_caches_with_validation_sampling_and_tensorboard(cached, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    root, models, config, dit = cached
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\na red square --w 32 --h 32 --s 2 --d 7\n"
                       "a blue circle --w 48 --h 32 --f 5 --s 2 --l 1.0\n", encoding="utf-8")
    out = tmp_path / "out"
    code = training_main([
        "train", "--dataset_config", str(config), "--dit", str(dit), "--output_dir", str(out), "--output_name",
        "cli", "--max_train_steps", "4", "--learning_rate", "1e-3", "--network_dim", "2", "--seed", "1",
        "--max_data_loader_n_workers", "1", "--persistent_data_loader_workers", "--gradient_checkpointing",
        "--validation_split", "0.34", "--validate_every_n_steps", "2", "--caption_dropout_rate", "0.5",
        "--vae", str(models.vae), "--t5", str(models.t5), "--sample_prompts", str(prompts), "--sample_at_first",
        "--sample_every_n_steps", "4", "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"),
        "--timestep_sampling", "shift", "--discrete_flow_shift", "3"])
    assert code == 0, capsys.readouterr().err
    lora = out / "cli.safetensors"
    assert capsys.readouterr().out.strip().endswith(str(lora))
    parsed = load_lora(lora, {f"blocks.{i}.{m}" for i in range(2) for m in (
        "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
        "cross_attn.o", "ffn.0", "ffn.2")})
    assert len(parsed.adapters) == 20 and not parsed.unmatched
    assert read_metadata(lora)["ss_num_train_items"] == "2"  # one of the three images is held out
    samples = sorted(p.name for p in (out / "sample").iterdir())
    assert len(samples) == 4  # 2 prompts at step 0 and at step 4
    assert sum(name.endswith(".png") for name in samples) == 2 and sum(name.endswith(".mp4") for name in samples) == 2
    assert any(name.startswith("cli_e000000_00_") and name.endswith("_7.png") for name in samples)
    tags = _event_tags(tmp_path / "logs")
    assert {"loss/current", "loss/average", "lr/group0", "val_loss/mean", "val_loss/t0500"} <= tags
    assert {"sample/00", "sample/01"} <= tags


def test_cache_source_leaves_caption_dropout_to_the_loop(cached, tmp_path: Path) -> None:
    from training.args import parse_train_config
    from training.train import open_source, setup_run

    _, _, config, dit = cached
    args = parse_train_config(["--dataset_config", str(config), "--dit", str(dit), "--output_dir", str(tmp_path),
                             "--caption_dropout_rate", "0.9"])
    source = open_source(setup_run(args), str(config))
    assert source.empty_t5 is not None
    for item in source.items():
        batch = source.load([item])
        assert batch["caption_dropped"] == [False] and batch["captions"][0]


def test_i2v_from_caches(cached, tmp_path: Path) -> None:
    root, models, _, _ = cached
    config = image_dataset(tmp_path, {"x": "an image"}, batch_size=1)
    assert training_main(["cache-latents", "--dataset_config", str(config), "--vae", str(models.vae), "--clip",
                          str(models.clip), "--vae_dtype", "float32", "--num_workers", "0", "--device", "cpu"]) == 0
    assert training_main(["cache-text", "--dataset_config", str(config), "--t5", str(models.t5),
                          "--device", "cpu"]) == 0
    cfg = dataclasses.replace(TINY_DIT_BY_TYPE["i2v"], clip_dim=32)  # the tiny CLIP tower is 32 wide
    dit = write_dit(randomize_(WanModel(cfg), 0), tmp_path / "i2v.safetensors")
    out = tmp_path / "out"
    assert training_main(["train", "--dataset_config", str(config), "--dit", str(dit), "--output_dir", str(out),
                          "--max_train_steps", "2", "--max_data_loader_n_workers", "0", "--clip",
                          str(models.clip)]) == 0
    assert any(m.endswith("cross_attn.k_img") for m in load_lora(out / "lora.safetensors").adapters)


def test_cli_errors(cached, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, models, config, dit = cached
    base = ["train", "--dit", str(dit), "--output_dir", str(tmp_path), "--max_data_loader_n_workers", "0",
            "--max_train_steps", "1"]
    assert training_main([*base, "--dataset_config", str(tmp_path / "missing.toml")]) == 1
    assert "missing.toml" in capsys.readouterr().err
    assert training_main([*base, "--dataset_config", str(config), "--optimizer_type", "NoSuchOptimizer"]) == 1
    assert "unknown optimizer 'NoSuchOptimizer'" in capsys.readouterr().err
    assert training_main([*base, "--dataset_config", str(config), "--task", "i2v-14B"]) == 1
    assert "task 'i2v-14B' needs a i2v model with 36 input channels" in capsys.readouterr().err
    assert training_main([*base, "--dataset_config", str(config), "--sdpa", "--flash3"]) == 2
    assert "give one attention flag" in capsys.readouterr().err
    assert training_main([*base, "--dataset_config", str(config), "--vae", str(models.other_vae)]) == 1
    assert "encoded with another VAE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        training_main(["train", "--help"])
    assert exit_info.value.code == 0


def test_unusable_output_folders_are_reported_before_anything_loads(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["train", "--dit", str(tmp_path / "no_dit.safetensors"), "--dataset_config", str(tmp_path / "d.toml")]
    assert training_main([*base, "--output_dir", str(afile)]) == 2
    assert capsys.readouterr().err == (f"error: invalid training flags:\n  - --output_dir {afile} is a file; expected "
                                       "a folder (it is created when missing)\n")
    assert training_main([*base, "--output_dir", str(afile / "out"), "--logging_dir", str(afile / "logs")]) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {afile / 'out'} lies under the file {afile}" in err
    assert f"--logging_dir {afile / 'logs'} lies under the file {afile}" in err
    out = tmp_path / "new" / "out"
    with pytest.MonkeyPatch.context() as mp:
        import wan_core.loading.checkpoint as checkpoint

        mp.setattr(checkpoint.os, "access", lambda path, mode: False)  # root ignores chmod: fake the refusal
        assert training_main([*base, "--output_dir", str(out)]) == 2
    assert f"--output_dir {out} is not writable (no write permission)" in capsys.readouterr().err
