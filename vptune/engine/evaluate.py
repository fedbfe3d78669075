"""Evaluation: top-1, top-5, per-class accuracy, a confusion matrix and the mean loss.

Inference runs under ``torch.inference_mode()`` with the model in eval mode. Metric dicts hold percent
numbers: ``{"top1", "top5", "per_class": [...], "confusion": [[...]], "loss", "n"}`` (``per_class[c]`` is
None for a class absent from the split; ``confusion[true][pred]`` counts images).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vptune.errors import VptuneError, check_choice

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # runtime.precision
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ device

def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable device is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VptuneError(f"unknown device {name!r}; valid choices: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VptuneError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise VptuneError(f"device {name!r} requested but MPS is not available; use --device cpu")
    return device


def cpu_model() -> str:
    """The CPU's model name (``model name`` in ``/proc/cpuinfo`` on Linux; elsewhere the platform's
    processor string, or ``unknown``): benchmark records name the machine, since speed differs 2-4x."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def host_summary(device: torch.device | str) -> dict[str, Any]:
    """Where a run ran (``result.json``'s ``host``): CPU model, torch threads, and the GPU on CUDA."""
    host: dict[str, Any] = {"cpu": cpu_model(), "threads": torch.get_num_threads()}
    if str(device).startswith("cuda"):  # a run's device may also be a label ("features": the one-pass sweep)
        host["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return host


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: the ``avx512_bf16`` or ``amx_bf16`` flag in
    ``/proc/cpuinfo`` (Linux x86). Elsewhere (no such file, other ISAs) False, so ``auto`` stays fp32:
    without native support bf16 autocast is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` -> bf16 on CUDA (when the GPU supports it) and on CPUs with native bf16, else fp32."""
    check_choice("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def check_precision(device: torch.device, precision: str) -> None:
    """auto or fp32 anywhere; bf16 on GPU or CPU; fp16 on GPU only (with a GradScaler when training)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp16" and device.type != "cuda":
        raise VptuneError("precision fp16 needs a CUDA device; use fp32 or bf16 on "
                          f"{device.type}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 (a no-op for fp32); ``auto`` is resolved by :func:`resolve_precision`."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    check_precision(device, precision)
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_loader(dataset: Dataset, batch_size: int, *, num_workers: int = 0,
                device: torch.device | None = None, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader; a fixed ``generator`` keeps shuffling and worker seeds off the global RNG. A dataset
    already in memory is read in the main process (workers would only copy its tensors)."""
    if getattr(dataset, "in_memory", False):
        num_workers = 0
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=device is not None and device.type == "cuda", drop_last=drop_last,
                      generator=generator, persistent_workers=False)


# ------------------------------------------------------------------------------------------ metrics

class MetricAccumulator:
    """Streams (logits, labels) batches into a confusion matrix, top-5 hits and a loss sum."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.top5_hits = 0
        self.loss_sum = 0.0
        self.n = 0

    def update(self, logits: Tensor, labels: Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
        if logits.shape[1] != self.num_classes:
            raise VptuneError(f"the model predicts {logits.shape[1]} classes but the metrics expect "
                              f"{self.num_classes}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise VptuneError(f"label {int(bad[0])} is out of range for a {self.num_classes}-class model")
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        pred = logits.argmax(dim=1)
        idx = labels * self.num_classes + pred
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, -1)
        k = min(5, self.num_classes)
        self.top5_hits += int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())
        self.n += int(labels.numel())

    def compute(self) -> dict[str, Any]:
        return compute_metrics(self.confusion, self.top5_hits, self.loss_sum, self.n)


def compute_metrics(confusion: Tensor, top5_hits: int, loss_sum: float, n: int) -> dict[str, Any]:
    """The metric dict (percent numbers) from a confusion matrix (rows: true class, cols: prediction)."""
    if n == 0:
        raise VptuneError("cannot evaluate on an empty split")
    correct = confusion.diagonal()
    support = confusion.sum(dim=1)
    per_class = [round(100.0 * int(c) / int(s), 4) if int(s) else None for c, s in zip(correct, support)]
    return {
        "top1": 100.0 * int(correct.sum()) / n,
        "top5": 100.0 * top5_hits / n,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "loss": loss_sum / n,
        "n": int(n),
    }


def brief(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The scalar part of a metric dict (no per-class list or confusion matrix)."""
    if metrics is None:
        return None
    return {k: metrics[k] for k in ("top1", "top5", "loss", "n") if k in metrics}


# ------------------------------------------------------------------------------------------ inference

def _progress(loader: DataLoader, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        return iter(loader)
    from tqdm.auto import tqdm

    return iter(tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()))


def evaluate(model: nn.Module, data: Dataset | DataLoader, *, device: torch.device | str | None = None,
             precision: str = "fp32", batch_size: int = 64, num_workers: int = 0,
             num_classes: int | None = None, progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Metrics of ``model`` on a dataset (or loader) of ``(image, label)`` items; see the module docstring."""
    if device is None:
        device = _device_of(model)
    elif isinstance(device, str):
        device = resolve_device(device)
    loader = data if isinstance(data, DataLoader) else make_loader(data, batch_size, num_workers=num_workers,
                                                                   device=device)
    return accumulate(model, loader, device=device, precision=precision, num_classes=num_classes,
                      progress=progress, desc=desc).compute()


def accumulate(model: nn.Module, loader: DataLoader, *, device: torch.device, precision: str = "fp32",
               num_classes: int | None = None, progress: bool = False, desc: str = "eval") -> MetricAccumulator:
    """The metric accumulator of ``model`` over ``loader`` (uncomputed, so that the counts of several
    shards -- the ranks of a data-parallel run -- can be summed before :meth:`MetricAccumulator.compute`)."""
    num_classes = int(num_classes or getattr(model, "num_classes", 0))
    if num_classes < 1:
        raise VptuneError("evaluate() needs num_classes for a model without a num_classes attribute")
    acc = MetricAccumulator(num_classes)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, labels in _progress(loader, progress, desc):
                images = images.to(device, non_blocking=True)
                with autocast(device, precision):
                    logits = model(images)
                acc.update(logits, torch.as_tensor(labels))
    finally:
        model.train(was_training)
    return acc


def _device_of(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def predict_topk(model: nn.Module, images: Tensor, k: int = 5, *, device: torch.device | None = None,
                 precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """(probabilities, class indices), each (B, k), of a (B, 3, S, S) batch, best first."""
    device = device or _device_of(model)
    model.eval()
    with torch.inference_mode():
        with autocast(device, precision):
            logits = model(images.to(device))
        probs = logits.float().softmax(dim=1)
        k = min(k, probs.shape[1])
        top = probs.topk(k, dim=1)
    return top.values.cpu(), top.indices.cpu()


def label_names_for(model: nn.Module, indices: Sequence[int]) -> list[str]:
    names = list(getattr(model, "label_names", []) or [])
    return [names[i] if i < len(names) else str(i) for i in indices]
