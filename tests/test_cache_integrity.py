"""Cache files carry sha256 checksums of their tensors: a corrupted or older file is encoded again by the cache
commands and named (never trained on) by the reader and the trainer; cache cleanup deletes only files this project
wrote; a diverging training run exits non-zero with the step, the items and the last good checkpoint."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from cache_helpers import image_dataset, write_models
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.tiny import TINY_DIT_BY_TYPE, randomize_
from training.__main__ import main as training_main
from training.cache.latents import cache_latents
from training.cache.store import TENSORS_METADATA, CachedDataset, CacheError
from training.cache.text import cache_text
from training.init_dit import write_dit
from wan_core.loading.checkpoint import non_finite_count
from wan_core.models.dit import WanModel


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


def _cache(config: Path, models) -> None:
    cache_latents(config, models.vae, vae_dtype="float32", num_workers=0)
    cache_text(config, models.t5)


def _flip_to_nan(path: Path, tensor: str) -> None:
    """Overwrite the first value of `tensor` in the file's data with a NaN of its dtype (bytes changed in place)."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    info = json.loads(raw[8: 8 + header_len])[tensor]
    nan = {"F32": b"\x00\x00\xc0\x7f", "BF16": b"\xc0\x7f", "F16": b"\x00\x7e"}[info["dtype"]]
    start = 8 + header_len + info["data_offsets"][0]
    raw[start: start + len(nan)] = nan
    path.write_bytes(bytes(raw))


def _only_tensor(path: Path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return next(iter(f.keys()))


@pytest.fixture()
def cached(tmp_path, models):
    config = image_dataset(tmp_path, {"a": "first caption", "b": "second caption"})
    _cache(config, models)
    return config, tmp_path / "cache"


def test_corrupted_entries_are_encoded_again_by_the_cache_commands(cached, models, caplog):
    config, cache = cached
    latent, text = cache / "a_0032x0032_wan.safetensors", cache / "b_wan_te.safetensors"
    before = {path: {k: v.clone() for k, v in load_file(str(path)).items()} for path in (latent, text)}
    for path in (latent, text):
        _flip_to_nan(path, _only_tensor(path))
        assert sum(non_finite_count(v) for v in load_file(str(path)).values()) == 1
    with caplog.at_level(logging.WARNING, logger="training.cache.store"):
        latents = cache_latents(config, models.vae, vae_dtype="float32", num_workers=0)
        texts = cache_text(config, models.t5)
    assert latents.encoded == [latent] and latents.reused == 1
    assert texts.encoded == [text] and texts.reused == 2
    for path in (latent, text):
        assert f"encoding {path} again: tensor {_only_tensor(path)} does not match its sha256 checksum" in caplog.text
        for key, value in load_file(str(path)).items():
            assert torch.equal(value, before[path][key])


def test_older_entries_without_checksums_are_encoded_again_with_a_log_line(cached, models, caplog):
    config, cache = cached
    path = cache / "a_0032x0032_wan.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != TENSORS_METADATA}
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(CacheError, match=r"a_0032x0032_wan.safetensors: written without tensor checksums"):
        CachedDataset(config)
    with caplog.at_level(logging.INFO, logger="training.cache.store"):
        report = cache_latents(config, models.vae, vae_dtype="float32", num_workers=0)
    assert report.encoded == [path]
    assert f"encoding {path} again: written without tensor checksums by an older version" in caplog.text
    assert TENSORS_METADATA in safe_open(str(path), framework="pt").metadata()


def test_reader_names_a_corrupted_file_and_refuses_it(cached):
    config, cache = cached
    path = cache / "b_0032x0032_wan.safetensors"
    _flip_to_nan(path, _only_tensor(path))
    dataset = CachedDataset(config)  # the metadata check at opening passes: the bytes are checked on reading
    batch = next(i for i in dataset.epoch_batches(0) if i[0].media_path.stem == "b")
    with pytest.raises(CacheError, match=rf"{path}: tensor latents_1x4x4_float32 does not match its sha256 "
                                         r"checksum .*refusing to train on it: run `python -m training cache-latents"):
        dataset.load_batch(batch)


def _dit(root: Path) -> Path:
    torch.manual_seed(0)
    return write_dit(randomize_(WanModel(TINY_DIT_BY_TYPE["t2v"]), 0), root / "dit.safetensors")


def _train_argv(config: Path, dit: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset_config", str(config), "--dit", str(dit), "--output_dir", str(out), "--seed", "1",
            "--network_dim", "2", "--max_data_loader_n_workers", "0", "--timestep_sampling", "uniform", *extra]


def test_trainer_names_a_corrupted_cache_file_and_exits_non_zero(cached, tmp_path, capsys):
    config, cache = cached
    path = cache / "a_wan_te.safetensors"
    _flip_to_nan(path, _only_tensor(path))
    out = tmp_path / "out"
    code = training_main(_train_argv(config, _dit(tmp_path), out, "--max_train_steps", "4"))
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"{path}: tensor varlen_t5_bfloat16 does not match its sha256 checksum" in err
    assert not list(out.glob("*.safetensors"))


def test_diverging_cli_run_exits_non_zero_naming_the_cache_files(cached, tmp_path, capsys):
    config, cache = cached
    out = tmp_path / "out"
    code = training_main(_train_argv(config, _dit(tmp_path), out, "--max_train_steps", "30", "--learning_rate",
                                     "1e4", "--save_every_n_steps", "1"))
    err = capsys.readouterr().err
    assert code == 1, err
    line = next(line for line in err.splitlines() if line.startswith("error: training stopped at step "))
    assert f"{cache}/" in line and "_0032x0032_wan.safetensors (T5 " in line and "last good checkpoint" in line
    saved = list(out.glob("*.safetensors"))
    assert not (out / "lora.safetensors").exists()
    assert all(non_finite_count(v) == 0 for path in saved for v in load_file(str(path)).values())


def test_cleanup_deletes_only_files_this_project_wrote(cached, models, capsys):
    config, cache = cached
    user_files = [cache / "my_style_wan.safetensors", cache / "my_style_wan_te.safetensors"]
    for path in user_files:  # a user's LoRA named like cache files, in the default cache folder
        save_file({"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.ones(2, 4)}, str(path),
                  metadata={"ss_network_module": "networks.lora_wan"})
    for suffix in (".png", ".txt"):
        (config.parent / "images" / f"b{suffix}").unlink()  # b's entries become stale
    argv = ["--dataset_config", str(config), "--device", "cpu"]
    assert training_main(["cache-latents", *argv, "--vae", str(models.vae), "--vae_dtype", "float32",
                          "--num_workers", "0"]) == 0
    assert training_main(["cache-text", *argv, "--t5", str(models.t5)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == ("latent cache: 1 entries: 0 encoded, 1 reused, 1 stale files removed, 1 files named like "
                       "cache files left alone (not written by this project: my_style_wan.safetensors)")
    assert out[-1] == ("T5 cache: 2 entries (including the empty caption): 0 encoded, 2 reused, 1 stale files "
                       "removed, 1 files named like cache files left alone (not written by this project: "
                       "my_style_wan_te.safetensors)")
    assert all(path.exists() for path in user_files)
    assert not (cache / "b_0032x0032_wan.safetensors").exists() and not (cache / "b_wan_te.safetensors").exists()
