"""The training engine: :func:`run_training` turns a :class:`TrainConfig` into a finished run folder.

Run folder ``<output>/``:

- ``config.yaml``: the fully resolved config;
- ``metrics.jsonl``: one JSON line per epoch (epoch, step, lr, train_loss, train_acc, val_top1, ...);
- ``tb/``: TensorBoard scalars (skipped, with one warning, when tensorboard is not installed);
- ``checkpoint.pt``: written atomically after every epoch (trained tensors, optimiser, schedule, epoch,
  RNG states): ``resume=True`` continues to the same result as an uninterrupted run, because the data
  order of epoch ``e`` depends only on ``(seed, e)``;
- ``task/``: the finished task (``model.save_pretrained``);
- ``result.json``: the summary, written last: the completion marker (a run whose folder holds the same
  config and a ``result.json`` is done, and running it again returns the stored summary);
- ``.vptune.lock``: held while a run writes (:mod:`vptune.engine.runlock`): a second run on the folder is
  refused, naming the first; a lock left by a killed process is taken over.

Ctrl-C (SIGINT) finishes the current step, writes a mid-epoch checkpoint and raises
:class:`~vptune.engine.runlock.TrainingInterrupted`; ``resume=True`` replays the epoch's loader up to that step
and restores the RNG state of the step boundary, so the resumed run equals an uninterrupted one.

Validation runs every ``runtime.eval_every`` epochs and after the last; the test split is evaluated once, at
the end, and never used to choose anything. A non-finite or exploding loss ends the run as diverged
(``result.json`` with ``status: diverged`` and the reason; the last good checkpoint is kept): a result, not
a crash, which a sweep lists and never selects.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vptune.artifact import atomic_write_bytes, atomic_write_json
from vptune.backbones import create_backbone
from vptune.backbones.base import Backbone, Preprocessing
from vptune.data import DataConfig, open_split
from vptune.data.memory import in_memory
from vptune.engine.checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    seed_everything,
)
from vptune.engine.config import TrainConfig, config_to_dict, dump_config, validate_config
from vptune.engine.evaluate import (
    autocast,
    check_precision,
    evaluate,
    make_loader,
    resolve_device,
    resolve_precision,
)
from vptune.engine.optim import build_optimizer, build_scheduler, resolve_optimizer_name, scaled_lr
from vptune.engine.recipes import IMAGENET_MEAN, IMAGENET_STD
from vptune.engine.runfolder import (  # noqa: F401 -- the file names and read_result are re-exported
    CONFIG_FILE,
    METRICS_FILE,
    RESULT_FILE,
    RUN_FILES,
    TASK_DIR,
    TB_DIR,
    data_summary,
    prepare_output,
    read_result,
    run_summary,
    truncate_metrics,
    write_finished_run,
)
from vptune.engine.runlock import RunLock, StopOnInterrupt, TrainingInterrupted
from vptune.errors import VptuneError
from vptune.methods.base import parse_method_name, parse_options
from vptune.methods.prototype import init_from_dataset
from vptune.model import create_model

logger = logging.getLogger("vptune")

_TB_WARNED = False
# (launched, run): multi-process launchers, registered by vptune.engine.distributed (which subclasses the
# Trainer, so this module must not import it); ``vptune.engine`` imports it, so it is always registered.
PARALLEL_LAUNCHERS: list[tuple[Callable[[], bool], Callable[..., dict[str, Any]]]] = []


# ------------------------------------------------------------------------------------------ public API

def run_training(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 datasets: dict[str, Dataset] | None = None, backbone: Backbone | None = None,
                 num_classes: int | None = None, label_names: list[str] | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.output`` and return the summary (also written to ``result.json``).

    ``datasets``: optional ``{"train": ..., "val": ..., "test": ...}`` (items ``(image tensor, label)``)
    used instead of opening ``cfg.data``; ``backbone``: an optional shared backbone used instead of
    building ``cfg.backbone``. ``resume`` continues from ``checkpoint.pt``; ``overwrite`` starts over.
    """
    validate_config(cfg)
    check_method(cfg)
    for launched, run_parallel in PARALLEL_LAUNCHERS:  # torchrun (WORLD_SIZE > 1): data-parallel training
        if launched():
            return run_parallel(cfg, resume=resume, overwrite=overwrite, datasets=datasets, backbone=backbone,
                                num_classes=num_classes, label_names=label_names)
    out = Path(cfg.output)
    with RunLock(out):  # one writer per run folder (a second run on it is refused, naming the first)
        stored = prepare_output(out, cfg, resume=resume, overwrite=overwrite)
        if stored is not None:
            logger.info("%s already holds a finished run of this config: returning its result", out)
            return stored
        trainer = build_trainer(cfg, resolve_device(cfg.runtime.device), datasets=datasets, backbone=backbone,
                                num_classes=num_classes, label_names=label_names)
        return trainer.run(resume=resume)


def build_trainer(cfg: TrainConfig, device: torch.device, *, datasets: dict[str, Dataset] | None = None,
                  backbone: Backbone | None = None, num_classes: int | None = None,
                  label_names: list[str] | None = None, trainer_cls: Any = None) -> Trainer:
    """The backbone, data splits and model of ``cfg`` in a ``trainer_cls`` (default :class:`Trainer`)."""
    check_precision(device, cfg.runtime.precision)
    seed_everything(cfg.runtime.seed)
    backbone = backbone if backbone is not None else build_backbone(cfg)
    prep = task_preprocessing(backbone, cfg.backbone.input_size, cfg.data.normalize, cfg.data.antialias)
    splits = datasets if datasets is not None else open_datasets(cfg, prep)
    if not splits.get("train"):
        raise VptuneError("no training data: datasets['train'] is missing or empty")
    num_classes, label_names = infer_classes(splits["train"], num_classes, label_names)
    seed_everything(cfg.runtime.seed)  # model init independent of how the data was opened
    model = create_model(backbone, cfg.method.name, num_classes, label_names=label_names,
                         head_norm=cfg.method.head_norm, head_init=cfg.method.head_init, **cfg.method.options)
    model.preprocessing = prep
    # --- hook: prompts initialised from the data (init="prototype", Self-Prompt Tuning), once, frozen backbone

    init_from_dataset(model, splits["train"], device)
    return (trainer_cls or Trainer)(cfg, model, splits, device, Path(cfg.output))


def check_method(cfg: TrainConfig) -> None:
    """Refuse an unknown method or option before any backbone or data is loaded (valid ones listed)."""
    cls, implied = parse_method_name(cfg.method.name)
    parse_options(cls, {**cfg.method.options, **implied})


def build_backbone(cfg: TrainConfig) -> Backbone:
    """The backbone ``cfg.backbone`` names (a registered name and/or a weights file or folder)."""
    b = cfg.backbone
    if b.weights is None:
        if b.name is None:
            raise VptuneError("no backbone given: set backbone.name (--backbone) and/or backbone.weights "
                              "(--weights); see `vptune.list_backbones()`")
        logger.warning("backbone %r has no weights: training on a randomly initialised backbone", b.name)
    return create_backbone(b.name, weights=b.weights, source=b.source, input_size=b.input_size, **b.config)


def task_preprocessing(backbone: Backbone, input_size: int | None, normalize: str = "backbone",
                       antialias: bool = True) -> Preprocessing:
    """The task's preprocessing: the backbone's, with ``input_size`` when given (a multiple of the patch),
    ImageNet mean/std with ``normalize="imagenet"`` and TensorFlow's bilinear resize (no antialiasing)
    with ``antialias=False`` (both as the reference code; stored with the task, so serving matches)."""
    prep = copy.deepcopy(backbone.preprocessing)
    if normalize == "imagenet":
        prep.mean, prep.std = IMAGENET_MEAN, IMAGENET_STD
    if not antialias:
        if prep.interpolation != "bilinear":
            raise VptuneError(f"data.antialias=false resizes as TensorFlow's bilinear resize; the backbone "
                              f"resizes with {prep.interpolation!r}")
        prep.interpolation = "tf_bilinear"
    if input_size is not None:
        ps = backbone.patch_size[0]
        if input_size <= 0 or input_size % ps:
            raise VptuneError(f"backbone.input_size must be a positive multiple of the patch size {ps}, "
                              f"got {input_size}")
        prep.input_size = int(input_size)
    return prep


def data_config(cfg: TrainConfig) -> DataConfig:
    """The reader settings of ``cfg.data`` (refusing a config without a dataset)."""
    d = cfg.data
    if not d.root:
        raise VptuneError("no dataset given: set data.root (--data FOLDER)")
    return DataConfig(root=d.root, format=d.format, protocol=d.protocol, num_workers=d.num_workers,
                      skip_corrupt=d.skip_corrupt, fraction=d.fraction)


def open_datasets(cfg: TrainConfig, prep: Preprocessing) -> dict[str, Dataset]:
    """Open the train (training transform), val and test splits of ``cfg.data``; splits whose transform
    is deterministic are decoded once per process and kept in memory (:mod:`vptune.data.memory`)."""
    d, dc = cfg.data, data_config(cfg)
    seed = cfg.runtime.seed
    splits = {"train": open_split(dc, d.train_split, prep, train=True, seed=seed)}
    if d.val_split:
        splits["val"] = open_split(dc, d.val_split, prep, train=False, seed=seed)
    if d.test_split:
        splits["test"] = open_split(dc, d.test_split, prep, train=False, seed=seed)
    return {name: in_memory(ds, workers=d.num_workers) for name, ds in splits.items()}


def infer_classes(train: Dataset, num_classes: int | None,
                  label_names: list[str] | None) -> tuple[int, list[str] | None]:
    """Class count and names: given, else the dataset's ``num_classes``/``class_names``, else max label+1."""
    if num_classes is None:
        num_classes = getattr(train, "num_classes", None)
    if num_classes is None:
        labels = getattr(train, "labels", None)
        labels = labels if labels is not None else [int(train[i][1]) for i in range(len(train))]
        num_classes = int(max(labels)) + 1
    if label_names is None:
        names = getattr(train, "class_names", None)
        label_names = list(names) if names and len(names) == num_classes else None
    return int(num_classes), label_names


# ------------------------------------------------------------------------------------------ the trainer

class Trainer:
    """One run: model, optimiser, schedule, loaders and logs (see the module docstring).

    Hooks a data-parallel subclass (:class:`vptune.engine.distributed.DistributedTrainer`) overrides:
    ``is_main`` (only the main process writes files and logs), :meth:`train_loader`, :meth:`loss`,
    :meth:`step_stats` and :meth:`evaluate`."""

    is_main = True
    _stop: StopOnInterrupt | None = None
    _skip = 0  # batches of the current epoch done before a mid-epoch checkpoint (resume skips them)

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, splits: dict[str, Dataset],
                 device: torch.device, out: Path) -> None:
        self.cfg, self.model, self.device, self.out = cfg, model, device, out
        self.precision = resolve_precision(device, cfg.runtime.precision)  # "auto" -> bf16 or fp32
        self.train_ds, self.val_ds, self.test_ds = splits["train"], splits.get("val"), splits.get("test")
        model.gradient_checkpointing = cfg.runtime.gradient_checkpointing
        model.to(device)
        self.forward = torch.compile(model) if cfg.runtime.compile else model
        bs = cfg.optim.batch_size
        self.drop_last = len(self.train_ds) > bs and len(self.train_ds) % bs == 1  # no batch of 1 (BatchNorm)
        n = len(self.train_ds)
        self.steps_per_epoch = n // bs if self.drop_last else math.ceil(n / bs)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps_per_epoch)
        use_scaler = self.precision == "fp16" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.epoch, self.step, self.prior_wall = 0, 0, 0.0
        self.last_val: tuple[int, dict[str, Any]] | None = None
        self.first_loss: float | None = None  # the divergence check's reference (see check_divergence)
        self.loss_ema: float | None = None
        self.writer = None

    # --- the whole run ----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        t0 = time.time()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RESULT_FILE).unlink(missing_ok=True)
            atomic_write_bytes(self.out / CONFIG_FILE, dump_config(self.cfg).encode())
        if resume and (self.out / CHECKPOINT).is_file():
            self.restore(load_checkpoint(self.out / CHECKPOINT))
        elif self.is_main:
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            if self.out.joinpath(TB_DIR).is_dir():
                shutil.rmtree(self.out / TB_DIR)
        if self.is_main:
            self.writer = open_tensorboard(self.out / TB_DIR, purge_step=self.step + 1 if self.step else None)
        try:
            try:
                with StopOnInterrupt() as self._stop:  # Ctrl-C: stop at a step boundary with a checkpoint
                    completed = self.fit(t0)
            except Diverged as d:
                return self.finish_diverged(t0, d)
            return self.finish(t0, completed)
        finally:
            if self.writer is not None:
                self.writer.close()

    def fit(self, t0: float) -> bool:
        """Train epochs ``self.epoch + 1 ..``; False when ``runtime.max_steps`` stopped the run early."""
        epochs, max_steps = self.cfg.optim.epochs, self.cfg.runtime.max_steps
        self._t0 = t0
        logger.info("training %s on %d images for %d epochs (%d steps each), %s, lr %.4g, %s",
                    self.model.method_name, len(self.train_ds), epochs, self.steps_per_epoch,
                    resolve_optimizer_name(self.cfg.optim, self.model), scaled_lr(self.cfg.optim, self.model),
                    self.precision)
        while self.epoch < epochs:
            if max_steps is not None and self.step >= max_steps:
                return False
            started = time.time()
            stats = self.train_epoch(self.epoch + 1)
            if stats is None:
                return False
            self.epoch += 1
            val = self.validate_if_due()
            self.log_epoch(stats, val, time.time() - started)
            self.save(t0)
        return True

    # --- one epoch --------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float] | None:
        """One pass over the training data in the order fixed by (seed, epoch); None if max_steps hit."""
        # The shuffle contract (mirrored by vptune.engine.features.epoch_order): a generator seeded with
        # seed * 1_000_003 + epoch; the loader draws one int64 from it (worker seeds), then randperm(n).
        loader = self.train_loader(epoch)
        self.model.train()
        loss_sum, correct, n = 0.0, 0, 0
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch}/{self.cfg.optim.epochs}",
                           self.cfg.runtime.progress)
        max_steps = self.cfg.runtime.max_steps
        batches, done = iter(loader), self._skip
        if done:  # resuming mid-epoch: replay the loader to where the checkpoint was written
            loss_sum, correct, n = self._partial
            for _ in itertools.islice(batches, done):
                pass
            restore_rng(self._resume_rng)  # the RNG state of the step boundary, after the replay's draws
            self._skip = 0
            bar.update(done)
        try:
            for images, labels in batches:
                if max_steps is not None and self.step >= max_steps:
                    return None
                loss, hits, count = self.train_step(images, torch.as_tensor(labels), epoch)
                loss_sum, correct, n, done = loss_sum + loss * count, correct + hits, n + count, done + 1
                bar.update(1)
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
                if self._stop is not None and self._stop.requested:
                    raise self.interrupted(epoch, done, (loss_sum, correct, n))
        finally:
            bar.close()
        return {"train_loss": loss_sum / max(n, 1), "train_acc": 100.0 * correct / max(n, 1)}

    def train_loader(self, epoch: int) -> Any:
        """The minibatches of ``epoch``, in the order fixed by (seed, epoch)."""
        gen = torch.Generator().manual_seed(self.cfg.runtime.seed * 1_000_003 + epoch)
        return make_loader(self.train_ds, self.cfg.optim.batch_size, num_workers=self.cfg.data.num_workers,
                           device=self.device, shuffle=True, generator=gen, drop_last=self.drop_last)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: mean cross-entropy of the batch."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.optim.label_smoothing)

    def step_stats(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        """(mean loss, correct, images) of the step's batch, for the logs and the non-finite check."""
        return float(loss.detach()), int((logits.detach().argmax(dim=1) == labels).sum()), int(labels.numel())

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> tuple[float, int, int]:
        """Forward, loss, backward, (clip), optimiser and schedule step; returns (loss, correct, images)."""
        self._check_labels(labels)
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        lr = self.scheduler.get_last_lr()[0]
        with autocast(self.device, self.precision):
            logits = self.forward(images)
        loss = self.loss(logits, labels)
        value, hits, count = self.step_stats(loss, logits, labels)
        self.check_divergence(value, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self._backward_and_step(loss)
        self.scheduler.step()
        self.step += 1
        if self.writer is not None:
            self.writer.add_scalar("train/loss_step", value, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
        return value, hits, count

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        clip = self.cfg.optim.grad_clip
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.optimizer.step()

    def _check_labels(self, labels: torch.Tensor) -> None:
        k = self.model.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise VptuneError(f"training label {int(labels.max())} is out of range for {k} classes "
                              f"(labels must be 0..{k - 1})")

    def check_divergence(self, value: float, epoch: int) -> None:
        """Raise :class:`Diverged` when a step's loss is not finite, or when the loss's moving average
        (0.9 decay, so a single spike that the run recovers from does not count) exceeds
        ``divergence_factor`` x max(ln(classes), the run's first loss): that far above chance and above
        its start, the lr is past the edge (the paper's grid reaches base lr 50, so some grid points do)."""
        if self.first_loss is None and math.isfinite(value):
            self.first_loss = value
        self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * value
        factor = self.cfg.optim.divergence_factor
        limit = factor * max(math.log(max(self.model.num_classes, 2)), self.first_loss or 0.0)
        if math.isfinite(value) and (factor == 0 or self.loss_ema <= limit):
            return
        lr = self.scheduler.get_last_lr()[0]
        what = (f"became {value}" if not math.isfinite(value)
                else f"averaged {self.loss_ema:.4g} (limit {limit:.4g})")
        raise Diverged(f"training diverged: the loss {what} at epoch {epoch}, step {self.step + 1} (lr "
                       f"{lr:.4g}); try a lower optim.base_lr or optim.grad_clip")

    # --- validation, logs, checkpoints --------------------------------------------------------------
    def validate_if_due(self) -> dict[str, Any] | None:
        every, last = self.cfg.runtime.eval_every, self.epoch == self.cfg.optim.epochs
        if self.val_ds is None or not (last or (every > 0 and self.epoch % every == 0)):
            return None
        val = self.evaluate(self.val_ds, "val")
        self.last_val = (self.epoch, val)
        return val

    def evaluate(self, dataset: Dataset, name: str) -> dict[str, Any]:
        return evaluate(self.model, dataset, device=self.device, precision=self.precision,
                        batch_size=self.cfg.optim.batch_size, num_workers=self.cfg.data.num_workers,
                        progress=self.cfg.runtime.progress, desc=name)

    def log_epoch(self, stats: dict[str, float], val: dict[str, Any] | None, seconds: float) -> None:
        if not self.is_main:
            return
        lr = self.scheduler.get_last_lr()[0]  # at the end of the epoch (TensorBoard has it per step)
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "lr": lr, **stats,
                                  "epoch_s": round(seconds, 3)}
        if val is not None:
            record.update({"val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]})
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("epoch", "step"):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, self.step)
            self.writer.flush()
        shown = f", val top-1 {val['top1']:.2f}%" if val is not None else ""
        logger.info("epoch %d/%d: loss %.4f, train acc %.2f%%%s", self.epoch, self.cfg.optim.epochs,
                    stats["train_loss"], stats["train_acc"], shown)

    def interrupted(self, epoch: int, done: int, partial: tuple[float, int, int]) -> TrainingInterrupted:
        """Write a mid-epoch checkpoint (``done`` steps into ``epoch``) and say how to resume."""
        self.save(self._t0, epoch_step=done, partial=partial)
        return TrainingInterrupted(
            f"interrupted at epoch {epoch}, step {self.step}: checkpoint written to {self.out / CHECKPOINT}; "
            "continue with the same command plus --resume (vptune train ... --resume)")

    def save(self, t0: float, epoch_step: int = 0, partial: tuple[float, int, int] | None = None) -> None:
        if not self.is_main:
            return
        extra = {"wall_s": self.prior_wall + time.time() - t0, "first_loss": self.first_loss,
                 "last_val_epoch": self.last_val[0] if self.last_val else 0,
                 "config": config_to_dict(self.cfg)}
        if epoch_step:  # a mid-epoch checkpoint (SIGINT): resume replays the epoch's first batches
            extra.update(epoch_step=int(epoch_step), partial=[float(partial[0]), int(partial[1]),
                                                              int(partial[2])])
        save_checkpoint(self.out / CHECKPOINT, model_state=self.model.trained_state_dict(),
                        optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                        epoch=self.epoch, step=self.step,
                        scaler=self.scaler.state_dict() if self.scaler is not None else None, extra=extra)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: trained tensors, optimiser, schedule, counters, RNG states."""
        expected = self.model.trained_state_dict()
        got = state["model"]
        if set(got) != set(expected) or any(tuple(got[k].shape) != tuple(expected[k].shape) for k in got):
            raise VptuneError(f"{self.out / CHECKPOINT} does not match the model of this config (method or "
                              "backbone changed?); pass --overwrite to start over")
        self.model.load_state_dict(got, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.prior_wall = float(state.get("extra", {}).get("wall_s", 0.0))
        self.first_loss = state.get("extra", {}).get("first_loss")
        self._skip = int(state.get("extra", {}).get("epoch_step", 0))
        if self._skip:
            loss_sum, correct, n = state["extra"]["partial"]
            self._partial, self._resume_rng = (float(loss_sum), int(correct), int(n)), state["rng"]
        if self.is_main:
            truncate_metrics(self.out / METRICS_FILE, self.epoch)
        restore_rng(state["rng"])
        logger.info("resumed %s at epoch %d (step %d)", self.out, self.epoch, self.step)

    # --- the end ----------------------------------------------------------------------------------
    def finish_diverged(self, t0: float, d: Diverged) -> dict[str, Any]:
        """A diverged run is a result: ``result.json`` with ``status: diverged`` and the reason; no task
        is saved and nothing is evaluated (a sweep lists it and never selects it)."""
        summary = self.summary(None, None, False, self.prior_wall + time.time() - t0)
        summary.update(status="diverged", diverged=str(d), steps=self.step)
        if self.is_main:
            atomic_write_json(self.out / RESULT_FILE, summary)
            logger.info("%s; recorded in %s", d, self.out / RESULT_FILE)
        return summary

    def finish(self, t0: float, completed: bool) -> dict[str, Any]:
        """Final validation and test, the task folder, then ``result.json`` (last)."""
        val = None
        if self.val_ds is not None:
            val = self.last_val[1] if self.last_val and self.last_val[0] == self.epoch else \
                self.evaluate(self.val_ds, "val")
        test = self.evaluate(self.test_ds, "test") if self.test_ds is not None else None
        summary = self.summary(val, test, completed, self.prior_wall + time.time() - t0)
        if not self.is_main:
            return summary
        write_finished_run(self.out, self.model, summary)
        self._log_final(summary)
        return summary

    def summary(self, val: dict | None, test: dict | None, completed: bool, wall: float) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        sizes = [len(ds) if ds is not None else 0 for ds in (self.train_ds, self.val_ds, self.test_ds)]
        return run_summary(cfg, model, status="done" if completed else "stopped", val=val, test=test,
                           epochs=self.epoch, steps=self.step, optimizer=resolve_optimizer_name(cfg.optim, model),
                           lr=scaled_lr(cfg.optim, model), data=data_summary(cfg, *sizes), device=str(self.device),
                           precision=self.precision, wall=wall)

    def _log_final(self, summary: dict[str, Any]) -> None:
        parts = [f"{k} top-1 {summary[k]['top1']:.2f}%" for k in ("val", "test") if summary[k]]
        logger.info("%s after %d epochs%s; task saved to %s", summary["status"], summary["epochs"],
                    ": " + ", ".join(parts) if parts else "", self.out / TASK_DIR)


# ------------------------------------------------------------------------------------------ helpers

class Diverged(VptuneError):
    """A run whose loss exploded or became non-finite: recorded as ``status: diverged``, not a crash."""


def open_tensorboard(log_dir: Path, purge_step: int | None = None) -> Any:
    """A SummaryWriter, or None (with one warning per process) when tensorboard is unavailable."""
    global _TB_WARNED
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken tensorboard/protobuf install
        if not _TB_WARNED:
            warnings.warn(f"tensorboard is unavailable ({e}); TensorBoard logs are skipped", stacklevel=2)
            _TB_WARNED = True
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


class SilentBar:
    """The progress bar off a terminal: accepts the tqdm calls the loops make and prints nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal when ``enabled``; a silent stand-in otherwise."""
    if not enabled or not sys.stderr.isatty():
        return SilentBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)
