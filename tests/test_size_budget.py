"""The size budget of the developers' guide, read with ``ast`` (nothing imported): no function or method in
``vptune/`` or ``benchmarks/`` over 80 lines (decorators excluded, docstring included) and no module over 600
lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOTS = [Path(__file__).resolve().parents[1] / name for name in ("vptune", "benchmarks")]
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def over_budget(root: Path) -> list[str]:
    """Every function over :data:`MAX_FUNCTION_LINES` and module over :data:`MAX_MODULE_LINES` under ``root``."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(root.parent)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            bad.append(f"{rel}: {lines} lines (module budget {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    bad.append(f"{rel}:{node.lineno} {node.name}: {n} lines (function budget {MAX_FUNCTION_LINES})")
    return bad


def test_no_function_over_80_lines_and_no_module_over_600():
    bad = [b for root in ROOTS for b in over_budget(root)]
    assert all(root.is_dir() for root in ROOTS) and not bad, "\n".join(bad)


def test_the_budget_check_can_fail(tmp_path):
    """A planted long function and a planted long module are both reported, a short one is not."""
    pkg = tmp_path / "vptune"
    pkg.mkdir()
    (pkg / "ok.py").write_text("def f():\n" + "    x = 1\n" * 79)  # 80 lines: within budget
    (pkg / "long_function.py").write_text("def f():\n" + "    x = 1\n" * 80)  # 81 lines
    (pkg / "long_module.py").write_text("x = 1\n" * 601)
    bad = over_budget(pkg)
    assert len(bad) == 2
    assert any("long_function.py:1 f: 81 lines" in b for b in bad)
    assert any("long_module.py: 601 lines" in b for b in bad)
