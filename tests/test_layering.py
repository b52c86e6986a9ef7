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


# --- import graph: no cycles, no function-level imports of our own modules --------------------------------------

OWN_PACKAGES = ("wan_core", "training")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _own_modules() -> dict[str, Path]:
    return {_module_name(path): path for package in OWN_PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: Path):
    """Yield (import node, absolute module names it names, whether it sits inside a function), skipping the
    `if TYPE_CHECKING:` blocks."""
    module = _module_name(path)
    package = module if _is_package(path) else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                continue  # annotations only: never imported at run time
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                yield child, [alias.name for alias in child.names], in_function
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                yield child, [base] + [f"{base}.{alias.name}" for alias in child.names], in_function
            else:
                yield from visit(child, nested)

    yield from visit(ast.parse(path.read_text(), filename=str(path)), False)


def _import_graph() -> dict[str, set[str]]:
    """Edges from each wan_core/training module to the own modules it imports, at module level or in functions.

    `from a.b import c` is an edge to `a.b.c` when that is a module, else to `a.b`."""
    modules = _own_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node, targets, _ in _imports(path):
            if isinstance(node, ast.ImportFrom):
                base, *members = targets
                found = {m for m in members if m in modules}
                if len(found) < len(members) and base in modules:
                    found.add(base)
            else:
                found = {t for t in targets if t in modules}
            graph[name] |= found - {name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finds_a_cycle_through_a_function_level_import():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycle():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _has_reason(lines: list[str], node: ast.stmt) -> bool:
    """A comment on the import's own lines or on the line above it (or above the run of imports it ends)."""
    if any("#" in line for line in lines[node.lineno - 1: node.end_lineno]):
        return True
    above = node.lineno - 2
    while above >= 0 and lines[above].lstrip().startswith(("import ", "from ")) and "#" not in lines[above]:
        above -= 1
    return above >= 0 and lines[above].lstrip().startswith("#")


def test_no_function_level_imports_of_own_modules_and_third_party_ones_say_why():
    problems = []
    for path in _own_modules().values():
        lines = path.read_text().splitlines()
        for node, targets, in_function in _imports(path):
            if not in_function:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and node.level or targets[0].split(".")[0] in OWN_PACKAGES:
                problems.append(f"{where} imports {targets[0]} inside a function")
            elif not _has_reason(lines, node):
                problems.append(f"{where} defers importing {targets[0]} without a comment saying why")
    assert not problems, "\n".join(problems)
