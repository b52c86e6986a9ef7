"""Node behaviour on tiny random models, outside ComfyUI: loaders and their cache, validation messages, the
IMAGE/LATENT conventions, the sampler against direct wan_core calls, LoRA chains, saving."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS as N
from nodes import comfy_adapter as adapter
from tests import tiny_model_set as tms
from tests.numerics import assert_float32_parity, float64_copy, float64_upcasts

T2V, I2V, FLF, FC = (tms.FILES[k][1] for k in ("dit_t2v", "dit_i2v", "dit_flf2v", "dit_fc"))
VAE, T5, CLIP = (tms.FILES[k][1] for k in ("vae", "t5", "clip"))
LORA = tms.LORA[1]
SAMPLER = {"width": 32, "height": 32, "length": 5, "steps": 3, "guidance_scale": 4.0, "shift": 5.0,
           "solver": "unipc", "seed": 7, "noise_on_cpu": False, "cfg_skip_mode": "none", "cfg_apply_ratio": 0.5,
           "slg_mode": "none", "slg_layers": "1", "slg_scale": 3.0, "slg_start": 0.0, "slg_end": 0.3}


def run(node_id: str, **inputs):
    cls = N[node_id]
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nodes")
    tms.write_model_set(root / "models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(adapter.MODELS_DIR_ENV, str(root / "models"))
        mp.setenv(adapter.OUTPUT_DIR_ENV, str(root / "output"))
        adapter.clear_cache()
        yield root
        adapter.clear_cache()


def dit(name: str = T2V, **options):
    args = {"task": "auto", "dtype": "default", "fp8": "none", "attention": "sdpa", "blocks_to_swap": 0,
            "compile": False, **options}
    return run("WanTunerDiTLoader", model_name=name, **args)[0]


def vae():
    return run("WanTunerVAELoader", model_name=VAE, dtype="fp32", cache_on_cpu=False, tiling="auto")[0]


def embeds(negative: str = "blurry"):
    t5 = run("WanTunerT5Loader", model_name=T5, dtype="default", fp8=False, tokenizer="")[0]
    return run("WanTunerTextEncode", t5=t5, prompt="a red square moving right", negative_prompt=negative)[0]


def image(height: int = 40, width: int = 56, frames: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(seed))


def sample(model, text, **overrides) -> torch.Tensor:
    return run("WanTunerSampler", dit=model, text_embeds=text, **{**SAMPLER, **overrides})[0]["samples"]


# ----------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------


def test_loaders_list_the_models_folder_and_cache_unchanged_inputs(models: Path) -> None:
    listed = N["WanTunerDiTLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert sorted(listed) == sorted([T2V, I2V, FLF, FC, *(name for _, name in tms.TOY_PAIR)])
    first, again = dit(), dit()
    assert again.model is first.model
    assert dit(dtype="fp32").model is not first.model  # a changed input loads anew
    path = models / "models" / "diffusion_models" / T2V
    before = N["WanTunerDiTLoader"].IS_CHANGED(model_name=T2V)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert N["WanTunerDiTLoader"].IS_CHANGED(model_name=T2V) != before
    assert dit(dtype="fp32").model is not first.model  # a replaced file loads anew


def test_loader_errors_name_the_problem(models: Path) -> None:
    check = N["WanTunerDiTLoader"].VALIDATE_INPUTS
    assert check(model_name=T2V, task="auto") is True and check(model_name=T2V, task=None) is True
    message = check(model_name=T2V, task="i2v-14B")
    assert "task 'i2v-14B' needs a i2v model with 36 input channels" in message and "t2v model with 16" in message
    for task in ("auto", "t2v-1.3B"):  # naming model_name in VALIDATE_INPUTS turns off ComfyUI's list check
        message = check(model_name="nope.safetensors", task=task)
        assert "diffusion_models file 'nope.safetensors' not found" in message and T2V in message
    assert N["WanTunerDiTLoader"].IS_CHANGED(model_name="nope.safetensors") == "missing:nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"vae file 'missing.safetensors' not found.*available: " + VAE):
        run("WanTunerVAELoader", model_name="missing.safetensors", dtype="fp32", cache_on_cpu=False, tiling="auto")
    assert N["WanTunerLoRALoader"].VALIDATE_INPUTS(include="blocks_(", exclude="") .startswith(
        "invalid include pattern 'blocks_('")
    assert N["WanTunerLoRALoader"].VALIDATE_INPUTS(include="self_attn", exclude=None) is True


def test_size_and_slg_validation_messages() -> None:
    check = N["WanTunerSampler"].VALIDATE_INPUTS
    assert check(width=832, height=480, length=81) is True
    assert check(width=None, height=480, length=81) is True  # a linked input is checked at run time
    assert "video length must be 4n+1 frames" in check(width=832, height=480, length=80)
    assert "height must be a positive multiple of 16 (got 470; try 464 or 480)" in check(832, 470, 81)
    assert "slg_layers must be comma-separated block indices" in check(slg_mode="original", slg_layers="9;10")
    assert check(slg_mode="none", slg_layers="9;10") is True
    assert "4n+1" in N["WanTunerImageToVideo"].VALIDATE_INPUTS(width=64, height=64, length=6)


# ----------------------------------------------------------------------------------------------------------------
# IMAGE / LATENT conventions
# ----------------------------------------------------------------------------------------------------------------


def test_vae_nodes_use_comfyui_image_and_raw_latent_layouts(models: Path) -> None:
    from wan_core.media.layouts import frames_to_wan_video
    from wan_core.sampling.pipeline import decode_latents

    handle, frames = vae(), image(32, 48, frames=5)
    latent = run("WanTunerVAEEncode", vae=handle, images=frames)[0]
    model = handle.model.obj
    normalised = model.encode(frames_to_wan_video(frames))
    assert latent["samples"].shape == (1, 16, 2, 4, 6)
    # ComfyUI LATENTs hold the VAE's raw mean: the VAE's own denormalisation of its normalised output
    torch.testing.assert_close(latent["samples"], model.denormalize(normalised), rtol=0, atol=1e-6)
    decoded = run("WanTunerVAEDecode", vae=handle, latent=latent)[0]
    assert decoded.shape == (5, 32, 48, 3) and 0.0 <= decoded.min() and decoded.max() <= 1.0
    torch.testing.assert_close(decoded, decode_latents(model, normalised)[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"4n\+1 frames"):
        run("WanTunerVAEEncode", vae=handle, images=image(32, 48, frames=4))


def test_image_conversions_and_bad_inputs() -> None:
    from wan_core.media.layouts import (
        image_batch_to_wan,
        image_to_wan,
        latent_from_comfy,
        latent_to_comfy,
        video_to_image,
    )

    rgba = torch.tensor([0.0, 0.5, 1.0, 0.3]).expand(2, 3, 4, 4)
    converted = image_batch_to_wan(rgba)
    assert converted.shape == (2, 3, 3, 4) and converted[0, :, 0, 0].tolist() == [-1.0, 0.0, 1.0]
    assert image_to_wan(rgba, index=1).shape == (3, 3, 4)
    assert video_to_image(torch.rand(2, 3, 8, 8, 3)).shape == (6, 8, 8, 3)
    z = torch.randn(1, 16, 2, 3, 4)
    torch.testing.assert_close(latent_from_comfy(latent_to_comfy(z)), z, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"IMAGE \[N, H, W, 3\].*got \[3, 8, 8\]"):
        image_batch_to_wan(torch.rand(3, 8, 8), "start_image")
    with pytest.raises(ValueError, match=r"video LATENT.*got \[1, 16, 8, 8\]"):
        latent_from_comfy(torch.zeros(1, 16, 8, 8))


# ----------------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------------


def test_t2v_sampler_equals_the_direct_wan_core_run(models: Path) -> None:
    from wan_core.media.layouts import latent_to_comfy
    from wan_core.sampling.conditioning import text_to_video
    from wan_core.sampling.guidance import SLGConfig
    from wan_core.sampling.pipeline import SamplerSettings, denoise

    model, text = dit(), embeds()
    got = sample(model, text, cfg_skip_mode="alternate", slg_mode="uncond", slg_end=0.7)
    settings = SamplerSettings(steps=3, guidance_scale=4.0, flow_shift=5.0, seed=7, solver="unipc",
                               cfg_skip_mode="alternate", cfg_apply_ratio=0.5,
                               slg=SLGConfig("uncond", (1,), 3.0, 0.0, 0.7))
    direct = denoise(model.model.obj, text_to_video(32, 32, 5), [text.positive], [text.negative], settings)
    assert torch.equal(got, latent_to_comfy(direct))
    assert torch.equal(sample(model, text, cfg_skip_mode="alternate", slg_mode="uncond", slg_end=0.7), got)
    assert not torch.equal(sample(model, text, seed=8), sample(model, text))


def test_input_latent_gives_the_size_and_denoise_keeps_part_of_it(models: Path) -> None:
    model, text = dit(), embeds()
    base = sample(model, text, width=48, height=16, length=9)
    from_latent = sample(model, text, latent={"samples": base}, width=16, height=16, length=1)
    assert from_latent.shape == base.shape  # denoise 1.0: only the size comes from the latent
    assert torch.equal(from_latent, base)
    partial = sample(model, text, width=48, height=16, length=9, latent={"samples": base + 1.0}, denoise=0.5)
    assert partial.shape == base.shape and not torch.equal(partial, base)


def test_model_and_conditioning_mismatches_are_explained(models: Path) -> None:
    text, handle = embeds(), vae()
    with pytest.raises(ValueError, match=r"image-to-video model \(36 input channels\).*text-to-video conditioning"):
        sample(dit(I2V), text)
    clip = run("WanTunerCLIPVisionLoader", model_name=CLIP, dtype="default")[0]
    start = image()
    features = run("WanTunerCLIPVisionEncode", clip_vision=clip, image=start, crop="none")[0]
    cond = run("WanTunerImageToVideo", vae=handle, start_image=start, image_embeds=features, width=32, height=32,
               length=5, size_from_image=False)[0]
    with pytest.raises(ValueError, match=r"text-to-video model \(16 input channels\).*connect no conditioning"):
        sample(dit(T2V), text, conditioning=cond)
    text = embeds(negative="")
    with pytest.raises(ValueError, match="needs a negative prompt"):
        sample(dit(T2V), dataclasses.replace(text, negative=None))
    assert text.negative.shape[0] == 1  # the empty caption: EOS only, the unconditional embedding
    assert sample(dit(T2V), text).shape == (1, 16, 2, 4, 4)
    with pytest.raises(ValueError, match=r"hold 1 image\(s\) but this conditioning needs 2"):
        run("WanTunerFirstLastFrame", vae=handle, start_image=start, end_image=start, image_embeds=features,
            width=32, height=32, length=5)


def test_i2v_flf_and_fun_control_condition_the_sampler(models: Path) -> None:
    from wan_core.sampling.conditioning import size_for_image

    text, handle = embeds(), vae()
    clip = run("WanTunerCLIPVisionLoader", model_name=CLIP, dtype="default")[0]
    start, end = image(seed=1), image(seed=2)
    single = run("WanTunerCLIPVisionEncode", clip_vision=clip, image=start, crop="none")[0]
    pair = run("WanTunerCLIPVisionEncode", clip_vision=clip, image=start, crop="center", end_image=end)[0]
    assert single.features.shape == (1, 257, 32) and pair.features.shape == (2, 257, 32)
    cond, width, height = run("WanTunerImageToVideo", vae=handle, start_image=start, image_embeds=single, width=32,
                              height=32, length=5, size_from_image=True)
    assert (height, width) == size_for_image((40, 56), 32 * 32)
    assert sample(dit(I2V), text, conditioning=cond).shape == (1, 16, 2, height // 8, width // 8)
    flf = run("WanTunerFirstLastFrame", vae=handle, start_image=start, end_image=end, image_embeds=pair, width=32,
              height=48, length=5)[0]
    assert sample(dit(FLF), text, conditioning=flf).shape == (1, 16, 2, 6, 4)
    control = image(32, 32, frames=5, seed=3)
    fc = run("WanTunerFunControl", vae=handle, control_video=control, width=32, height=32, length=5)[0]
    with_start = run("WanTunerFunControl", vae=handle, control_video=control, width=32, height=32, length=5,
                     start_image=start, image_embeds=single)[0]
    assert not torch.equal(sample(dit(FC), text, conditioning=fc), sample(dit(FC), text, conditioning=with_start))


def test_lora_chain_equals_sampling_with_merged_weights(models: Path) -> None:
    from wan_core.lora.apply import LoRAModule, merge_loras

    base, text = dit(dtype="fp32"), embeds()
    path = str(models / "models" / "loras" / LORA)
    first, report = run("WanTunerLoRALoader", dit=base, lora_name=LORA, strength=0.8, include="attn", exclude="")
    second, _ = run("WanTunerLoRALoader", dit=first, lora_name=LORA, strength=-0.5, include="", exclude="ffn")
    assert "2 modules matched (strength 0.8" in report and "3 unmatched keys" in report
    chained = sample(second, text)
    merged_model = copy.deepcopy(base.model.obj)
    merge_loras(merged_model, [path, path], [0.8, -0.5], include_patterns=["attn", None],
                exclude_patterns=[None, "ffn"])
    merged = adapter.ManagedModel(merged_model, merged_model, "dit")
    expected = sample(type(base)(merged, base.name, None), text)
    wide = float64_copy(merged_model)
    with float64_upcasts():
        exact = sample(type(base)(adapter.ManagedModel(wide, wide, "dit"), base.name, None), text)
    # unmerged (x·W + s·(x·A)·B) and merged (x·(W + s·BA)) differ only by fp32 rounding of the reordered sums. The
    # reference runs the merged DiT in float64; the sampler keeps its latents in float32 between steps (one rounding
    # per step, far below the DiT's own float32 error, which the bound is made of)
    assert_float32_parity(chained, expected, exact.double())
    assert (chained - sample(base, text)).abs().max() > 1e-3
    zero, _ = run("WanTunerLoRALoader", dit=base, lora_name=LORA, strength=0.0, include="", exclude="")
    assert torch.equal(sample(zero, text), sample(base, text))
    assert not any(isinstance(m, LoRAModule) for m in base.model.obj.modules())


def test_block_swap_dit_samples_like_the_plain_one(models: Path) -> None:
    text = embeds()
    plain = sample(dit(dtype="fp32"), text)
    swapped = dit(dtype="fp32", blocks_to_swap=1)
    assert swapped.model.patcher is None and swapped.model.placer is not None
    assert torch.equal(sample(swapped, text), plain)
    chain, _ = run("WanTunerLoRALoader", dit=swapped, lora_name=LORA, strength=1.0, include="", exclude="")
    sample(chain, text)
    assert swapped.model.placed is None  # detached after a run with LoRAs, re-attached by the next run


def test_loader_names_outside_their_model_folder_are_refused(models: Path, tmp_path: Path) -> None:
    outside = tmp_path / VAE
    outside.write_bytes((models / "models" / "vae" / VAE).read_bytes())  # a real model file, outside the folders
    vae_args = {"dtype": "fp32", "cache_on_cpu": False, "tiling": "auto"}
    for name in (str(outside), f"../vae/{VAE}", f"sub/../../vae/{VAE}", f"..\\vae\\{VAE}", "c:x.safetensors"):
        with pytest.raises(ValueError, match=r"vae file name .* must be a file inside the vae folder"):
            run("WanTunerVAELoader", model_name=name, **vae_args)
    message = N["WanTunerDiTLoader"].VALIDATE_INPUTS(model_name=f"../diffusion_models/{T2V}", task="auto")
    assert "absolute paths and paths outside ComfyUI's folders are refused" in message
    assert N["WanTunerVAELoader"].IS_CHANGED(model_name=str(outside)).startswith("missing:")
    assert run("WanTunerVAELoader", model_name=VAE, **vae_args)[0].name == VAE  # a plain name still loads


def test_save_video_refuses_an_empty_prefix_before_writing(models: Path) -> None:
    for prefix in ("", "  ", "clips/"):
        message = N["WanTunerSaveVideo"].VALIDATE_INPUTS(filename_prefix=prefix)
        assert message == (f"filename_prefix {prefix!r} names no file: give a file name, optionally after "
                           "subfolders (e.g. WanTuner/video)")
        with pytest.raises(ValueError, match="names no file"):
            N["WanTunerSaveVideo"]().save(images=image(16, 16), fps=8, filename_prefix=prefix, crf=0)
    assert N["WanTunerSaveVideo"].VALIDATE_INPUTS(filename_prefix="WanTuner/video") is True


# ----------------------------------------------------------------------------------------------------------------
# Output and preview
# ----------------------------------------------------------------------------------------------------------------


def test_save_video_numbers_files_and_shows_them(models: Path) -> None:
    import av

    frames = image(32, 48, frames=5)
    outs = [N["WanTunerSaveVideo"]().save(images=frames, fps=8, filename_prefix="clips/run", crf=0)
            for _ in range(2)]
    names = [o["ui"]["images"][0]["filename"] for o in outs]
    assert names == ["run_00001_.mp4", "run_00002_.mp4"] and outs[0]["ui"]["animated"] == (True,)
    assert outs[0]["ui"]["images"][0]["subfolder"] == "clips"
    with av.open(outs[1]["result"][0]) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
        assert float(container.streams.video[0].average_rate) == 8.0
    with pytest.raises(ValueError, match="outside the folders WanTuner may use"):
        N["WanTunerSaveVideo"]().save(images=frames, fps=8, filename_prefix="../escape", crf=0)


def test_preview_map_is_the_least_squares_fit_of_the_decoder(models: Path) -> None:
    import torch.nn.functional as F

    from wan_core.media.layouts import LatentRGB, fit_latent_rgb, latent_preview

    model = vae().model.obj
    rgb = fit_latent_rgb(model, size=12, seed=3)
    z = torch.randn(1, 16, 1, 12, 12, generator=torch.Generator().manual_seed(3))  # the latent the fit decodes
    target = (F.avg_pool2d(model.decode(z)[0, :, 0], 8) + 1) / 2  # mean colour per cell [3, 12, 12]

    def error(fit: LatentRGB) -> float:
        predicted = torch.einsum("chw,ck->khw", z[0, :, 0], fit.weight) + fit.bias[:, None, None]
        return float((predicted - target).pow(2).mean())

    best = error(rgb)
    constant = LatentRGB(torch.zeros(16, 3), target.mean(dim=(1, 2)))
    gen = torch.Generator().manual_seed(4)
    nudged = [LatentRGB(rgb.weight + 1e-2 * torch.randn(16, 3, generator=gen), rgb.bias) for _ in range(5)]
    assert best < error(constant) and all(best < error(n) for n in nudged)
    image_ = latent_preview(torch.randn(1, 16, 3, 6, 10), rgb, max_size=40)
    assert image_.shape == (24, 40, 3) and image_.dtype.name == "uint8"


def test_fallback_progress_logs_every_step(models: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="nodes.comfy_adapter"):
        sample(dit(), embeds(), steps=4)
    steps = [r.getMessage() for r in caplog.records if "WanTuner sampler: step" in r.getMessage()]
    assert steps == [f"WanTuner sampler: step {i}/4" for i in range(1, 5)]
