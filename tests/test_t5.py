"""umT5 encoder parity against transformers' UMT5EncoderModel through the real key map (tiny fp32
config), the official encode pipeline (clean, EOS, mask, trim), batching, and every file layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.numerics import assert_float32_parity, float64_copy, float64_run, float64_upcasts
from tests.test_tokenizer import _CORPUS, _reference_clean, _train_spiece
from tests.tiny import randomize_
from wan_core.loading.checkpoint import CheckpointError
from wan_core.loading.convert import T5_HF, T5_HF_EXTRA, rename
from wan_core.models.config import CONFIG_METADATA_KEY, DiTConfig, T5Config, config_to_json
from wan_core.models.ops import CastLinear
from wan_core.models.t5 import T5Encoder, UMT5Encoder, detect_t5_config, fp16_clamp, load_t5, relative_position_bucket
from wan_core.models.tokenizer import SPIECE_KEY, UMT5Tokenizer, save_spiece_into

TINY_T5 = T5Config(vocab_size=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
PROMPTS = ["A cat sits on a red sofa", "  Two dogs &amp; a   fox run across a snowy field at dawn, cinematic  ",
           "色调艳丽，过曝", ""]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_umt5(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    model = UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False))
    return randomize_(model, seed, scale=0.5).eval()


def _official_sd(ref) -> dict[str, torch.Tensor]:
    return rename(ref.state_dict(), T5_HF, to_ours=True, what="test", ignore=lambda k: k in T5_HF_EXTRA)


def _ours_from(ref) -> UMT5Encoder:
    model = UMT5Encoder(TINY_T5)
    model.load_state_dict(_official_sd(ref))
    return model.eval()


@pytest.fixture(scope="module")
def ref():
    return hf_umt5()


@pytest.fixture(scope="module")
def spiece() -> bytes:
    return _train_spiece(_CORPUS)


@pytest.fixture(scope="module")
def hf_tok(spiece: bytes, tmp_path_factory: pytest.TempPathFactory):
    from transformers import T5Tokenizer

    folder = tmp_path_factory.mktemp("hf_tok")
    (folder / "spiece.model").write_bytes(spiece)
    return T5Tokenizer.from_pretrained(str(folder), extra_ids=0)


@pytest.fixture(scope="module")
def ref_outputs(ref, hf_tok) -> list[torch.Tensor]:
    return _reference_encode(ref, hf_tok, PROMPTS)


@pytest.fixture(scope="module")
def ref_outputs64(ref, hf_tok) -> list[torch.Tensor]:
    return _reference_encode(ref, hf_tok, PROMPTS, float64=True)


def _reference_encode(ref, hf_tok, prompts: list[str], float64: bool = False) -> list[torch.Tensor]:
    """The official pipeline on the references: HF tokenizer (padding 512, truncation), HF model, trim by mask;
    with float64, the model runs in float64 (tests.numerics.float64_run)."""
    batch = hf_tok([_reference_clean(p) for p in prompts], padding="max_length", truncation=True, max_length=512,
                   return_tensors="pt")
    if float64:
        hidden = float64_run(ref, input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    else:
        with torch.no_grad():
            hidden = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return [h[:n] for h, n in zip(hidden, batch.attention_mask.sum(1).tolist())]


def _hf_file_sd(ref, spiece: bytes | None) -> dict[str, torch.Tensor]:
    """A ComfyUI-style umt5_xxl file: HF names, the tied embedding copy, and optionally the tokenizer tensor."""
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    return save_spiece_into(sd, spiece) if spiece is not None else sd


# ----------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------


def test_encoder_matches_transformers_on_real_tokens(ref) -> None:
    ours = _ours_from(ref)
    gen = torch.Generator().manual_seed(1)
    lengths = [20, 300]  # 300 also exercises the log-spaced buckets and the > max_distance bucket
    ids = torch.randint(3, 256, (2, 512), generator=gen)
    mask = (torch.arange(512)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    exact = float64_run(ref, input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.shape == expected.shape == (2, 512, 32)
    for row, n in enumerate(lengths):
        assert_float32_parity(got[row, :n], expected[row, :n], exact[row, :n])


def test_relative_position_buckets_match_transformers(ref) -> None:
    attn = ref.encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(-700, 701)[None, :]
    expected = attn._relative_position_bucket(rel)
    assert torch.equal(relative_position_bucket(rel, 32, 128), expected)
    assert expected.unique().numel() == 31  # every bucket is reached except 16 (= positive distance 0)


def test_every_block_has_its_own_position_bias(ref) -> None:
    ours = _ours_from(ref)
    tables = [b.pos_embedding.embedding.weight for b in ours.blocks]
    assert tables[0].shape == (32, 4) and not torch.equal(tables[0], tables[1])
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = ours(ids)
        ours.blocks[1].pos_embedding.embedding.weight.add_(0.3)
        changed = ours(ids)
    assert not torch.allclose(base, changed)


def test_encode_pipeline_matches_official_reference(ref, hf_tok, spiece: bytes) -> None:
    encoder = T5Encoder(_ours_from(ref), UMT5Tokenizer(spiece))
    long_prompt = " ".join(_CORPUS * 12)  # truncated at 512 tokens
    prompts = [*PROMPTS, long_prompt]
    expected = _reference_encode(ref, hf_tok, prompts)
    exact = _reference_encode(ref, hf_tok, prompts, float64=True)
    got = encoder.encode(prompts)
    assert [g.shape[0] for g in got] == [e.shape[0] for e in expected]
    assert got[-1].shape == (512, 32) and got[-2].shape == (1, 32)  # truncated; empty prompt = EOS only
    for g, e, e64 in zip(got, expected, exact):
        assert g.dtype == torch.float32
        assert_float32_parity(g, e, e64)


def test_outputs_are_trimmed_to_the_real_token_count(ref, spiece: bytes) -> None:
    tok = UMT5Tokenizer(spiece)
    encoder = T5Encoder(_ours_from(ref), tok)
    for prompt, out in zip(PROMPTS, encoder.encode(PROMPTS)):
        assert out.shape == (len(tok.tokenize(prompt)), 32)
    single = encoder.encode(PROMPTS[0])  # a bare string is one prompt
    assert len(single) == 1 and single[0].shape[0] == len(tok.tokenize(PROMPTS[0]))
    assert encoder.encode([]) == []


def test_batch_equals_one_at_a_time_and_full_padding(ref, spiece: bytes) -> None:
    ours, tok = _ours_from(ref), UMT5Tokenizer(spiece)
    together = T5Encoder(ours, tok, batch_size=8).encode(PROMPTS)
    chunked = T5Encoder(ours, tok, batch_size=3).encode(PROMPTS)
    full_padding = T5Encoder(ours, tok, pad_to_text_len=True).encode(PROMPTS)
    alone = [T5Encoder(ours, tok).encode([p])[0] for p in PROMPTS]
    with torch.no_grad(), float64_upcasts():
        exact = T5Encoder(float64_copy(ours), tok, batch_size=8).encode(PROMPTS)
    for outputs in (chunked, full_padding, alone):
        for a, b, e in zip(outputs, together, exact):
            assert a.shape == b.shape
            assert_float32_parity(a, b, e)  # only the summation order differs
    storages = {t.untyped_storage().data_ptr() for t in together}
    assert len(storages) == len(together)  # each output owns its storage (safe to save individually)


def test_bf16_run_and_device_dtype_moves(ref, hf_tok, spiece: bytes) -> None:
    encoder = T5Encoder(_ours_from(ref), UMT5Tokenizer(spiece))
    assert encoder.to(dtype=torch.bfloat16) is encoder and encoder.dtype == torch.bfloat16
    assert encoder.device == torch.device("cpu")
    ref_bf16 = hf_umt5().to(torch.bfloat16)
    for got, want in zip(encoder.encode(PROMPTS), _reference_encode(ref_bf16, hf_tok, PROMPTS)):
        assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
        # both round differently in bf16 (8 significant bits; these random weights make attention sharp, so each
        # is ~0.28 away from fp32): a sanity bound, not a parity claim. Measured 0.032 at most.
        assert _rel(got.float(), want.float()) < 0.1


def test_state_dict_uses_official_names() -> None:
    model = UMT5Encoder(TINY_T5)
    per_block = {"norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                 "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight",
                 "ffn.fc2.weight"}
    expected = {"token_embedding.weight", "norm.weight"} | {f"blocks.{i}.{k}" for i in range(2) for k in per_block}
    assert set(model.state_dict()) == expected
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 14 and all(isinstance(m, CastLinear) and m.bias is None for m in linears)


def test_fp16_clamp_only_in_fp16() -> None:
    big = torch.finfo(torch.float16).max
    x = torch.tensor([1.0, -3.0, big, float("inf"), -float("inf")], dtype=torch.float16)
    clamped = fp16_clamp(x)
    limit = torch.tensor(big - 1000, dtype=torch.float16)
    assert torch.equal(clamped, torch.stack([x[0], x[1], limit, limit, -limit]))
    finite = torch.tensor([1.0, big, -big], dtype=torch.float16)
    assert torch.equal(fp16_clamp(finite), finite)  # no inf -> untouched
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.tensor([1e30, float("inf")], dtype=dtype)
        assert fp16_clamp(y) is y


def test_fp16_overflow_is_clamped_end_to_end(ref) -> None:
    model = _ours_from(ref).half()
    with torch.no_grad():  # residual stream near the fp16 limit, so the FFN residual add overflows to inf
        model.token_embedding.weight.copy_(60000 * model.token_embedding.weight.sign())
        model.blocks[0].ffn.fc2.weight.mul_(5e3)
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = model.token_embedding(ids)
        block = model.blocks[0]
        assert torch.isinf(x + block.ffn(block.norm2(x))).any()
        y = block(x, None)
        out = model(ids)
    limit = torch.tensor(torch.finfo(torch.float16).max - 1000, dtype=torch.float16)
    assert torch.isfinite(y).all() and (y.abs() == limit).any()  # the official clamp fired
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------------
# Loading: every layout
# ----------------------------------------------------------------------------------------------------------------


def _quantize_fp8(sd: dict[str, torch.Tensor], scale_suffix: str) -> dict[str, torch.Tensor]:
    """ComfyUI scaled fp8: Linear weights stored as fp8 with a per-tensor fp32 scale (w ≈ fp8 · scale)."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in sd.items():
        if key.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")):
            scale = value.abs().max() / 448.0
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + scale_suffix] = scale.reshape(())
            if scale_suffix == "weight_scale":  # the newer format also carries these
                out[key[: -len("weight")] + "input_scale"] = torch.tensor(1.0)
                out[key[: -len("weight")] + "comfy_quant"] = torch.tensor(list(b'{"format":"float8_e4m3fn"}'),
                                                                          dtype=torch.uint8)
        else:
            out[key] = value
    return out


def _write(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    if path.suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("layout", ["official_pth", "encoder_prefixed_pth", "hf_safetensors", "hf_only_tied_copy",
                                    "hf_full_model", "fp16_safetensors", "bf16_safetensors"])
def test_layouts_load_with_official_names(layout: str, ref, ref_outputs, ref_outputs64, spiece: bytes,
                                          tmp_path: Path) -> None:
    official = _official_sd(ref)
    tokenizer = None
    if layout == "official_pth":
        path = _write(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", official)
        (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)  # official tokenizer folder next to the weights
        (tmp_path / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece)
    elif layout == "encoder_prefixed_pth":
        path = _write(tmp_path / "t5.pth", {f"encoder.{k}": v for k, v in official.items()})
        tokenizer = spiece
    elif layout == "hf_only_tied_copy":
        sd = _hf_file_sd(ref, spiece)
        sd.pop("shared.weight")
        path = _write(tmp_path / "umt5.safetensors", sd)
    elif layout == "hf_full_model":  # an encoder-decoder export: decoder and LM head are ignored
        sd = _hf_file_sd(ref, None)
        sd["decoder.final_layer_norm.weight"] = torch.ones(32)
        sd["lm_head.weight"] = torch.zeros(256, 32)
        path = _write(tmp_path / "umt5_full.safetensors", sd)
        tokenizer = tmp_path / "tok.model"
        tokenizer.write_bytes(spiece)
    else:
        dtype = {"fp16_safetensors": torch.float16, "bf16_safetensors": torch.bfloat16}.get(layout, torch.float32)
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _hf_file_sd(ref, spiece).items()}
        path = _write(tmp_path / f"umt5_xxl_{layout}.safetensors", sd)
    source_dtype = {"fp16_safetensors": torch.float16, "bf16_safetensors": torch.bfloat16}.get(layout)
    if source_dtype is not None:
        default = load_t5(path)
        assert default.dtype == torch.bfloat16  # the official encoder runs in bf16
        for key, value in default.model.state_dict().items():
            assert torch.equal(value, official[key].to(source_dtype).to(torch.bfloat16)), key
    encoder = load_t5(path, tokenizer=tokenizer, dtype=torch.float32)
    assert isinstance(encoder, T5Encoder) and encoder.config == TINY_T5 and encoder.dtype == torch.float32
    got_sd = encoder.model.state_dict()
    assert set(got_sd) == set(official)
    for key, value in got_sd.items():
        want = official[key] if source_dtype is None else official[key].to(source_dtype).float()
        assert torch.equal(value, want), key
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training
    if source_dtype is None:
        for g, e, e64 in zip(encoder.encode(PROMPTS), ref_outputs, ref_outputs64):
            assert_float32_parity(g, e, e64)


@pytest.mark.parametrize("scale_suffix", ["scale_weight", "weight_scale"])
def test_comfyui_scaled_fp8_is_dequantized(scale_suffix: str, ref, spiece: bytes, tmp_path: Path) -> None:
    file_sd = _quantize_fp8(_hf_file_sd(ref, spiece), scale_suffix)
    path = _write(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", file_sd)
    encoder = load_t5(path, dtype=torch.float32)
    official = _official_sd(ref)
    q_key = "encoder.block.1.layer.0.SelfAttention.q.weight"
    expected_q = file_sd[q_key].float() * file_sd[q_key[: -len("weight")] + scale_suffix]
    got = encoder.model.state_dict()
    assert torch.equal(got["blocks.1.attn.q.weight"], expected_q)
    assert torch.equal(got["blocks.1.norm1.weight"], official["blocks.1.norm1.weight"])  # not quantised
    assert _rel(got["blocks.1.attn.q.weight"], official["blocks.1.attn.q.weight"]) < 0.07  # e4m3: 3 mantissa bits
    assert load_t5(path).dtype == torch.bfloat16  # fp8 files default to bf16 compute
    out = encoder.encode(PROMPTS[:2])
    assert all(torch.isfinite(o).all() for o in out)


def test_config_from_argument_metadata_and_shapes(ref, spiece: bytes, tmp_path: Path) -> None:
    official = _official_sd(ref)
    assert detect_t5_config(official) == TINY_T5
    custom = dataclasses.replace(TINY_T5, max_distance=64)  # not visible in the shapes
    path = _write(tmp_path / "t5.safetensors", save_spiece_into(dict(official), spiece),
                  metadata={CONFIG_METADATA_KEY: config_to_json(custom)})
    assert load_t5(path).config == custom
    assert load_t5(path, config=TINY_T5).config == TINY_T5
    wrong = _write(tmp_path / "dit_config.safetensors", save_spiece_into(dict(official), spiece),
                   metadata={CONFIG_METADATA_KEY: config_to_json(DiTConfig())})
    with pytest.raises(ValueError, match="holds a DiTConfig, not a T5Config"):
        load_t5(wrong)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_missing_tokenizer_says_what_to_pass(ref, tmp_path: Path) -> None:
    path = _write(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", _official_sd(ref))
    with pytest.raises(FileNotFoundError) as err:
        load_t5(path)
    message = str(err.value)
    assert "no umT5 tokenizer" in message and "tokenizer=<folder containing spiece.model>" in message
    assert str(tmp_path / "google" / "umt5-xxl") in message


def test_unknown_layouts_and_corrupt_files(ref, spiece: bytes, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_t5(tmp_path / "nope.safetensors", tokenizer=spiece)
    dit_like = _write(tmp_path / "dit.safetensors", {"head.modulation": torch.zeros(1, 2, 8)})
    with pytest.raises(ValueError, match="is not a umT5 text encoder"):
        load_t5(dit_like, tokenizer=spiece)
    extra = _hf_file_sd(ref, spiece)
    extra["encoder.block.0.layer.2.Mystery.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unknown key layout for umT5.*Mystery"):
        load_t5(_write(tmp_path / "extra.safetensors", extra))
    missing = _official_sd(ref)
    missing.pop("blocks.1.ffn.fc2.weight")
    with pytest.raises(CheckpointError, match="missing key.*blocks.1.ffn.fc2.weight"):
        load_t5(_write(tmp_path / "missing.pth", missing), tokenizer=spiece)
    good = _write(tmp_path / "good.safetensors", _hf_file_sd(ref, spiece))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_t5(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_t5(garbage, tokenizer=spiece)
    with pytest.raises(ValueError, match="dtype must be a float compute dtype"):
        load_t5(good, dtype=torch.float8_e4m3fn)


def test_tokenizer_larger_than_the_embedding_is_rejected(ref, tmp_path: Path) -> None:
    big_vocab = _train_spiece(_CORPUS + [f"word{i} token{i * 7} piece{i * 13}" for i in range(300)], 400)
    with pytest.raises(ValueError, match=r"pieces but the text encoder's embedding has only 256 rows"):
        load_t5(_write(tmp_path / "t5.pth", _official_sd(ref)), tokenizer=big_vocab)
    corrupt = _hf_file_sd(ref, None)
    corrupt[SPIECE_KEY] = torch.arange(50, dtype=torch.uint8)
    with pytest.raises(ValueError, match="is not a valid SentencePiece model"):
        load_t5(_write(tmp_path / "bad_spiece.safetensors", corrupt))
