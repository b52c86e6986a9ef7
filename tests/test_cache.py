"""Latent and T5 caches: musubi file names/keys/shapes, values equal to direct encodes, content-keyed invalidation,
atomic/resumable writes, stale-file cleanup, and the training reader (tiny random encoders, CPU, fp32)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_helpers import frames_dataset, image_dataset, write_frames, write_models, write_toml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import wan_core.loading.checkpoint as checkpoint_module
from training.cache.latents import cache_latents
from training.cache.store import (
    EMPTY_TEXT_NAME,
    HASH_INDEX_NAME,
    KEY_METADATA,
    CachedDataset,
    CacheError,
    MediaHasher,
    checkpoint_fingerprint,
)
from training.cache.text import cache_text
from wan_core.media.io import frames_to_tensor, read_video, resize_to_bucket
from wan_core.models.clip import load_clip_vision
from wan_core.models.t5 import load_t5
from wan_core.models.vae import load_vae
from wan_core.sampling.conditioning import image_to_video


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def vae(models):
    return load_vae(models.vae, dtype=torch.float32)


def _pixels(path: Path, indices, bucket=(32, 32)) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1]: the frames resized to the bucket, as the cache reads them."""
    frames = np.stack([resize_to_bucket(f, bucket) for f in read_video(path, indices)])
    return frames_to_tensor(frames).permute(1, 0, 2, 3).contiguous()


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name.endswith(".safetensors")}


def _latents(root: Path, models, **options):
    options = {"vae_dtype": "float32", "num_workers": 1, **options}
    return cache_latents(root / "dataset.toml", models.vae, **options)


# --------------------------------------------------------------------------------------------------------------------
# File format


def test_video_latents_have_musubi_names_keys_and_equal_a_direct_encode(tmp_path, models, vae):
    frames_dataset(tmp_path, {"walk": "a red square walks", "jump": "a blue circle jumps"})
    report = _latents(tmp_path, models, batch_size=2)
    names = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".safetensors")
    assert names == ["jump_00000-005_0032x0032_wan.safetensors", "walk_00000-005_0032x0032_wan.safetensors"]
    assert len(report.encoded) == 2 and report.reused == 0
    expected = vae.encode(torch.stack([_pixels(tmp_path / "videos" / s, range(5)) for s in ("walk", "jump")]))
    for stem, latent in zip(("walk", "jump"), expected):  # one batch of 2, in dataset order
        path = tmp_path / "cache" / f"{stem}_00000-005_0032x0032_wan.safetensors"
        tensors = load_file(str(path))
        assert list(tensors) == ["latents_2x4x4_float32"]
        assert torch.equal(tensors["latents_2x4x4_float32"], latent)
        meta = _metadata(path)
        assert {k: meta[k] for k in ("architecture", "width", "height", "frame_count", "format_version")} == {
            "architecture": "wan", "width": "32", "height": "32", "frame_count": "5", "format_version": "1.0.1"}
        assert re.fullmatch(r"[0-9a-f]{64}", meta[KEY_METADATA])


def test_default_dtype_is_bf16_and_images_have_no_frame_part(tmp_path, models):
    image_dataset(tmp_path, {"cat": "a cat"}, size=(48, 32))
    cache_latents(tmp_path / "dataset.toml", models.vae, num_workers=0)
    path = tmp_path / "cache" / "cat_0048x0032_wan.safetensors"  # the source size, as musubi names it
    tensors = load_file(str(path))
    assert list(tensors) == ["latents_1x4x4_bfloat16"] and tensors["latents_1x4x4_bfloat16"].dtype == torch.bfloat16
    assert "frame_count" not in _metadata(path)
    bf16 = load_vae(models.vae, dtype=torch.bfloat16)
    expected = bf16.encode(_pixels(tmp_path / "images" / "cat.png", None)[None])[0].to(torch.bfloat16)
    assert torch.equal(tensors["latents_1x4x4_bfloat16"], expected)


def test_i2v_clip_and_control_latents(tmp_path, models, vae):
    frames_dataset(tmp_path, {"walk": "a red square walks"}, controls=True)
    cache_latents(tmp_path / "dataset.toml", models.vae, clip=models.clip, vae_dtype="float32", num_workers=0)
    tensors = load_file(str(tmp_path / "cache" / "walk_00000-005_0032x0032_wan.safetensors"))
    assert sorted(tensors) == ["clip_float32", "latents_2x4x4_float32", "latents_control_2x4x4_float32",
                               "latents_image_2x4x4_float32"]
    video = _pixels(tmp_path / "videos" / "walk", range(5))
    image = tensors["latents_image_2x4x4_float32"]
    assert image.shape == (20, 2, 4, 4)
    assert torch.equal(image[:4, 0], torch.ones(4, 4, 4)) and torch.equal(image[:4, 1], torch.zeros(4, 4, 4))
    clip = load_clip_vision(models.clip)
    reference = image_to_video(vae, clip, video[:, 0], 5, 32, 32)  # the inference-time I2V conditioning
    assert torch.equal(image, reference.y[0])
    assert tensors["clip_float32"].dtype == torch.float16  # musubi: fp16 features under the latent dtype's name
    assert tensors["clip_float32"].shape == (257, 32)
    assert torch.equal(tensors["clip_float32"], reference.clip_fea[0].to(torch.float16))
    control = _pixels(tmp_path / "controls" / "walk", range(5))  # 48x32 source, cover-cropped to 32x32
    assert torch.equal(tensors["latents_control_2x4x4_float32"], vae.encode(control[None])[0])


def test_text_cache_names_keys_values_and_the_empty_caption(tmp_path, models):
    captions = {"cat": "a cat sits on a red sofa", "dog": "two dogs run across a snowy field"}
    image_dataset(tmp_path, captions)
    report = cache_text(tmp_path / "dataset.toml", models.t5, batch_size=1)
    assert len(report.encoded) == 3  # two captions and the empty one
    encoder = load_t5(models.t5)
    for stem, caption in captions.items():
        path = tmp_path / "cache" / f"{stem}_wan_te.safetensors"
        tensors = load_file(str(path))
        assert list(tensors) == ["varlen_t5_bfloat16"]
        assert torch.equal(tensors["varlen_t5_bfloat16"], encoder.encode([caption])[0].to(torch.bfloat16))
        meta = _metadata(path)
        assert (meta["architecture"], meta["caption1"], meta["format_version"]) == ("wan", caption, "1.0.1")
    empty = load_file(str(tmp_path / "cache" / EMPTY_TEXT_NAME))["varlen_t5_bfloat16"]
    assert empty.shape == (1, 32)  # EOS only
    assert torch.equal(empty, encoder.encode([""])[0].to(torch.bfloat16))


def _musubi_content_key(key: str) -> str:
    """musubi's collator: drop `varlen_`, the dtype suffix, and for latents_* the FxHxW part."""
    key = key.removeprefix("varlen_").rsplit("_", 1)[0]
    return key.rsplit("_", 1)[0] if key.startswith("latents_") else key


def test_files_follow_musubi_loader_conventions(tmp_path, models):
    frames_dataset(tmp_path, {"my_clip": "a clip"}, frames=5, target_frames=[1, 5])
    cache_latents(tmp_path / "dataset.toml", models.vae, i2v=True, vae_dtype="float32", num_workers=0)
    cache_text(tmp_path / "dataset.toml", models.t5)
    latent_files = sorted((tmp_path / "cache").glob("*_wan.safetensors"))  # musubi's training glob
    assert [p.name for p in latent_files] == ["my_clip_00000-001_0032x0032_wan.safetensors",
                                              "my_clip_00000-005_0032x0032_wan.safetensors"]
    for path in latent_files:
        tokens = path.name.split("_")
        assert tokens[-2] == "0032x0032" and re.fullmatch(r"\d{5}-\d{3}", tokens[-3])
        text_file = path.parent / f"{'_'.join(tokens[:-3])}_wan_te.safetensors"
        assert text_file.is_file()
        keys = {_musubi_content_key(k) for k in load_file(str(path))} | {
            _musubi_content_key(k) for k in load_file(str(text_file))}
        assert keys == {"latents", "latents_image", "t5"}
    assert not list((tmp_path / "cache").glob("*_wan_te*.json"))


# --------------------------------------------------------------------------------------------------------------------
# Reuse and invalidation


def test_caption_edit_reencodes_exactly_that_caption(tmp_path, models):
    image_dataset(tmp_path, {"a": "first caption", "b": "second caption", "c": "third caption"})
    cache_latents(tmp_path / "dataset.toml", models.vae, vae_dtype="float32", num_workers=0)
    cache_text(tmp_path / "dataset.toml", models.t5)
    before = _mtimes(tmp_path / "cache")
    (tmp_path / "images" / "b.txt").write_text("an edited caption", encoding="utf-8")
    text = cache_text(tmp_path / "dataset.toml", models.t5)
    latents = _latents(tmp_path, models, num_workers=0)
    assert [p.name for p in text.encoded] == ["b_wan_te.safetensors"] and text.reused == 3
    assert latents.encoded == [] and latents.reused == 3
    after = _mtimes(tmp_path / "cache")
    assert {name for name in after if after[name] != before[name]} == {"b_wan_te.safetensors"}
    assert _metadata(tmp_path / "cache" / "b_wan_te.safetensors")["caption1"] == "an edited caption"
    expected = load_t5(models.t5).encode(["an edited caption"])[0].to(torch.bfloat16)
    assert torch.equal(load_file(str(tmp_path / "cache" / "b_wan_te.safetensors"))["varlen_t5_bfloat16"], expected)


def test_settings_and_encoder_changes_invalidate_only_what_they_affect(tmp_path, models):
    config = image_dataset(tmp_path, {"a": "first", "b": "second"}, size=(64, 32))
    assert len(_latents(tmp_path, models, num_workers=0).encoded) == 2
    cache_text(config, models.t5)
    assert _latents(tmp_path, models, num_workers=0).encoded == []
    # resolution: same file names (musubi names by source size), new bucket -> everything re-encoded, new shapes
    config.write_text(config.read_text().replace("resolution = [32, 32]", "resolution = [48, 32]"))
    report = _latents(tmp_path, models, num_workers=0)
    assert len(report.encoded) == 2 and report.removed == []
    assert list(load_file(str(tmp_path / "cache" / "a_0064x0032_wan.safetensors"))) == ["latents_1x4x6_float32"]
    # the VAE file: other weights, same architecture and size
    assert len(cache_latents(config, models.other_vae, vae_dtype="float32", num_workers=0).encoded) == 2
    assert len(cache_latents(config, models.other_vae, vae_dtype="bfloat16", num_workers=0).encoded) == 2
    assert len(cache_latents(config, models.other_vae, vae_dtype="bfloat16", i2v=True, num_workers=0).encoded) == 2
    # none of this touched the T5 entries
    assert cache_text(config, models.t5).encoded == []
    # --force re-encodes everything
    assert len(cache_text(config, models.t5, force=True).encoded) == 3


def test_media_edit_and_frame_window_changes(tmp_path, models):
    """9 frames, target 1, slide stride 4: windows at decoded frames 0, 4, 8; with source_fps 32 the kept frames are
    0, 2, 4, 6, 8 and the windows sit at kept positions 0 and 4 = decoded frames 0 and 8."""
    config = frames_dataset(tmp_path, {"clip": "a clip"}, frames=9, target_frames=[1], frame_extraction="slide",
                            frame_stride=4)
    first = _latents(tmp_path, models, num_workers=0)
    assert sorted(p.name for p in first.encoded) == [f"clip_{s:05d}-001_0032x0032_wan.safetensors" for s in (0, 4, 8)]
    config.write_text(config.read_text() + "source_fps = 32.0\n")
    report = _latents(tmp_path, models, num_workers=0)
    assert [p.name for p in report.encoded] == ["clip_00004-001_0032x0032_wan.safetensors"]  # now decoded frame 8
    assert report.reused == 1 and [p.name for p in report.removed] == ["clip_00008-001_0032x0032_wan.safetensors"]
    vae = load_vae(models.vae)
    expected = vae.encode(_pixels(tmp_path / "videos" / "clip", [8])[None])[0]
    assert torch.equal(load_file(str(report.encoded[0]))["latents_1x4x4_float32"], expected)
    write_frames(tmp_path / "videos" / "clip", 1, (32, 32), offset=40)  # re-save frame 0 with other content
    report = _latents(tmp_path, models, num_workers=0)  # the folder's content changed: all its windows
    assert sorted(p.name for p in report.encoded) == [f"clip_{s:05d}-001_0032x0032_wan.safetensors" for s in (0, 4)]
    config.write_text(config.read_text().replace("target_frames = [1]", "target_frames = [5]"))
    report = _latents(tmp_path, models, num_workers=0)  # one window of the 5 frames kept at 16 fps
    assert [p.name for p in report.encoded] == ["clip_00000-005_0032x0032_wan.safetensors"]
    assert sorted(p.name for p in report.removed) == [f"clip_{s:05d}-001_0032x0032_wan.safetensors" for s in (0, 4)]
    expected = vae.encode(_pixels(tmp_path / "videos" / "clip", [0, 2, 4, 6, 8])[None])[0]
    assert torch.equal(load_file(str(report.encoded[0]))["latents_2x4x4_float32"], expected)


def test_skip_existing_still_verifies_keys(tmp_path, models, capsys):
    from training.__main__ import main

    config = image_dataset(tmp_path, {"a": "first", "b": "second"})
    argv = ["cache-latents", "--dataset_config", str(config), "--vae", str(models.vae), "--vae_dtype", "float32",
            "--num_workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    assert main([*argv, "--skip_existing"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "latent cache: 2 entries: 0 encoded, 2 reused, 0 stale files removed")
    argv[argv.index(str(models.vae))] = str(models.other_vae)
    assert main([*argv, "--skip_existing"]) == 0
    assert "2 encoded, 0 reused" in capsys.readouterr().out


def test_musubi_files_without_a_key_are_reencoded(tmp_path, models):
    image_dataset(tmp_path, {"a": "first"})
    path = tmp_path / "cache" / "a_0032x0032_wan.safetensors"
    path.parent.mkdir()
    save_file({"latents_1x4x4_bfloat16": torch.zeros(16, 1, 4, 4, dtype=torch.bfloat16)}, str(path),
              metadata={"architecture": "wan", "width": "32", "height": "32", "format_version": "1.0.1"})
    assert [p.name for p in _latents(tmp_path, models, num_workers=0).encoded] == [path.name]
    assert KEY_METADATA in _metadata(path)


def test_fp8_t5_and_loaded_encoders_have_their_own_identity(tmp_path, models):
    config = image_dataset(tmp_path, {"a": "first"})
    cache_text(config, models.t5)
    assert len(cache_text(config, models.t5, fp8_t5=True).encoded) == 2  # the caption and the empty one
    entry = json.loads(_metadata(tmp_path / "cache" / "a_wan_te.safetensors")["wantuner_entry"])
    assert entry["settings"]["compute"] == "float32+fp8_scaled"
    assert cache_text(config, models.t5, fp8_t5=True).encoded == []
    loaded = load_vae(models.vae, dtype=torch.float32)  # e.g. a ComfyUI node's model: used as it is
    report = cache_latents(config, loaded, num_workers=0)
    assert report.encoded and list(load_file(str(report.encoded[0]))) == ["latents_1x4x4_float32"]
    assert cache_latents(config, loaded, num_workers=0).encoded == []


# --------------------------------------------------------------------------------------------------------------------
# Interrupted runs and stale files


def test_interrupted_run_leaves_no_partial_file_and_a_rerun_completes(tmp_path, models, monkeypatch):
    image_dataset(tmp_path, {"a": "first", "b": "second", "c": "third"})
    real_save = checkpoint_module.save_file
    calls = []

    def crash_on_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a file")  # the temporary file is partly written ...
            raise KeyboardInterrupt("simulated crash")  # ... when the process is interrupted
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _latents(tmp_path, models, num_workers=0)
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a_0032x0032_wan.safetensors", HASH_INDEX_NAME]
    killed = tmp_path / "cache" / ".b_0032x0032_wan.safetensors.k1ll3d.tmp"  # what a SIGKILL would leave
    killed.write_bytes(b"partial")
    report = _latents(tmp_path, models, num_workers=0)
    assert report.reused == 1 and sorted(p.name for p in report.encoded) == [
        "b_0032x0032_wan.safetensors", "c_0032x0032_wan.safetensors"]
    assert report.removed == [killed] and not killed.exists()


def test_stale_files_are_removed_unless_keep_cache(tmp_path, models):
    config = image_dataset(tmp_path, {"a": "first", "b": "second"})
    _latents(tmp_path, models, num_workers=0)
    cache_text(config, models.t5)
    unrelated = [tmp_path / "cache" / "notes.txt", tmp_path / "cache" / "b_other.safetensors"]
    for path in unrelated:
        path.write_text("not ours")
    for suffix in (".png", ".txt"):
        (tmp_path / "images" / f"b{suffix}").unlink()
    kept = _latents(tmp_path, models, num_workers=0, keep_cache=True)
    assert kept.removed == [] and (tmp_path / "cache" / "b_0032x0032_wan.safetensors").exists()
    assert cache_text(config, models.t5, keep_cache=True).removed == []
    assert [p.name for p in _latents(tmp_path, models, num_workers=0).removed] == ["b_0032x0032_wan.safetensors"]
    assert [p.name for p in cache_text(config, models.t5).removed] == ["b_wan_te.safetensors"]
    assert all(path.exists() for path in unrelated)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == [
        "a_0032x0032_wan.safetensors", "a_wan_te.safetensors", "b_other.safetensors", EMPTY_TEXT_NAME]


# --------------------------------------------------------------------------------------------------------------------
# Reader


@pytest.fixture()
def cached_images(tmp_path, models):
    """Three images, batch_size 2, num_repeats 2, cached with I2V + CLIP latents and T5."""
    captions = {"a": "first caption", "b": "second caption", "c": "third caption"}
    config = image_dataset(tmp_path, captions, batch_size=2, num_repeats=2)
    cache_latents(config, models.vae, clip=models.clip, vae_dtype="float32", num_workers=0)
    cache_text(config, models.t5)
    return config, captions


def test_reader_batches_have_the_documented_shapes(cached_images, models):
    config, captions = cached_images
    dataset = CachedDataset(config, need_clip=True, vae=models.vae, clip=models.clip, t5=models.t5, seed=3)
    assert len(dataset) == 3  # 3 items x 2 repeats in one bucket, batches of 2
    batches = list(dataset.iter_epoch(0))
    assert [len(b["captions"]) for b in batches] == [2, 2, 2]
    keys = sorted(k for b in batches for k in b["item_keys"])
    assert keys == ["a_0032x0032", "a_0032x0032", "b_0032x0032", "b_0032x0032", "c_0032x0032", "c_0032x0032"]
    batch = batches[0]
    assert batch["latents"].shape == (2, 16, 1, 4, 4) and batch["latents"].dtype == torch.float32
    assert batch["latents_image"].shape == (2, 20, 1, 4, 4) and batch["clip"].shape == (2, 257, 32)
    assert "latents_control" not in batch and batch["bucket"] == (32, 32, 1)
    for key, caption, t5 in zip(batch["item_keys"], batch["captions"], batch["t5"]):
        stem = key.split("_")[0]
        assert caption == captions[stem] and t5.dim() == 2 and t5.shape[1] == 32
        stored = load_file(str(config.parent / "cache" / f"{stem}_wan_te.safetensors"))["varlen_t5_bfloat16"]
        assert torch.equal(t5, stored.float())
        latent = load_file(str(config.parent / "cache" / f"{stem}_0032x0032_wan.safetensors"))
        assert torch.equal(batch["latents"][batch["item_keys"].index(key)], latent["latents_1x4x4_float32"])
    again = [b["item_keys"] for b in CachedDataset(config, seed=3).iter_epoch(0)]
    assert again == [b["item_keys"] for b in batches]  # seeded order
    loader = torch.utils.data.DataLoader(dataset.epoch(1), batch_size=None, num_workers=0)
    assert sum(len(b["captions"]) for b in loader) == 6


def test_caption_dropout_uses_the_empty_caption(cached_images):
    config, _ = cached_images
    dataset = CachedDataset(config, caption_dropout_rate=1.0)
    empty = load_file(str(config.parent / "cache" / EMPTY_TEXT_NAME))["varlen_t5_bfloat16"].float()
    assert torch.equal(dataset.empty_t5, empty)
    for batch in dataset.iter_epoch(0):
        assert batch["captions"] == ["", ""][: len(batch["captions"])] and all(batch["caption_dropped"])
        assert all(torch.equal(t5, empty) for t5 in batch["t5"])
    half = CachedDataset(config, caption_dropout_rate=0.5, seed=1)
    draws = [b["caption_dropped"] for b in half.iter_epoch(0)]
    assert draws == [b["caption_dropped"] for b in half.iter_epoch(0)]  # seeded by (seed, epoch, batch)


def test_training_source_adapter(cached_images):
    data = pytest.importorskip("training.dataset.batches")
    from training.cache.store import open_training_source

    config, captions = cached_images
    source = open_training_source(config)
    items = source.items()
    assert sorted(i.key for i in items) == ["a_0032x0032", "b_0032x0032", "c_0032x0032"]
    assert {(i.bucket, i.dataset) for i in items} == {((32, 32, 1), 0)}
    assert source.batching(0) == data.DatasetBatching(batch_size=2, num_repeats=2)
    batch = source.load(items[:2])
    assert batch["latents"].shape == (2, 16, 1, 4, 4) and batch["latents_image"].shape == (2, 20, 1, 4, 4)
    assert batch["clip"].shape == (2, 257, 32) and "latents_control" not in batch
    assert batch["captions"] == [captions[i.key[0]] for i in items[:2]] and len(batch["t5"]) == 2
    assert source.empty_t5.shape == (1, 32)
    plan = data.plan_epoch(source, items, seed=0, epoch=0)
    assert sorted(len(b) for b in plan.batches) == [2, 2, 2]


def test_reader_refuses_stale_or_missing_entries(cached_images, models):
    config, _ = cached_images
    cache = config.parent / "cache"
    with pytest.raises(CacheError, match=r"another VAE"):
        CachedDataset(config, vae=models.other_vae)
    (config.parent / "images" / "b.txt").write_text("an edited caption")
    (cache / "c_0032x0032_wan.safetensors").unlink()
    with pytest.raises(CacheError) as info:
        CachedDataset(config)
    message = str(info.value)
    assert f"{cache / 'c_0032x0032_wan.safetensors'}: missing" in message
    assert f"{cache / 'b_wan_te.safetensors'}: the caption changed since it was cached" in message
    assert "python -m training cache-latents --dataset_config" in message
    assert "python -m training cache-text --dataset_config" in message


def test_reader_names_what_the_task_needs(tmp_path, models):
    config = image_dataset(tmp_path, {"a": "first"})
    cache_latents(config, models.vae, vae_dtype="float32", num_workers=0)
    cache_text(config, models.t5)
    CachedDataset(config)
    with pytest.raises(CacheError, match=r"cached without --i2v"):
        CachedDataset(config, need_image=True)
    cache_latents(config, models.vae, i2v=True, vae_dtype="float32", num_workers=0)
    with pytest.raises(CacheError, match=r"cached without --clip \(no CLIP features\), which Wan2.1 I2V needs"):
        CachedDataset(config, need_clip=True)
    with pytest.raises(CacheError, match=r"no control_directory"):
        CachedDataset(config, need_control=True)


def test_reader_without_verification_checks_only_existence(cached_images):
    config, _ = cached_images
    (config.parent / "images" / "b.txt").write_text("an edited caption")
    CachedDataset(config, verify=False)  # the edit goes unnoticed: verify=False trusts the entries
    (config.parent / "cache" / "a_wan_te.safetensors").unlink()
    missing = r"1 T5 cache entries are missing or stale:\n  .*a_wan_te\.safetensors: missing"
    with pytest.raises(CacheError, match=missing):
        CachedDataset(config, verify=False)


def test_reader_refuses_entries_from_mixed_encoders(tmp_path, models):
    """An interrupted re-cache with another VAE leaves old and new entries side by side."""
    config = image_dataset(tmp_path, {"a": "first", "b": "second", "c": "third"})
    cache_latents(config, models.vae, vae_dtype="float32", num_workers=0)
    cache_text(config, models.t5)
    fresh = tmp_path / "fresh"
    image_dataset(fresh, {"a": "first"})
    cache_latents(fresh / "dataset.toml", models.other_vae, vae_dtype="float32", num_workers=0)
    os.replace(fresh / "cache" / "a_0032x0032_wan.safetensors", tmp_path / "cache" / "a_0032x0032_wan.safetensors")
    with pytest.raises(CacheError, match=r"a_0032x0032_wan.safetensors: latent entries were encoded with different "
                                         r"VAE/CLIP settings; this one differs from the other 2"):
        CachedDataset(config)


# --------------------------------------------------------------------------------------------------------------------
# Hashing


def test_media_hashes_are_reused_only_for_unchanged_files(tmp_path):
    media = tmp_path / "clip.png"
    media.write_bytes(b"frame one")
    index = tmp_path / HASH_INDEX_NAME
    first = MediaHasher(index)
    digest = first.media_hash(media)
    assert digest == hashlib.sha256(b"frame one").hexdigest()
    first.save()
    recent = MediaHasher(index)  # written less than 2 s before it was hashed: not trusted ("racy" file)
    assert recent.media_hash(media) == digest and recent.files_hashed == 1
    recent.save()
    settled = MediaHasher(index, racy_window_ns=0)
    assert settled.media_hash(media) == digest and settled.files_hashed == 0  # the fast path
    stat = media.stat()
    media.write_bytes(b"frame two")  # same size, and the old mtime restored: ctime still moves
    os.utime(media, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = MediaHasher(index, racy_window_ns=0)
    assert edited.media_hash(media) == hashlib.sha256(b"frame two").hexdigest() and edited.files_hashed == 1
    assert json.loads(index.read_text())["files"][str(media.absolute())]["sha256"] == digest


def test_frame_folder_hash_covers_every_frame_and_its_name(tmp_path):
    folder = write_frames(tmp_path / "clip", 3, (32, 32))
    before = MediaHasher().media_hash(folder)
    (folder / "0002.png").rename(folder / "0003.png")
    renamed = MediaHasher().media_hash(folder)
    write_frames(folder, 1, (32, 32), offset=9)
    assert len({before, renamed, MediaHasher().media_hash(folder)}) == 3


def test_checkpoint_fingerprint_covers_split_files_and_large_files(tmp_path):
    big = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(3 << 20)}, str(big))  # 12 MiB: sampled
    before = checkpoint_fingerprint(big)
    data = bytearray(big.read_bytes())
    data[-10] = 1  # inside the last sampled block
    big.write_bytes(bytes(data))
    assert checkpoint_fingerprint(big) != before
    parts = [tmp_path / f"m-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for i, part in enumerate(parts):
        save_file({f"w{i}": torch.zeros(4)}, str(part))
    whole = checkpoint_fingerprint(parts[0])
    save_file({"w1": torch.ones(4)}, str(parts[1]))
    assert checkpoint_fingerprint(parts[0]) != whole


# --------------------------------------------------------------------------------------------------------------------
# Bad input and the CLI


def test_colliding_cache_names_and_missing_cache_directory_are_reported(tmp_path, models):
    config = image_dataset(tmp_path, {"a": "first"})
    (tmp_path / "images" / "a.jpg").write_bytes((tmp_path / "images" / "a.png").read_bytes())
    with pytest.raises(ValueError, match=r"images/a\.(jpg|png) and .*images/a\.(jpg|png) -> a_0032x0032_wan"):
        _latents(tmp_path, models)
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"image_path": str(tmp_path / "images" / "a.png"), "caption": "x"}) + "\n")
    write_toml(config, {"resolution": [32, 32]}, {"image_jsonl_file": jsonl})
    with pytest.raises(ValueError, match=r"datasets\[0\]: cache_directory is required with image_jsonl_file"):
        cache_text(config, models.t5)


def test_cli_errors_and_config_file(tmp_path, models, capsys):
    from training.__main__ import main

    config = image_dataset(tmp_path, {"a": "first"})
    with pytest.raises(SystemExit) as exit_info:
        main(["cache-latents", "--dataset_config", str(config)])
    assert exit_info.value.code == 2 and "--vae" in capsys.readouterr().err
    code = main(["cache-latents", "--dataset_config", str(config), "--vae", str(models.vae), "--task", "i2v-14B"])
    assert code == 2 and "task i2v-14B needs CLIP features in the latent cache: pass --clip" in capsys.readouterr().err
    (tmp_path / "images" / "a.txt").unlink()
    code = main(["cache-text", "--dataset_config", str(config), "--t5", str(models.t5)])
    assert code == 1 and "has no captioned media (1 no_caption)" in capsys.readouterr().err
    code = main(["cache-latents", "--dataset_config", str(config), "--vae", str(models.vae)])
    assert code == 1 and "yields no training items" in capsys.readouterr().err
    (tmp_path / "images" / "a.txt").write_text("first")
    settings = tmp_path / "cache_args.toml"
    settings.write_text(f'dataset_config = "{config}"\nt5 = "{models.t5}"\nbatch_size = 4\ndevice = "cpu"\n'
                        'network_dim = 16\n')
    assert main(["cache-text", "--config_file", str(settings)]) == 0
    assert "2 encoded" in capsys.readouterr().out
    assert main(["cache-text", "--config_file", str(settings), "--force"]) == 0  # the command line adds flags
    assert "2 encoded" in capsys.readouterr().out
    assert main(["cache-latents", "--dataset_config", str(config), "--debug_mode", "console"]) == 0
    assert "a.png: image 32x32 -> bucket 32x32" in capsys.readouterr().out
    code = main(["cache-latents", "--dataset_config", str(config), "--vae", str(models.vae), "--task", "t2v-1.3B-FC"])
    assert code == 2 and "task t2v-1.3B-FC trains on control videos, but 1 items have none" in capsys.readouterr().err


def test_dropped_files_are_reported_and_the_rest_is_cached(tmp_path, models, capsys, caplog):
    from training.__main__ import main

    images = tmp_path / "images"
    image_dataset(tmp_path, {"good": "a good image"})
    (images / "nocaption.png").write_bytes((images / "good.png").read_bytes())
    (images / "broken.png").write_bytes(b"not a png")
    (images / "broken.txt").write_text("unreadable")
    clips = tmp_path / "clips"
    frames_dataset(clips, {"short": "three frames"}, frames=3, target_frames=[5])
    config = write_toml(tmp_path / "both.toml", {"resolution": [32, 32], "caption_extension": ".txt"},
                        {"image_directory": images, "cache_directory": tmp_path / "cache"},
                        {"video_jsonl_file": clips / "dataset.jsonl", "cache_directory": clips / "cache",
                         "target_frames": [5]})
    code = main(["cache-latents", "--dataset_config", str(config), "--vae", str(models.vae), "--vae_dtype", "fp32",
                 "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out == (
        "latent cache: 1 entries: 1 encoded, 0 reused, 0 stale files removed, 1 files dropped (no_caption), "
        "1 files dropped (too_short), 1 files dropped (unreadable) (see the warnings above, or python -m training "
        "dataset --dry-run)\n")
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "nocaption.png: no_caption" in warnings and "broken.png: unreadable" in warnings
    assert "short: too_short (needs 5 frames, the video has 3)" in warnings
