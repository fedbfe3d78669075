"""``vptune serve`` (HTTP service over many tasks on one backbone) and ``vptune export`` (ONNX).

vptune serve --weights WEIGHTS_DIR --task dtd=tasks/dtd --task tasks/pets --port 8000
vptune serve --weights WEIGHTS_DIR --task-root tasks/ --max-resident-tasks 16   # load on first use
VPTUNE_API_TOKEN=... vptune serve --weights WEIGHTS_DIR --task-root tasks/ --host 0.0.0.0
vptune export --format onnx --weights WEIGHTS_DIR --task tasks/dtd --task tasks/pets --out export/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import vptune.serve as serve_lib  # run_server looked up at call time (tests replace it)
from vptune.artifact import read_task_json
from vptune.backbones import create_backbone
from vptune.errors import VptuneError
from vptune.export import export_onnx
from vptune.multitask import MultiTaskModel
from vptune.serve import ServeConfig, check_bind, resolve_token

MIN_OPSET, MAX_OPSET = 14, 23  # aten::scaled_dot_product_attention needs 14; torch's exporter knows up to 23


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve tasks over HTTP with dynamic micro-batching",
        description="Serve task folders that share one frozen backbone over HTTP "
        "(FastAPI + uvicorn). Needs the 'serve' extra.",
    )
    _backbone_args(p)
    _serve_args(p)
    p.set_defaults(func=cmd_serve)
    _export_parser(sub)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1); any non-loopback address needs an API token",
    )
    p.add_argument(
        "--token",
        default=None,
        help="API token clients send as 'Authorization: Bearer <token>' (default: $VPTUNE_API_TOKEN; "
        "prefer the variable: arguments are visible to other users)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="samples per backbone batch (default 32)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the worker waits to fill a batch (default 5 ms)",
    )
    p.add_argument("--max-queue", type=int, default=1024, help="queued requests before 503 (default 1024)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (504)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted image upload (413)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest accepted image area (413)")
    p.add_argument("--top-k", type=int, default=5, help="default number of labels returned")
    p.add_argument(
        "--task-root",
        default=None,
        help="folder of task folders, loaded on first use by folder name; POST /v1/tasks loads only "
        "from here (off without it)",
    )
    p.add_argument("--max-resident-tasks", type=int, default=64, help="tasks kept loaded (LRU; default 64)")
    p.add_argument(
        "--max-resident-mb", type=float, default=4096.0, help="memory of the loaded tasks (LRU; default 4096)"
    )
    p.add_argument(
        "--max-input-size", type=int, default=1024, help="largest task input side served (default 1024)"
    )
    p.add_argument(
        "--compute-workers", type=int, default=2, help="batching threads (default 2: a slow batch "
        "leaves the other serving)"
    )
    p.add_argument(
        "--shutdown-timeout", type=float, default=5.0, help="SIGTERM: seconds in-flight requests get"
    )
    p.add_argument("--no-task-loading", action="store_true", help="disable the task admin routes")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--limit-concurrency", type=int, default=None, help="uvicorn: open connections before 503")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _export_parser(sub: Any) -> None:
    e = sub.add_parser(
        "export",
        help="export the backbone and prompt tasks to ONNX",
        description="Export the backbone once (prompts as graph inputs) and each task's head, "
        "then verify with onnxruntime against PyTorch. Needs the 'onnx' extra.",
    )
    _backbone_args(e)
    e.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    e.add_argument("--out", "-o", required=True, help="output folder")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--atol", type=float, default=1e-4, help="verification: absolute tolerance on the logits")
    e.add_argument("--rtol", type=float, default=1e-4, help="verification: relative tolerance on the logits")
    e.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    e.set_defaults(func=cmd_export)


def _backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone", default=None, help="registered backbone name (see 'vptune.list_backbones()')"
    )
    p.add_argument(
        "--weights",
        default=None,
        help="backbone checkpoint file or folder (a folder with a config.json needs no --backbone)",
    )
    p.add_argument(
        "--source", default="auto", help="checkpoint layout (auto, timm, jax, hf, mae, mocov3 ...)"
    )
    p.add_argument(
        "--backbone-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backbone config override, JSON value (e.g. depth=2); repeatable",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a task folder, optionally named (default name: the folder name); repeatable",
    )


def _parse_tasks(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        out.append((name, Path(path)))
    return out


def _parse_options(specs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise VptuneError(f"--backbone-option expects KEY=VALUE, got {spec!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_multitask(args: argparse.Namespace) -> Any:
    tasks = _parse_tasks(args.task)
    if args.backbone is None and args.weights is None:
        raise VptuneError("give the backbone: --backbone NAME and/or --weights PATH")
    input_size = None
    if tasks:  # positional embeddings follow the tasks' input size
        input_size = int(read_task_json(tasks[0][1]).get("preprocessing", {}).get("input_size", 0)) or None
    backbone = create_backbone(
        args.backbone,
        args.weights,
        source=args.source,
        input_size=input_size,
        **_parse_options(args.backbone_option),
    )
    mt = MultiTaskModel(backbone.eval())
    for name, path in tasks:
        mt.add_task(name, path)
    return mt


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise VptuneError(
            f"'vptune serve' needs the 'serve' extra ({e.name} is missing): pip install 'vptune[serve]'"
        ) from None
    import torch


    _check_serve_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ServeConfig(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.timeout,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        default_top_k=args.top_k,
        allow_task_loading=not args.no_task_loading,
        task_root=args.task_root,
        max_input_size=args.max_input_size,
        max_resident_tasks=args.max_resident_tasks,
        max_resident_mb=args.max_resident_mb,
        compute_workers=args.compute_workers,
        token=resolve_token(args.token),
        shutdown_timeout_s=args.shutdown_timeout,
    )
    cfg.validate()
    check_bind(args.host, cfg)  # before loading anything
    if args.task_root is not None and not Path(args.task_root).is_dir():
        raise VptuneError(f"--task-root {args.task_root} is not a folder")
    mt = build_multitask(args)
    print(
        f"vptune serve: {len(mt)} task(s) on http://{args.host}:{args.port} "
        f"({', '.join(mt.task_names()) or 'none yet'})"
        + (f"; more load on first use from {args.task_root}" if args.task_root else ""),
        flush=True,
    )
    serve_lib.run_server(
        mt,
        cfg,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        limit_concurrency=args.limit_concurrency,
    )
    return 0


def _check_serve_args(args: argparse.Namespace) -> None:
    """The flags ServeConfig does not see (bind, threads, uvicorn) and the ones converted before it does."""
    import math

    if not 0 <= args.port <= 65535:
        raise VptuneError(f"--port must be in 0..65535, got {args.port}")
    if args.threads < 0:
        raise VptuneError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.limit_concurrency is not None and args.limit_concurrency < 1:
        raise VptuneError(f"--limit-concurrency must be >= 1, got {args.limit_concurrency}")
    if not 0 < args.max_upload_mb < math.inf:
        raise VptuneError(f"--max-upload-mb must be a finite number > 0, got {args.max_upload_mb}")


def _check_export_args(args: argparse.Namespace) -> None:
    """Checked before the backbone is loaded: the output folder, the opset, the tolerances."""
    import math

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise VptuneError(f"--out {args.out} is a file, not a folder")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise VptuneError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET} (attention exports from opset 14 on), "
                          f"got {args.opset}")
    for flag, value in (("--atol", args.atol), ("--rtol", args.rtol)):
        if not 0 <= value < math.inf:
            raise VptuneError(f"{flag} must be a finite number >= 0, got {value}")


def cmd_export(args: argparse.Namespace) -> int:
    if not args.task:
        raise VptuneError("give at least one --task to export")
    _check_export_args(args)
    mt = build_multitask(args)
    manifest = export_onnx(
        mt, args.out, opset=args.opset, verify=not args.no_verify, atol=args.atol, rtol=args.rtol
    )
    ver = manifest.get("verification")
    print(
        f"exported {len(manifest['tasks'])} task(s) to {args.out}: "
        "backbone.onnx, heads/, prompts/, manifest.json"
        + (f"; onnxruntime vs PyTorch max |diff| {ver['max_abs_diff']:.2e}" if ver else "")
    )
    return 0
