"""Executes an API-format ComfyUI workflow through the pack's node classes, without ComfyUI.

The graph is checked the way ComfyUI checks it before running (known node types, required inputs present, no
unknown inputs, links pointing at existing outputs of the declared type, then each node's VALIDATE_INPUTS with its
constant inputs), and the nodes run in dependency order. ComfyUI core nodes used by the examples are not available
without ComfyUI; `core_stand_ins(input_dir)` gives minimal versions of the two the examples use (LoadImage,
RepeatImageBatch) so the rest of each graph runs here; the real-ComfyUI test runs the real ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodes import NODE_CLASS_MAPPINGS


class GraphError(ValueError):
    """The workflow would be rejected (or failed) in ComfyUI: the message names the node."""


@dataclass
class RunResult:
    outputs: dict[str, tuple] = field(default_factory=dict)
    ui: dict[str, dict] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


def core_stand_ins(input_dir: Path) -> dict[str, Callable[..., tuple]]:
    """Stand-ins for ComfyUI core nodes: LoadImage (a PNG from `input_dir` as IMAGE + MASK) and RepeatImageBatch."""
    from PIL import Image

    def load_image(image: str, upload: str = "image") -> tuple:
        rgb = np.asarray(Image.open(input_dir / image).convert("RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(rgb)[None]
        return tensor, torch.zeros(tensor.shape[:3])

    def repeat_image_batch(image: torch.Tensor, amount: int) -> tuple:
        return (image.repeat(amount, 1, 1, 1),)

    return {"LoadImage": load_image, "RepeatImageBatch": repeat_image_batch}


def _is_link(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _declared(cls: type) -> tuple[dict[str, tuple], set[str], dict[str, str]]:
    types = cls.INPUT_TYPES()
    inputs = {**types.get("required", {}), **types.get("optional", {})}
    return inputs, set(types.get("required", {})), types.get("hidden", {})


def _output_type(prompt: Mapping[str, dict], src: str, slot: int) -> str | None:
    cls = NODE_CLASS_MAPPINGS.get(prompt[src]["class_type"])
    if cls is None:
        return None  # a core node: its types are not known here
    if not 0 <= slot < len(cls.RETURN_TYPES):
        raise GraphError(f"node {src} ({cls.__name__}) has no output slot {slot}")
    return cls.RETURN_TYPES[slot]


def _check_node(prompt: Mapping[str, dict], node_id: str, node: dict) -> None:
    cls = NODE_CLASS_MAPPINGS[node["class_type"]]
    declared, required, _ = _declared(cls)
    given = node.get("inputs", {})
    missing = sorted(required - set(given))
    unknown = sorted(set(given) - set(declared))
    if missing or unknown:
        raise GraphError(f"node {node_id} ({cls.__name__}): missing inputs {missing}, unknown inputs {unknown}")
    for name, value in given.items():
        if not _is_link(value):
            continue
        if value[0] not in prompt:
            raise GraphError(f"node {node_id} input {name!r} links to missing node {value[0]}")
        produced = _output_type(prompt, value[0], value[1])
        wanted = declared[name][0]
        if produced is not None and produced != wanted:
            raise GraphError(f"node {node_id} input {name!r} expects {wanted} but node {value[0]} gives {produced}")


def _validate(node_id: str, cls: type, constants: dict[str, Any]) -> None:
    check = getattr(cls, "VALIDATE_INPUTS", None)
    if check is None:
        return
    wanted = inspect.signature(check).parameters
    result = check(**{k: v for k, v in constants.items() if k in wanted})
    if result is not True:
        raise GraphError(f"node {node_id} ({cls.__name__}) failed validation: {result}")


def _order(prompt: Mapping[str, dict]) -> list[str]:
    deps = {nid: {v[0] for v in node.get("inputs", {}).values() if _is_link(v)} for nid, node in prompt.items()}
    order: list[str] = []
    ready = sorted((n for n, d in deps.items() if not d), key=int)
    while ready:
        current = ready.pop(0)
        order.append(current)
        for nid, d in deps.items():
            if current in d:
                d.discard(current)
                if not d and nid not in order and nid not in ready:
                    ready.append(nid)
    if len(order) != len(prompt):
        raise GraphError(f"the workflow has a cycle among nodes {sorted(set(prompt) - set(order))}")
    return order


def check_workflow(prompt: Mapping[str, dict], core: Mapping[str, Callable] | None = None) -> list[str]:
    """Validate a workflow as ComfyUI would before running it; returns the execution order."""
    for node_id, node in prompt.items():
        kind = node.get("class_type")
        if kind in NODE_CLASS_MAPPINGS:
            _check_node(prompt, node_id, node)
            constants = {k: v for k, v in node.get("inputs", {}).items() if not _is_link(v)}
            _validate(node_id, NODE_CLASS_MAPPINGS[kind], constants)
        elif core is None or kind not in core:
            raise GraphError(f"node {node_id}: unknown node type {kind!r}")
    return _order(prompt)


def run_workflow(prompt: Mapping[str, dict], core: Mapping[str, Callable] | None = None) -> RunResult:
    """Validate, then execute every node in dependency order; returns each node's outputs and UI data."""
    result = RunResult(order=check_workflow(prompt, core))
    for node_id in result.order:
        node = prompt[node_id]
        kwargs = {k: result.outputs[v[0]][v[1]] if _is_link(v) else v for k, v in node.get("inputs", {}).items()}
        kind = node["class_type"]
        if kind in NODE_CLASS_MAPPINGS:
            cls = NODE_CLASS_MAPPINGS[kind]
            if "unique_id" in _declared(cls)[2]:
                kwargs["unique_id"] = node_id
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        else:
            out = core[kind](**kwargs)  # type: ignore[index]
        if isinstance(out, dict):
            result.ui[node_id] = out.get("ui", {})
            out = out.get("result", ())
        result.outputs[node_id] = tuple(out)
    return result
