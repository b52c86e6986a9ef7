"""The umT5 tokenizer: ids equal transformers' T5Tokenizer on the same SentencePiece model (trained here, tiny),
official text cleaning, padding / truncation / mask, and every tokenizer source incl. the ComfyUI tensor."""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

import pytest
import torch

from wan_core.models.tokenizer import (
    SPIECE_KEY,
    UMT5Tokenizer,
    clean_prompt,
    find_tokenizer,
    load_tokenizer,
    save_spiece_into,
)

_CORPUS = [
    "A cat sits on a red sofa in the afternoon sun, soft light.",
    "Two dogs run across a snowy field at dawn, cinematic, 4k.",
    "Un chat noir dort près de la fenêtre, café crème et croissant.",
    "Ein Mann läuft über die Brücke bei Nacht & Regen.",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止",
    "The quick brown fox jumps over the lazy dog 123 times!",
    "A timelapse of clouds over mountains; \"quoted\" words <and> symbols.",
    "El perro corre por la playa, niños juegan con una pelota.",
]

# Prompts for the agreement check: accents, full-width and compatibility characters (NFKC), CJK, emoji and
# characters missing from the vocabulary (<unk>), HTML entities (double-escaped too), mojibake, messy whitespace.
PROMPTS = [
    "A cat sits on a red sofa",
    "   Two   dogs\trun\n\nacross a field   ",
    "Un café crème ｆｕｌｌ－ｗｉｄｔｈ ① ™ ½",
    "色调艳丽，过曝，静态 with an English tail",
    "emoji 🐱 and unseen letters ЖЩЫ qqq",
    "Tom &amp; Jerry &amp;amp; friends &lt;3 &quot;hi&quot;",
    "cafÃ© mojibake and a non\u00a0breaking space\u3000ideographic",
    "",
]


def _train_spiece(sentences: list[str], vocab_size: int = 160) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 6), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, normalization_rule_name="nmt_nfkc",
        hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def spiece() -> bytes:
    return _train_spiece(_CORPUS)


@pytest.fixture(scope="module")
def hf_tokenizer(spiece: bytes, tmp_path_factory: pytest.TempPathFactory):
    from transformers import T5Tokenizer

    folder = tmp_path_factory.mktemp("hf_tok")
    (folder / "spiece.model").write_bytes(spiece)
    return T5Tokenizer.from_pretrained(str(folder), extra_ids=0)


def _reference_clean(text: str) -> str:
    """The official prompt cleaning written out independently: ftfy, unescape twice, collapse whitespace, strip."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def test_ids_equal_transformers_t5_tokenizer(spiece: bytes, hf_tokenizer) -> None:
    ours = UMT5Tokenizer(spiece)
    assert ours.vocab_size < 256 and ours.eos_id == 1 and ours.pad_id == 0
    for prompt in PROMPTS:
        expected = hf_tokenizer(_reference_clean(prompt)).input_ids
        assert ours.tokenize(prompt) == expected, prompt
        assert expected[-1] == 1
    assert any(2 in ours.tokenize(p) for p in PROMPTS)  # the <unk> path is exercised


def test_padded_batch_and_truncation_equal_transformers(spiece: bytes, hf_tokenizer) -> None:
    long_prompt = " ".join(_CORPUS * 12)  # far more than 512 tokens
    prompts = [*PROMPTS, long_prompt]
    ids, mask = UMT5Tokenizer(spiece)(prompts)
    ref = hf_tokenizer([_reference_clean(p) for p in prompts], padding="max_length", truncation=True,
                       max_length=512, return_tensors="pt")
    assert ids.shape == mask.shape == (len(prompts), 512)
    assert ids.dtype == mask.dtype == torch.int64
    assert torch.equal(ids, ref.input_ids)
    assert torch.equal(mask, ref.attention_mask)
    assert mask[-1].all() and ids[-1, -1] == 1  # truncated: 511 pieces then EOS
    assert mask[-2].sum() == 1 and ids[-2, 0] == 1  # the empty prompt is just EOS


def test_text_len_is_respected(spiece: bytes) -> None:
    tok = UMT5Tokenizer(spiece, text_len=6)
    ids, mask = tok(["A cat sits on a red sofa in the afternoon sun", "a cat"])
    assert ids.shape == (2, 6) and ids[0, -1] == 1 and mask[0].all()
    assert tok.tokenize("a cat")[-1] == 1 and mask[1].sum() == len(tok.tokenize("a cat"))
    with pytest.raises(ValueError, match="text_len"):
        UMT5Tokenizer(spiece, text_len=0)


@pytest.mark.parametrize(("raw", "clean"), [
    ("  a   cat \n\t on  a mat  ", "a cat on a mat"),
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("double &amp;amp; escaped &amp;lt;b&amp;gt;", "double & escaped <b>"),
    ("caf\u00c3\u00a9", "café"),  # UTF-8 read as Latin-1, repaired by ftfy
    ("non\u00a0breaking\u3000spaces\u2028here", "non breaking spaces here"),
    ("\n\n", ""),
])
def test_official_cleaning(raw: str, clean: str) -> None:
    assert clean_prompt(raw) == clean


def test_cleaning_is_applied_before_tokenizing(spiece: bytes) -> None:
    tok = UMT5Tokenizer(spiece)
    assert tok.tokenize("  Tom &amp;amp;  Jerry \n") == tok.tokenize("Tom & Jerry")


def test_sources_folder_file_bytes_tensor(spiece: bytes, hf_tokenizer, tmp_path: Path) -> None:
    expected = UMT5Tokenizer(spiece).tokenize(PROMPTS[2])
    (tmp_path / "official" / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "official" / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece)
    hf_dir = tmp_path / "hf"
    hf_tokenizer.save_pretrained(str(hf_dir))
    (hf_dir / "spiece.model").write_bytes(spiece)  # HF umt5 folders ship spiece.model next to tokenizer.json
    model_file = tmp_path / "tok.model"
    model_file.write_bytes(spiece)
    sd = save_spiece_into({}, spiece)
    assert sd[SPIECE_KEY].dtype == torch.uint8 and sd[SPIECE_KEY].numel() == len(spiece)
    for source in (tmp_path / "official" / "google" / "umt5-xxl", str(hf_dir), model_file, spiece, sd[SPIECE_KEY],
                   UMT5Tokenizer(spiece)):
        tok = load_tokenizer(source)
        assert tok.tokenize(PROMPTS[2]) == expected, source
    assert load_tokenizer(sd[SPIECE_KEY]).model_bytes == spiece
    assert save_spiece_into({}, UMT5Tokenizer(spiece))[SPIECE_KEY].numpy().tobytes() == spiece


def test_resolution_order(spiece: bytes, tmp_path: Path) -> None:
    other = _train_spiece(_CORPUS[:4], vocab_size=60)
    ckpt = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    with pytest.raises(FileNotFoundError) as err:
        find_tokenizer(ckpt)
    message = str(err.value)
    assert "spiece_model" in message and "tokenizer=" in message
    assert str(tmp_path / "google" / "umt5-xxl" / "spiece.model") in message
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "google" / "umt5-xxl" / "spiece.model").write_bytes(other)
    assert find_tokenizer(ckpt).model_bytes == other  # official folder next to the checkpoint
    embedded = save_spiece_into({}, spiece)[SPIECE_KEY]
    assert find_tokenizer(ckpt, embedded).model_bytes == spiece  # the embedded tensor wins


def test_bad_tokenizer_inputs(spiece: bytes, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path} has no spiece.model")):
        UMT5Tokenizer.from_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        UMT5Tokenizer(b"definitely not a protobuf" * 3)
    with pytest.raises(ValueError, match="empty"):
        UMT5Tokenizer(b"")
    with pytest.raises(ValueError, match="1-D uint8"):
        UMT5Tokenizer.from_tensor(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(ValueError, match="cannot make a umT5 tokenizer from a int"):
        load_tokenizer(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        save_spiece_into({}, spiece[: len(spiece) // 3])
    with pytest.raises(ValueError, match="prompts must be strings"):
        UMT5Tokenizer(spiece)(["ok", None])  # type: ignore[list-item]
