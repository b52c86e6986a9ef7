"""Device identity: compare devices by what they are, not by how they were spelt.

A tensor on the first GPU reports `cuda:0`, while `torch.device("cuda")` has no index, and the two compare
unequal. `canonical_device` fills in the index (the current device of that type), so that equal places compare
equal everywhere a device is compared.
"""

from __future__ import annotations

import torch

_NO_INDEX = ("cpu", "meta")  # tensors on these report no index


def canonical_device(device: str | torch.device) -> torch.device:
    """`device` with an explicit index: a bare accelerator type ("cuda") means its current device; "cpu:0" is
    "cpu" (CPU tensors report no index)."""
    device = torch.device(device)
    if device.type in _NO_INDEX:
        return torch.device(device.type)
    if device.index is not None:
        return device
    backend = getattr(torch, device.type, None)
    current = getattr(backend, "current_device", None)
    return torch.device(device.type, current() if current is not None else 0)


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """True when `a` and `b` name the same device ("cuda" and "cuda:0" while device 0 is current)."""
    return canonical_device(a) == canonical_device(b)
