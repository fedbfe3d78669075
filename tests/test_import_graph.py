"""The import graph of ``vptune`` (read with ``ast``, nothing imported): no cycles, and no import from a
lower layer to a higher one. Every import counts, function-local ones included. The layer table is the
one in docs/architecture.md; a module belongs to the longest prefix listed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vptune"

LAYERS: dict[str, int] = {
    "vptune.errors": 0, "vptune.version": 0, "vptune.io": 0, "vptune.checks": 0,
    "vptune.backbones": 1,
    "vptune.methods": 2,
    "vptune.model": 3,
    "vptune.artifact": 4,
    "vptune.data": 5, "vptune.multitask": 5, "vptune.export": 5,
    "vptune": 5,  # the package facade: the core API, MultiTaskModel loaded lazily
    "vptune.engine": 6,
    "vptune.cli": 7, "vptune.serve": 7, "vptune.serving_limits": 7, "vptune.demo": 7, "vptune.__main__": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The vptune modules ``path`` imports (``from vptune.x import y`` counts vptune.x.y when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "vptune"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "vptune":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m != name}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {n: imports_of(p, n, set(files)) for n, p in files.items()}


def layer(name: str) -> int:
    key = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len, default=None)
    if key is None:
        pytest.fail(f"module {name} has no layer in LAYERS (add it here and to docs/architecture.md)")
    return LAYERS[key]


def test_every_module_has_a_layer():
    for name in graph():
        layer(name)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
           for a, deps in graph().items() for b in deps if layer(b) > layer(a)]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checker itself can fail: a planted cycle and a planted upward import are found."""
    pkg = tmp_path / "vptune"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from vptune.engine import a\n")  # layer 0 -> 6
    (pkg / "engine" / "a.py").write_text("def f():\n    from vptune.engine import b\n")
    (pkg / "engine" / "b.py").write_text("from vptune.engine.a import f\n")
    files = {module_name_in(pkg, p): p for p in pkg.rglob("*.py")}
    g = {n: imports_of(p, n, set(files)) for n, p in files.items()}
    assert "vptune.engine.a" in g["vptune.errors"]
    assert g["vptune.engine.a"] == {"vptune.engine.b"} and g["vptune.engine.b"] == {"vptune.engine.a"}


def module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)
