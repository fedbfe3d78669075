"""Frozen features cached on disk, and the one-pass linear sweep.

A linear probe (the paper's "Linear", Sec. 4.1: a linear head on the frozen final [CLS]) trains nothing
but the head, so a whole (lr x wd) grid needs the backbone's features only once. This module

- extracts features per (backbone fingerprint, task, split, protocol + input size) and caches them as
  safetensors (:func:`load_features`);
- trains G heads in one pass (:func:`train_linear_heads`): one ``(G, C, d)`` weight tensor and ``(G, C)``
  bias, each head with its own SGD-momentum buffer, peak lr and weight decay, following the recipe of a
  separate run (REFERENCE.md "Training recipe"): SGD momentum 0.9, weight decay on the weight and not
  the bias, peak lr = base_lr * batch_size / 256, linear warmup from ``peak * warmup_start_factor`` then
  cosine decay, both per iteration; and the same minibatch order as a separate run with the same seed
  (see :func:`epoch_order`) and the same initial head (:func:`init_head`), so a head matches the
  trainer's run of the same config up to float rounding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vptune.artifact import atomic_write_bytes
from vptune.data import DataConfig, open_split
from vptune.engine.config import COSMETIC_KEYS, config_diff, config_to_dict, dump_config
from vptune.engine.evaluate import MetricAccumulator, resolve_device
from vptune.engine.optim import WarmupCosine, method_optimizer, scaled_lr
from vptune.engine.runfolder import (
    CONFIG_FILE,
    RESULT_FILE,
    data_summary,
    run_summary,
    write_finished_run,
)
from vptune.engine.trainer import task_preprocessing
from vptune.errors import VptuneError
from vptune.methods.base import linear_head, parse_method_name
from vptune.model import create_model, frozen_model

FEATURES_FORMAT = "vptune-features-v1"


# ------------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSpec:
    """One head of a one-pass sweep: its base lr (before the batch-size scaling), weight decay and seed
    (the seed fixes the head's initialisation and its minibatch order)."""

    base_lr: float
    weight_decay: float
    seed: int = 0


@dataclass(frozen=True)
class HeadRecipe:
    """The optimisation recipe shared by every head (the ``optim`` section of a train config)."""

    batch_size: int = 64
    epochs: int = 100
    warmup_epochs: int = 10
    warmup_start_factor: float = 0.01
    min_lr: float = 0.0
    momentum: float = 0.9
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    lr_scaling: str = "linear"

    @classmethod
    def from_optim(cls, optim: Mapping[str, Any]) -> HeadRecipe:
        names = [f for f in cls.__dataclass_fields__ if f in optim]
        return cls(**{k: optim[k] for k in names})

    def peak_lr(self, base_lr: float) -> float:
        """lr = base_lr * batch_size / 256 (``lr_scaling: linear``, REFERENCE.md "Training recipe") or
        base_lr itself (``none``), as :func:`vptune.engine.optim.scaled_lr`."""
        factor = self.batch_size / 256.0 if self.lr_scaling == "linear" else 1.0
        return float(base_lr) * factor

    def drop_last(self, n: int) -> bool:
        """As the trainer: drop the last batch only when it would hold a single image."""
        return n > self.batch_size and n % self.batch_size == 1

    def steps_per_epoch(self, n: int) -> int:
        return n // self.batch_size if self.drop_last(n) else math.ceil(n / self.batch_size)


def lr_schedule(peaks: Sequence[float], recipe: HeadRecipe, steps_per_epoch: int) -> Any:
    """The training engine's own scheduler (:class:`vptune.engine.optim.WarmupCosine`: warmup from
    ``peak * warmup_start_factor``, cosine to ``min_lr``, per iteration) over one parameter group per
    head, so the sweep and ``vptune train`` step exactly the same curve. ``get_last_lr()`` gives the
    heads' lrs at the current step; ``step()`` advances it."""
    dummies = [torch.zeros(1, requires_grad=True) for _ in peaks]
    opt = torch.optim.SGD([{"params": [p], "lr": float(lr)} for p, lr in zip(dummies, peaks)], lr=0.0)
    return WarmupCosine(opt, total_steps=recipe.epochs * steps_per_epoch,
                        warmup_steps=int(recipe.warmup_epochs * steps_per_epoch),
                        start_factor=recipe.warmup_start_factor, min_lr=recipe.min_lr)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The minibatch order of ``epoch`` (1-based) in a separate run with ``seed``: the trainer shuffles
    each epoch with a ``DataLoader`` whose generator is seeded with ``seed * 1_000_003 + epoch``; the
    loader first draws one int64 from it (its workers' base seed), then its sampler a ``randperm(n)``."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return torch.randperm(n, generator=g)


def init_head(in_dim: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """The linear head a run with ``seed`` starts from: ``torch.manual_seed(seed)`` then the method's
    head init (kaiming-normal weight, focal-prior bias; :func:`vptune.methods.base.linear_head`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        head = linear_head(in_dim, num_classes)
    return head.weight.detach().clone(), head.bias.detach().clone()


# ------------------------------------------------------------------------------------------------------
# one-pass training of G heads
# ------------------------------------------------------------------------------------------------------


@dataclass
class Heads:
    """G trained linear heads: ``weight`` (G, C, d) and ``bias`` (G, C), in nn.Linear's layout."""

    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        """(N, d) features -> (G, N, C) logits."""
        return torch.einsum("nd,gcd->gnc", x, self.weight) + self.bias[:, None, :]


def _head_step_grads(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor,
                     label_smoothing: float) -> tuple[Tensor, Tensor]:
    """Gradients of each head's own mean cross-entropy (with label smoothing, as ``F.cross_entropy``)
    on one shared minibatch, in closed form: d loss / d logits = (softmax - target) / B.

    x (B, d), y (B,), weight (g, C, d), bias (g, C) -> grad weight (g, C, d), grad bias (g, C)."""
    batch, c = x.shape[0], weight.shape[1]
    logits = torch.einsum("bd,gcd->gbc", x, weight) + bias[:, None, :]  # (g, B, C)
    target = torch.full((batch, c), label_smoothing / c, dtype=x.dtype, device=x.device)  # (B, C)
    target[torch.arange(batch, device=x.device), y] += 1.0 - label_smoothing
    dlogits = (logits.softmax(dim=2) - target) / batch  # (g, B, C)
    return torch.einsum("gbc,bd->gcd", dlogits, x), dlogits.sum(dim=1)


def _step_grads(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, perms: dict[int, Tensor],
                groups: dict[int, Tensor], it: int, recipe: HeadRecipe) -> tuple[Tensor, Tensor]:
    """Every head's gradient at iteration ``it`` of the epoch, each on its seed's minibatch."""
    bs = recipe.batch_size
    if len(groups) == 1:  # the usual grid: every head on the same minibatch
        batch = next(iter(perms.values()))[it * bs:(it + 1) * bs]
        return _head_step_grads(x[batch], y[batch], weight, bias, recipe.label_smoothing)
    gw, gb = torch.empty_like(weight), torch.empty_like(bias)
    for s, ix in groups.items():
        batch = perms[s][it * bs:(it + 1) * bs]
        gw[ix], gb[ix] = _head_step_grads(x[batch], y[batch], weight[ix], bias[ix], recipe.label_smoothing)
    return gw, gb


def _clip_per_head(gw: Tensor, gb: Tensor, max_norm: float) -> None:
    """``clip_grad_norm_`` applied to each head on its own (norm over its weight and bias)."""
    norm = (gw.pow(2).sum(dim=(1, 2)) + gb.pow(2).sum(dim=1)).sqrt()  # (G,)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    gw.mul_(coef[:, None, None])
    gb.mul_(coef[:, None])


def train_linear_heads(x: Tensor, y: Tensor, num_classes: int, heads: Sequence[HeadSpec], recipe: HeadRecipe,
                       progress: Callable[[int, int], None] | None = None) -> Heads:
    """Train every head in ``heads`` on features ``x`` (N, d) and labels ``y`` (N,) in one pass.

    Each head follows the recipe of a separate run (module docstring): per-head SGD momentum buffers,
    weight decay on the weight only, per-head peak lr on the shared warmup-cosine curve, per-seed
    minibatch order. Heads that share a seed share each minibatch (one einsum for all of them)."""
    if not heads:
        raise VptuneError("no heads to train")
    n, d = x.shape
    y = y.to(device=x.device, dtype=torch.long)
    inits = [init_head(d, num_classes, h.seed) for h in heads]
    weight = torch.stack([w for w, _ in inits]).to(x)  # (G, C, d)
    bias = torch.stack([b for _, b in inits]).to(x)  # (G, C)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    peaks = [recipe.peak_lr(h.base_lr) for h in heads]
    wd = torch.tensor([float(h.weight_decay) for h in heads], dtype=x.dtype, device=x.device)  # (G,)
    by_seed: dict[int, list[int]] = {}
    for k, h in enumerate(heads):
        by_seed.setdefault(h.seed, []).append(k)
    groups = {s: torch.tensor(ix, device=x.device) for s, ix in by_seed.items()}
    steps = recipe.steps_per_epoch(n)
    schedule = lr_schedule(peaks, recipe, steps)
    for epoch in range(recipe.epochs):
        perms = {s: epoch_order(n, s, epoch + 1).to(x.device) for s in groups}
        for it in range(steps):
            lr = torch.tensor(schedule.get_last_lr(), dtype=x.dtype, device=x.device)  # (G,)
            gw, gb = _step_grads(x, y, weight, bias, perms, groups, it, recipe)
            if recipe.grad_clip:
                _clip_per_head(gw, gb, float(recipe.grad_clip))
            # torch.optim.SGD (dampening 0, no nesterov): buf = m * buf + (g + wd * p); p -= lr * buf
            buf_w.mul_(recipe.momentum).add_(gw + wd[:, None, None] * weight)
            buf_b.mul_(recipe.momentum).add_(gb)
            weight.sub_(lr[:, None, None] * buf_w)
            bias.sub_(lr[:, None] * buf_b)
            schedule.step()
        if progress is not None:
            progress(epoch + 1, recipe.epochs)
    return Heads(weight, bias)


def head_metrics(heads: Heads, x: Tensor, y: Tensor, num_classes: int, chunk: int = 4096) -> list[dict[str, Any]]:
    """Each head's metric dict on features ``x`` (N, d), labels ``y`` (N,), exactly as the trainer's
    evaluation computes it (:class:`vptune.engine.evaluate.MetricAccumulator`: top1, top5, per_class,
    confusion, loss, n)."""
    accs = [MetricAccumulator(num_classes) for _ in range(heads.weight.shape[0])]
    for i in range(0, x.shape[0], chunk):
        logits = heads.logits(x[i:i + chunk])  # (G, n, C)
        for g, acc in enumerate(accs):
            acc.update(logits[g], y[i:i + chunk])
    return [acc.compute() for acc in accs]


# ------------------------------------------------------------------------------------------------------
# features, cached on disk
# ------------------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Frozen features of one split: ``features`` (N, d) float32, ``labels`` (N,), ``indices`` (N,) (the
    source items they come from, so a fraction of the split is a row selection)."""

    features: Tensor
    labels: Tensor
    indices: Tensor
    num_classes: int
    class_names: list[str]

    def select(self, indices: Sequence[int]) -> FeatureSet:
        """The rows whose source item is in ``indices`` (kept in the order of ``indices``)."""
        pos = {int(v): i for i, v in enumerate(self.indices.tolist())}
        missing = [i for i in indices if int(i) not in pos]
        if missing:
            raise VptuneError(f"{len(missing)} item(s) of the split are missing from the feature cache; "
                              "delete the cache folder to rebuild it")
        rows = torch.tensor([pos[int(i)] for i in indices], dtype=torch.long)
        return FeatureSet(self.features[rows], self.labels[rows], self.indices[rows], self.num_classes,
                          self.class_names)


def task_key(root: str) -> str:
    """A task's cache name: its folder name plus a hash of its absolute path."""
    absolute = os.path.abspath(root)
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:8]
    name = os.path.basename(os.path.normpath(absolute)) or "data"
    return f"{name}-{digest}"


def feature_cache_path(cache_dir: str | Path, fingerprint: str, root: str, split: str, protocol: str,
                       input_size: int) -> Path:
    """``<cache>/<fingerprint[:16]>/<task>-<hash>/<split>_<protocol><size>.safetensors``: one file per
    (backbone fingerprint, task, split, input size)."""
    return Path(cache_dir) / fingerprint[:16] / task_key(root) / f"{split}_{protocol}{input_size}.safetensors"


@torch.no_grad()
def extract_features(backbone: Any, dataset: Any, device: torch.device, batch_size: int = 128,
                     num_workers: int = 0, progress: bool = False) -> Tensor:
    """The linear method's head input (the backbone's pooled final features) for every item, (N, d)."""
    model = frozen_model(backbone)  # the one block loop, linear method: the probe's head input
    backbone.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if progress:
        import sys

        from tqdm import tqdm

        loader = tqdm(loader, desc=f"features {getattr(dataset, 'name', '')}", unit="batch", leave=False,
                      disable=not sys.stderr.isatty())
    parts = [model.forward_features(images.to(device)).float().cpu() for images, _ in loader]
    return torch.cat(parts) if parts else torch.zeros(0, backbone.num_features)


def split_digest(ds: Any) -> str:
    """sha256 over (item name, label) of every item of a lazy split: a rebuilt or edited split file
    invalidates its cached features. Reads no image."""
    h = hashlib.sha256()
    for i, y in zip(ds.indices, ds.labels):
        h.update(f"{ds.source.describe(i)}\t{y}\n".encode())
    return h.hexdigest()


def _cache_meta(fingerprint: str, data: Any, split: str, input_size: int, digest: str) -> dict[str, str]:
    return {"format": FEATURES_FORMAT, "fingerprint": fingerprint, "root": os.path.abspath(data.root),
            "split": split, "protocol": data.protocol, "input_size": str(input_size),
            "skip_corrupt": str(bool(data.skip_corrupt)), "split_sha256": digest}


def _read_cache(path: Path, meta: dict[str, str]) -> FeatureSet | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            if any(stored.get(k) != v for k, v in meta.items()):
                return None
            t = {k: f.get_tensor(k) for k in ("features", "labels", "indices")}
    except (SafetensorError, OSError, ValueError):
        return None
    names = json.loads(stored.get("class_names", "[]"))
    return FeatureSet(t["features"], t["labels"], t["indices"], int(stored.get("num_classes", 0)), names)


def _write_cache(path: Path, fs: FeatureSet, meta: dict[str, str]) -> None:
    from safetensors.torch import save as save_bytes

    tensors = {"features": fs.features.contiguous(), "labels": fs.labels, "indices": fs.indices}
    meta = {**meta, "num_classes": str(fs.num_classes), "class_names": json.dumps(fs.class_names)}
    atomic_write_bytes(path, save_bytes(tensors, metadata=meta))


def load_features(backbone: Any, data: Any, split: str, cache_dir: str | Path | None, *,
                  device: torch.device | None = None, batch_size: int = 128, progress: bool = False) -> FeatureSet:
    """Features of the whole ``split`` (fraction ignored: select rows with :meth:`FeatureSet.select`),
    read from the cache when there, else extracted with the evaluation transform and cached.

    ``data`` is a :class:`vptune.data.DataConfig`; the cache file is per (backbone fingerprint, task
    folder, split, protocol and input size) and is used only while the split lists the same items with
    the same labels (:func:`split_digest`)."""
    from dataclasses import replace

    full = replace(data, fraction=1.0)
    size = int(full.input_size or backbone.preprocessing.input_size)
    fingerprint = backbone.fingerprint()
    ds = open_split(full, split, backbone.preprocessing, train=False)  # lazy: labels only
    meta = _cache_meta(fingerprint, full, split, size, split_digest(ds))
    path = feature_cache_path(cache_dir, fingerprint, full.root, split, full.protocol, size) if cache_dir else None
    if path is not None and path.is_file():
        cached = _read_cache(path, meta)
        if cached is not None:
            return cached
    feats = extract_features(backbone, ds, device or torch.device("cpu"), batch_size, full.num_workers, progress)
    fs = FeatureSet(feats, torch.tensor(ds.labels, dtype=torch.long), torch.tensor(ds.indices, dtype=torch.long),
                    ds.num_classes, list(ds.class_names))
    if path is not None:
        _write_cache(path, fs, meta)
    return fs


def training_rows(backbone: Any, data: Any, split: str, seed: int, full: FeatureSet) -> FeatureSet:
    """The rows a run with ``seed`` trains on: the whole split, or its stratified ``data.fraction``
    (the data layer's choice for that seed, so the same images as a separate run)."""
    if data.fraction >= 1.0:
        return full
    ds = open_split(data, split, backbone.preprocessing, train=False, seed=seed)
    return full.select(ds.indices)


# ------------------------------------------------------------------------------------------------------
# linear runs in one pass: run folders equal to the trainer's
# ------------------------------------------------------------------------------------------------------

# What may differ between the configs of one pass (everything else must match).
PASS_AXES = ("optim.base_lr", "optim.weight_decay", "runtime.seed", "output")


def is_head_only(method: str) -> bool:
    """Whether a method name declares ``head_only`` (a linear head on frozen features, nothing else)."""
    try:
        return bool(parse_method_name(method)[0].head_only)
    except VptuneError:
        return False


def one_pass_eligible(cfg: Any) -> str | None:
    """None when a config can train in a one-pass linear sweep, else why not (a sentence)."""
    if not is_head_only(cfg.method.name):
        return f"method {cfg.method.name!r} is not the linear probe"
    cls, _ = parse_method_name(cfg.method.name)
    optimizer = method_optimizer(cls, cfg.optim.optimizer)
    if optimizer != "sgd":
        return f"optimizer {optimizer!r} (the one-pass sweep implements SGD with momentum)"
    if cfg.optim.schedule != "step" or cfg.optim.lr_scale:
        return "a per-epoch schedule or per-group lr factors are set (the one-pass sweep steps per iteration)"
    if cfg.method.head_norm != "none" or cfg.method.head_init != "small":
        return "a head norm or the reference head init is set"
    if cfg.data.normalize != "backbone" or not cfg.data.antialias:
        return "the reference input pipeline is set"
    if cfg.data.protocol != "vtab":
        return f"protocol {cfg.data.protocol!r} augments training images, so features cannot be cached"
    if cfg.runtime.max_steps is not None or cfg.runtime.precision not in ("auto", "fp32"):
        return "runtime.max_steps or a reduced precision is set"
    return None


def _data_config(cfg: Any) -> Any:
    d = cfg.data
    return DataConfig(root=d.root, format=d.format, protocol=d.protocol, input_size=cfg.backbone.input_size,
                      num_workers=d.num_workers, skip_corrupt=d.skip_corrupt, fraction=d.fraction)


def _check_same_pass(cfgs: Sequence[Any]) -> None:
    first = config_to_dict(cfgs[0])
    for cfg in cfgs[1:]:
        diff = config_diff(first, config_to_dict(cfg), ignore=PASS_AXES + tuple(COSMETIC_KEYS))
        if diff:
            raise VptuneError(f"configs of one linear pass may differ only in {', '.join(PASS_AXES)}; "
                              f"{', '.join(diff)} differ")


def train_linear_runs(cfgs: Sequence[Any], backbone: Any, cache_dir: str | Path | None = None, *,
                      progress: bool = False) -> list[dict[str, Any]]:
    """Train the linear-probe runs ``cfgs`` (:class:`~vptune.engine.config.TrainConfig` s that differ
    only in base lr, weight decay, seed and output) in one pass on cached features, writing each run
    folder as the trainer would (``config.yaml``, ``task/``, then ``result.json``); returns the results."""
    cfgs = list(cfgs)
    _check_same_pass(cfgs)
    why = one_pass_eligible(cfgs[0])
    if why:
        raise VptuneError(f"cannot train these runs in one linear pass: {why}")
    t0 = time.time()
    c0, data = cfgs[0], _data_config(cfgs[0])
    device = resolve_device(c0.runtime.device)
    feats = {split: load_features(backbone, data, split, cache_dir, device=device, progress=progress)
             for split in (c0.data.train_split, c0.data.val_split, c0.data.test_split) if split}
    recipe = HeadRecipe.from_optim(vars(c0.optim))
    results: list[dict[str, Any] | None] = [None] * len(cfgs)
    by_seed: dict[int, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        by_seed.setdefault(cfg.runtime.seed, []).append(i)
    for seed, idx in by_seed.items():  # a fraction of the split depends on the seed
        train = training_rows(backbone, data, c0.data.train_split, seed, feats[c0.data.train_split])
        specs = [HeadSpec(cfgs[i].optim.base_lr, cfgs[i].optim.weight_decay, seed) for i in idx]
        heads = train_linear_heads(train.features.to(device), train.labels, train.num_classes, specs, recipe)
        heads = Heads(heads.weight.cpu(), heads.bias.cpu())
        scores = {name: head_metrics(heads, feats[split].features, feats[split].labels, train.num_classes)
                  for name, split in (("val", c0.data.val_split), ("test", c0.data.test_split)) if split}
        wall = (time.time() - t0) / len(cfgs)
        for k, i in enumerate(idx):
            metrics = {name: s[k] for name, s in scores.items()}
            results[i] = _write_linear_run(cfgs[i], backbone, heads.weight[k], heads.bias[k], train, metrics,
                                           wall, len(cfgs), len(train.labels))
    return [r for r in results if r is not None]


def _write_linear_run(cfg: Any, backbone: Any, weight: Tensor, bias: Tensor, train: FeatureSet,
                      metrics: dict[str, dict[str, Any]], wall: float, heads: int, n_train: int) -> dict[str, Any]:
    """One run folder of the one-pass sweep, through the trainer's writer (:mod:`vptune.engine.runfolder`)."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).unlink(missing_ok=True)
    atomic_write_bytes(out / CONFIG_FILE, dump_config(cfg).encode())
    model = create_model(backbone, "linear", train.num_classes, label_names=train.class_names or None)
    model.preprocessing = task_preprocessing(backbone, cfg.backbone.input_size)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    val, test = metrics.get("val"), metrics.get("test")
    steps = cfg.optim.epochs * HeadRecipe.from_optim(vars(cfg.optim)).steps_per_epoch(n_train)
    summary = run_summary(cfg, model, status="done", val=val, test=test, epochs=cfg.optim.epochs, steps=steps,
                          optimizer="sgd", lr=scaled_lr(cfg.optim, model),
                          data=data_summary(cfg, n_train, val["n"] if val else 0, test["n"] if test else 0),
                          device="features", precision="fp32", wall=wall)
    summary["one_pass"] = {"heads": heads, "note": "trained by the one-pass linear sweep on cached features"}
    return write_finished_run(out, model, summary)
