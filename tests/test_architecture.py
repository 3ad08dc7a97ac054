"""The package's shape is policed: no import circles (lazy imports count), no module over 500
lines, no module importing another's private names, io/ a leaf, the engine blind to the Hub."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ckptavg"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.with_suffix("").relative_to(PACKAGE.parent).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "ckptavg":
                target = node.module
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, []) if sub in MODULES else (target, [a.name]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "ckptavg"]
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for target, _ in _imports(m, p):
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    graph = _graph()
    graph["ckptavg.io.layout"] = graph["ckptavg.io.layout"] | {"ckptavg.averaging"}
    assert any("ckptavg.io.layout" in c and "ckptavg.averaging" in c for c in _cycles(graph))


def test_no_import_circles_even_through_lazy_imports():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("leaf,forbidden", [
    ("ckptavg.io", ("ckptavg.trajectory", "ckptavg.sources", "ckptavg.hub", "ckptavg.local", "ckptavg.engine")),
    ("ckptavg.engine", ("ckptavg.hub", "ckptavg.sources", "ckptavg.local")),
    ("ckptavg.trajectory", ("ckptavg.hub", "ckptavg.sources", "ckptavg.local", "ckptavg.io.readers")),
], ids=["io-is-a-leaf", "engine-without-hub", "trajectory-is-pure-data"])
def test_layers_point_one_way(leaf, forbidden):
    graph = _graph()
    mods = [m for m in graph if m == leaf or m.startswith(leaf + ".")]
    bad = [(m, t) for m in mods for t in graph[m] if any(t == f or t.startswith(f + ".") for f in forbidden)]
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES), ids=sorted(MODULES))
def test_no_module_over_500_lines(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


def test_no_module_imports_another_modules_private_names():
    bad = []
    for m, p in MODULES.items():
        for target, names in _imports(m, p):
            bad += [f"{m} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")
                    and target != m]
    assert bad == []
