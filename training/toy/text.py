"""The toy text encoder: a SentencePiece tokenizer trained on the toy world's captions and a tiny umT5 encoder with
seeded random, frozen weights (official `UMT5Encoder` class and key names; the tokenizer embedded as ComfyUI does).

The tokenizer keeps every caption word (all colours, the reserved purple included, shapes and motion words) as
one piece, spells anything else with single characters (no byte fallback), and lower-cases its input (a tiny
normalisation table, so "A Red Square" and "a red square" tokenise alike). Random frozen weights are enough
because every caption word is its own token and the encoder keeps them apart; `caption_separation` measures it.
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from wan_core.loading.checkpoint import save_safetensors
from wan_core.models.config import CONFIG_METADATA_KEY, T5Config, config_to_json
from wan_core.models.t5 import T5Encoder, UMT5Encoder, load_t5
from wan_core.models.tokenizer import UMT5Tokenizer, save_spiece_into
from wan_core.toy.world import COLOURS, MOTIONS, SHAPES, all_combos

logger = logging.getLogger(__name__)

EXTRA_CHARACTERS = ("abcdefghijklmnopqrstuvwxyz ba ca", "0123456789 .,!?'-")
TOY_T5_CONFIG = T5Config(vocab_size=64, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2,
                         num_buckets=32, max_distance=128, text_len=32)


def all_captions() -> list[str]:
    """Every caption of the world, reserved colours included."""
    return [combo.caption for combo in all_combos(COLOURS, SHAPES, MOTIONS)]


def caption_words() -> list[str]:
    return sorted({word for caption in all_captions() for word in caption.split()})


def train_tokenizer(vocab_limit: int = TOY_T5_CONFIG.vocab_size) -> bytes:
    """Train the SentencePiece model (deterministic: one thread, fixed corpus) -> serialised model bytes.

    Ids follow umT5: <pad> 0, </s> 1, <unk> 2; no BOS."""
    words = caption_words()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "lowercase.tsv"
        rules.write_text("".join(f"{ord(c):X}\t{ord(c.lower()):X}\n" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(all_captions() + list(EXTRA_CHARACTERS)), model_writer=buffer,
            model_type="unigram", vocab_size=vocab_limit, hard_vocab_limit=False, character_coverage=1.0,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, user_defined_symbols=["\u2581" + w for w in words],
            normalization_rule_tsv=str(rules), num_threads=1, minloglevel=2)
    model = _without_rule_path(buffer.getvalue())
    tokenizer = UMT5Tokenizer(model, source="the toy tokenizer")
    if tokenizer.vocab_size > vocab_limit:
        raise RuntimeError(f"the toy tokenizer has {tokenizer.vocab_size} pieces, more than {vocab_limit}")
    for word in words:
        if len(tokenizer.tokenize(word)) != 2:
            raise RuntimeError(f"the toy tokenizer splits the caption word {word!r}")
    return model


def _without_rule_path(model: bytes) -> bytes:
    """Drop the (temporary) path of the normalisation table that the trainer records, so the bytes are
    reproducible; the compiled table itself stays in the model."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf, a development-only dependency

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.normalizer_spec.ClearField("normalization_rule_tsv")
    return proto.SerializeToString(deterministic=True)


def build_t5(seed: int, config: T5Config = TOY_T5_CONFIG) -> UMT5Encoder:
    """A `UMT5Encoder` with PyTorch's default initialisation drawn from `torch.Generator` seeded by `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = UMT5Encoder(config)
    return model.eval().requires_grad_(False)


def save_t5(model: UMT5Encoder, tokenizer_model: bytes, path: str | Path) -> Path:
    """Official key names (fp32), the tokenizer as the `spiece_model` tensor, the T5Config in the metadata."""
    tensors = save_spiece_into({k: v.float() for k, v in model.state_dict().items()}, tokenizer_model)
    return save_safetensors(tensors, path, {CONFIG_METADATA_KEY: config_to_json(model.config)})


@torch.no_grad()
def caption_separation(encoder: T5Encoder, captions: list[str] | None = None) -> tuple[float, float]:
    """(smallest, median) pairwise distance between caption embeddings (the empty caption included), each
    embedding zero-padded to the longest and divided by the mean embedding norm: how distinct captions stay."""
    captions = (captions or all_captions()) + [""]
    embeds = encoder.encode(captions)
    length = max(e.shape[0] for e in embeds)
    flat = torch.stack([torch.nn.functional.pad(e.float(), (0, 0, 0, length - e.shape[0])).flatten()
                        for e in embeds])  # [N, L*C]
    flat = flat / flat.norm(dim=1).mean()
    dist = torch.cdist(flat, flat)
    off = dist[~torch.eye(len(captions), dtype=torch.bool)]
    return float(off.min()), float(off.median())


def build_toy_text_encoder(path: str | Path, seed: int) -> tuple[float, float]:
    """Train the tokenizer, build the seeded encoder, save it; returns `caption_separation` of the saved file."""
    model_bytes = train_tokenizer()
    saved = save_t5(build_t5(seed), model_bytes, path)
    encoder = load_t5(saved)
    separation = caption_separation(encoder)
    logger.info("toy umT5 %s: vocab %d, caption separation min %.3f median %.3f", saved,
                encoder.tokenizer.vocab_size, *separation)
    return separation
