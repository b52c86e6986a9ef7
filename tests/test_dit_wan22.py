"""Wan2.2 DiT: per-token timesteps ([B, L], as TI2V-5B's image-to-video uses) against diffusers'
WanTransformer3DModel through the real key mapping, equality with the per-sample (Wan2.1) embedding when every
token has the same t, and the TI2V-5B preset."""

from __future__ import annotations

import pytest
import torch

from tests.numerics import assert_float32_parity, float64_run, rel_err
from tests.tiny import TINY_DIT, diffusers_dit
from wan_core.loading.checkpoint import build_on_meta, load_into
from wan_core.loading.convert import DIT_DIFFUSERS, rename
from wan_core.models.config import WAN22_TI2V_5B_DIT, detect_config, tasks_matching
from wan_core.models.dit import WanModel

FRAMES, SIZE = 5, 16
TOKENS = FRAMES * (SIZE // 2) ** 2


@pytest.fixture(scope="module")
def ref():
    return diffusers_dit("t2v")


@pytest.fixture(scope="module")
def ours(ref) -> WanModel:
    sd = rename(ref.state_dict(), DIT_DIFFUSERS, to_ours=True, what="test")
    return load_into(build_on_meta(lambda: WanModel(TINY_DIT)), sd).eval()


def _inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, FRAMES, SIZE, SIZE, generator=gen)
    context = torch.randn(batch, 512, TINY_DIT.text_dim, generator=gen)
    context[:, 20:] = 0  # zero padding, as T5 contexts are padded to 512
    return x, context


def _ti2v_timesteps(values: list[float]) -> torch.Tensor:
    """[B, L]: the first latent frame's tokens at t = 0 (the encoded image), the rest at the sample's t."""
    t = torch.tensor(values).view(-1, 1).repeat(1, TOKENS)
    t[:, : TOKENS // FRAMES] = 0.0
    return t


def test_per_token_timesteps_match_diffusers(ref, ours: WanModel) -> None:
    x, context = _inputs()
    t = _ti2v_timesteps([999.0, 437.5])
    with torch.no_grad():
        want32 = ref(x, t, context, return_dict=False)[0]
        got = ours(x, t, context)
    want64 = float64_run(ref, x, t, context, return_dict=False)[0]
    print(f"per-token t: max rel err {rel_err(got, want64):.3g} vs float64, {rel_err(got, want32):.3g} vs diffusers "
          f"fp32 (its own fp32 error {rel_err(want32, want64):.3g})")
    assert_float32_parity(got, want32, want64)
    with torch.no_grad():  # the first frame's t matters: a per-sample t gives a different prediction
        assert rel_err(ours(x, torch.tensor([999.0, 437.5]), context), got) > 1e-2


def test_one_t_per_sample_equals_the_wan21_broadcast(ours: WanModel) -> None:
    x, context = _inputs()
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        per_sample = ours(x, t, context)
        per_token = ours(x, t[:, None].expand(-1, TOKENS), context)
    # Same maths, not bitwise: the time embedding's matmuls run on B*L rows instead of B, and BLAS picks other
    # kernels / blocking for the larger shape, so the float32 rounding differs (measured max rel err 6.4e-7 on
    # CPU). The bound is float32 rounding of the same maths:
    print(f"per-token vs per-sample: bitwise equal {torch.equal(per_token, per_sample)}, "
          f"max rel err {rel_err(per_token, per_sample):.3g}")
    assert_float32_parity(per_token, per_sample, float64_run(ours, x, t, context))


def test_per_token_timesteps_must_cover_every_token(ours: WanModel) -> None:
    x, context = _inputs()
    with pytest.raises(ValueError, match=rf"\[B, L\] = \[2, {TOKENS}\].*got \[2, 7\]"):
        ours(x, torch.zeros(2, 7), context)


def test_ti2v_5b_preset_is_detected_from_shapes() -> None:
    sd = build_on_meta(lambda: WanModel(WAN22_TI2V_5B_DIT)).state_dict()
    assert detect_config(sd) == WAN22_TI2V_5B_DIT
    assert not WAN22_TI2V_5B_DIT.has_image_input and "img_emb.proj.0.weight" not in sd
    assert (WAN22_TI2V_5B_DIT.head_dim, WAN22_TI2V_5B_DIT.in_dim, WAN22_TI2V_5B_DIT.out_dim) == (128, 48, 48)
    assert tuple(sd["patch_embedding.weight"].shape) == (3072, 48, 1, 2, 2)
    assert tasks_matching(WAN22_TI2V_5B_DIT) == ["ti2v-5B"]
    assert round(sum(v.numel() for v in sd.values()) / 1e9, 1) == 5.0  # "5B"
