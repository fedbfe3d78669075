"""``vptune data ...``: build VTAB-1k splits, mini-VTAB, procedural tasks; check datasets; list tasks."""

from __future__ import annotations

import argparse
import os

from vptune.data import DataConfig, list_vtab_tasks
from vptune.data.check import check_dataset, format_reports, raise_if_bad
from vptune.data.mini_vtab import build_mini_vtab, procedural_sizes, write_procedural_task
from vptune.data.vtab import vtab1k_from_class_folder
from vptune.data.vtab_arrays import is_array_dataset, vtab1k_from_dataset
from vptune.errors import VptuneError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its subcommands."""
    p = sub.add_parser("data", help="prepare and check datasets", description=__doc__)
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: _no_subcommand(p))

    v = dsub.add_parser("vtab1k", help="draw VTAB-1k splits from a class folder, an npz or a HF datasets folder")
    v.add_argument("src", help="class folder (<class>/<image>, or train/ and test/ class folders), an .npz "
                               "(x_<split>/y_<split> or MedMNIST's <split>_images/<split>_labels) or a "
                               "Hugging Face save_to_disk folder")
    v.add_argument("--out", required=True, help="output folder; the task goes to OUT/TASK_NAME")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--test-cap", type=int, default=None, help="keep at most this many test images")
    v.add_argument("--task-name", default=None, help="task folder name (default: the source folder's name)")
    v.add_argument("--train", type=int, default=800, help="training images (default 800)")
    v.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    v.add_argument("--mode", choices=("copy", "symlink", "hardlink"), default="copy",
                   help="how images are placed in the task folder")
    v.add_argument("--force", action="store_true", help="rebuild even if built with other settings")
    v.set_defaults(func=_vtab1k)

    m = dsub.add_parser("mini-vtab", help="build mini-VTAB (4 Natural + 4 Structured tasks) for CPU runs")
    m.add_argument("--assets", default=os.environ.get("VPTUNE_ASSETS"),
                   help="assets folder with datasets/ (default: $VPTUNE_ASSETS)")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--scale", type=float, default=1.0, help="shrink every split (e.g. 0.05 for a smoke test)")
    m.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    m.add_argument("--workers", type=int, default=2, help="processes for rendering")
    m.add_argument("--force", action="store_true")
    m.set_defaults(func=_mini_vtab)

    g = dsub.add_parser("generate", help="render a procedural structured task (dSprites / CLEVR style)")
    g.add_argument("task", help="dsprites_loc, dsprites_ori, clevr_count or clevr_dist")
    g.add_argument("--out", required=True, help="output folder; the task goes to OUT/TASK")
    g.add_argument("--n", type=int, default=2000, help="samples (2000: train800 / val200 / test 1000)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=int, default=None, help="image width in pixels")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--force", action="store_true")
    g.set_defaults(func=_generate)

    c = dsub.add_parser("check", help="scan a dataset for unreadable images and bad labels")
    c.add_argument("root", help="dataset folder or file")
    c.add_argument("--format", default="auto")
    c.add_argument("--split", nargs="+", default=None, help="only these splits (default: all)")
    c.add_argument("--workers", type=int, default=2)
    c.set_defaults(func=_check)

    t = dsub.add_parser("tasks", help="list the 19 VTAB-1k tasks with class counts and groups")
    t.set_defaults(func=_tasks)


def _no_subcommand(p: argparse.ArgumentParser) -> int:
    import sys

    p.print_help()
    print("vptune data: error: give a subcommand (listed above)", file=sys.stderr)
    return 2


def _check_out(out: str) -> None:
    """``--out`` must be a folder (or not exist yet), checked before anything is read or rendered."""

    if os.path.exists(out) and not os.path.isdir(out):
        raise VptuneError(f"--out {out} is a file, not a folder")


def _check_counts(**counts: int | None) -> None:

    for flag, value in counts.items():
        if value is not None and value < 1:
            raise VptuneError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def _vtab1k(a: argparse.Namespace) -> int:
    _check_out(a.out)
    if is_array_dataset(a.src):
        path = vtab1k_from_dataset(a.src, a.out, a.seed, a.test_cap, a.task_name, a.train, a.val, a.force)
        print(f"wrote {path}")
        return 0
    path = vtab1k_from_class_folder(a.src, a.out, a.seed, a.test_cap, a.task_name, a.train, a.val, a.mode,
                                    a.force)
    print(f"wrote {path}")
    return 0


def _mini_vtab(a: argparse.Namespace) -> int:
    _check_out(a.out)
    _check_counts(workers=a.workers)
    done = build_mini_vtab(a.assets, a.out, a.seed, a.scale, a.tasks, a.workers, a.force)
    for t, path in done.items():
        print(f"{t}: {path}")
    return 0


def _generate(a: argparse.Namespace) -> int:
    _check_out(a.out)
    _check_counts(size=a.size, workers=a.workers)
    n_train, n_val, n_test = procedural_sizes(a.n)
    path = write_procedural_task(a.task, os.path.join(a.out, a.task), n_train, n_val, n_test, a.seed, a.size,
                                 a.workers, a.force)
    print(f"wrote {path} (train800 {n_train}, val200 {n_val}, test {n_test})")
    return 0


def _check(a: argparse.Namespace) -> int:
    _check_counts(workers=a.workers)
    fmt, reports = check_dataset(DataConfig(root=a.root, format=a.format), a.split, a.workers)
    print(format_reports(fmt, a.root, reports))
    raise_if_bad(a.root, reports)
    return 0


def _tasks(a: argparse.Namespace) -> int:
    for name, (k, group) in list_vtab_tasks().items():
        print(f"{name:22s} {k:4d}  {group}")
    return 0

