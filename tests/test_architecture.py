"""The package's layout as README's architecture section states it: no import
circles, backends under clipfast/backends/ reached through the registry, and
the tools (benchmark, training, AOT check, perf model) above the library.

Imports are read from the source (every ``import`` statement, including those
inside functions, which are circles just the same when they run), so the test
sees the graph without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

import clipfast
from clipfast import backends
from clipfast.dispatch import BACKENDS

PACKAGE = Path(clipfast.__file__).parent
# Modules nothing in the library may import: they sit above it.
TOOLS = {"clipfast.bench", "clipfast.train", "clipfast.aot_check", "clipfast.perfmodel",
         "clipfast._cli", "clipfast.check"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, level: int, name: str) -> str:
    if level == 0:
        return name
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> Dict[str, Set[str]]:
    """module -> the clipfast modules it imports (``from X import Y`` counts
    as importing X.Y when that is a module, else X)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node.level, node.module or "")
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reader_resolves_relative_imports():
    graph = import_graph()
    assert "clipfast.backends._ops" in graph["clipfast.backends.chunked"]
    assert "clipfast.backends.triton.clip_loss" in graph["clipfast.backends.triton"]
    assert "clipfast._inputs" in graph["clipfast.api"]


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_the_library_never_imports_the_tools():
    graph = import_graph()
    offenders = {m: sorted(graph[m] & TOOLS) for m in graph
                 if m not in TOOLS and graph[m] & TOOLS}
    assert offenders == {}


def test_backends_never_import_the_layers_above_them():
    above = {"clipfast.api", "clipfast.dispatch", "clipfast.modules", "clipfast.distributed",
             "clipfast.infonce", "clipfast.autoselect"} | TOOLS
    graph = import_graph()
    offenders = {m: sorted(graph[m] & above) for m in graph
                 if m.startswith("clipfast.backends") and graph[m] & above}
    assert offenders == {}


def test_every_backend_lives_under_backends_and_is_registered():
    for name, backend in backends.REGISTRY.items():
        assert backend.name == name
        module = type(backend).__module__
        assert module.startswith("clipfast.backends."), module
    assert BACKENDS == ("auto",) + tuple(backends.REGISTRY)
    assert clipfast.BACKENDS == BACKENDS
    old_homes = ["reference.py", "chunked.py", "cpu_backend.py", "cuda_backend.py", "_triton",
                 "siglip.py", "_ops.py"]
    assert [p for p in old_homes if (PACKAGE / p).exists()] == []


def test_public_entry_points_have_no_per_backend_branches():
    """Dispatch goes through the registry: the public modules never compare a
    backend name with a literal (``chosen == "triton"``)."""
    names = set(backends.REGISTRY)
    for module in ("api", "dispatch", "infonce", "modules", "distributed"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                literals = {c.value for c in [node.left, *node.comparators]
                            if isinstance(c, ast.Constant)}
                assert not literals & names, (module, ast.unparse(node))


@pytest.mark.parametrize("name", sorted(backends.REGISTRY))
def test_registry_declarations_are_complete(name):
    backend = backends.get(name)
    assert backend.summary and backend.dtypes
    assert backend.block_option in (None, "chunk_elements", "panel_size")
    assert backends.get(backend.stand_in).has(backends.ROWS)
    assert backends.get(backend.stand_in).has(backends.BLOCKS)
