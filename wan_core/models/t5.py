"""The umT5-XXL text encoder (encoder only), with official Wan2.1 state-dict names, and its loader.

Reimplemented from the semantics of Wan-Video/Wan2.1 `wan/modules/t5.py` (Apache-2.0):
T5 RMSNorm (no mean, no bias), attention without 1/sqrt(d) scaling, a bidirectional relative position
bias table in every block (`shared_pos=False`), a gated GELU-tanh feed-forward, and the fp16 overflow clamp applied
only when running in fp16. Every Linear is a `CastLinear`, so an fp8 or LoRA wrapper can replace it without touching
any `forward`.

`load_t5` reads the official `models_t5_umt5-xxl-enc-bf16.pth` (also with an `encoder.` prefix), Hugging Face /
ComfyUI `umt5_xxl_*.safetensors` (HF names, optional embedded `spiece_model`), in bf16 / fp16 / fp32 / fp8_e4m3fn and
ComfyUI scaled fp8 (dequantised with the per-tensor scale).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wan_core.loading.checkpoint import build_on_meta, load_into, load_state_dict, read_metadata
from wan_core.loading.convert import T5_HF, T5_HF_EXTRA, T5_HF_SENTINEL, renamed_keys
from wan_core.models.config import T5Config, stored_config
from wan_core.models.ops import FP8_DTYPES, CastLinear
from wan_core.models.tokenizer import SPIECE_KEY, UMT5Tokenizer, find_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """In fp16 only: when any value overflowed to inf, clamp everything to ±(fp16 max − 1000) (official rule).

    Written without a host sync: the bound is the fp16 max (a no-op) unless an inf is present.
    """
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), x.new_tensor(big - 1000), x.new_tensor(big))
    return torch.clamp(x, -limit, limit)


class T5LayerNorm(nn.Module):
    """T5 RMSNorm: x·rsqrt(mean(x²)+eps) in fp32, cast to the weight dtype, times the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(self.weight.dtype) * self.weight


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets for relative positions key − query: half the buckets per direction, exact
    distances below num_buckets/4, log-spaced up to `max_distance`, the last bucket beyond."""
    half = num_buckets // 2
    direction = (rel > 0).long() * half
    dist = rel.abs()
    max_exact = half // 2
    log_ratio = torch.log(dist.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return direction + torch.where(dist < max_exact, dist, far)


class T5RelativeEmbedding(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """-> additive attention bias [1, H, L, L] in the table's dtype."""
        pos = torch.arange(length, device=self.embedding.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q, self.k, self.v = (CastLinear(dim, dim_attn, bias=False) for _ in range(3))
        self.o = CastLinear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], bias [B|1, H, L, L] additive (relative positions, padding masked) -> [B, L, C]."""
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no scaling
        return self.o(out.transpose(1, 2).flatten(2))


class T5FeedForward(nn.Module):
    """fc2(fc1(x) · gelu_tanh(gate(x))); `gate.0` is the GELU branch (HF `wi_0`), `fc1` the linear one (`wi_1`)."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(CastLinear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = CastLinear(dim, dim_ffn, bias=False)
        self.fc2 = CastLinear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    """One encoder layer (official `T5SelfAttention`) with its own relative position bias table."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, C]; keep [B, 1, 1, L] bool (False = padding key) or None -> [B, L, C]."""
        bias = self.pos_embedding(x.shape[1])  # [1, H, L, L]
        if keep is not None:
            bias = torch.where(keep, bias, torch.finfo(x.dtype).min)  # [B, H, L, L]
        x = fp16_clamp(x + self.attn(self.norm1(x), bias).to(x.dtype))
        return fp16_clamp(x + self.ffn(self.norm2(x)).to(x.dtype))


class UMT5Encoder(nn.Module):
    """umT5 encoder stack: ids [B, L] (+ mask) -> hidden states [B, L, dim]. Attribute paths = official keys."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, L] int64; mask [B, L] (nonzero = real token) or None -> [B, L, dim] in the model dtype."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, L], got shape {list(ids.shape)}")
        x = self.token_embedding(ids)  # [B, L, C]
        keep = None if mask is None else mask.to(device=ids.device, dtype=torch.bool)[:, None, None, :]
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x)


class T5Encoder:
    """Prompts -> umT5 embeddings as the official `T5EncoderModel.__call__`: one [L_i, dim] tensor per prompt, L_i
    = its real token count including EOS (padding trimmed).

    Prompts are encoded `batch_size` at a time. By default each batch is cut to its longest prompt before the
    forward pass (padding keys are masked, so real-token outputs do not depend on it); `pad_to_text_len=True` runs
    the full official 512-token padding instead.
    """

    def __init__(self, model: UMT5Encoder, tokenizer: UMT5Tokenizer, batch_size: int = 8,
                 pad_to_text_len: bool = False) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} pieces but the text "
                             f"encoder's embedding has only {model.config.vocab_size} rows: wrong tokenizer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.pad_to_text_len = batch_size, pad_to_text_len

    @property
    def config(self) -> T5Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> T5Encoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def encode(self, prompts: str | Sequence[str]) -> list[torch.Tensor]:
        """-> list of [L_i, dim] tensors (model device and dtype), one per prompt, in order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                out.extend(self._encode_batch(prompts[start : start + self.batch_size]))
        return out

    __call__ = encode

    def _encode_batch(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        ids, mask = self.tokenizer(prompts)  # [B, text_len] each
        lengths = mask.sum(dim=1).tolist()
        if not self.pad_to_text_len:
            ids, mask = ids[:, : max(lengths)], mask[:, : max(lengths)]
        hidden = self.model(ids.to(self.device), mask.to(self.device))  # [B, L, C]
        return [h[:n].clone() for h, n in zip(hidden, lengths)]  # own storage: safe to save one by one


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

_OFFICIAL_SENTINEL = "blocks.0.attn.q.weight"
_QUANT_SCALES = (".scale_weight", ".weight_scale")
_QUANT_EXTRAS = (*_QUANT_SCALES, ".scale_input", ".input_scale", ".comfy_quant")
_HF_SKIP = ("decoder.", "lm_head.")  # a full UMT5 model: only the encoder is used


def detect_t5_config(sd: Mapping[str, torch.Tensor]) -> T5Config:
    """A `T5Config` from official-named shapes: vocab/dim from the embedding, heads and buckets from the relative
    bias table [num_buckets, num_heads], dim_attn from q, dim_ffn from fc1, layers from the block count.
    max_distance (128), eps and text_len are not stored in the weights and keep their defaults."""
    for key in ("token_embedding.weight", "blocks.0.pos_embedding.embedding.weight", "blocks.0.attn.q.weight",
                "blocks.0.ffn.fc1.weight"):
        if key not in sd:
            raise ValueError(f"not a umT5 encoder state dict: key {key!r} is missing")
    vocab_size, dim = sd["token_embedding.weight"].shape
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return T5Config(vocab_size=vocab_size, dim=dim, dim_attn=sd["blocks.0.attn.q.weight"].shape[0],
                    dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0], num_heads=num_heads, num_layers=num_layers,
                    num_buckets=num_buckets)


def _prefix_of(keys: Sequence[str], sentinel: str) -> str | None:
    """The shortest prefix under which `sentinel` occurs (None if it does not)."""
    found = [k[: len(k) - len(sentinel)] for k in keys if k == sentinel or k.endswith("." + sentinel)]
    return min(found, key=len) if found else None


def _official_names(keys: Sequence[str], what: str) -> dict[str, str]:
    """Map official, `encoder.`-prefixed official, or HF / ComfyUI key names -> {official name: file key}.

    Keys of other parts (a decoder, an LM head, the tied embedding copy) are left out; unknown keys are an error."""
    hf_prefix = _prefix_of(keys, T5_HF_SENTINEL)
    if hf_prefix is not None:
        inner = {k[len(hf_prefix):]: k for k in keys if k.startswith(hf_prefix)}
        if "shared.weight" not in inner and "encoder.embed_tokens.weight" in inner:
            inner["shared.weight"] = inner["encoder.embed_tokens.weight"]  # files that kept only the tied copy
        names = renamed_keys(inner, T5_HF, to_ours=True, what=f"umT5 {what} (Hugging Face / ComfyUI layout)",
                             ignore=lambda k: k in T5_HF_EXTRA or k.startswith(_HF_SKIP))
        return {ours: inner[key] for ours, (key, _) in names.items()}  # T5 rules have no transforms
    prefix = _prefix_of(keys, _OFFICIAL_SENTINEL)
    if prefix is None:
        raise ValueError(f"{what} is not a umT5 text encoder: none of its {len(keys)} keys match the official "
                         f"({_OFFICIAL_SENTINEL!r}) or Hugging Face / ComfyUI ({T5_HF_SENTINEL!r}) layout "
                         f"(first keys: {', '.join(keys[:4])})")
    inner = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    if "token_embedding.weight" not in inner and "token_embedding.weight" in keys:
        inner["token_embedding.weight"] = "token_embedding.weight"  # full T5Model: embedding shared at the top
    if len(inner) < len(keys):
        logger.info("umT5 %s: using the %d keys under %r (%d others ignored)", what, len(inner), prefix,
                    len(keys) - len(inner))
    return inner


def _split_quant(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI fp8 files -> (weights without quantisation extras, {weight key: its scale})."""
    weights, scales = {}, {}
    for key, value in sd.items():
        if key == "scaled_fp8" or key.endswith(_QUANT_EXTRAS):
            if key.endswith(_QUANT_SCALES):
                scales[key.rsplit(".", 1)[0] + ".weight"] = value
            continue
        weights[key] = value
    return weights, scales


def _materialize(value: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
                 device: str | torch.device) -> torch.Tensor:
    """One tensor to (device, dtype), dequantised with its per-tensor (or per-row) scale: w = fp8 · scale."""
    value = value.to(device)
    if scale is not None:
        scale = scale.to(device=device, dtype=torch.float32)
        if scale.numel() > 1:
            scale = scale.reshape(-1, *([1] * (value.dim() - 1)))
        value = value.to(torch.float32) * scale
    return value.to(dtype) if value.is_floating_point() else value


def t5_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                   torch.Tensor | None, dict[str, str]]:
    """Read a umT5 file -> (official-named weights, their fp8 scales, embedded spiece_model or None, metadata).

    Tensors are memory-mapped (safetensors) and not yet converted."""
    raw = load_state_dict(path)
    metadata = read_metadata(path)
    spiece_keys = [k for k in raw if k == SPIECE_KEY or k.endswith("." + SPIECE_KEY)]
    spiece = raw.pop(spiece_keys[0]) if spiece_keys else None
    for key in spiece_keys[1:]:
        raw.pop(key)
    weights, scales = _split_quant(raw)
    names = _official_names(list(weights), Path(path).name)  # {official: file key}
    sd = {ours: weights[theirs] for ours, theirs in names.items()}
    scales = {ours: scales[theirs] for ours, theirs in names.items() if theirs in scales}
    return sd, scales, spiece, metadata


def load_t5(path: str | os.PathLike, tokenizer: UMT5Tokenizer | str | os.PathLike | bytes | None = None,
            dtype: torch.dtype | None = None, device: str | torch.device = "cpu", config: T5Config | None = None,
            batch_size: int = 8) -> T5Encoder:
    """Load the umT5 text encoder and its tokenizer.

    path: official `models_t5_umt5-xxl-enc-bf16.pth` (optionally `encoder.`-prefixed) or an HF / ComfyUI
    `umt5_xxl_*.safetensors` (bf16, fp16, fp32, fp8_e4m3fn, ComfyUI scaled fp8); split files are expanded.
    tokenizer: a UMT5Tokenizer, a folder with spiece.model, a .model file or model bytes; when None, the file's
    embedded `spiece_model` tensor, else `<checkpoint folder>/google/umt5-xxl`, else a FileNotFoundError.
    dtype: defaults to bf16 as the official encoder (fp32 files stay fp32); fp16 runs with the overflow clamp.
    config: the architecture; else the file's `wantuner_config` metadata; else detected from the shapes.
    """
    sd, scales, spiece, metadata = t5_state_dict(path)
    if config is None:
        config = stored_config(metadata, T5Config, f"{path} (not a text-encoder file)")
    cfg = config or detect_t5_config(sd)
    tok = (load_tokenizer(tokenizer, cfg.text_len) if tokenizer is not None
           else find_tokenizer(path, spiece, cfg.text_len))
    source_dtype = sd[_OFFICIAL_SENTINEL].dtype if _OFFICIAL_SENTINEL in sd else torch.bfloat16
    if dtype is None:
        dtype = torch.float32 if source_dtype == torch.float32 else torch.bfloat16
    if not dtype.is_floating_point or dtype in FP8_DTYPES:
        raise ValueError(f"dtype must be a float compute dtype (bf16, fp16, fp32), got {dtype}; fp8 storage is "
                         "provided by the fp8 module")
    model = build_on_meta(lambda: UMT5Encoder(cfg))
    sd = {k: _materialize(v, scales.get(k), dtype, device) for k, v in sd.items()}
    load_into(model, sd, what=f"umT5 {Path(path).name}")
    model.eval().requires_grad_(False)
    logger.info("loaded umT5 %s: %d layers, dim %d, %s (file %s%s), tokenizer %s", Path(path).name, cfg.num_layers,
                cfg.dim, dtype, source_dtype, ", scaled fp8" if scales else "", tok.source)
    return T5Encoder(model, tok, batch_size=batch_size)
