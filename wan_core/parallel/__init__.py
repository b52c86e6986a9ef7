"""Multi-GPU inference on torch.distributed: sequence parallelism (Ulysses all-to-all, ring attention), CFG
parallel and FSDP weight sharding, each attached to loaded models from outside (see the modules)."""

from wan_core.parallel.cfg import CfgParallel
from wan_core.parallel.mesh import ParallelConfig, ParallelMesh, build_mesh, init_distributed, launched_world_size
from wan_core.parallel.models import ParallelModelSet, check_spec, same_random_state
from wan_core.parallel.sequence import SequenceParallel

__all__ = ["CfgParallel", "ParallelConfig", "ParallelMesh", "ParallelModelSet", "SequenceParallel", "build_mesh",
           "check_spec", "init_distributed", "launched_world_size", "same_random_state"]
