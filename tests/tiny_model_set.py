"""The tiny random model set of tests/model_set.py laid out as ComfyUI's models folder, under the toy model file
names the example workflows use, plus a musubi-format LoRA.

`write_model_set(root)` creates `root/<folder>/<name>`. The same files serve the CI graph tests
(`WANTUNER_MODELS_DIR=root`) and the real-ComfyUI test (`root` = ComfyUI's models dir).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from tests import model_set
from tests.tiny import TINY_DIT, randomize_
from wan_core.loading.checkpoint import save_safetensors
from wan_core.loading.model_set import TOY_EXPERT_FILES
from wan_core.models.config import VAEConfig
from wan_core.models.dit import WanModel
from wan_core.models.vae import WanVAEModel

FILES = {  # tests/model_set.py key -> (ComfyUI folder, file name used by the example workflows)
    "dit_t2v": ("diffusion_models", "wan21_toy_t2v_dit.safetensors"),
    "dit_i2v": ("diffusion_models", "wan21_toy_i2v_dit.safetensors"),
    "dit_flf2v": ("diffusion_models", "wan21_toy_flf2v_dit.safetensors"),
    "dit_fc": ("diffusion_models", "wan21_toy_fun_control_dit.safetensors"),
    "vae": ("vae", "wan21_toy_vae.safetensors"),
    "t5": ("text_encoders", "wan21_toy_umt5.safetensors"),
    "clip": ("clip_vision", "wan21_toy_clip_vision.safetensors"),
}
LORA = ("loras", "wan21_toy_purple_lora.safetensors")
# The toy Wan2.2 T2V-A14B pair's names (high, low): copies of the tiny T2V DiT
TOY_PAIR = tuple(("diffusion_models", name) for name in TOY_EXPERT_FILES["t2v-A14B"])
LORA_MODULES = ("blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.1.ffn.0")  # layers of the t2v DiT
LORA_UNMATCHED_MODULE = "blocks.7.self_attn.q"  # the tiny DiT has 2 blocks: reported as unmatched


def write_lora(path: Path, rank: int = 4, seed: int = 5) -> Path:
    """musubi/kohya keys (`lora_unet_<module with _>` + alpha) for LORA_MODULES and one module the DiT lacks."""
    cfg = model_set.DIT_KINDS["t2v"]
    shapes = {"self_attn.q": (cfg.dim, cfg.dim), "cross_attn.k": (cfg.dim, cfg.dim), "ffn.0": (cfg.ffn_dim, cfg.dim)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in (*LORA_MODULES, LORA_UNMATCHED_MODULE):
        out_features, in_features = shapes[module.split(".", 2)[2]]
        base = "lora_unet_" + module.replace(".", "_")
        tensors[f"{base}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * 0.5
        tensors[f"{base}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.5
        tensors[f"{base}.alpha"] = torch.tensor(float(rank))
    return save_safetensors(tensors, path, {"ss_network_module": "networks.lora_wan"})


def write_model_set(root: Path) -> dict[str, Path]:
    """Write every model under `root/<ComfyUI folder>/<toy name>`; returns {file name: path}."""
    root = Path(root)
    flat = model_set.write_model_set(root / ".flat")
    paths = {}
    for key, (folder, name) in FILES.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        paths[name] = Path(shutil.move(flat[key], root / folder / name))
    shutil.rmtree(root / ".flat")
    paths[LORA[1]] = write_lora(root / LORA[0] / LORA[1])
    for folder, name in TOY_PAIR:
        paths[name] = Path(shutil.copy(paths[FILES["dit_t2v"][1]], root / folder / name))
    return paths


TINY_I2V_A14B = dataclasses.replace(TINY_DIT, in_dim=36)  # mask + image latents, no CLIP branch
TINY_TI2V = dataclasses.replace(TINY_DIT, in_dim=48, out_dim=48)
TINY_VAE22 = VAEConfig(dim=8, dec_dim=12, z_dim=48, patch_size=2, is_residual=True)
WAN22_FILES = {  # official (Comfy-Org) file name -> (ComfyUI folder, tiny config, seed)
    "wan2.2_t2v_high_noise_14B_fp16.safetensors": ("diffusion_models", TINY_DIT, 11),
    "wan2.2_t2v_low_noise_14B_fp16.safetensors": ("diffusion_models", TINY_DIT, 12),
    "wan2.2_i2v_high_noise_14B_fp16.safetensors": ("diffusion_models", TINY_I2V_A14B, 13),
    "wan2.2_i2v_low_noise_14B_fp16.safetensors": ("diffusion_models", TINY_I2V_A14B, 14),
    "wan2.2_ti2v_5B_fp16.safetensors": ("diffusion_models", TINY_TI2V, 15),
    "wan2.2_vae.safetensors": ("vae", TINY_VAE22, 0),
}
OFFICIAL_COPIES = {"umt5_xxl_fp16.safetensors": "t5", "wan_2.1_vae.safetensors": "vae"}  # tiny files, official names


def write_wan22_files(root: Path) -> dict[str, Path]:
    """Tiny random Wan2.2 files under their official names in `root/<ComfyUI folder>/`, plus the tiny umT5 and
    Wan2.1 VAE under their official names (call after write_model_set(root))."""
    paths = {}
    for name, (folder, config, seed) in WAN22_FILES.items():
        module = WanVAEModel(config) if isinstance(config, VAEConfig) else WanModel(config)
        scale = 0.1 if isinstance(config, VAEConfig) else 0.05
        (root / folder).mkdir(parents=True, exist_ok=True)
        paths[name] = model_set._save(randomize_(module, seed, scale=scale), config, root / folder / name)
    for name, key in OFFICIAL_COPIES.items():
        folder, toy = FILES[key]
        paths[name] = Path(shutil.copy(root / folder / toy, root / folder / name))
    return paths


if __name__ == "__main__":  # python -m tests.tiny_model_set <models dir>
    import sys

    for name, path in write_model_set(Path(sys.argv[1])).items():
        print(name, path)
