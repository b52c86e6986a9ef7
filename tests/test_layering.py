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
