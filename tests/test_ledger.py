"""The mini-VTAB ledger (benchmarks/_ledger.py): finished runs survive a fresh checkout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _ledger
from vptune.engine.runfolder import read_result

RUN = Path("dtd10/vpt-deep/grid/lr0.01_wd0.0001")


def _result(status: str = "done") -> dict:
    return {"status": status, "val": {"top1": 71.5, "per_class": [70.0, 73.0], "confusion": [[7, 3], [2, 8]]},
            "test": None, "config": {"optim": {"base_lr": 0.01}}}


def _write(folder: Path, obj: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(obj))


def test_export_then_restore_gives_the_slim_result_in_a_fresh_out(tmp_path: Path) -> None:
    out, ledger, fresh = tmp_path / "out", tmp_path / "ledger", tmp_path / "fresh"
    _write(out / RUN, _result())
    _write(out / "dtd10/vpt-deep/grid/unfinished", {"status": "running"})
    assert _ledger.export(out, ledger) == 1
    assert _ledger.export(out, ledger) == 0  # idempotent: nothing changed
    assert _ledger.restore(ledger, fresh) == 1
    got = read_result(fresh / RUN)
    assert got == {"status": "done", "val": {"top1": 71.5}, "test": None, "config": {"optim": {"base_lr": 0.01}}}
    assert not (fresh / "dtd10/vpt-deep/grid/unfinished").exists()


def test_restore_never_overwrites_a_result_already_in_the_run_folder(tmp_path: Path) -> None:
    out, ledger = tmp_path / "out", tmp_path / "ledger"
    _write(ledger / RUN, _result("diverged"))
    _write(out / RUN, _result("done"))
    assert _ledger.restore(ledger, out) == 0
    assert read_result(out / RUN)["status"] == "done"
    assert _ledger.export(out, ledger) == 1  # the run folder's newer result replaces the ledger's
    assert read_result(ledger / RUN)["status"] == "done"
