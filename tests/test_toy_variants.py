"""Toy I2V / FLF2V / Fun-Control DiTs and the toy CLIP vision tower (training/toy/variants.py): the variant init
keeps the T2V model's output exactly, the files load with no arguments, the datasets and the FLF2V cache layout, the
judge, and (when the shipped files exist) a behaviour check of the shipped variants."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import model_set
from tests.tiny import TINY_DIT, randomize_
from training.toy import variants as tv
from wan_core.loading.checkpoint import read_metadata, save_safetensors
from wan_core.loading.model_set import SAMPLING_METADATA_KEY, TOY_FILES, TOY_MODEL_DIR
from wan_core.models.clip import load_clip_vision
from wan_core.models.config import CONFIG_METADATA_KEY, config_to_json
from wan_core.models.dit import WanModel, load_dit
from wan_core.toy.world import Combo, render_clip, sample_params

CLIP_DIM = 24


def _t2v(seed: int = 0) -> WanModel:
    """A tiny T2V DiT with every weight random (the official init's zero head would make outputs trivially 0)."""
    return randomize_(WanModel(TINY_DIT), seed, scale=0.2).eval()


def _inputs(cfg, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 4, 4, generator=gen)
    return {"x": x, "t": torch.tensor([300.0, 800.0]),
            "context": [torch.randn(5, cfg.text_dim, generator=gen), torch.randn(3, cfg.text_dim, generator=gen)],
            "gen": gen}


def _forward(model: WanModel, inp: dict, y: torch.Tensor | None = None, clip: torch.Tensor | None = None):
    with torch.no_grad():
        return model(inp["x"], inp["t"], inp["context"], clip_fea=clip, y=y)


# ----------------------------------------------------------------------------------------------------------------
# Variant init
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", tv.KINDS)
def test_variant_init_computes_the_t2v_output_whatever_the_extra_inputs(kind: str) -> None:
    t2v = _t2v()
    variant = tv.init_variant(t2v, kind, CLIP_DIM, seed=3).eval()
    cfg = variant.config
    assert (cfg.in_dim, cfg.clip_dim, cfg.model_type) == (tv.VARIANT_IN_DIM[kind], CLIP_DIM,
                                                          "flf2v" if kind == "flf2v" else "i2v")
    inp = _inputs(cfg)
    expected = _forward(t2v, inp)
    extra = cfg.in_dim - 16
    zeros = torch.zeros(2, extra, 3, 4, 4)
    noise_y = torch.randn(2, extra, 3, 4, 4, generator=inp["gen"])
    clip = torch.randn(2, cfg.image_tokens, CLIP_DIM, generator=inp["gen"])
    torch.testing.assert_close(_forward(variant, inp, zeros, torch.zeros_like(clip)), expected, rtol=0, atol=0)
    torch.testing.assert_close(_forward(variant, inp, noise_y, clip), expected)
    # the test can fail: once the image path carries weight, the output moves
    with torch.no_grad():
        variant.blocks[0].cross_attn.v_img.weight.normal_()
    assert not torch.allclose(_forward(variant, inp, noise_y, clip), expected, atol=1e-3)


def test_variant_init_copies_every_shared_tensor_and_zeroes_only_the_new_input_paths() -> None:
    t2v = _t2v()
    source = t2v.state_dict()
    for kind in tv.KINDS:
        sd = tv.init_variant(t2v, kind, CLIP_DIM, seed=3).state_dict()
        for key, value in source.items():
            if key == "patch_embedding.weight":
                assert torch.equal(sd[key][:, :16], value)
                assert not sd[key][:, 16:].any()
            else:
                assert torch.equal(sd[key], value), key
        new = sorted(set(sd) - set(source))
        assert all(k.startswith("img_emb.") or ".cross_attn." in k for k in new), new
        for i in range(TINY_DIT.num_layers):
            assert not sd[f"blocks.{i}.cross_attn.v_img.weight"].any()
            assert sd[f"blocks.{i}.cross_attn.k_img.weight"].std() > 0
        assert sd["img_emb.proj.1.weight"].std() > 0
        if kind == "flf2v":
            assert sd["img_emb.emb_pos"].shape == (1, 514, CLIP_DIM) and sd["img_emb.emb_pos"].std() > 0
    # seeded: the same seed gives the same new tensors, another seed other ones
    a, b = tv.init_variant(t2v, "i2v", CLIP_DIM, 3), tv.init_variant(t2v, "i2v", CLIP_DIM, 3)
    c = tv.init_variant(t2v, "i2v", CLIP_DIM, 4)
    assert torch.equal(a.img_emb.proj[1].weight, b.img_emb.proj[1].weight)
    assert not torch.equal(a.img_emb.proj[1].weight, c.img_emb.proj[1].weight)


def test_variant_config_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown variant 'vace'"):
        tv.variant_config(TINY_DIT, "vace", CLIP_DIM)
    i2v = dataclasses.replace(TINY_DIT, in_dim=36, model_type="i2v")
    with pytest.raises(ValueError, match="must be a T2V DiT"):
        tv.variant_config(i2v, "flf2v", CLIP_DIM)


def test_variant_files_load_with_no_arguments(tmp_path: Path) -> None:
    t2v = _t2v()
    sampling = {"task": "t2v-1.3B", "infer_steps": 12, "flow_shift": 3.0, "guidance_scale": 5.0}
    t2v_path = save_safetensors(t2v.state_dict(), tmp_path / "t2v.safetensors",
                                {CONFIG_METADATA_KEY: config_to_json(TINY_DIT),
                                 SAMPLING_METADATA_KEY: json.dumps(sampling)})
    inp = _inputs(TINY_DIT)
    for kind in tv.KINDS:
        path = tv.write_variant_init(t2v_path, kind, CLIP_DIM, 3, tmp_path / f"{kind}.safetensors")
        model = load_dit(path)
        assert model.config == tv.variant_config(TINY_DIT, kind, CLIP_DIM)
        load_dit(path, task=tv.VARIANT_TASKS[kind])  # the task family fits
        stored = json.loads(read_metadata(path)[SAMPLING_METADATA_KEY])
        assert stored == sampling | {"task": tv.VARIANT_TASKS[kind]}
        y = torch.zeros(2, model.config.in_dim - 16, 3, 4, 4)
        torch.testing.assert_close(_forward(model, inp, y), _forward(t2v, inp), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Toy CLIP
# ----------------------------------------------------------------------------------------------------------------


def test_toy_clip_gives_257_tokens_of_its_width_and_loads_with_no_arguments(tmp_path: Path) -> None:
    path = tv.build_toy_clip(tmp_path / "clip.safetensors", seed=7)
    clip = load_clip_vision(path)
    assert clip.cfg == tv.TOY_CLIP_CONFIG
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    feats = clip.encode(images)
    assert feats.shape == (3, 257, tv.TOY_CLIP_CONFIG.dim)
    assert torch.equal(feats, tv.toy_clip(7).encode(images))
    assert not torch.equal(feats, tv.toy_clip(8).encode(images))
    # features tell images apart (red vs blue object at the same place)
    red, blue = (torch.from_numpy(render_clip(Combo(c, "square", "still"), seed=1)[0]) for c in ("red", "blue"))
    pair = torch.stack([red, blue]).permute(0, 3, 1, 2).float() / 127.5 - 1
    a, b = clip.encode(pair)
    assert (a - b).abs().mean() > 0.05 * a.abs().mean()
    assert path.stat().st_size < 2 * 1024 * 1024


# ----------------------------------------------------------------------------------------------------------------
# Datasets, FLF2V cache
# ----------------------------------------------------------------------------------------------------------------


def test_silhouette_covers_the_object_of_the_clip() -> None:
    combo = Combo("green", "triangle", "left")
    frames = render_clip(combo, seed=11).astype(np.float64)
    sil = tv.silhouette(combo, 11)
    assert sil.shape == frames.shape and sil.dtype == np.uint8
    assert (sil[..., 0] == sil[..., 1]).all() and (sil[..., 0] == sil[..., 2]).all()
    alpha = sil[..., 0] / 255.0  # [T, H, W]
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    centroids = np.stack([(alpha * xs).sum((1, 2)) / alpha.sum((1, 2)), (alpha * ys).sum((1, 2)) / alpha.sum((1, 2))],
                         axis=1)
    np.testing.assert_allclose(centroids, sample_params(combo, seed=11).centroids("triangle"), atol=0.15)
    # where the silhouette is white, the clip shows the object's colour (far from the grey background)
    background = np.median(frames.reshape(9, -1, 3), axis=1)[:, None, None]
    differs = np.abs(frames - background).sum(-1) > 60
    assert (differs == (alpha > 0.5)).mean() > 0.99


def test_control_dataset_pairs_every_clip_with_its_silhouette(tmp_path: Path) -> None:
    from training.cache.latents import load_pixels
    from training.dataset.items import scan_dataset_group
    from training.dataset.schema import load_dataset_config

    combos = [Combo("red", "circle", "down"), Combo("blue", "square", "right")]
    toml = tv.write_control_dataset(tmp_path / "fc", combos, 1, seed=5, batch=2)
    scan = scan_dataset_group(load_dataset_config(toml))
    assert len(scan.items) == 2
    for item in scan.items:
        assert item.control_path is not None and item.control_path.name == item.media_path.stem
        frames, control = load_pixels(item)
        assert frames.shape == control.shape == (9, 64, 64, 3)
        combo = next(c for c in combos if f"{c.colour}_{c.shape}" in item.media_path.stem)
        det = tv.judge(frames.astype(np.float64) / 255.0, tv.VariantPair(combo, 0, False))
        assert det.colour and det.motion
        lit = control[..., 0] > 127
        object_px = np.abs(frames.astype(int) - np.median(frames.reshape(9, -1, 3), axis=1)[:, None, None]).sum(-1)
        assert (lit == (object_px > 60)).mean() > 0.98


def test_control_dataset_can_caption_a_share_of_its_clips_with_another_motion(tmp_path: Path) -> None:
    """The control and the video keep the clip's motion; only the caption of the chosen clips names another one."""
    combos = [Combo("red", "circle", "down"), Combo("blue", "square", "still"), Combo("green", "triangle", "left")]
    plain = tv.write_control_dataset(tmp_path / "plain", combos, 4, seed=5, batch=2)
    mixed = tv.write_control_dataset(tmp_path / "mixed", combos, 4, seed=5, batch=2, conflict=0.5)
    changed = 0
    for caption in sorted((mixed.parent / "videos").glob("*.txt")):
        motion = caption.stem.split("_")[3]  # NNNNN_<colour>_<shape>_<motion>
        combo = Combo(*caption.stem.split("_")[1:3], motion)
        text = caption.read_text().strip()
        original = (plain.parent / "videos" / caption.name).read_text().strip()
        assert original == combo.caption
        if text != original:
            changed += 1
            assert text.startswith(f"a {combo.colour} {combo.shape} ") and combo.caption[len("a ") :] not in text
        assert (mixed.parent / "control" / caption.stem).is_dir()
    assert 2 <= changed <= 10  # about half of the 12 clips
    for name in ("videos", "control"):
        a, b = (sorted(p.name for p in (t.parent / name).rglob("*")) for t in (plain, mixed))
        assert a == b
    with pytest.raises(ValueError, match=r"conflict must be in \[0, 1\], got 1.5"):
        tv.write_control_dataset(tmp_path / "bad", combos, 1, seed=5, batch=2, conflict=1.5)


def test_flf2v_cache_entries_hold_the_official_flf2v_layout(tmp_path: Path) -> None:
    from training.cache.latents import cache_latents, load_pixels
    from training.cache.store import latent_entries, load_latent_entry, open_training_source
    from training.cache.text import cache_text
    from training.dataset.items import scan_dataset_group
    from training.dataset.schema import load_dataset_config
    from training.step import InputSpec, conditioning
    from wan_core.models.vae import load_vae
    from wan_core.sampling.conditioning import first_last_to_video

    models = model_set.write_model_set(tmp_path / "models")
    combos = [Combo("yellow", "circle", "up"), Combo("red", "triangle", "right")]
    toml = tv.write_image_dataset(tmp_path / "data", combos, 1, seed=3, batch=2)
    cache_latents(toml, models["vae"], clip=models["clip"], vae_dtype="float32", num_workers=0)
    cache_text(toml, models["t5"])
    vae, clip = load_vae(models["vae"], dtype=torch.float32), load_clip_vision(models["clip"])
    assert tv.rewrite_flf2v_cache(toml, vae, clip) == 2
    assert tv.rewrite_flf2v_cache(toml, vae, clip) == 0  # already FLF2V entries are kept
    scan = scan_dataset_group(load_dataset_config(toml))
    for entry in latent_entries(scan):
        cached = load_latent_entry(entry.path)
        frames, _ = load_pixels(entry.item)
        cond = first_last_to_video(vae, clip, tv.to_image(frames[0]), tv.to_image(frames[-1]), 9, 64, 64)
        torch.testing.assert_close(cached["latents_image"], cond.y[0], rtol=0, atol=0)
        assert cached["latents_image"][:4, 0].eq(1).all() and cached["latents_image"][:4, -1].sum() > 0
        torch.testing.assert_close(cached["clip"].float(), cond.clip_fea[0].view(2, 257, -1).half().float())
    source = open_training_source(toml, need_image=True, need_clip=True)  # the trainer reads them
    items = source.items()
    batch = source.load(items)
    y, clip_fea = conditioning(batch, InputSpec("flf2v"), torch.device("cpu"), torch.float32)
    assert y.shape == (2, 20, 3, 8, 8) and clip_fea.shape == (2, 514, model_set.TINY_CLIP.dim)


def test_rewrite_flf2v_cache_needs_an_i2v_cache(tmp_path: Path) -> None:
    from training.cache.latents import cache_latents
    from wan_core.models.vae import load_vae

    models = model_set.write_model_set(tmp_path / "models")
    toml = tv.write_image_dataset(tmp_path / "data", [Combo("red", "square", "left")], 1, seed=3, batch=1)
    cache_latents(toml, models["vae"], vae_dtype="float32", num_workers=0)
    with pytest.raises(RuntimeError, match="not an I2V cache entry with CLIP features"):
        tv.rewrite_flf2v_cache(toml, load_vae(models["vae"], dtype=torch.float32), load_clip_vision(models["clip"]))


# ----------------------------------------------------------------------------------------------------------------
# Judge
# ----------------------------------------------------------------------------------------------------------------


def test_judge_accepts_the_reference_clip_and_rejects_a_displaced_one() -> None:
    for pair in tv.variant_pairs(8):
        clip = render_clip(pair.combo, seed=pair.seed + 1).astype(np.float64) / 255.0
        result = tv.judge(clip, pair)
        assert result.colour and result.motion and result.track_error < 1.0, (pair, result)
    pair = tv.VariantPair(Combo("blue", "circle", "still"), 7, False)
    shifted = np.roll(render_clip(pair.combo, seed=8), 9, axis=2).astype(np.float64) / 255.0
    result = tv.judge(shifted, pair)
    assert result.colour and not tv._ok(result.first_error) and not tv._ok(result.track_error)
    summary = tv.summarise("i2v", [result])
    assert summary["success"] == 0.0 and summary["colour"] == 1.0


def test_variant_pairs_mix_heldout_and_training_combinations() -> None:
    pairs = tv.variant_pairs(12)
    assert len(pairs) == 12 and sum(p.heldout for p in pairs) == 6
    assert len({p.seed for p in pairs}) == 12 and len({p.combo for p in pairs}) >= 10
    conflict = tv.conflict_pairs(pairs)
    assert all(c.prompt != p.prompt and c.combo == p.combo for c, p in zip(conflict, pairs))
    with pytest.raises(ValueError, match="count must be >= 2"):
        tv.variant_pairs(1)


# ----------------------------------------------------------------------------------------------------------------
# The shipped variants
# ----------------------------------------------------------------------------------------------------------------

SHIPPED = [TOY_MODEL_DIR / tv.VARIANT_FILES[k] for k in (*tv.KINDS, "clip")]
BASE = [TOY_MODEL_DIR / TOY_FILES[k] for k in ("vae", "t5")]


@pytest.mark.slow
@pytest.mark.skipif(not all(p.is_file() for p in SHIPPED + BASE), reason="toy variants not in wan_core/toy_models")
@pytest.mark.parametrize("kind", tv.KINDS)
def test_shipped_variant_follows_its_conditioning(kind: str) -> None:
    """Modest bars on 4 pairs (2 held-out): the start image's object stays in place (I2V, FLF2V), FLF2V moves towards
    the last frame, and Fun-Control follows the control's path even when the prompt names another motion."""
    files = {k: TOY_MODEL_DIR / tv.VARIANT_FILES[k] for k in (*tv.KINDS, "clip")}
    pairs = tv.variant_pairs(4)
    if kind == "fun_control":
        pairs = tv.conflict_pairs(pairs)
    figures = tv.evaluate_files(kind, files[kind], BASE[0], BASE[1], files["clip"], pairs, conflict=False)
    assert figures["colour"] >= 0.75, figures
    bars = {"i2v": ("first_in_place",), "flf2v": ("first_in_place", "motion"),
            "fun_control": ("track_in_place", "motion")}[kind]
    for key in bars:
        assert figures[key] >= 0.75, (key, figures)


def test_recipe_passes_the_fun_control_conflict_share_to_the_variant_build(tmp_path: Path, monkeypatch) -> None:
    from training.toy import recipe

    calls = []
    monkeypatch.setattr(recipe, "build_variants", lambda *args, **kwargs: calls.append(kwargs) or {"stages": {}})
    cfg = recipe.RecipeConfig(seed=3, fun_control_conflict=0.3, fun_control_steps=2000)
    recipe.Recipe(cfg, tmp_path / "out", tmp_path / "work").stage_variants()
    assert calls[0]["seed"] == 3 and calls[0]["config"].conflict_captions == 0.3
    assert calls[0]["config"].fun_control_steps == 2000
    assert tv.VariantConfig().conflict_captions == 0.0  # the default build captions every clip with its motion


def test_each_variant_trains_for_its_own_step_count(tmp_path: Path, monkeypatch) -> None:
    t2v_path = save_safetensors(_t2v().state_dict(), tmp_path / "t2v.safetensors",
                                {CONFIG_METADATA_KEY: config_to_json(TINY_DIT)})
    steps = {}

    def record(args, log) -> None:  # stands in for the trainer: keeps the step count, writes the output file
        args = [str(a) for a in args]
        kind = args[args.index("--output_name") + 1]
        steps[kind] = int(args[args.index("--max_train_steps") + 1])
        shutil.copyfile(t2v_path, Path(args[args.index("--output_dir") + 1]) / f"{kind}.safetensors")

    monkeypatch.setattr(tv, "run", record)
    for fc_steps, want in ((0, 5), (9, 9)):
        cfg = tv.VariantConfig(steps=5, flf2v_steps=7, fun_control_steps=fc_steps)
        build = tv.VariantBuild(cfg, tmp_path / "out", tmp_path / "work", t2v_path, t2v_path, t2v_path)
        (tmp_path / "out").mkdir(exist_ok=True)
        for kind in tv.KINDS:
            build.stage_train(kind)
        assert steps == {"i2v": 5, "flf2v": 7, "fun_control": want}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("conflict_captions", 1.5, r"conflict_captions must be in \[0, 1\], got 1.5"),
    ("fun_control_steps", -1, "fun_control_steps must be >= 0, got -1")])
def test_variant_and_recipe_configs_refuse_bad_fun_control_settings_before_any_stage(field, value, message,
                                                                                      tmp_path, capsys) -> None:
    from training.toy import recipe

    with pytest.raises(ValueError, match=message):
        tv.VariantConfig(**{field: value})
    recipe_field = {"conflict_captions": "fun_control_conflict"}.get(field, field)
    with pytest.raises(ValueError, match=message):
        recipe.RecipeConfig(**{recipe_field: value})
    assert recipe.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                        f"--{recipe_field}", str(value)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message.replace(chr(92), '')}"]
    assert not (tmp_path / "work").exists()  # no stage ran
    assert tv.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w2"), f"--{field}", str(value)]) == 1
    assert not (tmp_path / "w2").exists()


def test_recipe_refuses_an_unknown_vae_init_before_any_stage(tmp_path, capsys) -> None:
    from training.toy import recipe

    argv = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--vae_init", "wavelet"]
    assert recipe.main(argv) == 2
    assert "init must be one of ('identity', 'colour', 'haar', 'default'), got 'wavelet'" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
