"""Sequence parallelism for the DiT: one forward's video tokens are split over the ranks of a CFG group, attached
to a loaded `WanModel` from outside (module hooks and the self-attention kernel; `WanModel.forward` is unchanged).

- Between the patch embedding and the head every rank holds one chunk of the tokens (the sequence is zero-padded
  to a multiple of the number of ranks; padded tokens are never attended to and are dropped before the head).
  The first block that runs takes its chunk of the residual stream, of the RoPE table and of per-token
  modulation (Wan2.2); the head's input is gathered back, so the model returns the whole prediction on every rank.
- Self-attention is the only place where tokens meet: Ulysses (`dist.all_to_all_single`) trades the sequence
  chunks of a Ulysses group for a slice of the heads, runs the model's own attention kernel over the group's
  tokens, and trades back; over a ring group, each rank's key/value block travels around the ring (P2P) and the
  partial results are merged with their log-sum-exp (online softmax), exact up to float rounding.
- Cross-attention needs nothing: each rank's queries attend to the whole text / image context.

Inference only (no backward through the collectives).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from wan_core.models.attention import attention
from wan_core.models.dit import SelfAttention, WanModel
from wan_core.parallel.mesh import ParallelMesh

logger = logging.getLogger(__name__)

RING_CHUNK_ELEMENTS = 1 << 26  # score-matrix elements per query slice of a ring step (256 MB in float32)


@dataclass
class TokenPlan:
    """The split of one forward's tokens: `tokens` real ones, padded to `chunk` · ranks."""

    tokens: int
    chunk: int
    x_local: bool = False  # the residual stream is already this rank's chunk
    local: dict[int, Any] = field(default_factory=dict)  # id(full tensor) -> this rank's chunk of it
    keep: list[Any] = field(default_factory=list)  # the full tensors of `local`, alive while their ids are keys


def _pad_tokens(x: Tensor, total: int, dim: int) -> Tensor:
    if x.shape[dim] == total:
        return x
    pad = list(x.shape)
    pad[dim] = total - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad)], dim=dim)


class SequenceParallel:
    """Splits a `WanModel`'s tokens over `mesh.sp_group` (see the module docstring). `remove()` detaches it."""

    def __init__(self, model: WanModel, mesh: ParallelMesh) -> None:
        mesh.config.check_heads(model.config.num_heads)
        self.model, self.mesh = model, mesh
        self.ranks = mesh.config.sp_size
        self.plan: TokenPlan | None = None
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._start, with_kwargs=True),
                                                model.head.register_forward_pre_hook(self._gather)]
        self._handles += [block.register_forward_pre_hook(self._shard) for block in model.blocks]
        self._backends: dict[SelfAttention, Any] = {}
        for module in model.modules():
            if isinstance(module, SelfAttention):
                self._backends[module] = module.attn_backend
                module.attn_backend = SequenceParallelAttention(self, module.attn_backend)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, backend in self._backends.items():
            module.attn_backend = backend
        self._handles, self._backends = [], {}

    # -- hooks ----------------------------------------------------------------------------------------------

    def _start(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        pt, ph, pw = self.model.config.patch_size
        tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        self.plan = TokenPlan(tokens, math.ceil(tokens / self.ranks))

    def _chunk(self, full: Tensor, dim: int) -> Tensor:
        plan = self._current()
        start = self.mesh.sp_rank * plan.chunk
        return _pad_tokens(full, plan.chunk * self.ranks, dim).narrow(dim, start, plan.chunk)

    def _chunk_once(self, full: Any, make) -> Any:
        """This rank's chunk of a tensor (or tuple) that every block receives unchanged, cut once per forward."""
        plan = self._current()
        if id(full) not in plan.local:
            plan.local[id(full)] = make(full)
            plan.keep.append(full)
        return plan.local[id(full)]

    def _shard(self, block: nn.Module, args: tuple) -> tuple:
        x, e0, context, rope = args
        plan = self._current()
        if not plan.x_local:
            x, plan.x_local = self._chunk(x, 1), True
        if e0.dim() == 4:  # per-token modulation [B, L, 6, C]
            e0 = self._chunk_once(e0, lambda t: self._chunk(t, 1))
        rope = self._chunk_once(rope, lambda r: tuple(self._chunk(t, 0) for t in r))
        return x, e0, context, rope

    def _gather(self, head: nn.Module, args: tuple) -> tuple | None:
        plan = self._current()
        if not plan.x_local:  # every block skipped: the stream was never split
            return None
        x, e = args
        parts = [torch.empty_like(x) for _ in range(self.ranks)]
        dist.all_gather(parts, x.contiguous(), group=self.mesh.sp_group)
        plan.x_local = False
        return torch.cat(parts, dim=1)[:, :plan.tokens], e

    def _current(self) -> TokenPlan:
        if self.plan is None:
            raise RuntimeError("sequence parallel hooks ran outside a WanModel forward")
        return self.plan


class SequenceParallelAttention:
    """The self-attention kernel over a sequence split into chunks: [B, chunk, H, D] q, k, v -> [B, chunk, H, D]."""

    def __init__(self, owner: SequenceParallel, backend: Any) -> None:
        self.owner, self.backend = owner, backend

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        mesh, plan = self.owner.mesh, self.owner._current()
        u = mesh.config.ulysses_size
        if u > 1:
            q, k, v = seq_to_heads(torch.stack([q, k, v]), u, mesh.ulysses_group).unbind(0)
        block = plan.chunk * u  # tokens of one Ulysses group, the block a ring step passes on
        if mesh.config.ring_size > 1:
            valid = [min(max(plan.tokens - j * block, 0), block) for j in range(mesh.config.ring_size)]
            out = ring_attention(q, k, v, valid, mesh)
        else:
            n = min(plan.tokens, block)
            out = attention(q, k[:, :n], v[:, :n], self.backend)
        return heads_to_seq(out, u, mesh.ulysses_group) if u > 1 else out


def seq_to_heads(x: Tensor, ranks: int, group: dist.ProcessGroup | None) -> Tensor:
    """[S, B, chunk, H, D] on each rank of a group -> [S, B, ranks · chunk, H / ranks, D]: all the group's tokens
    (in rank order) for this rank's slice of the heads (S stacks q, k, v into one collective)."""
    s, b, n, h, d = x.shape
    send = x.reshape(s, b, n, ranks, h // ranks, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = rank j's tokens, my heads
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(s, b, ranks * n, h // ranks, d)


def heads_to_seq(x: Tensor, ranks: int, group: dist.ProcessGroup | None) -> Tensor:
    """The inverse of `seq_to_heads` for one tensor: [B, ranks · chunk, H / ranks, D] -> [B, chunk, H, D]."""
    b, total, h, d = x.shape
    send = x.reshape(b, ranks, total // ranks, h, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = my tokens, rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, total // ranks, ranks * h, d)


def block_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention of [B, Lq, H, D] over [B, Lk, H, D] -> (out [B, Lq, H, D] float32, log-sum-exp of the
    scaled scores [B, H, Lq] float32); queries in slices so the score matrix stays under RING_CHUNK_ELEMENTS."""
    scale = q.shape[-1] ** -0.5
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    step = max(1, RING_CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[2] * k.shape[1]))
    outs, lses = [], []
    for start in range(0, q.shape[1], step):
        scores = torch.matmul(qh[:, :, start:start + step], kh.transpose(-1, -2)).float() * scale
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        outs.append(torch.matmul(probs.to(vh.dtype), vh).float())
        lses.append(lse)
    return torch.cat(outs, dim=2).transpose(1, 2), torch.cat(lses, dim=2)


def merge_partials(out: Tensor, lse: Tensor, part: Tensor, part_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two softmax attentions of the same queries over disjoint keys -> the attention over all those keys."""
    total = torch.logaddexp(lse, part_lse)
    w_old = torch.exp(lse - total).transpose(1, 2).unsqueeze(-1)  # [B, Lq, H, 1]
    w_new = torch.exp(part_lse - total).transpose(1, 2).unsqueeze(-1)
    return out * w_old + part * w_new, total


def ring_attention(q: Tensor, k: Tensor, v: Tensor, valid: list[int], mesh: ParallelMesh) -> Tensor:
    """Attention of this rank's queries over the keys of every rank of its ring group. Block j (the keys of ring
    rank j) has `valid[j]` real tokens, then padding. Each step computes against the block at hand while the
    block is sent to the next rank and the previous rank's is received."""
    ring, me = mesh.config.ring_size, mesh.ring_index
    nxt, prev = mesh.ring_ranks[(me + 1) % ring], mesh.ring_ranks[(me - 1) % ring]
    kv = torch.stack([k, v]).contiguous()
    out: Tensor | None = None
    lse: Tensor | None = None
    for step in range(ring):
        incoming, requests = None, []
        if step < ring - 1:
            incoming = torch.empty_like(kv)
            requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, mesh.ring_group),
                                               dist.P2POp(dist.irecv, incoming, prev, mesh.ring_group)])
        n = valid[(me - step) % ring]
        if n > 0:
            part, part_lse = block_attention(q, kv[0][:, :n], kv[1][:, :n])
            out, lse = (part, part_lse) if out is None or lse is None else merge_partials(out, lse, part, part_lse)
        for request in requests:
            request.wait()
        if incoming is not None:
            kv = incoming
    if out is None:
        raise RuntimeError("ring attention saw no keys")
    return out.to(q.dtype)
