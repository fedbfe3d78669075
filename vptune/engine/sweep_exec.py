"""Sweep execution: jobs, the worker environment that runs them, and the in-process backend."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vptune.engine.config import config_diff, config_from_dict
from vptune.engine.features import train_linear_runs
from vptune.engine.runfolder import clear_run, read_run_config
from vptune.engine.sweep_plan import Run, run_state
from vptune.engine.trainer import build_backbone, run_training


@dataclass
class Job:
    """What a backend executes: one run through the trainer, or the runs of one linear pass."""

    runs: list[Run]

    def describe(self) -> str:
        r = self.runs[0]
        if r.one_pass:
            return f"{r.task}/{r.method}: {len(self.runs)} {r.stage} head(s) in one linear pass"
        return f"{r.task}/{r.method}/{r.stage}/{r.folder.name}"


class Env:
    """A worker's means to execute jobs: the trainer (``train_fn``, default
    :func:`vptune.engine.trainer.run_training`), backbones shared between runs, the feature cache.
    ``trained`` lists the folders it trained, in order."""

    def __init__(self, train_fn: Callable[..., dict[str, Any]] | None = None, backbone: Any = None,
                 cache_dir: str | Path | None = None, progress: bool = True) -> None:
        self.train_fn, self.backbone, self.cache_dir, self.progress = train_fn, backbone, cache_dir, progress
        self.trained: list[str] = []
        self._backbones: dict[str, Any] = {}

    def backbone_for(self, cfg: Any) -> Any:
        if self.backbone is not None:
            return self.backbone

        key = json.dumps(vars(cfg.backbone), sort_keys=True, default=str)
        if key not in self._backbones:
            self._backbones[key] = build_backbone(cfg)
        return self._backbones[key]

    def execute(self, job: Job) -> None:

        states = [run_state(r) for r in job.runs]
        runs = [r for r, s in zip(job.runs, states) if s != "done"]
        if not runs:
            return
        cfgs = [config_from_dict(r.config) for r in runs]
        if runs[0].one_pass:
            for r in runs:
                clear_run(r.folder)
            train_linear_runs(cfgs, self.backbone_for(cfgs[0]), self.cache_dir, progress=self.progress)
        else:
            run, state = runs[0], states[job.runs.index(runs[0])]
            resume = state == "partial" and not config_diff(read_run_config(run.folder) or {}, run.config)
            (self.train_fn or run_training)(cfgs[0], resume=resume, overwrite=state != "pending" and not resume,
                                            backbone=self.backbone_for(cfgs[0]))
        self.trained.extend(str(r.folder) for r in runs)


class LocalBackend:
    """Executes jobs one after another in this process."""

    def __init__(self, env: Env, log: Callable[[str], None] = print) -> None:
        self.env, self.log = env, log

    def run(self, jobs: Sequence[Job]) -> None:
        for i, job in enumerate(jobs, 1):
            self.log(f"[{i}/{len(jobs)}] {job.describe()}")
            self.env.execute(job)



def make_jobs(runs: Sequence[Run], states: dict[Path, str]) -> list[Job]:
    """Jobs for the runs not yet done: one-pass linear runs grouped per (task, method, fraction, stage),
    first (they are cheap); every other run alone."""
    passes: dict[tuple, list[Run]] = {}
    single: list[Job] = []
    for r in runs:
        if states[r.folder] == "done":
            continue
        if r.one_pass:
            passes.setdefault((r.task, r.method, r.fraction, r.stage), []).append(r)
        else:
            single.append(Job([r]))
    return [Job(v) for v in passes.values()] + single


# ------------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------------


