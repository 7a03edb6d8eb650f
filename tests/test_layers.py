"""Imports point downward only: scripts -> cli -> server -> evaluation -> profiler -> runtime -> common
(and neuron_files, data only), all installed under the `partinfer` namespace; and no two modules of
one package import each other, directly or around a circle. Every import in every module counts,
those inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("common", "runtime", "profiler", "evaluation", "server", "cli", "scripts")  # bottom to top
NAMESPACE = "partinfer"


def imported_modules(source: str, module: str = "") -> set[str]:
    """Dotted names of the project's modules that `source` (the module `module`, e.g. "runtime.loader")
    imports, without the namespace, wherever the import statement is: "runtime.pack", "common.errors"."""
    found = set()
    package = module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [f"{NAMESPACE}.{package}.{node.module or ''}".rstrip(".")]
        else:
            continue
        for name in names:
            if name.startswith(f"{NAMESPACE}."):
                found.add(name[len(NAMESPACE) + 1:])
            elif name.split(".")[0] in LAYERS:  # an import that bypasses the namespace
                found.add(name)
    return found


def imported_packages(source: str) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(source)}


def upward_imports(package: str, source: str) -> set[str]:
    """The project packages above `package` that `source` imports (the layering violations)."""
    level = LAYERS.index(package)
    return {name for name in imported_packages(source) if name in LAYERS and LAYERS.index(name) > level}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_graph(package: str, sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (a `from a import b` counts as a.b when
    a.b is a module, else as a)."""
    if sources is None:
        sources = {module_name(p): p.read_text(encoding="utf-8") for p in sorted((ROOT / package).rglob("*.py"))}
    graph = {}
    for module, source in sources.items():
        targets = {name for name in imported_modules(source, module) if name in sources}
        graph[module] = targets - {module}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports in `graph` (as the modules around it), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_every_module_imports_only_its_own_layer_or_lower():
    violations = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            upward = upward_imports(package, path.read_text(encoding="utf-8"))
            if upward:
                violations[str(path.relative_to(ROOT))] = sorted(upward)
    assert violations == {}


def test_every_import_goes_through_the_namespace():
    bare = {}
    for package in (*LAYERS, "tests"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
            wrong = sorted(n for n in names if n.split(".")[0] in LAYERS and n.split(".")[0] != "scripts")
            if wrong:
                bare[str(path.relative_to(ROOT))] = wrong
    assert bare == {}


def test_no_package_has_an_import_circle():
    circles = {package: find_circle(package_graph(package)) for package in LAYERS}
    assert {p: c for p, c in circles.items() if c} == {}


def test_the_check_catches_an_upward_import():
    assert upward_imports("runtime", "def f():\n    from partinfer.cli.app import app\n") == {"cli"}
    assert upward_imports("common", "import partinfer.profiler.report\n") == {"profiler"}
    assert upward_imports("evaluation", "from partinfer.profiler.profile import run_profile\nimport partinfer.common.data\n") == set()
    assert upward_imports("cli", "from partinfer.runtime import loader\n") == set()
    assert upward_imports("runtime", "from scripts.fetch_data import main\n") == {"scripts"}


def test_the_check_catches_a_circle_inside_a_package():
    sources = {"runtime.loader": "def f():\n    from partinfer.runtime.pack import cached_pack\n",
               "runtime.pack": "from partinfer.runtime import loader\n",
               "runtime.model": "from partinfer.common.errors import PartinferError\n"}
    assert find_circle(package_graph("runtime", sources)) == ["runtime.loader", "runtime.pack", "runtime.loader"]
    sources["runtime.pack"] = "from partinfer.runtime.model import Transformer\n"
    assert find_circle(package_graph("runtime", sources)) is None


def test_the_neuron_files_package_is_data_only():
    assert imported_packages((ROOT / "neuron_files" / "__init__.py").read_text()) == set()
