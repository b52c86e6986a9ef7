"""A `ModelSet` for a multi-process run: the DiT (each expert) gets sequence parallelism and, with --dit_fsdp,
sharded weights; the umT5 encoder, with --t5_fsdp, sharded weights. Everything else loads as on one device."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from wan_core.loading.model_set import ModelSet, ModelSpec
from wan_core.models.dit import WanModel
from wan_core.models.t5 import T5Encoder, load_t5
from wan_core.parallel.cfg import CfgParallel
from wan_core.parallel.fsdp import shard_blocks
from wan_core.parallel.mesh import ParallelConfig, ParallelMesh
from wan_core.parallel.sequence import SequenceParallel
from wan_core.runtime.fp8 import fp8_t5
from wan_core.runtime.prepare import prepare_dit
from wan_core.runtime.step_cache import Predict

logger = logging.getLogger(__name__)


def check_spec(config: ParallelConfig, spec: ModelSpec) -> None:
    """ValueError for option pairs that cannot work together, before any model loads."""
    if config.dit_fsdp and spec.blocks_to_swap not in (None, 0):
        raise ValueError(f"--dit_fsdp shards the DiT's weights over the GPUs; it cannot be combined with "
                         f"--blocks_to_swap {spec.blocks_to_swap}, which streams them from CPU memory: use one")
    if config.dit_fsdp and spec.offload_inactive:
        raise ValueError("--dit_fsdp shards both Wan2.2 experts over the GPUs; --offload_inactive_dit moves whole "
                         "experts to CPU memory: use one")
    if config.dit_fsdp and spec.compile:
        raise ValueError("--compile is not supported with --dit_fsdp yet (blocks are compiled one by one, FSDP "
                         "gathers their weights around each block): drop one")


class ParallelModelSet(ModelSet):
    """`ModelSet` whose DiTs run sequence parallel over `mesh` (and sharded with --dit_fsdp), and whose T5 is
    sharded with --t5_fsdp."""

    def __init__(self, spec: ModelSpec, mesh: ParallelMesh) -> None:
        check_spec(mesh.config, spec)
        super().__init__(dataclasses.replace(spec, device=str(mesh.device)))
        self.mesh = mesh
        self.sequence_parallel: list[SequenceParallel] = []

    @property
    def writes_outputs(self) -> bool:
        """Only rank 0 decodes and saves."""
        return self.mesh.is_main

    def predict_wrapper(self) -> Callable[[Predict], Predict] | None:
        """What `denoise` wraps its per-branch predict in: CFG parallel, when asked for."""
        return CfgParallel(self.mesh).wrap if self.mesh.config.cfg_parallel else None

    def _parallel_dit(self, path: Path, spec: ModelSpec, device: torch.device) -> WanModel:
        if self.mesh.config.dit_fsdp:
            model = shard_blocks(prepare_dit(path, spec, torch.device("cpu")), self.mesh)
        else:
            model = prepare_dit(path, spec, device, self.size_hint)
        if self.mesh.config.sp_size > 1:
            self.sequence_parallel.append(SequenceParallel(model, self.mesh))
        return model

    def _load_dit(self, path: Path) -> WanModel:
        offloaded = self.spec.dit_high is not None and self.spec.offload_inactive
        return self._parallel_dit(path, self.spec, torch.device("cpu") if offloaded else self.device)

    def _load_dit_high(self, path: Path) -> WanModel:
        return self._parallel_dit(path, dataclasses.replace(self.spec, loras=self.spec.loras_high), self.device)

    def _load_t5(self, path: Path) -> T5Encoder:
        if not self.mesh.config.t5_fsdp:
            return super()._load_t5(path)
        t5 = load_t5(path, tokenizer=self.spec.tokenizer, device="cpu")
        if self.spec.fp8_t5:
            fp8_t5(t5)
        shard_blocks(t5.model, self.mesh)
        return t5


def same_random_state(mesh: ParallelMesh) -> int:
    """Seed Python's `random` with one number drawn on rank 0, so that every rank picks the same random seeds
    for jobs that give none. Returns that number."""
    value = torch.tensor([random.randint(0, 2**62) if mesh.is_main else 0], dtype=torch.int64, device=mesh.device)
    dist.broadcast(value, src=0)
    random.seed(int(value.item()))
    return int(value.item())
