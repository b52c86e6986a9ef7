"""R1: wan_core never imports ComfyUI; training imports only wan_core (plus third-party libraries)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution", "node_helpers"}


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_wan_core_never_imports_comfyui_or_upper_layers():
    for path in sorted((ROOT / "wan_core").rglob("*.py")):
        bad = _imported_top_modules(path) & (COMFY_MODULES | {"nodes", "training"})
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_training_imports_only_wan_core():
    for path in sorted((ROOT / "training").rglob("*.py")):
        bad = _imported_top_modules(path) & (COMFY_MODULES | {"nodes"})
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_importing_library_leaves_root_logger_alone():
    code = (
        "import logging, sys\n"
        "sys.modules['comfy'] = None\n"
        "before = list(logging.getLogger().handlers)\n"
        "import wan_core, training\n"
        "assert logging.getLogger().handlers == before, logging.getLogger().handlers\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_checkout_root_imports_as_a_plain_module():
    """pytest imports the root __init__.py as a plain module when the checkout folder's name is not an identifier
    (a clone named ComfyUI-WanTuner); that must not fail, or every test errors at setup."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('__init__', {str(ROOT / '__init__.py')!r})\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "assert module.WEB_DIRECTORY == './web/js'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_checkout_root_imports_as_comfyui_imports_it():
    """ComfyUI loads the folder as a package under its folder name, hyphens included."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('ComfyUI-WanTuner', {str(ROOT / '__init__.py')!r},\n"
            f"    submodule_search_locations=[{str(ROOT)!r}])\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "sys.modules[spec.name] = module\n"
            "spec.loader.exec_module(module)\n"
            "names = list(module.NODE_CLASS_MAPPINGS)\n"
            "assert all(name.startswith('WanTuner') for name in names), names\n"
            "assert len(module.NODE_CLASS_MAPPINGS) >= 16\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
