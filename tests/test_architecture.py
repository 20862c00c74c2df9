"""The package's layers: every import inside vlmkit (module-level and function-level alike) points down the
order of docs/design.md, and no set of modules imports itself in a circle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# lower rank = lower layer; a module may import its own layer or any lower one, never a higher one
LAYERS = {
    "config": 0,
    "processing": 1,
    "data": 2,  # LLaVA-format records, collation, the synthetic world: text and pixels, no model
    "models": 3,
    "quantization": 4,  # rewrites a built model's linear layers; below everything that runs one
    "generation": 5,
    "cache": 5,
    "runtime": 5.5,  # request preparation (image keys, features, caches) that VLM delegates to
    "api": 6,
    "training": 7,
    "evaluation": 7,
    "serving": 7,
    "cli": 8,
    "__main__": 9,
    "__init__": 9,  # `import vlmkit` re-exports the public API
}


def module_files() -> dict[str, Path]:
    files = {}
    for path in (SRC / "vlmkit").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """Every ``vlmkit`` module name this file imports, at any depth (functions included), with its line."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name == "vlmkit" or name.startswith("vlmkit.")]


def resolve(name: str, modules: dict[str, Path]) -> str:
    """``vlmkit.a.b.Name`` -> the longest prefix that is a module (``vlmkit.a.b``)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    modules = module_files()
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    for module, path in modules.items():
        for name, line in imported_names(module, path):
            target = resolve(name, modules)
            if target != module and target in modules:
                edges[module].setdefault(target, line)
    return edges


def test_every_package_has_a_layer() -> None:
    unknown = sorted({layer(module) for module in module_files()} - LAYERS.keys())
    assert not unknown, f"new top-level package(s) {unknown}: give each a place in LAYERS and docs/design.md"


def test_imports_point_down(graph) -> None:
    upward = [
        f"{source}:{line} imports {target} ({layer(source)} may not import {layer(target)})"
        for source, targets in graph.items()
        for target, line in targets.items()
        if LAYERS.get(layer(target), 0) > LAYERS.get(layer(source), 0)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components of more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(graph.get(root, {})))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, {}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_no_module_cycle(graph) -> None:
    cycles = strongly_connected(graph)
    assert not cycles, f"import cycles: {cycles}"


def test_no_cycle_between_layers(graph) -> None:
    """Peers of one rank (training / evaluation / serving; generation / cache) may use each other one way."""
    packages: dict[str, dict[str, int]] = defaultdict(dict)
    for source, targets in graph.items():
        for target in targets:
            if layer(source) != layer(target):
                packages[layer(source)][layer(target)] = 0
    assert not strongly_connected(packages)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path) -> None:
    """The walk must not miss what a maintainer hides in a function, or spells relatively."""
    path = tmp_path / "mod.py"
    path.write_text(
        "def f():\n    from vlmkit.api import VLM\n\nfrom .sibling import thing\nimport vlmkit.cli.main\n"
    )
    names = [name for name, _ in imported_names("vlmkit.models.mod", path)]
    assert sorted(names) == ["vlmkit.api.VLM", "vlmkit.cli.main", "vlmkit.models.sibling.thing"]
    cyclic = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert strongly_connected(cyclic) == [["a", "b", "c"]]
