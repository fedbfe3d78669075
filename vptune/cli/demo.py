"""``vptune demo``: pretrain a small ViT on procedural data (cached), adapt it with linear, full,
VPT-shallow and VPT-deep, print the table, write task folders and a plot, and serve one mixed batch."""

from __future__ import annotations

import argparse

import vptune.demo as demo_lib  # run_demo looked up at call time (tests replace it)
from vptune.demo import DemoOptions
from vptune.errors import VptuneError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    p = sub.add_parser(
        "demo", help="the paper's story end to end on CPU in minutes (no download needed)",
        description="Pretrains a small ViT on procedural upstream data (cached for the next run), adapts it to "
                    "held-apart procedural tasks with linear, full, vpt-shallow and vpt-deep, prints a table "
                    "(test top-1, trainable parameters, bytes stored per task), writes task folders, "
                    "results.md/json and demo.png, and classifies one mixed batch of several tasks through one "
                    "backbone. With --assets (or VPTUNE_ASSETS) it uses the real ViT-Ti and real images.")
    p.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    p.add_argument("--cache", default=None,
                   help="pretrained-backbone cache (default: $VPTUNE_CACHE or ~/.cache/vptune/demo)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--assets", default=None, metavar="DIR",
                   help="shared assets folder: use the real ViT-Ti and real images (default: $VPTUNE_ASSETS)")
    g.add_argument("--no-assets", action="store_true", help="ignore VPTUNE_ASSETS; use the procedural demo")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; numbers mean little)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 1: measured fastest for these small models on a busy 2-core machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise VptuneError(f"--threads must be >= 1, got {args.threads}")
    _check_paths(args)
    demo_lib.run_demo(DemoOptions(out=args.out, cache=args.cache, assets=args.assets, no_assets=args.no_assets,
                         quick=args.quick, threads=args.threads, seed=args.seed,
                         progress=not args.no_progress))
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Folders the demo writes or reads, checked before minutes of pretraining (not after)."""
    from pathlib import Path


    for flag, value in (("--out", args.out), ("--cache", args.cache)):
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise VptuneError(f"{flag} {value} is a file, not a folder")
    if args.assets is not None and not Path(args.assets).is_dir():
        raise VptuneError(f"--assets {args.assets} is not a folder" if Path(args.assets).exists()
                          else f"--assets {args.assets} does not exist")
