"""Tiny random model factories shared by the tests (fp32, CPU, seeded)."""

from __future__ import annotations

import dataclasses

import torch

from wan_core.models.config import DiTConfig

TINY_DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, in_dim=16)
TINY_DIT_BY_TYPE = {
    "t2v": TINY_DIT,
    "i2v": dataclasses.replace(TINY_DIT, in_dim=36, model_type="i2v"),
    "flf2v": dataclasses.replace(TINY_DIT, in_dim=36, model_type="flf2v"),
    "fc": dataclasses.replace(TINY_DIT, in_dim=48, model_type="i2v"),
}


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (norm weights around 1) so that no branch is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * scale
            is_norm_weight = name.endswith(".gamma") or (p.dim() == 1 and "norm" in name and name.endswith("weight"))
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return module


def diffusers_dit(kind: str = "t2v", seed: int = 0):
    """A tiny diffusers WanTransformer3DModel of the given kind with random weights."""
    from diffusers import WanTransformer3DModel

    cfg = TINY_DIT_BY_TYPE[kind]
    extra = {}
    if cfg.has_image_input:
        extra = {"image_dim": 1280, "added_kv_proj_dim": cfg.dim}
        if cfg.model_type == "flf2v":
            extra["pos_embed_seq_len"] = 514
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=16, text_dim=cfg.text_dim, freq_dim=256, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=1024, **extra)
    return randomize_(model, seed).eval()
