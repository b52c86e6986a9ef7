"""CFG parallel: the conditional and the negative-prompt forwards of a step run at the same time on the two halves
of the world (CFG group 0: cond, group 1: uncond) and are exchanged, instead of one after the other.

A wrapper around the sampler's per-branch `predict(x, t, branch, skip_blocks)`: guidance asks for the conditional
prediction first; the wrapper then runs this rank's branch on the same input, exchanges the two results with the
matching rank of the other group, returns the conditional one and keeps the negative one for the call that follows
on the same input. A step that turns out not to need it (CFG skipped, guidance 1 for that step) loses nothing: the
other group would have been idle. Skip-layer passes are computed by both groups alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from wan_core.parallel.mesh import ParallelMesh
from wan_core.runtime.step_cache import Predict

BRANCHES = ("cond", "uncond")


class CfgParallel:
    """`wrap(predict)` -> a predict whose unskipped cond / uncond pair costs one forward per rank."""

    def __init__(self, mesh: ParallelMesh) -> None:
        if mesh.config.cfg_size != 2:
            raise ValueError("CfgParallel needs a mesh built with --cfg_parallel")
        self.mesh = mesh
        self.forwards = 0  # forwards this rank ran (for logs and tests)

    def wrap(self, predict: Predict) -> Predict:
        kept: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # "uncond" -> (x, t, velocity) of the last pair
        mine = BRANCHES[self.mesh.cfg_index]

        def parallel_predict(x: Tensor, t: Tensor, branch: str, skip: tuple[int, ...]) -> Tensor:
            if skip:
                self.forwards += 1
                return predict(x, t, branch, skip)
            if branch == "uncond" and "uncond" in kept:
                x0, t0, v = kept.pop("uncond")
                if x0 is x and torch.equal(t0, t):
                    return v
            if branch != "cond":
                self.forwards += 1
                return predict(x, t, branch, skip)
            self.forwards += 1
            v_mine = predict(x, t, mine, ())
            both = [torch.empty_like(v_mine) for _ in BRANCHES]
            dist.all_gather(both, v_mine.contiguous(), group=self.mesh.cfg_group)
            kept["uncond"] = (x, t, both[1])
            return both[0]

        return parallel_predict
