"""Imports point downward only: cli -> server -> evaluation -> profiler -> runtime -> common (and
neuron_files, data only). Every import in every module counts, those inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("common", "runtime", "profiler", "evaluation", "server", "cli")  # bottom to top


def imported_packages(source: str) -> set[str]:
    """Top-level package names that `source` imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def upward_imports(package: str, source: str) -> set[str]:
    """The project packages above `package` that `source` imports (the layering violations)."""
    level = LAYERS.index(package)
    return {name for name in imported_packages(source) if name in LAYERS and LAYERS.index(name) > level}


def test_every_module_imports_only_its_own_layer_or_lower():
    violations = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            upward = upward_imports(package, path.read_text(encoding="utf-8"))
            if upward:
                violations[str(path.relative_to(ROOT))] = sorted(upward)
    assert violations == {}


def test_the_check_catches_an_upward_import():
    assert upward_imports("runtime", "def f():\n    from cli.app import app\n") == {"cli"}
    assert upward_imports("common", "import profiler.report\n") == {"profiler"}
    assert upward_imports("evaluation", "from profiler.profile import run_profile\nimport common.data\n") == set()


def test_the_neuron_files_package_is_data_only():
    assert imported_packages((ROOT / "neuron_files" / "__init__.py").read_text()) == set()
