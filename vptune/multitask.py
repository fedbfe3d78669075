"""One frozen backbone serving many tasks in mixed batches.

    mt = vptune.MultiTaskModel(backbone)
    mt.add_task("dtd", "tasks/dtd")            # refuses a task trained on another backbone
    mt.add_task("pets", "tasks/pets")
    logits = mt(images, ["dtd", "pets", "dtd"])  # a list: logits[b] has shape (num_classes of task b,)

How a mixed batch runs (``forward``):

* **Shared tasks** -- every method that leaves the backbone's weights alone and only hands it prompts
  (VPT-shallow, VPT-deep with any ``deep_layers``/``project_dim``/``pool``, prompt location
  ``prepend``) or nothing at all (linear, mlp-k) -- share **one** backbone pass per input size. Each
  sample gets its task's prompts at every block where its task has some: the prompts of all samples are
  padded to the longest task's length, ``Tokens.prompt_mask`` masks the padding (and the slots of
  samples whose task has no prompts yet, or none at all, such as a linear probe) out of attention, and
  ``run_block(..., prompt_replace=...)`` (see :mod:`vptune.backbones.base`) lets a VPT-shallow
  sample's prompts flow on while a VPT-deep sample's are replaced. A masked key is never attended to, so
  every sample's logits equal those of its task run alone (up to float rounding). Each task's pooling
  mode and head are then applied to its own rows.
* **Tap tasks** -- SSF, LoRA and DoRA (:mod:`vptune.methods.taps`) join the same shared pass: per
  block and layer, the tasks' scale/shift vectors and low-rank A/B are stacked into tables (identity for
  tasks without one, ranks zero-padded), gathered per sample and applied with batched matmuls, as
  multi-LoRA servers do; so a LoRA sample beside an SSF sample and a VPT-deep sample each gets its task's
  own logits (up to float rounding).
* **Own-pass tasks** -- methods that change backbone weights (full, partial-k, bias; the task holds its
  own backbone copy), adapters, side-tuning and ``location='add'`` prompts -- run per task on their
  samples with the task's :class:`~vptune.model.TunedModel`.

``forward`` returns a list of per-sample logit tensors in input order (tasks have different class
counts); :func:`pad_logits` turns it into a padded ``(B, C_max)`` tensor (``-inf`` padding) plus lengths.
``images`` is a ``(B, 3, H, W)`` tensor or a list of ``(3, H, W)`` tensors that may differ in size
(tasks may use different input sizes); samples are grouped by size.

Padding costs compute: a shared pass is split by prompt length so that no sample's sequence grows by
more than ``pad_tolerance`` (default 25%) through padding (``pad_tolerance=None``: always one pass).

Thread-safe: ``add_task``/``remove_task`` may run while other threads call ``forward``. The registry is
an immutable snapshot swapped under a short lock; ``forward`` works on the snapshot it read (or on the
:class:`TaskEntry` objects it is given), so no lock is held across a forward pass and a replaced task
never mixes into a pass that started with the old one.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vptune.artifact import load_task, read_task_json
from vptune.backbones.base import Backbone
from vptune.errors import VptuneError
from vptune.methods.mixed import MixedPrompts
from vptune.methods.taps import MixedTaps, task_tap_tables
from vptune.model import frozen_model

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_UIDS = itertools.count(1)  # TaskEntry.uid: never reused (prompt-table cache keys)


@dataclass
class TaskEntry:
    """A loaded task. ``shared``: runs in the shared backbone pass (else its own TunedModel runs)."""

    name: str
    directory: str
    model: Any  # TunedModel
    meta: dict[str, Any]
    shared: bool
    prompts: list[Tensor | None] = field(default_factory=list)  # per block: (p, d_i) or None
    num_prompts: int = 0
    pool_mode: str | None = None
    taps: dict[int, dict[str, Any]] = field(default_factory=dict)  # block -> layer -> LayerUpdate (SSF, LoRA)
    uid: int = field(default_factory=lambda: next(_UIDS))

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def label_names(self) -> list[str]:
        return list(self.model.label_names)

    @property
    def preprocessing(self) -> Any:
        return self.model.preprocessing

    @property
    def method(self) -> str:
        return self.model.method_name

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "num_classes": self.num_classes,
            "input_size": int(self.preprocessing.input_size),
            "num_prompts": self.num_prompts,
            "pass": "shared" if self.shared else "own",
            "directory": self.directory,
        }


def is_shared_method(model: Any) -> bool:
    """Whether a TunedModel's method can join a shared pass (it declares one: :meth:`Method.shared_pass`)."""
    return model.method.shared_pass(model.backbone.num_blocks) is not None


class MultiTaskModel:
    """One frozen backbone, many task heads/prompts; see the module docstring."""

    def __init__(
        self, backbone: Backbone, *, pad_tolerance: float | None = 0.25, table_cache: int = 64
    ) -> None:
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        backbone.fingerprint()  # pin the identity once (tasks are verified against it)
        self.backbone = backbone
        self.pad_tolerance = pad_tolerance
        self._tasks: dict[str, TaskEntry] = {}  # never mutated: replaced whole under _lock
        self._lock = threading.RLock()
        self._tables: OrderedDict[tuple, tuple[list[Tensor | None], list[Tensor]]] = OrderedDict()
        self._table_cache = int(table_cache)
        self.mixes_prompts = bool(backbone.supports_mixed_batches)  # else prompt tasks run one task per pass
        self._runner = frozen_model(backbone)  # the one block loop, run with mixed-batch hooks

    # --- tasks ---------------------------------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, TaskEntry]:
        """A snapshot: task name -> :class:`TaskEntry`."""
        return dict(self._tasks)

    def task_names(self) -> list[str]:
        """The registered task names, sorted."""
        return sorted(self._tasks)

    def get_task(self, name: str) -> TaskEntry | None:
        """The registered :class:`TaskEntry` named ``name``, or None."""
        return self._tasks.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def add_task(self, name: str, directory: str | Path, *, replace: bool = False) -> TaskEntry:
        """Load the task folder ``directory`` as ``name``. Refuses a task trained on another backbone
        (arch, config or weights sha256 differ) and an existing name unless ``replace``."""
        self._check_name(name, replace)
        model = load_task(directory, self.backbone, check_backbone=True)  # VptuneError on a mismatch
        return self._register(name, str(directory), model, read_task_json(directory), replace)

    def add_model(
        self,
        name: str,
        model: Any,
        *,
        replace: bool = False,
        directory: str = "<memory>",
        meta: dict[str, Any] | None = None,
    ) -> TaskEntry:
        """Register an in-memory TunedModel built on this backbone (tests, notebooks, a server that
        loads and checks task folders itself: ``directory`` and ``meta`` (its task.json) then describe
        it). ``replace`` swaps an existing task atomically."""
        if model.backbone.fingerprint() != self.backbone.fingerprint() or (
            model.backbone is not self.backbone and not model.method.changes_backbone
        ):
            raise VptuneError(f"task {name!r} was built on another backbone")
        self._check_name(name, replace)
        return self._register(name, directory, model, dict(meta or {}), replace)

    def _check_name(self, name: str, replace: bool) -> None:
        if not isinstance(name, str) or not TASK_NAME.match(name):
            raise VptuneError(
                f"bad task name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        if name in self._tasks and not replace:
            raise VptuneError(f"task {name!r} is already loaded (remove it first, or replace=True)")

    def _register(
        self, name: str, directory: str, model: Any, meta: dict[str, Any], replace: bool
    ) -> TaskEntry:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            spec = model.method.shared_pass(self.backbone.num_blocks)
        entry = TaskEntry(name=name, directory=directory, model=model, meta=meta, shared=spec is not None)
        if spec is not None:
            entry.prompts = list(spec.prompts)
            lengths = {int(t.shape[0]) for t in entry.prompts if t is not None}
            if len(lengths) > 1:  # never produced by the built-in methods; keep such a task apart
                entry.shared = False
            entry.num_prompts = max(lengths, default=0)
            entry.pool_mode = spec.pool_mode
            entry.taps = dict(spec.taps)
        with self._lock:
            self._check_name(name, replace)  # again: another thread may have added it meanwhile
            self._tasks = {**self._tasks, name: entry}
            self._tables.clear()
        return entry

    def remove_task(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise VptuneError(
                    f"unknown task {name!r}; loaded tasks: {', '.join(sorted(self._tasks)) or '(none)'}"
                )
            self._tasks = {k: v for k, v in self._tasks.items() if k != name}
            self._tables.clear()

    def task(self, name: str, _tasks: dict[str, TaskEntry] | None = None) -> TaskEntry:
        tasks = self._tasks if _tasks is None else _tasks
        entry = tasks.get(name)
        if entry is None:
            raise VptuneError(f"unknown task {name!r}; loaded tasks: {', '.join(sorted(tasks)) or '(none)'}")
        return entry

    # --- inference -----------------------------------------------------------------------------------
    def __call__(
        self, images: Tensor | Sequence[Tensor], task_names: Sequence[str | TaskEntry]
    ) -> list[Tensor]:
        return self.forward(images, task_names)

    @torch.no_grad()
    def forward(
        self, images: Tensor | Sequence[Tensor], task_names: Sequence[str | TaskEntry]
    ) -> list[Tensor]:
        """Per-sample logits, ``out[b]`` of shape ``(num_classes of task_names[b],)``, in input order.
        ``task_names[b]`` may also be a :class:`TaskEntry` (a server that resolved it earlier)."""
        if len(images) != len(task_names):
            raise VptuneError(f"{len(images)} images but {len(task_names)} task names")
        snapshot = self._tasks  # no lock across the pass: the registry is swapped, never mutated
        entries = [n if isinstance(n, TaskEntry) else self.task(n, snapshot) for n in task_names]
        groups: dict[tuple, list[int]] = {}
        for b, (img, e) in enumerate(zip(images, entries)):
            if img.dim() != 3:
                raise VptuneError(f"image {b} must be (3, H, W), got shape {tuple(img.shape)}")
            pass_key = "shared" if e.shared and self.mixes_prompts else e.uid  # uid: a replaced task's
            # old and new entries (both in one batch of a server) never share a pass
            if e.shared and not self.mixes_prompts and e.num_prompts == 0:
                pass_key = "plain"  # prompt-free tasks can always share a pass
            groups.setdefault((pass_key, tuple(img.shape)), []).append(b)
        out: list[Tensor | None] = [None] * len(entries)
        device = next(self.backbone.parameters()).device
        for (pass_key, shape), rows in groups.items():
            if pass_key == "shared":
                n_tokens = (shape[1] // self.backbone.patch_size[0]) * (
                    shape[2] // self.backbone.patch_size[1]
                )
                passes = self._buckets(rows, entries, n_tokens)
            else:
                passes = [rows]
            for rows_ in passes:
                x = _stack(images, rows_).to(device)
                sub = [entries[b] for b in rows_]
                logits = self._shared_pass(x, sub) if sub[0].shared else list(sub[0].model(x).unbind(0))
                for b, lg in zip(rows_, logits):
                    out[b] = lg
        return out  # type: ignore[return-value]

    def _buckets(self, rows: list[int], entries: list[TaskEntry], n_tokens: int) -> list[list[int]]:
        """Split a shared group into passes by prompt length so that padding never makes a sample's
        sequence more than ``1 + pad_tolerance`` times longer than it would be alone."""
        lengths = sorted({entries[b].num_prompts for b in rows})
        if self.pad_tolerance is None or len(lengths) == 1:
            return [rows]
        edge: dict[int, int] = {}  # prompt length -> bucket
        start, bucket = lengths[0], 0
        for p in lengths:
            if (1 + n_tokens + p) > (1 + self.pad_tolerance) * (1 + n_tokens + start):
                start, bucket = p, bucket + 1
            edge[p] = bucket
        out: list[list[int]] = [[] for _ in range(bucket + 1)]
        for b in rows:
            out[edge[entries[b].num_prompts]].append(b)
        return [r for r in out if r]

    def _shared_pass(self, x: Tensor, entries: list[TaskEntry]) -> list[Tensor]:
        modes = sorted({e.pool_mode for e in entries}, key=str)
        feats = dict(zip(modes, self._runner.forward_features(x, self._hooks(x, entries, modes))))  # (B, d)
        by_task: dict[int, list[int]] = {}
        for r, e in enumerate(entries):
            by_task.setdefault(e.uid, []).append(r)
        out: list[Tensor | None] = [None] * len(entries)
        for rows in by_task.values():
            e = entries[rows[0]]
            idx = torch.tensor(rows, device=x.device)
            y = e.model.forward_head(feats[e.pool_mode].index_select(0, idx))  # (n_t, C_t)
            for r, lg in zip(rows, y.unbind(0)):
                out[r] = lg
        return out  # type: ignore[return-value]

    def _hooks(self, x: Tensor, entries: list[TaskEntry], modes: list[str | None]) -> MixedPrompts | MixedTaps:
        """The mixed-batch hooks of one shared pass: every sample's task prompts, padded."""
        uniq: list[TaskEntry] = []
        pos: dict[int, int] = {}
        for e in entries:
            if e.uid not in pos:
                pos[e.uid] = len(uniq)
                uniq.append(e)
        tix = torch.tensor([pos[e.uid] for e in entries], device=x.device)  # (B,)
        P = max(e.num_prompts for e in uniq)
        tables, has = self._prompt_tables(uniq, P, x.device, x.dtype)
        plen = torch.tensor([e.num_prompts for e in uniq], device=x.device)[tix]  # (B,)
        prompts = [None if t is None else t.index_select(0, tix) for t in tables]  # (B, P, d_i)
        hooks = MixedPrompts(prompts, [h.index_select(0, tix) for h in has], plen, modes)
        if not any(e.taps for e in uniq):
            return hooks
        return MixedTaps(hooks, self._tap_tables(uniq, x), tix)

    def _tap_tables(self, uniq: list[TaskEntry], x: Tensor) -> list[dict[str, tuple]]:
        """Per block: layer -> the tasks' stacked scale/shift/A/B tables (cached like the prompt tables)."""
        key = ("taps", tuple(e.uid for e in uniq), str(x.device), x.dtype)
        with self._lock:
            hit = self._tables.get(key)
            if hit is not None:
                self._tables.move_to_end(key)
                return hit  # type: ignore[return-value]
        tables = task_tap_tables([e.taps for e in uniq], self.backbone.num_blocks, x)
        with self._lock:
            self._tables[key] = tables  # type: ignore[assignment]
            while len(self._tables) > self._table_cache:
                self._tables.popitem(last=False)
        return tables

    def _prompt_tables(
        self, uniq: list[TaskEntry], P: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[list[Tensor | None], list[Tensor]]:
        """Per block: a (T, P, d_i) table of the tasks' padded prompts (None when no task has any
        there) and a (T,) bool 'this task places prompts here'."""
        key = (tuple(e.uid for e in uniq), P, str(device), dtype)
        with self._lock:
            hit = self._tables.get(key)
            if hit is not None:
                self._tables.move_to_end(key)
                return hit
        tables: list[Tensor | None] = []
        has: list[Tensor] = []
        for i in range(self.backbone.num_blocks):
            flags = torch.tensor([e.prompts[i] is not None for e in uniq], device=device)
            has.append(flags)
            if P == 0 or not bool(flags.any()):
                tables.append(None)
                continue
            d = next(e.prompts[i].shape[1] for e in uniq if e.prompts[i] is not None)
            t = torch.zeros(len(uniq), P, d, device=device, dtype=dtype)
            for j, e in enumerate(uniq):
                if e.prompts[i] is not None:
                    t[j, : e.prompts[i].shape[0]] = e.prompts[i].to(device=device, dtype=dtype)
            tables.append(t)
        with self._lock:
            self._tables[key] = (tables, has)
            while len(self._tables) > self._table_cache:
                self._tables.popitem(last=False)
        return tables, has


def _stack(images: Tensor | Sequence[Tensor], rows: list[int]) -> Tensor:
    if isinstance(images, Tensor):
        return images.index_select(0, torch.tensor(rows, device=images.device))
    return torch.stack([images[b] for b in rows])


def pad_logits(logits: Sequence[Tensor], fill: float = float("-inf")) -> tuple[Tensor, Tensor]:
    """List of per-sample logits -> ``(B, C_max)`` padded with ``fill``, and the ``(B,)`` lengths."""
    lengths = torch.tensor([int(t.shape[0]) for t in logits])
    out = torch.full(
        (len(logits), int(lengths.max()) if len(logits) else 0),
        fill,
        dtype=logits[0].dtype if logits else torch.float32,
    )
    for b, t in enumerate(logits):
        out[b, : t.shape[0]] = t
    return out, lengths
