"""Sample previews during Wan2.2 training (tiny random files, CPU): a T2V-A14B expert pair samples through the
ExpertSwitch with the trained LoRA in both experts, TI2V-5B samples text-to-video on the Wan2.2 VAE's latents; each
written preview equals a direct wan_core sampling run with the same settings and the saved LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cache_helpers import write_models
from tests.tiny import randomize_
from tests.tiny_training import memory_source, tiny_dit_file, train_args
from training.train import train
from wan_core.loading.checkpoint import save_safetensors
from wan_core.lora.network import LoRANetwork
from wan_core.media.io import to_uint8
from wan_core.models.config import CONFIG_METADATA_KEY, VAEConfig, config_to_json
from wan_core.models.dit import WanModel, load_dit
from wan_core.models.t5 import load_t5
from wan_core.models.vae import WanVAEModel, load_vae
from wan_core.sampling.conditioning import text_to_video
from wan_core.sampling.experts import HIGH, LOW, ExpertSwitch
from wan_core.sampling.pipeline import SamplerSettings, decode_latents, denoise

TINY_VAE22 = VAEConfig(dim=8, dec_dim=12, z_dim=48, patch_size=2, is_residual=True)  # stride 16, 48 channels
PROMPT, NEGATIVE = "a red square", "blurry"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("previews22")
    models = write_models(root / "models")
    vae22 = save_safetensors(randomize_(WanVAEModel(TINY_VAE22), 0, scale=0.1).state_dict(),
                             root / "vae22.safetensors", {CONFIG_METADATA_KEY: config_to_json(TINY_VAE22)})
    return {"vae": models.vae, "vae22": vae22, "t5": models.t5,
            "low": tiny_dit_file(root / "low.safetensors", seed=31),
            "high": tiny_dit_file(root / "high.safetensors", seed=32),
            "ti2v": tiny_dit_file(root / "ti2v.safetensors", "ti2v-5B", seed=33)}


def _prompts(folder: Path, line: str) -> Path:
    path = folder / "prompts.txt"
    path.write_text(line + "\n", encoding="utf-8")
    return path


def _with_lora(dit: Path, lora: Path) -> WanModel:
    model = load_dit(dit)
    LoRANetwork.from_weights(model, lora).eval()  # patched in, as the training's network is
    return model.eval()


def _direct_frame(model: WanModel | ExpertSwitch, vae: Path, t5: Path, size: tuple[int, int], settings: SamplerSettings
                  ) -> np.ndarray:
    """One frame [H, W, 3] uint8 sampled by wan_core directly (prompt and negative prompt of the preview line)."""
    texts = sorted([PROMPT, NEGATIVE])  # one T5 batch, as the previews encode their prompts
    with torch.no_grad():
        embeds = dict(zip(texts, (e.float().cpu() for e in load_t5(t5).encode(texts))))
    context, negative = embeds[PROMPT], embeds[NEGATIVE]
    cond = text_to_video(size[0], size[1], 1, spatial=load_vae(vae).config.space_stride)
    latents = denoise(model, cond, [context], [negative], settings)
    return to_uint8(decode_latents(load_vae(vae), latents.float())[0])[0]


def _preview(out: Path) -> np.ndarray:
    (png,) = (out / "sample").glob("*.png")
    return np.asarray(Image.open(png).convert("RGB"))


def test_expert_pair_previews_sample_both_experts_with_the_shared_lora(files: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    line = f"{PROMPT} --w 32 --h 32 --s 4 --d 7 --fs 3 --g 4.0 --n {NEGATIVE}"
    args = train_args(files["low"], tmp_path, "--task", "t2v-A14B", "--dit_high_noise", str(files["high"]),
                      "--timestep_boundary", "0.5", "--max_train_steps", "2", "--sample_every_n_steps", "2",
                      "--sample_prompts", str(_prompts(tmp_path, line)), "--vae", str(files["vae"]), "--t5",
                      str(files["t5"]))
    result = train(args, source=memory_source(2))
    preview = _preview(tmp_path)
    assert preview.shape == (32, 32, 3)
    settings = SamplerSettings(steps=4, guidance_scale=4.0, flow_shift=3.0, seed=7)
    low = _with_lora(files["low"], result.output)
    switch = ExpertSwitch(_with_lora(files["high"], result.output), low, 0.5, 4.0, 4.0, torch.device("cpu"))
    assert np.array_equal(preview, _direct_frame(switch, files["vae"], files["t5"], (32, 32), settings))
    assert HIGH in switch.used and LOW in switch.used  # the boundary falls inside the 4-step schedule
    without = ExpertSwitch(load_dit(files["high"]).eval(), low, 0.5, 4.0, 4.0, torch.device("cpu"))
    assert not np.array_equal(preview, _direct_frame(without, files["vae"], files["t5"], (32, 32), settings))


def test_ti2v_5b_previews_are_text_to_video_on_the_wan22_vae(files: dict[str, Path], tmp_path: Path) -> None:
    line = f"{PROMPT} --w 80 --h 32 --s 3 --d 5 --fs 5 --n {NEGATIVE}"  # 80 px wide rounds down to 64 (32 px steps)
    args = train_args(files["ti2v"], tmp_path, "--task", "ti2v-5B", "--max_train_steps", "2",
                      "--sample_every_n_steps", "2", "--sample_prompts", str(_prompts(tmp_path, line)),
                      "--vae", str(files["vae22"]), "--t5", str(files["t5"]))
    result = train(args, source=memory_source(2, "ti2v-5B"))
    preview = _preview(tmp_path)
    assert preview.shape == (32, 64, 3)
    settings = SamplerSettings(steps=3, guidance_scale=5.0, flow_shift=5.0, seed=5)
    expected = _direct_frame(_with_lora(files["ti2v"], result.output), files["vae22"], files["t5"], (32, 64),
                             settings)
    assert np.array_equal(preview, expected)


def test_previews_refuse_a_vae_of_other_latents_before_training(files: dict[str, Path], tmp_path: Path) -> None:
    args = train_args(files["ti2v"], tmp_path, "--task", "ti2v-5B", "--max_train_steps", "2",
                      "--sample_prompts", str(_prompts(tmp_path, PROMPT)), "--vae", str(files["vae"]),
                      "--t5", str(files["t5"]))
    with pytest.raises(ValueError, match="--vae has 16 latent channels but the DiT samples 48-channel latents"):
        train(args, source=memory_source(2, "ti2v-5B"))
    assert not (tmp_path / "sample").exists()
