"""A complete tiny random Wan2.1 model set written to disk (configs in the files' metadata), for end-to-end tests
of the CLI, the nodes and the trainer. Weights are random: outputs are checked for shapes, determinism and
plumbing, never for content."""

from __future__ import annotations

import dataclasses
import io
from functools import cache
from pathlib import Path

import sentencepiece as spm
import torch

from tests.tiny import TINY_DIT, randomize_
from wan_core.loading.checkpoint import save_safetensors
from wan_core.models.clip import CLIPVision
from wan_core.models.config import CONFIG_METADATA_KEY, CLIPVisionConfig, T5Config, VAEConfig, config_to_json
from wan_core.models.dit import WanModel
from wan_core.models.t5 import UMT5Encoder
from wan_core.models.tokenizer import save_spiece_into
from wan_core.models.vae import WanVAEModel

TINY_CLIP = CLIPVisionConfig(dim=32, num_heads=4, num_layers=3)
TINY_T5 = T5Config(vocab_size=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
TINY_VAE = VAEConfig(dim=8)
DIT_KINDS = {
    "t2v": TINY_DIT,
    "i2v": dataclasses.replace(TINY_DIT, in_dim=36, model_type="i2v", clip_dim=TINY_CLIP.dim),
    "flf2v": dataclasses.replace(TINY_DIT, in_dim=36, model_type="flf2v", clip_dim=TINY_CLIP.dim),
    "fc": dataclasses.replace(TINY_DIT, in_dim=48, model_type="i2v", clip_dim=TINY_CLIP.dim),
}
CORPUS = ["a red square moving right", "a blue circle staying still", "a green triangle moving up",
          "a yellow square moving down", "a purple circle moving left", "a cat walking on grass",
          "low quality, blurry", "the quick brown fox jumps over the lazy dog"]


@cache
def spiece_bytes() -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=out, vocab_size=64,
                                   model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()


def _save(module: torch.nn.Module, config: object, path: Path, extra: dict | None = None) -> Path:
    sd = dict(module.state_dict())
    if extra:
        sd.update(extra)
    return save_safetensors(sd, path, {CONFIG_METADATA_KEY: config_to_json(config)})


def write_model_set(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write dit_{t2v,i2v,flf2v,fc}, vae, t5 (tokenizer embedded) and clip files; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (kind, cfg) in enumerate(DIT_KINDS.items()):
        dit = randomize_(WanModel(cfg), seed + i, scale=0.05)
        paths[f"dit_{kind}"] = _save(dit, cfg, folder / f"dit_{kind}.safetensors")
    paths["vae"] = _save(randomize_(WanVAEModel(TINY_VAE), seed, scale=0.1), TINY_VAE, folder / "vae.safetensors")
    t5 = randomize_(UMT5Encoder(TINY_T5), seed, scale=0.2)
    paths["t5"] = _save(t5, TINY_T5, folder / "t5.safetensors", save_spiece_into({}, spiece_bytes()))
    paths["clip"] = _save(randomize_(CLIPVision(TINY_CLIP), seed, scale=0.05), TINY_CLIP, folder / "clip.safetensors")
    return paths
