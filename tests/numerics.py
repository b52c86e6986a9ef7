"""Float32 parity tolerances derived from the numerics, not from what one CPU printed.

Two float32 computations of the same maths (ours and a reference, or one model loaded two ways) differ by
rounding: summation order depends on the CPU's SIMD width, thread count and memory alignment. The size of that
rounding is measured, on the very inputs of the test, as the reference's own float32-vs-float64 error; a result
passes when it is within MARGIN times that error of the float64 run (plus a floor of a few float32 epsilons for
results that float32 happens to represent exactly). A wrong key mapping or formula gives an O(1) error and still
fails.

`float64_run` runs a module entirely in float64: a deep copy is cast to float64, and for the duration of the run
`Tensor.float()` leaves float64 tensors alone, so the deliberate float32 upcasts in the models (layer norms,
modulation, the residual stream) do not round the reference back to float32. Explicit casts such as
`.to(torch.float32)` still apply (transformers' T5 norm variance, diffusers' timestep sinusoid): those roundings
remain in the float64 run and count towards the reference's own float32 error, which the bound is made of.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps
# A different summation order changes each rounding, not its size: independent float32 runs stay within a small
# multiple of the reference's own error from the float64 result (within 2x in the suite's parity tests).
MARGIN = 8.0
FLOOR = 4 * FLOAT32_EPS


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, computed in float64."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max()).item()


def to_float64(value: Any) -> Any:
    """Floating tensors (also inside lists, tuples and dicts) cast to float64; everything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(to_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float64(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def float64_upcasts() -> Iterator[None]:
    """While active, `Tensor.float()` keeps float64 tensors in float64 (other dtypes are converted as usual)."""
    original = torch.Tensor.float

    def keep_float64(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep_float64
    try:
        yield
    finally:
        torch.Tensor.float = original


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 deep copy of the module (run it inside float64_upcasts)."""
    return copy.deepcopy(module).double()


def float64_run(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """module(*args, **kwargs) computed entirely in float64 on a copy (the module itself is left as it is)."""
    with torch.no_grad(), float64_upcasts():
        return float64_copy(module)(*to_float64(args), **to_float64(kwargs))


def float32_tolerance(reference32: torch.Tensor, reference64: torch.Tensor, margin: float = MARGIN) -> float:
    """The relative error allowed against `reference64`: margin x the reference's own float32 error, plus FLOOR."""
    return margin * rel_err(reference32, reference64) + FLOOR


def assert_float32_parity(got: torch.Tensor, reference32: torch.Tensor, reference64: torch.Tensor,
                          margin: float = MARGIN) -> None:
    """`got` (float32) is as close to the float64 result as float32 rounding allows (see the module docstring)."""
    if reference64.dtype != torch.float64:
        raise AssertionError(f"the float64 reference is {reference64.dtype}: a cast in the reference escaped")
    err, tol = rel_err(got, reference64), float32_tolerance(reference32, reference64, margin)
    assert err <= tol, (f"relative error {err:.3g} vs the float64 run exceeds {tol:.3g} = {margin:g} x the "
                        f"reference's own float32 error {rel_err(reference32, reference64):.3g} + {FLOOR:.3g}")


def reference_pair(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's float32 output and its float64 output on the same inputs."""
    with torch.no_grad():
        out32 = module(*args, **kwargs)
    return out32, float64_run(module, *args, **kwargs)
