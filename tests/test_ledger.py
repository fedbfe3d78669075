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


def test_reselect_rewrites_the_sweeps_own_selection_from_restored_results(tmp_path: Path) -> None:
    """A fresh checkout has the ledger's result.json files but no selection.json: reselect writes the same
    choice the sweep wrote, and none for a (task, method) whose grid is not all finished."""
    from tests.test_sweep import FakeTrainer, fake_env, make_task, sweep_dict
    from vptune.engine import sweep as S

    make_task(tmp_path / "data", "toy")
    make_task(tmp_path / "data", "toy2", classes=2)
    d = sweep_dict(tmp_path, tmp_path / "data", tasks={"root": str(tmp_path / "data"), "names": ["toy", "toy2"]})
    val = {(0.5, 0.0, 2): 60.0, (0.1, 0.0, 2): 75.0}
    S.run_sweep(S.parse_sweep(d), env=fake_env(FakeTrainer(val, {})), log=lambda _: None)
    out, ledger, fresh = tmp_path / "out", tmp_path / "ledger", tmp_path / "fresh"
    wrote = json.loads((out / "toy/vpt-deep/selection.json").read_text())
    _ledger.export(out, ledger)
    (ledger / "toy2/vpt-deep/grid/lr0.5_wd0/result.json").unlink()  # toy2's grid unfinished in the ledger
    _ledger.restore(ledger, fresh)
    spec = S.parse_sweep({**d, "output": str(fresh)})
    assert _ledger.reselect(spec) == 1
    got = json.loads((fresh / "toy/vpt-deep/selection.json").read_text())
    assert got["choice"]["lr"] == wrote["choice"]["lr"] == 0.1
    assert [g["val_top1"] for g in got["grid"]] == [g["val_top1"] for g in wrote["grid"]] == [75.0, 60.0]
    assert not (fresh / "toy2/vpt-deep/selection.json").exists()
    assert _ledger.reselect(spec) == 0  # idempotent: an existing selection is kept
