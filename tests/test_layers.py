"""The package's layers: every import inside ``alexnet_tasks`` points down (or within its layer)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alexnet_tasks"

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = (
    ("config", "validation", "recipes", "layout", "store", "atomic", "jsonio", "errors", "progress", "sweeps"),
    ("data",),
    ("training",),
    ("evaluate",),
    ("release",),
    ("serving",),
    ("ops",),
    ("ui",),
    ("dag_tasks",),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def layer_of(module: str) -> str:
    """``alexnet_tasks.training.train`` -> ``training``; ``alexnet_tasks.config`` -> ``config``."""
    return module.split(".")[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``alexnet_tasks`` import in a file, at any depth (function bodies too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alexnet_tasks"):
            if node.module == "alexnet_tasks":  # from alexnet_tasks import data
                found += [(node.lineno, f"alexnet_tasks.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("alexnet_tasks.")]
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        name = ".".join(relative.parts)
        if name != "alexnet_tasks.__init__":
            yield path, name.removesuffix(".__init__")


def test_every_module_has_a_layer():
    unknown = sorted({layer_of(name) for _, name in modules()} - set(RANK))
    assert not unknown, f"modules outside every layer of tests/test_layers.py: {unknown}"


def test_imports_point_down():
    upward = []
    for path, name in modules():
        own = RANK[layer_of(name)]
        for line, target in imports_of(path):
            if RANK[layer_of(target)] > own:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({layer_of(name)}) imports {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk finds imports in function bodies, so a lazy upward import cannot hide."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from alexnet_tasks.release.publish import publish\n")
    assert imports_of(source) == [(2, "alexnet_tasks.release.publish")]


# --------------------------------------------------------------------------- the tests: shared code lives in builders
TESTS = ROOT / "tests"
_SCRIPT_IMPORT = re.compile(r"^\s*(?:from\s+(test_\w+)\s+import|import\s+(test_\w+))", re.MULTILINE)


def imports_of_test_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``test_*`` module in a file: import statements at any depth,
    and import lines inside string constants (the scripts a test runs in a subprocess)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0].startswith("test_"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0].startswith("test_")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(node.lineno, match.group(1) or match.group(2)) for match in _SCRIPT_IMPORT.finditer(node.value)]
    return found


def test_no_test_module_imports_another():
    """Test modules share code through tests/builders.py and fixtures through tests/conftest.py, never each other."""
    imports = [f"{path.relative_to(ROOT)}:{line} imports {module}"
               for path in sorted(TESTS.glob("*.py")) for line, module in imports_of_test_modules(path)]
    assert not imports, "test modules importing test modules (move what they share to tests/builders.py):\n" + \
        "\n".join(imports)


def test_the_check_sees_a_test_module_imported_anywhere(tmp_path):
    test = "test_"  # spelled apart, so this file's own strings hold no such import
    source = tmp_path / "test_probe.py"
    source.write_text(f"import {test}plugin\n"
                      f"def f():\n    from {test}train import scalar_tags\n"
                      f"SCRIPT = '''\nimport sys\nfrom {test}registry import entry\n'''\n"
                      "from builders import fake_run\n")
    assert imports_of_test_modules(source) == [(1, "test_plugin"), (3, "test_train"), (4, "test_registry")]
