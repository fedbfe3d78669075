"""``vptune prune RUN --output OUT``: E2VPT's prompt pruning and rewinding (:mod:`vptune.engine.prune`)."""

from __future__ import annotations

import argparse

from vptune.cli.train import setup_logging
from vptune.engine.prune import prune_run


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prune`` command."""
    p = sub.add_parser(
        "prune", help="prune a vpt-kv run's input prompts (E2VPT) and retrain from the rewound init",
        description="Score the input prompts of a finished vpt-kv run (|dL/d rho| of a mask on each token and "
                    "segment, over its training split), prune the lowest per block, and train the same config "
                    "again from the same initial values with those prompts masked out (E2VPT, Sec. 3.3). "
                    "Prune the result again for more rounds.")
    p.add_argument("run", help="a finished vpt-kv training run folder (num_tokens > 0)")
    p.add_argument("--output", required=True, help="the new run folder")
    p.add_argument("--tokens", type=float, required=True,
                   help="fraction of each block's prompt tokens to prune, in [0, 1)")
    p.add_argument("--segments", type=int, default=1,
                   help="split every prompt into this many segments for segment-wise pruning (default 1: off)")
    p.add_argument("--segment-fraction", type=float, default=0.0,
                   help="fraction of the kept tokens' segments to prune, in [0, 1) (default 0)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="score on at most this many training batches (default: the whole split)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted retraining in --output")
    p.add_argument("--overwrite", action="store_true", help="start over if --output holds another run")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    p.set_defaults(func=_prune)


def _prune(args: argparse.Namespace) -> int:
    setup_logging()
    summary = prune_run(args.run, args.output, tokens=args.tokens, segments=args.segments,
                        segment_fraction=args.segment_fraction, max_batches=args.max_batches,
                        overwrite=args.overwrite, resume=args.resume,
                        progress=not args.no_progress)
    val, test = summary.get("val") or {}, summary.get("test") or {}
    print(f"{summary.get('status', 'done')}: val top-1 {val.get('top1', float('nan')):.2f}%, "
          f"test top-1 {test.get('top1', float('nan')):.2f}%; task saved to {args.output}/task")
    return 0
