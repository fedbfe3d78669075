"""ONNX export: one backbone graph for every prompt task, plus one tiny head graph per task.

Layout of an export folder (``vptune export --format onnx``)::

    backbone.onnx          the frozen backbone, prompts as inputs (below); exported once
    heads/<task>.onnx      per task: features (B, d) -> logits (B, num_classes)
    prompts/<task>.npz     per task: ``prompts`` (L, P_t, d) float32, ``replace`` (L,) bool
    manifest.json          layout, backbone identity, and per task: method, pool, classes, labels,
                           preprocessing, files

``backbone.onnx`` inputs (B: batch, dynamic; P: prompt slots, dynamic, >= 1; L: number of blocks):

* ``images``       float32 (B, 3, H, W), normalised as the task's ``preprocessing`` says (H, W fixed
  at export: ``input_size``)
* ``prompts``      float32 (L, B, P, d): block i's prompts for each sample (zeros where unused)
* ``replace``      bool    (L, B): at block i sample b's prompt slots are *replaced* by
  ``prompts[i, b]`` (True), or its prompts flow on from the previous block (False). A VPT-deep task
  sets every row True, VPT-shallow only row 0, ``deep_layers=k`` the first (or last) |k| rows, a
  linear / MLP task none.
* ``prompt_len``   int64   (B,): how many of the P slots are real for each sample (its task's p);
  the rest are padding, masked out of attention.

A slot is attended to only once its sample has had prompts placed (``replace`` True at this or an
earlier block) and only when it is one of its first ``prompt_len`` slots, so one padded batch of
samples from many tasks (different p, shallow and deep, linear probes with ``prompt_len = 0``) gives
each sample exactly the features of its task run alone. Outputs: one (B, d) feature per pooling mode
of the backbone, named after it (``cls``, ``image_mean``, ``prompt_mean`` for a ViT); a task reads the
one its manifest entry names under ``pool``.

Tasks that change backbone weights (full, partial-k, bias) are refused with a message saying so;
adapters, side-tuning and ``location='add'`` prompts cannot use the shared graph either and are refused.
Backbones declare whether they trace (``Backbone.exports_onnx``): ViT and Swin do. A Swin's blocks have
different widths per stage: ``prompts`` is padded to the widest (``dim``) and block i reads its first
``block_dims[i]`` channels.

:class:`OnnxMultiTask` runs an export folder with onnxruntime (numpy in, numpy out), building the padded
inputs for a mixed batch; :func:`verify_export` compares it with PyTorch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vptune.backbones.base import Backbone
from vptune.errors import VptuneError
from vptune.io import atomic_write_json
from vptune.methods.mixed import MixedPrompts
from vptune.model import frozen_model

logger = logging.getLogger("vptune")
LAYOUT = "vptune-onnx-multitask/1"
OPSET = 18


class PromptedBackboneGraph(nn.Module):
    """The traced module behind ``backbone.onnx`` (see the module docstring for its inputs): the one
    block loop (:meth:`vptune.model.TunedModel.forward_features`) with the mixed-batch hooks."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.model = frozen_model(backbone)
        self.pool_modes = tuple(backbone.pool_modes)
        self.dims = [info.dim for info in backbone.block_infos()]  # block i reads prompts[i, ..., :d_i]

    def forward(
        self, images: Tensor, prompts: Tensor, replace: Tensor, prompt_len: Tensor
    ) -> tuple[Tensor, ...]:
        # block 0 inserts every sample's P slots (masked until placed); later blocks replace or keep
        per_block = [prompts[i, :, :, :d] for i, d in enumerate(self.dims)]
        hooks = MixedPrompts(per_block, list(replace.unbind(0)), prompt_len, self.pool_modes, traced=True)
        return self.model.forward_features(images, hooks)


_EXPORTABLE = "export only input-prompt (vpt-shallow, vpt-deep, vfpt), linear and mlp tasks, or serve it with PyTorch"


def _check_exportable(entry: Any, backbone: Backbone) -> None:
    if entry.model.method.changes_backbone:
        raise VptuneError(
            f"task {entry.name!r} ({entry.method}) trains backbone weights, so it cannot use the shared "
            f"prompt graph; {_EXPORTABLE}"
        )
    if entry.taps:
        raise VptuneError(
            f"task {entry.name!r} ({entry.method}) changes the backbone's layers per task (low-rank updates "
            f"or scale and shift), so it cannot use the shared prompt graph; {_EXPORTABLE}"
        )
    if not entry.shared:
        raise VptuneError(
            f"task {entry.name!r} ({entry.method}) acts inside the blocks (key/value prompts, gates, added "
            f"prompts or modules of its own), so it cannot use the shared prompt graph; {_EXPORTABLE}"
        )


def _check_tasks(mt: Any, tasks: Sequence[str] | None, input_size: int | None) -> tuple[list[Any], int]:
    bb = mt.backbone
    if not bb.exports_onnx:
        raise VptuneError(f"ONNX export does not support {bb.arch!r} backbones (its blocks do not trace)")
    names = list(tasks) if tasks else sorted(mt.tasks)
    if not names:
        raise VptuneError("no tasks to export: load at least one task")
    entries = [mt.task(n) for n in names]
    for e in entries:
        _check_exportable(e, bb)
    size = int(input_size or entries[0].preprocessing.input_size)
    for e in entries:
        if int(e.preprocessing.input_size) != size:
            raise VptuneError(
                f"task {e.name!r} uses input size {e.preprocessing.input_size}, the export "
                f"{size}: export tasks of one input size together"
            )
    return entries, size


def export_onnx(
    mt: Any,
    out_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    input_size: int | None = None,
    opset: int = OPSET,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Export the backbone of a :class:`~vptune.multitask.MultiTaskModel` and its tasks to ``out_dir``.

    Returns the manifest (also written as ``manifest.json``); with ``verify`` it also holds the max
    absolute difference from PyTorch on a random mixed batch (``verification``), and a logit off by more
    than ``atol + rtol * |logit|`` raises VptuneError."""
    _require_onnx()
    entries, size = _check_tasks(mt, tasks, input_size)
    out = Path(out_dir)
    (out / "heads").mkdir(parents=True, exist_ok=True)
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    graph = PromptedBackboneGraph(mt.backbone).eval()
    L, d = len(graph.dims), max(graph.dims)
    _export_backbone(graph, out, size, L, d, max(1, max(e.num_prompts for e in entries)), opset)
    manifest = _manifest(mt.backbone, graph, size, L, d)
    for e in entries:
        manifest["tasks"][e.name] = _export_task(e, out, L, d, opset, manifest["default_pool"])
    atomic_write_json(out / "manifest.json", manifest)
    if verify:
        diff = verify_export(mt, out, [e.name for e in entries], atol=atol, rtol=rtol, input_size=size)
        manifest["verification"] = {
            "max_abs_diff": diff,
            "atol": atol,
            "rtol": rtol,
            "runtime": "onnxruntime",
        }
        atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _export_backbone(graph: PromptedBackboneGraph, out: Path, size: int, L: int, d: int, p_max: int,
                     opset: int) -> None:
    B = 2
    example = (
        torch.zeros(B, 3, size, size),
        torch.zeros(L, B, p_max, d),
        torch.ones(L, B, dtype=torch.bool),
        torch.full((B,), p_max, dtype=torch.int64),
    )
    _onnx_export(
        graph,
        example,
        out / "backbone.onnx",
        ["images", "prompts", "replace", "prompt_len"],
        list(graph.pool_modes),
        {
            "images": {0: "batch"},
            "prompts": {1: "batch", 2: "slots"},
            "replace": {1: "batch"},
            "prompt_len": {0: "batch"},
        },
        opset,
    )


def _manifest(bb: Backbone, graph: PromptedBackboneGraph, size: int, L: int, d: int) -> dict[str, Any]:
    return {
        "layout": LAYOUT,
        "backbone": bb.identity(),
        "input_size": size,
        "num_blocks": L,
        "dim": d,
        "block_dims": list(graph.dims),
        "pool_modes": list(graph.pool_modes),
        "default_pool": _default_pool(bb),
        "inputs": {
            "images": "float32 (B, 3, H, W)",
            "prompts": "float32 (L, B, P, d): block i reads [..., :block_dims[i]]",
            "replace": "bool (L, B)",
            "prompt_len": "int64 (B,)",
        },
        "tasks": {},
    }


def _export_task(e: Any, out: Path, L: int, d: int, opset: int, default_pool: str) -> dict[str, Any]:
    prompts = np.zeros((L, max(e.num_prompts, 0), d), dtype=np.float32)
    replace = np.zeros((L,), dtype=bool)
    for i, t in enumerate(e.prompts):
        if t is not None:
            prompts[i, : t.shape[0], : t.shape[1]] = t.float().cpu().numpy()
            replace[i] = True
    np.savez(out / "prompts" / f"{e.name}.npz", prompts=prompts, replace=replace)
    head = _HeadGraph(e.model.head).eval()
    _onnx_export(
        head,
        (torch.zeros(2, e.model.backbone.num_features),),
        out / "heads" / f"{e.name}.onnx",
        ["features"],
        ["logits"],
        {"features": {0: "batch"}},
        opset,
    )
    return {
        "method": e.method,
        "num_classes": e.num_classes,
        "label_names": e.label_names,
        "num_prompts": e.num_prompts,
        "pool": e.pool_mode or default_pool,
        "preprocessing": e.preprocessing.to_dict(),
        "prompts": f"prompts/{e.name}.npz",
        "head": f"heads/{e.name}.onnx",
    }


def _default_pool(bb: Backbone) -> str:
    cfg = getattr(bb, "config", None)
    return str(getattr(cfg, "global_pool", bb.pool_modes[0]))


class _HeadGraph(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features)


def _onnx_export(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """torch.onnx.export with the TorchScript exporter (``dynamo=False``: stable for this small set of
    ops, no onnxscript needed), then ``onnx.checker``."""
    import warnings

    import onnx

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs: dict[str, Any] = {
            "input_names": input_names,
            "output_names": output_names,
            "dynamic_axes": dynamic_axes,
            "opset_version": opset,
            "do_constant_folding": True,
        }
        try:
            try:
                torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)
            except TypeError:  # a torch without the ``dynamo`` keyword
                torch.onnx.export(module, args, str(path), **kwargs)
        except torch.onnx.errors.OnnxExporterError as e:  # an op this opset cannot express
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise VptuneError(f"ONNX export at opset {opset} failed: {first}") from None
    onnx.checker.check_model(str(path))


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise VptuneError(
            f"ONNX export needs the 'onnx' extra ({e.name} is missing): pip install 'vptune[onnx]'"
        ) from None


class OnnxMultiTask:
    """Run an export folder with onnxruntime: ``predict(images, task_names) -> list of logits``."""

    def __init__(self, folder: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise VptuneError(f"{folder} is not a vptune ONNX export: manifest.json is missing")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("layout") != LAYOUT:
            raise VptuneError(f"{path}: layout {self.manifest.get('layout')!r}, expected {LAYOUT!r}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.folder / "backbone.onnx"), opts, providers=list(providers)
        )
        self.heads = {
            n: ort.InferenceSession(str(self.folder / t["head"]), opts, providers=list(providers))
            for n, t in self.manifest["tasks"].items()
        }
        self.prompts = {}
        for n, t in self.manifest["tasks"].items():
            with np.load(self.folder / t["prompts"]) as z:
                self.prompts[n] = (z["prompts"], z["replace"])

    def inputs(self, images: np.ndarray, task_names: Sequence[str]) -> dict[str, np.ndarray]:
        """The padded backbone inputs for a mixed batch."""
        m = self.manifest
        unknown = sorted(set(task_names) - set(self.prompts))
        if unknown:
            raise VptuneError(f"unknown task(s) {unknown}; exported tasks: {', '.join(sorted(self.prompts))}")
        B, L, d = len(task_names), m["num_blocks"], m["dim"]
        P = max(1, max(self.prompts[n][0].shape[1] for n in task_names))
        prompts = np.zeros((L, B, P, d), dtype=np.float32)
        replace = np.zeros((L, B), dtype=bool)
        plen = np.zeros((B,), dtype=np.int64)
        for b, n in enumerate(task_names):
            pr, rp = self.prompts[n]
            prompts[:, b, : pr.shape[1]] = pr
            replace[:, b] = rp
            plen[b] = pr.shape[1]
        return {
            "images": np.ascontiguousarray(images, dtype=np.float32),
            "prompts": prompts,
            "replace": replace,
            "prompt_len": plen,
        }

    def predict(self, images: np.ndarray, task_names: Sequence[str]) -> list[np.ndarray]:
        feats = dict(
            zip(self.manifest["pool_modes"], self.session.run(None, self.inputs(images, task_names)))
        )
        out: list[np.ndarray | None] = [None] * len(task_names)
        for n in dict.fromkeys(task_names):
            rows = [b for b, t in enumerate(task_names) if t == n]
            f = feats[self.manifest["tasks"][n]["pool"]][rows]
            logits = self.heads[n].run(None, {"features": np.ascontiguousarray(f)})[0]
            for r, lg in zip(rows, logits):
                out[r] = lg
        return out  # type: ignore[return-value]


def verify_export(
    mt: Any,
    folder: str | Path,
    task_names: Sequence[str],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    input_size: int | None = None,
    batch: int = 0,
    seed: int = 0,
) -> float:
    """Max |onnxruntime - PyTorch| over the logits of a random mixed batch of ``task_names`` (each task
    at least twice, batch size != the export's example batch). Raises VptuneError when a logit is off by
    more than ``atol + rtol * |logit|``."""
    runner = OnnxMultiTask(folder)
    size = int(input_size or runner.manifest["input_size"])
    names = [n for n in task_names for _ in range(2)]
    names = (names * 2)[: max(batch, len(names) + 1)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(names), 3, size, size, generator=g)
    ref = mt(x, names)
    got = runner.predict(x.numpy(), names)
    ref_np = [np.asarray(r.cpu().numpy()) for r in ref]
    diff = max(float(np.abs(r - o).max()) for r, o in zip(ref_np, got))
    ok = all(bool(np.all(np.abs(r - o) <= atol + rtol * np.abs(r))) for r, o in zip(ref_np, got))
    if not ok:
        raise VptuneError(
            f"ONNX export does not match PyTorch: max abs difference {diff:.3g} "
            f"(tolerance {atol} + {rtol} * |logit|)"
        )
    logger.info("ONNX export verified: max abs difference %.3g", diff)
    return diff
