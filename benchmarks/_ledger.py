"""A committed ledger of a sweep's finished runs, so a long benchmark resumes across sessions and machines.

A sweep knows a run is finished from its folder's ``result.json`` alone (status and config, see
``vptune.engine.sweep_plan.run_state``), and its report reads nothing else. Run folders hold weights,
checkpoints and TensorBoard logs and stay gitignored, so a fresh checkout loses them. The ledger mirrors
each finished run's ``result.json`` (without the per-class and confusion lists, which nothing downstream
reads: a few KB per run) into a tracked folder, ``<ledger>/<task>/<method>/<stage>/<run>/result.json``;
:func:`restore` writes them back into the run folders that lack one before the sweep plans, so the same
command picks up where any earlier session stopped. A restored run counts as done only if its config equals
the one the sweep would train now (``run_state``); otherwise it is stale and retrained as usual.
The ledger keeps no ``selection.json``: :func:`reselect` rewrites it from the restored grid results with the
sweep's own rule (``select_all``), so a report from a fresh checkout lists the chosen settings too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vptune.engine.runfolder import RESULT_FILE, read_result
from vptune.engine.sweep_plan import SELECTION_FILE, method_dir, plan_grid, run_state, select_all
from vptune.io import atomic_write_json

FINISHED = ("done", "stopped", "diverged")
BULKY = ("per_class", "confusion")


def slim(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` without the bulky per-class lists of its val and test metrics."""
    out = dict(result)
    for split in ("val", "test"):
        if isinstance(out.get(split), dict):
            out[split] = {k: v for k, v in out[split].items() if k not in BULKY}
    return out


def _finished(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(Path(root).rglob(RESULT_FILE)) if Path(root).is_dir() else []:
        result = read_result(path.parent)
        if result is not None and result.get("status") in FINISHED:
            found.append((path.relative_to(root), result))
    return found


def export(out: Path, ledger: Path) -> int:
    """Mirror every finished run under ``out`` into ``ledger``; returns how many files changed."""
    changed = 0
    for rel, result in _finished(out):
        entry = slim(result)
        if read_result((ledger / rel).parent) != entry:
            atomic_write_json(ledger / rel, entry)
            changed += 1
    return changed


def restore(ledger: Path, out: Path) -> int:
    """Write each ledger entry into its run folder under ``out`` where that folder has no ``result.json``;
    returns how many were restored. A result already in a run folder always wins."""
    restored = 0
    for rel, result in _finished(ledger):
        if not (out / rel).exists():
            atomic_write_json(out / rel, result)
            restored += 1
    return restored


def reselect(spec: Any) -> int:
    """Write ``<task>/<method>/selection.json`` for every (task, method) of ``spec`` (a ``SweepSpec``) that has
    none and whose grid runs all hold results of the sweep's config (``run_state`` "done"): the choice the
    sweep itself would write. Returns how many were written; an unfinished or stale grid gets none."""
    pairs: dict[tuple[str, str], list[Any]] = {}
    for run in plan_grid(spec):
        pairs.setdefault((run.task, run.method), []).append(run)
    written = 0
    for (task, method), runs in pairs.items():
        if (method_dir(spec, task, method) / SELECTION_FILE).exists():
            continue
        if all(run_state(r) == "done" for r in runs):
            select_all(spec, runs)
            written += 1
    return written
