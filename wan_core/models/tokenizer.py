"""The umT5 tokenizer, on `sentencepiece` directly (no transformers at run time, never the network).

Behaviour follows the official Wan2.1 text pipeline: the prompt is cleaned (ftfy, HTML
entities unescaped twice, whitespace collapsed), tokenised without BOS, truncated so that the EOS token (id 1)
still fits, and padded with the pad token (id 0) to `text_len` (512), with an attention mask.

The SentencePiece model can come from a folder holding `spiece.model` (the official `google/umt5-xxl` folder or a
Hugging Face tokenizer folder), from a `.model` file, or from the `spiece_model` uint8 tensor that ComfyUI embeds in
its text-encoder files (`save_spiece_into` writes the same tensor into our own files).

Known difference from the Hugging Face tokenizer the official code uses: literal special-token strings inside a
prompt (e.g. "</s>", "<extra_id_0>") are tokenised as text, as ComfyUI does, instead of becoming special ids.
"""

from __future__ import annotations

import html
import logging
import os
import re
from collections.abc import MutableMapping, Sequence
from pathlib import Path

import sentencepiece as spm
import torch

logger = logging.getLogger(__name__)

SPIECE_KEY = "spiece_model"  # ComfyUI's tensor key for the serialised SentencePiece model
SPIECE_FILE = "spiece.model"
OFFICIAL_TOKENIZER_DIR = Path("google") / "umt5-xxl"  # relative to the official checkpoint folder
DEFAULT_TEXT_LEN = 512

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The official `clean="whitespace"` cleaning: ftfy.fix_text, html.unescape twice, collapse whitespace, strip."""
    try:
        import ftfy  # optional at run time (a clear error without it); ~0.1 s to import
    except ImportError:
        raise RuntimeError("the umT5 text cleaning needs the 'ftfy' package: pip install ftfy") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer:
    """Cleans, tokenises (EOS appended, no BOS), truncates and pads prompts to `text_len`."""

    def __init__(self, model_proto: bytes, text_len: int = DEFAULT_TEXT_LEN, source: str = "<bytes>") -> None:
        if text_len < 1:
            raise ValueError(f"text_len must be at least 1 (room for the EOS token), got {text_len}")
        if not model_proto:
            raise ValueError(f"the SentencePiece model from {source} is empty")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=bytes(model_proto))
        except Exception as exc:  # sentencepiece raises RuntimeError / OSError with terse protobuf messages
            raise ValueError(f"{source} is not a valid SentencePiece model ({len(model_proto)} bytes): "
                             f"{exc}") from None
        self._proto = bytes(model_proto)
        self.text_len = text_len
        self.source = source
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"the SentencePiece model from {source} defines no EOS piece; umT5 needs '</s>' (id 1)")
        self.pad_id = max(self._sp.pad_id(), 0)  # T5 convention: <pad> = 0

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | os.PathLike, text_len: int = DEFAULT_TEXT_LEN) -> UMT5Tokenizer:
        """A folder that holds `spiece.model` (official or Hugging Face layout), or a SentencePiece `.model` file."""
        path = Path(path)
        if path.is_dir():
            model_file = path / SPIECE_FILE
            if not model_file.is_file():
                present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
                raise FileNotFoundError(f"tokenizer folder {path} has no {SPIECE_FILE} (it holds: {present}); the "
                                        f"umT5 tokenizer needs the SentencePiece model file {SPIECE_FILE}")
            path = model_file
        elif not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path} (expected a folder with {SPIECE_FILE} or a "
                                    f"SentencePiece .model file)")
        return cls(path.read_bytes(), text_len, source=str(path))

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, text_len: int = DEFAULT_TEXT_LEN,
                    source: str = f"the '{SPIECE_KEY}' tensor") -> UMT5Tokenizer:
        """The uint8 `spiece_model` tensor ComfyUI embeds in its text-encoder checkpoints."""
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise ValueError(f"{source} must be a 1-D uint8 tensor holding a serialised SentencePiece model, got "
                             f"{tensor.dtype} of shape {list(tensor.shape)}")
        return cls(tensor.cpu().numpy().tobytes(), text_len, source=source)

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_bytes(self) -> bytes:
        """The serialised SentencePiece model (what `save_spiece_into` embeds)."""
        return self._proto

    # -- tokenising -----------------------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        """Cleaned prompt -> token ids ending with EOS, at most `text_len` of them."""
        return self._ids([prompt])[0]

    def _ids(self, prompts: Sequence[str]) -> list[list[int]]:
        cleaned = [clean_prompt(p) for p in prompts]
        pieces = self._sp.encode(cleaned)
        return [ids[: self.text_len - 1] + [self.eos_id] for ids in pieces]

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (ids [B, text_len] int64 padded with pad_id, mask [B, text_len] int64: 1 = real token)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {', '.join(sorted(set(bad)))}")
        ids = torch.full((len(prompts), self.text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.text_len), dtype=torch.long)
        for row, tokens in enumerate(self._ids(prompts)):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"UMT5Tokenizer(vocab={self.vocab_size}, text_len={self.text_len}, source={self.source!r})"


def load_tokenizer(source: UMT5Tokenizer | str | os.PathLike | bytes | torch.Tensor,
                   text_len: int = DEFAULT_TEXT_LEN) -> UMT5Tokenizer:
    """A tokenizer from an instance (returned as is), a folder / `.model` path, model bytes or a uint8 tensor."""
    if isinstance(source, UMT5Tokenizer):
        return source
    if isinstance(source, (bytes, bytearray)):
        return UMT5Tokenizer(bytes(source), text_len)
    if isinstance(source, torch.Tensor):
        return UMT5Tokenizer.from_tensor(source, text_len)
    if isinstance(source, (str, os.PathLike)):
        return UMT5Tokenizer.from_path(source, text_len)
    raise ValueError(f"cannot make a umT5 tokenizer from a {type(source).__name__}; pass a folder with "
                     f"{SPIECE_FILE}, a .model file, the model bytes or a UMT5Tokenizer")


def find_tokenizer(checkpoint: str | os.PathLike, embedded: torch.Tensor | None = None,
                   text_len: int = DEFAULT_TEXT_LEN) -> UMT5Tokenizer:
    """Resolution when no tokenizer is given: the checkpoint's embedded `spiece_model` tensor, then the official
    `google/umt5-xxl` folder next to the checkpoint; otherwise a FileNotFoundError saying what to pass."""
    if embedded is not None:
        return UMT5Tokenizer.from_tensor(embedded, text_len, source=f"the '{SPIECE_KEY}' tensor of {checkpoint}")
    official = Path(checkpoint).parent / OFFICIAL_TOKENIZER_DIR
    if (official / SPIECE_FILE).is_file():
        return UMT5Tokenizer.from_path(official, text_len)
    raise FileNotFoundError(
        f"no umT5 tokenizer for {checkpoint}: the file embeds no '{SPIECE_KEY}' tensor and {official / SPIECE_FILE} "
        f"does not exist. Pass tokenizer=<folder containing {SPIECE_FILE}> (e.g. the google/umt5-xxl folder of "
        f"Wan-AI/Wan2.1-T2V-14B) or tokenizer=<path to a SentencePiece .model file>, or put that folder at {official}"
    )


def save_spiece_into(state_dict: MutableMapping[str, torch.Tensor],
                     model_bytes: bytes | UMT5Tokenizer) -> MutableMapping[str, torch.Tensor]:
    """Embed a SentencePiece model as ComfyUI does (uint8 tensor under `spiece_model`); returns `state_dict`."""
    if isinstance(model_bytes, UMT5Tokenizer):
        model_bytes = model_bytes.model_bytes
    UMT5Tokenizer(model_bytes, source="the model bytes given to save_spiece_into")  # validate before embedding
    state_dict[SPIECE_KEY] = torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8)
    return state_dict
