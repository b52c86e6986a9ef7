"""DiT parity against diffusers' WanTransformer3DModel through the real key conversion (tiny fp32 configs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.numerics import assert_float32_parity, float64_run
from tests.tiny import TINY_DIT, TINY_DIT_BY_TYPE, diffusers_dit, randomize_
from wan_core.loading.checkpoint import build_on_meta, load_into
from wan_core.loading.convert import DIT_DIFFUSERS, rename
from wan_core.models.config import TASKS, detect_config
from wan_core.models.dit import WanModel, rope_band_sizes, sinusoidal_embedding


def _ours_from(ref, kind: str) -> WanModel:
    sd = rename(ref.state_dict(), DIT_DIFFUSERS, to_ours=True, what="test")
    model = build_on_meta(lambda: WanModel(TINY_DIT_BY_TYPE[kind]))
    return load_into(model, sd).eval()


def _inputs(kind: str, batch: int = 1, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    cfg = TINY_DIT_BY_TYPE[kind]
    x = torch.randn(batch, 16, 5, 16, 16, generator=gen)
    y = torch.randn(batch, cfg.in_dim - 16, 5, 16, 16, generator=gen) if cfg.in_dim > 16 else None
    lengths = [7, 20, 3][:batch]
    context = [torch.randn(n, cfg.text_dim, generator=gen) for n in lengths]
    clip = torch.randn(batch, cfg.image_tokens, 1280, generator=gen) if cfg.has_image_input else None
    return x, y, context, clip


@pytest.mark.parametrize("kind", ["t2v", "i2v", "flf2v", "fc"])
@pytest.mark.parametrize("t", [999.0, 500.0, 0.0])
def test_dit_matches_diffusers(kind: str, t: float) -> None:
    ref = diffusers_dit(kind)
    ours = _ours_from(ref, kind)
    x, y, context, clip = _inputs(kind, batch=2)
    padded = torch.stack([torch.cat([c, c.new_zeros(512 - c.shape[0], c.shape[1])]) for c in context])
    timestep = torch.full((2,), t)
    with torch.no_grad():
        hidden = x if y is None else torch.cat([x, y], dim=1)
        ref_clip = clip if kind != "flf2v" else clip.reshape(-1, 257, 1280)  # diffusers takes [2B, 257, 1280]
        expected = ref(hidden, timestep, padded, encoder_hidden_states_image=ref_clip, return_dict=False)[0]
        got = ours(x, timestep, context, clip_fea=clip, y=y)
    exact = float64_run(ref, hidden, timestep, padded, encoder_hidden_states_image=ref_clip, return_dict=False)[0]
    assert got.shape == expected.shape == (2, 16, 5, 16, 16)
    assert got.dtype == torch.float32
    # diffusers rounds the timestep sinusoid to float32 even in its float64 run, which we compute in float64 as the
    # official code does: that rounding is part of the reference's own float32 error the bound is made of
    assert_float32_parity(got, expected, exact)


def test_state_dict_keys_are_the_official_names() -> None:
    model = build_on_meta(lambda: WanModel(TINY_DIT_BY_TYPE["flf2v"]))
    keys = set(model.state_dict())
    for key in ("patch_embedding.weight", "text_embedding.2.bias", "time_projection.1.weight", "blocks.1.modulation",
                "blocks.0.self_attn.norm_q.weight", "blocks.0.norm3.weight", "blocks.0.cross_attn.k_img.weight",
                "blocks.0.cross_attn.norm_k_img.weight", "blocks.1.ffn.2.bias", "head.head.weight", "head.modulation",
                "img_emb.proj.0.weight", "img_emb.proj.4.bias", "img_emb.emb_pos"):
        assert key in keys, key
    assert not any("norm1" in k or "norm2" in k for k in keys)  # non-affine LayerNorms have no keys


def test_skip_blocks_equals_a_model_without_those_blocks() -> None:
    cfg = dataclasses.replace(TINY_DIT, num_layers=3)
    full = randomize_(WanModel(cfg), seed=3).eval()
    sd = full.state_dict()
    short = WanModel(dataclasses.replace(cfg, num_layers=2)).eval()
    kept = {k.replace("blocks.2.", "blocks.1."): v for k, v in sd.items() if not k.startswith("blocks.1.")}
    short.load_state_dict(kept)
    x, _, context, _ = _inputs("t2v")
    t = torch.tensor([700.0])
    with torch.no_grad():
        skipped = full(x, t, context, skip_blocks=[1])
        assert torch.equal(skipped, short(x, t, context))
        assert not torch.allclose(skipped, full(x, t, context))


def test_batch_items_are_independent() -> None:
    ref = diffusers_dit("t2v")
    ours = _ours_from(ref, "t2v")
    x, _, context, _ = _inputs("t2v", batch=2)
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        both = ours(x, t, context)
        first = ours(x[:1], t[:1], context[:1])
    assert_float32_parity(both[:1], first, float64_run(ours, x[:1], t[:1], context[:1]))


def test_text_context_is_zero_padded_to_512_and_unmasked() -> None:
    """Trailing zero rows in the T5 output change nothing (they equal the padding), but the padding is attended."""
    ours = _ours_from(diffusers_dit("t2v"), "t2v")
    x, _, context, _ = _inputs("t2v")
    t = torch.tensor([500.0])
    with torch.no_grad():
        base = ours(x, t, context)
        with_zeros = ours(x, t, [torch.cat([context[0], torch.zeros(5, 32)])])
        torch.testing.assert_close(base, with_zeros, rtol=0, atol=0)
    with pytest.raises(ValueError, match="text context must be"):
        ours(x, t, [torch.zeros(513, 32)])


def test_rope_split_and_sinusoid() -> None:
    assert rope_band_sizes(128) == (22, 21, 21)  # 44/42/42 real dims
    assert rope_band_sizes(16) == (4, 2, 2)
    emb = sinusoidal_embedding(256, torch.tensor([0.0, 937.0]))
    assert emb.dtype == torch.float64
    assert torch.equal(emb[0, :128], torch.ones(128, dtype=torch.float64))  # cos first
    half = torch.arange(128, dtype=torch.float64) / 128
    expected = torch.cat([torch.cos(937.0 * 10000.0 ** -half), torch.sin(937.0 * 10000.0 ** -half)])
    torch.testing.assert_close(emb[1], expected, rtol=0, atol=1e-12)


def test_image_models_validate_clip_tokens() -> None:
    ours = _ours_from(diffusers_dit("i2v"), "i2v")
    x, y, context, clip = _inputs("i2v")
    with pytest.raises(ValueError, match=r"clip_fea must be \[B, 257, 1280\]"):
        ours(x, torch.tensor([1.0]), context, clip_fea=clip[:, :100], y=y)
    with pytest.raises(ValueError, match="36 input channels"):
        ours(x, torch.tensor([1.0]), context, clip_fea=clip)
    t2v = _ours_from(diffusers_dit("t2v"), "t2v")
    with pytest.raises(ValueError, match="text-to-video"):
        t2v(x, torch.tensor([1.0]), context, clip_fea=clip)


@pytest.mark.parametrize("kind", ["t2v", "i2v", "flf2v", "fc"])
def test_detect_config_from_shapes(kind: str) -> None:
    cfg = TINY_DIT_BY_TYPE[kind]
    model = build_on_meta(lambda: WanModel(cfg))
    assert detect_config(model.state_dict(), num_heads=cfg.num_heads) == cfg


def test_detect_config_reads_the_clip_width_of_image_models() -> None:
    import dataclasses

    for kind in ("i2v", "flf2v"):
        cfg = dataclasses.replace(TINY_DIT_BY_TYPE[kind], clip_dim=48)
        assert detect_config(build_on_meta(lambda cfg=cfg: WanModel(cfg)).state_dict(), num_heads=cfg.num_heads) == cfg


def test_presets_have_the_published_parameter_counts() -> None:
    def count(task: str) -> int:
        model = build_on_meta(lambda: WanModel(TASKS[task].dit))
        return sum(p.numel() for p in model.parameters())

    assert round(count("t2v-1.3B") / 1e9, 3) == 1.419
    assert round(count("t2v-14B") / 1e9, 3) == 14.288
    assert round(count("i2v-14B") / 1e9, 3) == 16.395
    assert detect_config(build_on_meta(lambda: WanModel(TASKS["i2v-14B"].dit)).state_dict()) == TASKS["i2v-14B"].dit


def test_rope_in_slices_equals_rope_in_one_piece(monkeypatch) -> None:
    import wan_core.models.dit as model_module
    from wan_core.models.dit import apply_rope, rope_table

    x = torch.randn(2, 3 * 4 * 5, 4, 16, dtype=torch.bfloat16)
    rope = rope_table((3, 4, 5), 16, torch.device("cpu"))
    whole = apply_rope(x, rope)
    monkeypatch.setattr(model_module, "ROPE_CHUNK_ELEMENTS", 7 * 2 * 4 * 16)  # 7 tokens per slice
    assert torch.equal(apply_rope(x, rope), whole)
    # independent check of one token: pair (x0, x1) rotated by the angle of its position
    cos, sin = rope
    x0, x1 = x[1, 9, 2, 4].double(), x[1, 9, 2, 5].double()
    expected = (x0 * cos[9, 0, 2] - x1 * sin[9, 0, 2]).to(torch.bfloat16)
    assert whole[1, 9, 2, 4] == expected


def test_patchify_equals_the_patch_embedding_conv() -> None:
    model = randomize_(WanModel(TINY_DIT_BY_TYPE["i2v"]), seed=4)
    x = torch.randn(2, 36, 3, 8, 12, generator=torch.Generator().manual_seed(5))
    tokens, grid = model.patchify(x)
    with torch.no_grad():
        conv = model.patch_embedding(x)  # [B, C, F, H/2, W/2]
    exact = float64_run(model.patch_embedding, x)
    assert grid == (3, 4, 6)
    assert_float32_parity(tokens, *(c.flatten(2).transpose(1, 2) for c in (conv, exact)))
