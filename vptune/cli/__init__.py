"""The ``vptune`` command line: parse, then call the library.

Each command group lives in its own small module here (``data``, ``train`` ...), exposing
``register(subparsers)`` that adds its parsers and sets ``func`` to a handler taking the parsed args.
A :class:`~vptune.errors.VptuneError` (or a missing file, a file where a folder is expected and the
reverse, a file it may not read) is printed as one line and exits with 2; a bad command line too
(argparse's usage text is left to ``--help``). A user error never shows a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from vptune.errors import VptuneError
from vptune.version import __version__

# Command modules, in the order they appear in --help. A module that is absent is skipped.
COMMAND_MODULES = ("data", "train", "prune", "sweep", "serve", "demo")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2): ``vptune train: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_overrides_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable, collected in ``args.overrides``): dotted-key config overrides."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="vptune", description="Visual Prompt Tuning (Jia et al., ECCV 2022) for frozen vision backbones."
    )
    parser.add_argument("--version", action="version", version=f"vptune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"vptune.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"vptune.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        print("vptune: error: give a command (listed above)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except VptuneError as e:
        print(f"vptune: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"vptune: error: no such file or folder: {e.filename or e}", file=sys.stderr)
        return 2
    except (NotADirectoryError, IsADirectoryError, PermissionError) as e:  # a path given where it cannot work
        what = {NotADirectoryError: "not a folder", IsADirectoryError: "a folder, not a file",
                PermissionError: "permission denied"}[type(e)]
        print(f"vptune: error: {what}: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training run stopped by Ctrl-C says where its checkpoint is
        print(f"vptune: {e}" if str(e) else "vptune: interrupted", file=sys.stderr)
        return 130


def run(argv: list[str] | None = None) -> None:
    """The ``vptune`` command and ``python -m vptune``: :func:`main`, then exit with its status. A process of
    a data-parallel launch (``torchrun``) leaves without the interpreter's teardown, which gloo's worker
    threads can abort (:func:`vptune.engine.distributed.leave_process`)."""
    code = main(argv)
    distributed = sys.modules.get("vptune.engine.distributed")  # imported only by a data-parallel run
    if distributed is not None and distributed.joined_group():
        distributed.leave_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
