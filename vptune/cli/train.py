"""``vptune train | eval | predict | info``: thin wrappers over :mod:`vptune.engine`.

    vptune train --config configs/vpt_deep_vtab.yaml --data vtab-1k/dtd --weights vit_b16.npz \\
        --backbone vit_base_patch16_224 --set optim.base_lr=0.5 --set method.options.num_tokens=50
    vptune eval runs/dtd/task --data vtab-1k/dtd --split test --json metrics.json
    vptune predict runs/dtd/task image1.jpg image2.jpg --top-k 3
    vptune info runs/dtd
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vptune.artifact import atomic_write_json, read_task_json
from vptune.backbones.registry import resolve
from vptune.checks import coerce_fields
from vptune.cli import add_overrides_arg
from vptune.data import detect_format, load_image
from vptune.data.readers import _images_under
from vptune.engine import load_config, run_training
from vptune.engine.checkpoint import CHECKPOINT
from vptune.engine.tasks import (
    describe,
    evaluate_task,
    format_info,
    load_task_model,
    predict_files,
    resolve_task_dir,
    task_protocol,
)
from vptune.errors import VptuneError
from vptune.methods.base import parse_method_name

# plain flag -> dotted config key
TRAIN_FLAGS = {
    "backbone": "backbone.name", "weights": "backbone.weights", "method": "method.name", "data": "data.root",
    "epochs": "optim.epochs", "batch_size": "optim.batch_size", "lr": "optim.base_lr",
    "wd": "optim.weight_decay",
    "output": "output", "seed": "runtime.seed", "device": "runtime.device", "recipe": "recipe",
    "skip_corrupt": "data.skip_corrupt",
}


def register(sub: Any) -> None:
    _register_train(sub)
    _register_eval(sub)
    _register_predict(sub)
    _register_info(sub)


def _register_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a task (a YAML config plus overrides)",
                       description="Train one task. Settings come from --config (YAML), then the plain "
                                   "flags, then --set KEY=VALUE overrides (dotted keys, e.g. "
                                   "optim.base_lr=0.5, method.options.num_tokens=50, "
                                   "backbone.config.depth=2).")
    p.add_argument("--config", help="YAML config file (see configs/)")
    add_overrides_arg(p, "override a config value (repeatable); values are parsed as YAML scalars")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, same as --set method.options.KEY=VALUE (repeatable)")
    p.add_argument("--backbone", help="registered backbone name (backbone.name)")
    p.add_argument("--weights", help="backbone checkpoint file or folder (backbone.weights)")
    p.add_argument("--method", help="method name, e.g. vpt-deep, linear, partial-1 (method.name)")
    p.add_argument("--data", help="dataset folder (data.root)")
    p.add_argument("--epochs", type=int, help="optim.epochs")
    p.add_argument("--batch-size", type=int, help="optim.batch_size")
    p.add_argument("--lr", type=float, help="peak lr (optim.base_lr; with optim.lr_scaling=linear the lr for "
                                           "batch 256, lr = base_lr*bs/256); default: the method's own")
    p.add_argument("--recipe", help="default (vptune's) or reference (the reference code's training)")
    p.add_argument("--wd", type=float, help="weight decay (optim.weight_decay)")
    p.add_argument("--output", help="run folder (output)")
    p.add_argument("--seed", type=int, help="runtime.seed")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (runtime.device)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --output and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (runtime.progress=false)")
    p.add_argument("--skip-corrupt", action="store_true", default=None,
                   help="drop unreadable images with a warning instead of failing (data.skip_corrupt)")
    p.add_argument("--json", metavar="OUT", help="also write the run summary to this JSON file")
    p.set_defaults(func=cmd_train)


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights",
                   help="backbone weights file or folder (default: the path recorded at training)")
    p.add_argument("--backbone", help="backbone name (default: the architecture recorded in task.json)")
    p.add_argument("--source",
                   help="checkpoint layout: auto, timm, jax, hf, mae, mocov3 (default: as trained)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def _add_json_backbone_args(p: argparse.ArgumentParser, json_help: str, func: Any) -> None:
    """The tail shared by ``eval`` and ``predict``: ``--json OUT``, the backbone flags, the handler."""
    p.add_argument("--json", metavar="OUT", help=json_help)
    _add_backbone_args(p)
    p.set_defaults(func=func)


def _register_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a task on a dataset split",
                       description="Top-1, top-5, per-class accuracy and a confusion matrix of a task "
                                   "(a task folder or a finished run folder) on one split.")
    p.add_argument("task", help="task folder (task.json + weights.safetensors) or run folder")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", default="test", help="split name (default: test)")
    p.add_argument("--format", default="auto", help="data format (default: auto)")
    p.add_argument("--protocol", help="transform protocol vtab|fgvc (default: as trained)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--precision", default="fp32", help="fp32, bf16, fp16")
    _add_json_backbone_args(p, "write the metrics to this JSON file", cmd_eval)


def _register_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="top-k labels for image files",
                       description="Classify image files with a task; prints the top-k labels and "
                                   "probabilities.")
    p.add_argument("task", help="task folder or run folder")
    p.add_argument("images", nargs="+", help="image files, or folders (every image file in them, sorted)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--protocol", help="transform protocol vtab|fgvc (default: as trained)")
    _add_json_backbone_args(p, "write the predictions to this JSON file", cmd_predict)


def _register_info(sub: Any) -> None:
    p = sub.add_parser("info", help="what a task folder, run folder or checkpoint holds",
                       description="Method, options, classes, trained parameters, stored bytes and backbone "
                                   "identity of a task; for a run folder also its status.")
    p.add_argument("path", help="task folder, run folder or checkpoint.pt")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


# ------------------------------------------------------------------------------------------ handlers

class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (not the one at setup: it may have been replaced since)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging() -> None:
    log = logging.getLogger("vptune")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def train_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides the command line asks for, in order: plain flags, --option, --set."""
    out = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in TRAIN_FLAGS.items()
           if getattr(args, flag) is not None]
    if args.no_progress:
        out.append("runtime.progress=false")
    out += [f"method.options.{item}" for item in args.options]
    return out + list(args.overrides)


def check_config_file(path: str | None) -> None:
    """A ``--config`` that is missing, a folder or not UTF-8 text gets one clear line."""
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise VptuneError(f"config file {path} does not exist" if not p.exists()
                          else f"config file {path} is not a file")
    try:
        p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise VptuneError(f"config file {path} is not a text (YAML) file") from None


def preflight(cfg: Any) -> None:
    """Checks before anything heavy is loaded: the weights path exists, ``--output`` is not a file, and
    ``method.options`` / ``backbone.config`` values have their fields' types (converted in place, e.g.
    ``"8"`` -> 8; ``num_tokens=abc`` is refused naming the key)."""
    b = cfg.backbone
    if b.weights is not None and not Path(b.weights).exists():
        raise VptuneError(f"backbone weights {b.weights} do not exist (backbone.weights / --weights)")
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise VptuneError(f"output {cfg.output} is a file, not a folder; choose another --output")
    preflight_data(cfg.data)
    cls, _ = parse_method_name(cfg.method.name)
    cfg.method.options = coerce_fields(cls.options_cls, cfg.method.options, "method.options")
    if b.name is not None and b.config:
        _, config = resolve(b.name)
        b.config = coerce_fields(type(config), b.config, "backbone.config")


def preflight_data(d: Any) -> None:
    """``data.root`` is given and, for ``format: auto``, names something a reader recognises (only the
    folder is listed: nothing is decoded)."""

    if not d.root:
        raise VptuneError("no dataset given: set data.root (--data FOLDER)")
    if d.format == "auto":
        detect_format(d.root)


def check_json_out(path: str | None) -> None:
    """A ``--json OUT`` that cannot be written is refused before any work is done."""

    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise VptuneError(f"--json {path} is a folder; give a file name")
    if p.parent.exists() and not p.parent.is_dir():
        raise VptuneError(f"--json {path}: {p.parent} is a file, not a folder")


def check_resume(args: argparse.Namespace, output: str) -> None:
    """``--resume`` with ``--overwrite`` is refused; a checkpoint that is not a torch archive (random bytes,
    a truncated write) is refused before the backbone is loaded."""
    import zipfile


    if args.resume and args.overwrite:
        raise VptuneError("--resume and --overwrite exclude each other: continue the run, or start it over")
    ckpt = Path(output) / CHECKPOINT
    if args.resume and ckpt.is_file() and not zipfile.is_zipfile(ckpt):
        raise VptuneError(f"cannot read checkpoint {ckpt}: corrupt or truncated (not a torch archive); "
                          "pass --overwrite to start over")


def cmd_train(args: argparse.Namespace) -> int:
    check_config_file(args.config)
    check_json_out(args.json)
    cfg = load_config(args.config, train_overrides(args))
    preflight(cfg)
    check_resume(args, cfg.output)
    setup_logging()
    summary = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports (every process gets its summary)
        return 0
    if args.json:
        atomic_write_json(Path(args.json), summary)
    if summary.get("status") == "diverged":
        print(f"{summary['diverged']} (recorded in {Path(cfg.output) / 'result.json'})", file=sys.stderr)
        return 3
    for split in ("val", "test"):
        if summary.get(split):
            print(f"{split} top-1: {summary[split]['top1']:.2f}%  top-5: {summary[split]['top5']:.2f}%")
    print(f"{summary['status']}: {summary['epochs']} epochs, {summary['trainable_parameters']:,} trained "
          f"parameters, task saved to {Path(cfg.output) / 'task'}")
    return 0


def _load_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    task = resolve_task_dir(args.task)
    meta = read_task_json(task)
    model = load_task_model(task, weights=args.weights, backbone_name=args.backbone, source=args.source)
    return model, meta


def cmd_eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.num_workers < 0:
        raise VptuneError(f"--batch-size must be >= 1 and --num-workers >= 0, got {args.batch_size} and "
                          f"{args.num_workers}")
    check_json_out(args.json)
    model, meta = _load_model(args)
    metrics = evaluate_task(model, args.data, args.split, data_format=args.format,
                            protocol=args.protocol or task_protocol(meta), batch_size=args.batch_size,
                            num_workers=args.num_workers, device=args.device, precision=args.precision)
    print(f"{args.split}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
          f"loss {metrics['loss']:.4f}  ({metrics['n']} images)")
    for name, acc in zip(model.label_names, metrics["per_class"]):
        if acc is not None:
            print(f"  {name}: {acc:.2f}%")
    if args.json:
        atomic_write_json(Path(args.json), {"task": str(args.task), "data": args.data, "split": args.split,
                                            "method": meta.get("method"), "label_names": model.label_names,
                                            **metrics})
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise VptuneError(f"--top-k must be >= 1, got {args.top_k}")
    check_json_out(args.json)
    paths = expand_image_args(args.images)
    model, meta = _load_model(args)
    errors = unreadable_images(paths)
    good = [p for p in paths if p not in errors]
    found = predict_files(model, good, k=args.top_k, protocol=args.protocol or task_protocol(meta),
                          device=args.device) if good else []
    by_path = {r["path"]: r for r in found}
    results = [by_path[str(p)] if p not in errors else {"path": str(p), "error": errors[p]} for p in paths]
    for r in results:
        if "error" in r:
            print(f"{r['path']}: unreadable: {r['error']}")
            continue
        tops = ", ".join(f"{t['label']} ({100 * t['prob']:.1f}%)" for t in r["top"])
        print(f"{r['path']}: {tops}")
    if args.json:
        atomic_write_json(Path(args.json), results)
    if errors:
        raise VptuneError(f"{len(errors)} of {len(paths)} image(s) could not be read (listed above)")
    return 0


def expand_image_args(items: list[str]) -> list[str]:
    """Image files as given, and for a folder every image file under it (sorted, hidden files skipped)."""
    out: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = _images_under(item)
            if not found:
                raise VptuneError(f"folder {item} holds no image files")
            out.extend(found)
        elif os.path.exists(item):
            out.append(item)
        else:
            raise VptuneError(f"image {item} does not exist")
    return out


def unreadable_images(paths: list[str]) -> dict[str, str]:
    """``{path: reason}`` of the files that do not decode (each is reported, the others still predicted)."""
    errors = {}
    for p in paths:
        try:
            load_image(p)
        except VptuneError as e:
            errors[p] = str(e)
    return errors


def cmd_info(args: argparse.Namespace) -> int:
    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
