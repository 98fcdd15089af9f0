"""The import graph of patronus/ against the layer order in docs/ARCHITECTURE.md.

Every import of a patronus module counts, at module level or inside a
function (a lazy import is still a dependency), except those under ``if
TYPE_CHECKING:`` (annotations only). A module may import its own package's
modules and anything in a lower layer; nothing upward, nothing sideways
between packages of one layer, and no cycle between modules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "patronus"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def layers() -> list[set[str]]:
    """The layer table of ARCHITECTURE.md: one line per layer, top first,
    ``name, name   what it owns`` between the layer markers."""
    text = DOC.read_text()
    block = re.search(r"<!-- layers -->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md lost its <!-- layers --> block"
    out = []
    for line in block.group(1).splitlines():
        names = line.split("  ")[0].strip()
        if names and not names.startswith(("|", "v")):
            out.append({n.strip() for n in names.split(",")})
    return out


def unit(module: str) -> str:
    """The layer unit of a module: its top-level package or module under patronus."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "patronus"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    for p in PKG.glob("*.pyx"):
        out[f"patronus.{p.stem}"] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The patronus modules ``name`` imports (outside TYPE_CHECKING blocks)."""
    if path.suffix == ".pyx":
        return set()
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "patronus")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "patronus":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out.update(subs if subs and len(subs) == len(node.names) else [target, *subs])
    out.discard(name)
    return out


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_the_layer_table_names_every_package():
    named = set().union(*layers())
    present = {unit(m) for m in GRAPH}
    assert present - named == set(), "add these to the layer table of docs/ARCHITECTURE.md"
    assert named - present == set(), "the layer table names what does not exist"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    rank = {u: i for i, layer in enumerate(layers()) for u in layer}
    mine = unit(module)
    wrong = [f"{module} -> {t} ({unit(t)} is {'above' if rank[unit(t)] < rank[mine] else 'beside'} {mine})"
             for t in sorted(GRAPH[module])
             if unit(t) != mine and rank[unit(t)] <= rank[mine]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    # a package's __init__ importing its own modules is how a package is
    # built, not a dependency cycle: those edges are left out
    edges = {m: {t for t in ts if not (t.startswith(m + ".") and GRAPH.get(t) is not None)} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t in edges and not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m)


def test_the_checker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    """The walker itself: an import inside a function counts, one under
    TYPE_CHECKING does not."""
    p = tmp_path / "m.py"
    p.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from patronus import cli\n"
                 "def f():\n    from patronus.lab import net\n")
    known = {"patronus.lab.net": p, "patronus.cli": p}
    assert imports("patronus.x", p, known) == {"patronus.lab.net"}
