"""Node declarations: ids, tooltips, declared inputs/outputs against the functions, thin node bodies (R8)."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path

import pytest

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
NODES = sorted(NODE_CLASS_MAPPINGS.items())
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")
CORE_TYPES = ("IMAGE", "LATENT", "MASK", *WIDGETS)
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution", "node_helpers"}
# Core node ids (ComfyUI v0.33) a pack must not reuse, a sample of each area.
CORE_IDS = {"UNETLoader", "CLIPLoader", "VAELoader", "CLIPVisionLoader", "CLIPTextEncode", "CLIPVisionEncode",
            "VAEEncode", "VAEDecode", "KSampler", "LoraLoader", "LoraLoaderModelOnly", "SaveVideo", "CreateVideo",
            "WanImageToVideo", "WanFunControlToVideo", "WanFirstLastFrameToVideo", "TrainLoraNode"}


def _inputs(cls: type) -> dict[str, dict]:
    return cls.INPUT_TYPES()


def test_ids_are_prefixed_unique_and_named_after_their_class() -> None:
    assert len(NODE_CLASS_MAPPINGS) >= 14
    for node_id, cls in NODES:
        assert node_id.startswith("WanTuner") and cls.__name__ == node_id
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("WanTuner ")
    assert not set(NODE_CLASS_MAPPINGS) & CORE_IDS
    assert len(set(NODE_DISPLAY_NAME_MAPPINGS.values())) == len(NODE_DISPLAY_NAME_MAPPINGS)


@pytest.mark.parametrize("node_id, cls", NODES)
def test_every_input_has_a_tooltip_and_every_output_a_name_and_tooltip(node_id: str, cls: type) -> None:
    for group in ("required", "optional"):
        for name, spec in _inputs(cls).get(group, {}).items():
            assert isinstance(spec, tuple) and len(spec) == 2, f"{node_id}.{name}"
            assert isinstance(spec[1].get("tooltip"), str) and len(spec[1]["tooltip"]) > 10, f"{node_id}.{name}"
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert cls.CATEGORY.startswith("WanTuner") and cls.DESCRIPTION


@pytest.mark.parametrize("node_id, cls", NODES)
def test_socket_types_are_ours_or_core(node_id: str, cls: type) -> None:
    types = [spec[0] for group in ("required", "optional") for spec in _inputs(cls).get(group, {}).values()]
    for kind in [*types, *cls.RETURN_TYPES]:
        assert isinstance(kind, list) or kind in CORE_TYPES or kind.startswith("WANTUNER_"), f"{node_id}: {kind}"


@pytest.mark.parametrize("node_id, cls", NODES)
def test_function_signature_matches_declared_inputs(node_id: str, cls: type) -> None:
    declared = _inputs(cls)
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    names = [n for n in params if n != "self"]
    required, optional = list(declared["required"]), list(declared.get("optional", {}))
    hidden = list(declared.get("hidden", {}))
    assert names == required + optional + hidden, f"{node_id}: {names}"
    for name in required:
        assert params[name].default is inspect.Parameter.empty, f"{node_id}.{name} is required"
    for name in optional + hidden:
        assert params[name].default is not inspect.Parameter.empty, f"{node_id}.{name} needs a default"
    for name, spec in declared.get("optional", {}).items():
        if spec[0] in WIDGETS:
            assert params[name].default == spec[1]["default"], f"{node_id}.{name}"


@pytest.mark.parametrize("node_id, cls", [(n, c) for n, c in NODES if hasattr(c, "VALIDATE_INPUTS")])
def test_validate_inputs_names_only_declared_inputs_with_defaults(node_id: str, cls: type) -> None:
    declared = {**_inputs(cls)["required"], **_inputs(cls).get("optional", {})}
    params = inspect.signature(cls.VALIDATE_INPUTS).parameters
    for name, param in params.items():
        assert name in declared, f"{node_id}.VALIDATE_INPUTS names unknown input {name}"
        # ComfyUI passes only constant inputs; linked ones are missing
        assert param.default is None, f"{node_id}.VALIDATE_INPUTS({name}) must default to None"


@pytest.mark.parametrize("node_id, cls", NODES)
def test_widget_defaults_satisfy_their_own_limits(node_id: str, cls: type) -> None:
    for group in ("required", "optional"):
        for name, (kind, options) in _inputs(cls).get(group, {}).items():
            if isinstance(kind, list):
                assert kind and all(isinstance(c, str) for c in kind), f"{node_id}.{name}"
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], f"{node_id}.{name}"


def _function_defs(path: Path) -> list[tuple[str, ast.FunctionDef]]:
    tree = ast.parse(path.read_text())
    out = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith("WanTuner")):
        function = NODE_CLASS_MAPPINGS[cls.name].FUNCTION
        out += [(f"{cls.name}.{f.name}", f) for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == function]
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "nodes").glob("*.py")), ids=lambda p: p.name)
def test_node_functions_are_short_and_do_no_tensor_math(path: Path) -> None:
    """R8: each node function is at most 30 lines and calls no torch function (work goes through wan_core)."""
    for name, fn in _function_defs(path):
        assert fn.end_lineno - fn.lineno + 1 <= 30, f"{name} has {fn.end_lineno - fn.lineno + 1} lines"
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert node.value.id not in ("torch", "F", "np"), f"{name} uses {node.value.id}.{node.attr}"
    if path.name == "comfy_adapter.py":
        return
    for node in ast.walk(ast.parse(path.read_text())):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for module in modules:
            assert module.split(".")[0] not in COMFY_MODULES, f"{path.name} imports {module}: use comfy_adapter.py"


def test_pack_imports_as_comfyui_imports_it() -> None:
    """ComfyUI loads the pack folder through spec_from_file_location under a mangled name (relative imports)."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("custom_nodes_x_ComfyUI-WanTuner", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        assert module.WEB_DIRECTORY == "./web/js"
        assert sorted(module.NODE_CLASS_MAPPINGS) == {sorted(NODE_CLASS_MAPPINGS)!r}
        assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    """)
    import subprocess

    subprocess.run([sys.executable, "-c", code], cwd="/", check=True)
    assert importlib.util.find_spec("nodes.comfy_adapter") is not None
