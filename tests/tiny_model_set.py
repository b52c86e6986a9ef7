"""The tiny random model set of tests/model_set.py laid out as ComfyUI's models folder, under the toy model file
names the example workflows use, plus a musubi-format LoRA.

`write_model_set(root)` creates `root/<folder>/<name>`. The same files serve the CI graph tests
(`WANTUNER_MODELS_DIR=root`) and the real-ComfyUI test (`root` = ComfyUI's models dir).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests import model_set
from wan_core.loading.checkpoint import save_safetensors

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
    return paths


if __name__ == "__main__":  # python -m tests.tiny_model_set <models dir>
    import sys

    for name, path in write_model_set(Path(sys.argv[1])).items():
        print(name, path)
