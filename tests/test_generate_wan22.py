"""End to end CLI runs of the Wan2.2 tasks on tiny random files: two A14B experts, and a TI2V-5B DiT with a
Wan2.2 VAE. Weights are random: outputs are checked for shapes and for which expert produced them."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.model_set import TINY_T5, _save, write_model_set
from tests.tiny import TINY_DIT, randomize_
from wan_core.generate.cli import main, vae_latent_channels
from wan_core.generate.outputs import load_latent
from wan_core.loading import model_set
from wan_core.loading.checkpoint import save_safetensors
from wan_core.lora.formats import LowRank, save_lora
from wan_core.media.io import image_to_tensor, read_image
from wan_core.models.config import VAEConfig
from wan_core.models.dit import WanModel
from wan_core.models.vae import WanVAEModel, load_vae
from wan_core.sampling.experts import ExpertSwitch

TINY_I2V_A14B = dataclasses.replace(TINY_DIT, in_dim=36)  # mask + image latents, no CLIP branch
TINY_TI2V = dataclasses.replace(TINY_DIT, in_dim=48, out_dim=48)
TINY_VAE22 = VAEConfig(dim=8, dec_dim=12, z_dim=48, patch_size=2, is_residual=True)
assert TINY_T5.dim == TINY_DIT.text_dim
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wan22")
    paths = write_model_set(folder)
    for name, cfg, seed in (("t2v_high", TINY_DIT, 11), ("t2v_low", TINY_DIT, 12), ("i2v_high", TINY_I2V_A14B, 13),
                            ("i2v_low", TINY_I2V_A14B, 14), ("ti2v", TINY_TI2V, 15)):
        paths[name] = _save(randomize_(WanModel(cfg), seed, scale=0.05), cfg, folder / f"{name}.safetensors")
    paths["vae22"] = _save(randomize_(WanVAEModel(TINY_VAE22), 0, scale=0.1), TINY_VAE22, folder / "vae22.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "start.png")
    paths["start"] = folder / "start.png"
    return paths


def _run(models, out: Path, *extra: str) -> int:
    return main(["--vae", str(models["vae"]), "--t5", str(models["t5"]), "--video_size", "32", "32",
                 "--video_length", "5", "--infer_steps", "4", "--seed", "7", "--output_type", "latent",
                 "--prompt", "a red square", "--save_path", str(out), "--quiet", "--device", "cpu", *extra])


def _latent(folder: Path) -> torch.Tensor:
    (path,) = sorted(folder.glob("*_latent.safetensors"))
    return load_latent(path)[0]


def _experts(models, kind: str) -> list[str]:
    return ["--task", f"{kind}-A14B", "--dit", str(models[f"{kind}_low"]), "--dit_high_noise",
            str(models[f"{kind}_high"])]


def test_t2v_a14b_switches_experts_at_the_boundary(models, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # shift 12, 4 UniPC steps: t = 999, 972, 922, 799 -> 3 high-noise steps, then 1 low-noise step at boundary 0.875
    assert _run(models, tmp_path / "both", *_experts(models, "t2v")) == 0
    assert "switching to the high-noise expert" in caplog.text and "switching to the low-noise expert" in caplog.text
    both = _latent(tmp_path / "both")
    assert both.shape == (1, 16, 2, 4, 4)
    # boundary 0: every step is the high-noise expert's, with its guidance (4.0) -> that expert alone at 4.0
    assert _run(models, tmp_path / "b0", *_experts(models, "t2v"), "--timestep_boundary", "0") == 0
    assert _run(models, tmp_path / "high", "--task", "t2v-A14B", "--dit", str(models["t2v_high"]),
                "--guidance_scale", "4.0") == 0
    assert torch.equal(_latent(tmp_path / "b0"), _latent(tmp_path / "high"))
    # boundary 1000: no timestep reaches it -> the low-noise expert alone at its guidance (3.0)
    assert _run(models, tmp_path / "b1000", *_experts(models, "t2v"), "--timestep_boundary", "1000") == 0
    assert _run(models, tmp_path / "low", "--task", "t2v-A14B", "--dit", str(models["t2v_low"])) == 0
    assert torch.equal(_latent(tmp_path / "b1000"), _latent(tmp_path / "low"))
    assert "with only --dit: that one expert runs all 4 steps" in caplog.text
    assert not torch.equal(both, _latent(tmp_path / "low")) and not torch.equal(both, _latent(tmp_path / "high"))


def test_high_noise_guidance_flag_and_offload(models, tmp_path):
    assert _run(models, tmp_path / "a", *_experts(models, "t2v"), "--timestep_boundary", "0",
                "--guidance_scale_high_noise", "2.0", "--offload_inactive_dit", "--force_v2_1_time_embedding") == 0
    assert _run(models, tmp_path / "b", "--task", "t2v-A14B", "--dit", str(models["t2v_high"]),
                "--guidance_scale", "2.0") == 0
    assert torch.equal(_latent(tmp_path / "a"), _latent(tmp_path / "b"))


@pytest.mark.parametrize("offload", [False, True])
def test_lazy_loading_reads_the_low_noise_expert_at_the_switch(models, tmp_path, monkeypatch, offload):
    """--lazy_loading: the high-noise file is read first, the low-noise file only when its first step comes; the
    result is the eager run's, bit for bit (with and without --offload_inactive_dit)."""
    offload_flag = ["--offload_inactive_dit"] if offload else []
    assert _run(models, tmp_path / "eager", *_experts(models, "t2v"), *offload_flag) == 0
    events: list[str] = []
    real_prepare, real_pick = model_set.prepare_dit, ExpertSwitch.pick
    monkeypatch.setattr(model_set, "prepare_dit", lambda path, *a, **k: events.append(f"read {Path(path).stem}")
                        or real_prepare(path, *a, **k))
    monkeypatch.setattr(ExpertSwitch, "pick", lambda self, t: events.append(real_pick(self, t)) or events[-1])
    assert _run(models, tmp_path / "lazy", *_experts(models, "t2v"), *offload_flag, "--lazy_loading") == 0
    # shift 12, 4 steps: 3 high-noise steps then 1 low-noise step, two model calls (prompt, negative) per step;
    # each call picks its expert, which is read then if it has not been
    assert events == ["high", "read t2v_high", *["high"] * 5, "low", "read t2v_low", "low"]
    assert torch.equal(_latent(tmp_path / "lazy"), _latent(tmp_path / "eager"))


def test_lazy_loading_needs_two_experts(models, tmp_path, capsys):
    assert _run(models, tmp_path, "--task", "t2v-A14B", "--dit", str(models["t2v_low"]), "--lazy_loading") == 2
    assert "--lazy_loading loads the two Wan2.2 experts one at a time: it needs" in capsys.readouterr().err


def test_i2v_a14b_needs_no_clip(models, tmp_path):
    assert _run(models, tmp_path, *_experts(models, "i2v"), "--image_path", str(models["start"])) == 0
    assert _latent(tmp_path).shape == (1, 16, 2, 4, 4)


def test_ti2v_5b_text_to_video_with_the_wan22_vae(models, tmp_path):
    assert main(["--task", "ti2v-5B", "--dit", str(models["ti2v"]), "--vae", str(models["vae22"]), "--t5",
                 str(models["t5"]), "--video_size", "32", "64", "--video_length", "5", "--infer_steps", "2",
                 "--output_type", "both", "--prompt", "a red square", "--save_path", str(tmp_path), "--quiet",
                 "--device", "cpu"]) == 0
    assert _latent(tmp_path).shape == (1, 48, 2, 2, 4)
    assert len(list(tmp_path.glob("*.mp4"))) == 1


def test_ti2v_5b_image_to_video_puts_the_image_latent_in_frame_0(models, tmp_path):
    """--image_path with ti2v-5B: the output's first latent frame is the Wan2.2 VAE latent of the start image
    (32x64, the size of the video here), the other frames are generated."""
    image_path = tmp_path / "start_wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(image_path)
    argv = ["--task", "ti2v-5B", "--dit", str(models["ti2v"]), "--vae", str(models["vae22"]), "--t5",
            str(models["t5"]), "--video_size", "32", "64", "--video_length", "5", "--infer_steps", "3", "--seed", "4",
            "--output_type", "latent", "--prompt", "a red square", "--quiet", "--device", "cpu"]
    assert main([*argv, "--image_path", str(image_path), "--save_path", str(tmp_path / "i2v")]) == 0
    assert main([*argv, "--save_path", str(tmp_path / "t2v")]) == 0
    i2v, t2v = _latent(tmp_path / "i2v"), _latent(tmp_path / "t2v")
    assert i2v.shape == t2v.shape == (1, 48, 2, 2, 4)
    image = image_to_tensor(read_image(image_path))  # [3, 32, 64] in [-1, 1]
    want = load_vae(models["vae22"]).encode(image[None, :, None])
    assert torch.equal(i2v[:, :, :1], want)
    assert not torch.equal(i2v[:, :, 1:], t2v[:, :, 1:])  # the image conditions the generated frame


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "i2v-A14B", "--dit", "{dit_i2v}", "--image_path", "{start}"],
     "task 'i2v-A14B' needs a t2v model with 36 input channels, but the checkpoint is a i2v model"),
    (["--task", "ti2v-5B", "--dit", "{t2v_low}", "--vae", "{vae22}"],
     "task 'ti2v-5B' needs a t2v model with 48 input channels"),
    (["--task", "t2v-14B", "--dit", "{t2v_low}", "--dit_high_noise", "{t2v_high}"],
     "are for the Wan2.2 A14B tasks (t2v-A14B, i2v-A14B); task is t2v-14B"),
    (["--task", "t2v-A14B", "--dit", "{t2v_low}", "--timestep_boundary", "1001"],
     "timestep boundary must be in [0, 1] or (1, 1000], got 1001.0"),
    (["--task", "t2v-A14B", "--dit", "{t2v_low}", "--lora_weight_high_noise", "{t2v_low}"],
     "--lora_weight_high_noise needs the high-noise expert (--dit_high_noise)"),
    (["--task", "ti2v-5B", "--dit", "{ti2v}"],
     "--vae vae.safetensors has 16 latent channels; task ti2v-5B needs the Wan2.2 VAE (wan2.2_vae) with 48"),
    (["--task", "t2v-A14B", "--dit", "{t2v_low}", "--vae", "{vae22}"],
     "--vae vae22.safetensors has 48 latent channels; task t2v-A14B needs the Wan2.1 VAE (wan_2.1_vae) with 16"),
    (["--task", "ti2v-5B", "--dit", "{ti2v}", "--vae", "{vae22}", "--image_path", "{start}", "--end_image_path",
      "{start}"], "task ti2v-5B takes a start image only (--image_path, the first frame); drop --end_image_path"),
    # t2v-A14B has a toy expert pair (tests/test_toy_wan22.py covers it with and without the files)
    (["--task", "i2v-A14B"], "there is no embedded toy model for the Wan2.2 task i2v-A14B: give its DiT with --dit"),
])
def test_wrong_wan22_input_is_one_clear_error(models, tmp_path, capsys, argv, message):
    assert _run(models, tmp_path, *[a.format(**{k: str(v) for k, v in models.items()}) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_vae_latent_channels_from_shapes_without_metadata(tmp_path):
    for cfg, want in ((TINY_VAE22, 48), (VAEConfig(dim=8), 16)):
        path = save_safetensors(dict(WanVAEModel(cfg).state_dict()), tmp_path / f"vae{want}.safetensors")
        assert vae_latent_channels(path) == want


# ----------------------------------------------------------------------------------------------------------------
# The Wan2.1 sampling options on the Wan2.2 tasks: CFG skipping, SLG, LoRA regex, batch and interactive modes
# ----------------------------------------------------------------------------------------------------------------

GUIDANCE_OPTIONS = ("--cfg_skip_mode", "alternate", "--slg_mode", "uncond", "--slg_layers", "0", "--slg_start", "0",
                    "--slg_end", "1")


def test_cfg_skip_and_slg_apply_to_an_expert_pair_as_to_one_dit(models, tmp_path):
    """At boundary 0 the pair is its high-noise expert on every step, so with the same CFG skipping and SLG it must
    equal that expert alone; the options change the result (they are applied, not dropped)."""
    assert _run(models, tmp_path / "pair", *_experts(models, "t2v"), "--timestep_boundary", "0",
                *GUIDANCE_OPTIONS) == 0
    assert _run(models, tmp_path / "one", "--task", "t2v-A14B", "--dit", str(models["t2v_high"]),
                "--guidance_scale", "4.0", *GUIDANCE_OPTIONS) == 0
    assert _run(models, tmp_path / "plain", *_experts(models, "t2v"), "--timestep_boundary", "0") == 0
    pair = _latent(tmp_path / "pair")
    assert torch.equal(pair, _latent(tmp_path / "one"))
    assert not torch.equal(pair, _latent(tmp_path / "plain"))


def _block_lora(blocks: range, seed: int = 5) -> dict[str, LowRank]:
    gen = torch.Generator().manual_seed(seed)
    dim = TINY_DIT.dim
    return {f"blocks.{i}.self_attn.q": LowRank(torch.randn(4, dim, generator=gen), torch.randn(dim, 4, generator=gen),
                                               2.0) for i in blocks}


def test_lora_include_patterns_on_each_expert(models, tmp_path):
    """--include_patterns keeps only block 0 of a LoRA on every layer: equal to a LoRA holding block 0 alone, on
    the low-noise expert and (the same file) on the high-noise expert."""
    full = _block_lora(range(TINY_DIT.num_layers))
    every = str(save_lora(full, tmp_path / "every.safetensors", "musubi"))
    first = str(save_lora({k: v for k, v in full.items() if k.startswith("blocks.0.")}, tmp_path / "first.safetensors",
                          "musubi"))
    assert _run(models, tmp_path / "regex", *_experts(models, "t2v"), "--lora_weight", every, "--include_patterns",
                "blocks_0_", "--lora_weight_high_noise", first) == 0
    assert _run(models, tmp_path / "block0", *_experts(models, "t2v"), "--lora_weight", first,
                "--lora_weight_high_noise", first) == 0
    assert _run(models, tmp_path / "all", *_experts(models, "t2v"), "--lora_weight", every,
                "--lora_weight_high_noise", first) == 0
    assert torch.equal(_latent(tmp_path / "regex"), _latent(tmp_path / "block0"))
    assert not torch.equal(_latent(tmp_path / "regex"), _latent(tmp_path / "all"))


def _latents_by_seed(folder: Path) -> dict[int, torch.Tensor]:
    return {int(p.name.split("_")[-2]): load_latent(p)[0] for p in folder.glob("*_latent.safetensors")}


def test_batch_file_runs_ti2v_text_and_image_jobs_as_single_runs(models, tmp_path):
    ti2v = ["--task", "ti2v-5B", "--dit", str(models["ti2v"]), "--vae", str(models["vae22"])]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red square --d 1\na blue circle --d 2 --i {models['start']}\n")
    assert _run(models, tmp_path / "batch", *ti2v, "--from_file", str(prompts)) == 0
    batch = _latents_by_seed(tmp_path / "batch")
    assert _run(models, tmp_path / "text", *ti2v, "--seed", "1") == 0
    assert _run(models, tmp_path / "image", *ti2v, "--seed", "2", "--image_path", str(models["start"]),
                "--prompt", "a blue circle") == 0  # the last --prompt wins
    assert sorted(batch) == [1, 2]
    assert torch.equal(batch[1], _latent(tmp_path / "text"))
    assert torch.equal(batch[2], _latent(tmp_path / "image"))


def test_interactive_mode_with_an_expert_pair(models, tmp_path):
    argv = [sys.executable, "-m", "wan_core.generate", "--vae", str(models["vae"]), "--t5", str(models["t5"]),
            "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "4", "--output_type", "latent",
            "--save_path", str(tmp_path), "--device", "cpu", *_experts(models, "t2v"), "--interactive"]
    result = subprocess.run(argv, input="a red square --d 1\na blue circle --d 2\n", capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "switching to the low-noise expert" in result.stderr
    assert sorted(_latents_by_seed(tmp_path)) == [1, 2]
