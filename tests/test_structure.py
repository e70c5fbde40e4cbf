"""The package's structure: no import circle anywhere in eekernels/, and nothing in
eekernels/ that only the benchmarks use (benchmark code lives in benchmarks/).

Every import counts, also one inside a function, and so does a module named in a string
("eekernels.triton.exit_head:exit_head_triton", how backends and the method registry
import lazily)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "eekernels"
#: modules used from outside by design: the command line and its entry points
ENTRY_POINTS = {"eekernels", "eekernels.__main__", "eekernels.cli"}
_STRING_MODULE = re.compile(r"""["'](eekernels(?:\.\w+)+)(?::\w+)?["']""")
#: the compiled extension (no Python source, imports nothing of the package)
COMPILED = {"eekernels._C"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "_csrc" not in p.parts}


def imported_modules(path: Path, known: Set[str], package: str) -> Set[str]:
    """The eekernels modules ``path`` imports (absolute, relative, in functions, in strings);
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: Set[str] = set()

    def add(name: str) -> None:
        if name in COMPILED:
            return
        while name and name not in known:  # eekernels.ops.exit_head.ExitHeadOutput -> eekernels.ops.exit_head
            name = name.rpartition(".")[0]
        if name:
            out.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "eekernels":
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "eekernels":
                continue
            for a in node.names:
                full = f"{mod}.{a.name}"
                add(full if full in known or full in COMPILED else mod)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _STRING_MODULE.fullmatch(repr(node.value))
            if m and m.group(1) in known:  # a module named in a string (not "eekernels.json")
                out.add(m.group(1))
    return out


def import_graph() -> Dict[str, Set[str]]:
    mods = package_modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imported_modules(path, known, pkg) - {name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    # A package's __init__ re-exporting its submodules is not a circle in itself; the edge
    # submodule -> its own package __init__ is (it runs the __init__ again): both count.
    found = cycles(graph)
    assert not found, "import circles in eekernels/: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_package_module_is_used_only_by_the_benchmarks():
    graph = import_graph()
    mods = package_modules()
    known = set(mods)
    used_inside = set(ENTRY_POINTS)
    for targets in graph.values():
        used_inside |= targets
    used_by_benchmarks: Set[str] = set()
    for path in (ROOT / "benchmarks").rglob("*.py"):
        used_by_benchmarks |= imported_modules(path, known, "benchmarks")
    # a package counts as used when one of its modules is (its __init__ runs)
    used_inside |= {m.rpartition(".")[0] for m in used_inside}
    only_bench = sorted(m for m in used_by_benchmarks - used_inside if m in known)
    assert not only_bench, f"eekernels modules only the benchmarks import (move them to benchmarks/): {only_bench}"
