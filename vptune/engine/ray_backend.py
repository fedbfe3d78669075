"""The ``ray`` sweep backend: the runs of a sweep stage fanned out as Ray tasks over a cluster.

    vptune sweep configs/sweeps/vtab1k.yaml --backend ray --address auto --gpus-per-run 1 --cpus-per-run 8

Each job of a stage (one run through the trainer, or the heads of one linear pass) becomes one Ray task
with its resources (``num_gpus = gpus_per_run``, ``num_cpus = cpus_per_run``). The task builds an
:class:`~vptune.engine.sweep.Env` on its worker and calls the same ``env.execute(job)`` as the local
backend, writing into the same run folder -- so the output layout, idempotence (finished folders are
skipped), selection (on the driver, between the grid and the final stage) and reports are the same
whichever backend ran the sweep. On a multi-node cluster the sweep output (and the data and weights) must
be on a filesystem every node sees at the same path.

A failed task is retried ``max_retries`` times (Ray re-runs it; an interrupted run resumes from its
checkpoint); a job that still fails is returned in the failures list that
:func:`~vptune.engine.sweep.run_sweep` writes to ``failures.json``, prints and turns into a non-zero exit.

Ray: ``address=None`` starts a private local instance for the sweep (no dashboard) and shuts it down at
the end; ``address="auto"`` (or ``host:port``, ``ray://host:10001``) joins a running cluster, shipping this
vptune package to it (``runtime_env`` ``py_modules``); a Ray already initialised by the caller is used as is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vptune.engine.sweep_exec import Env
from vptune.errors import VptuneError

logger = logging.getLogger("vptune")

_WORKER_ENVS: dict[tuple, Any] = {}  # per worker process: Envs (and their backbones) reused across tasks


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise VptuneError("the ray backend needs Ray: pip install 'vptune[ray]' (or pip install ray)") from None
    return ray


def execute_job(job: Any, spec: dict[str, Any], backbone: Any = None) -> list[str]:
    """Run one job on a Ray worker (also callable in-process); returns the folders it trained."""
    import torch


    torch.set_num_threads(max(1, int(spec.get("threads") or 1)))
    if spec.get("train_fn") is None and backbone is None:
        key = (spec.get("cache_dir"), bool(spec.get("progress")))
        env = _WORKER_ENVS.get(key)
        if env is None:
            env = _WORKER_ENVS[key] = Env(cache_dir=spec.get("cache_dir"), progress=bool(spec.get("progress")))
    else:
        env = Env(train_fn=spec.get("train_fn"), backbone=backbone, cache_dir=spec.get("cache_dir"),
                  progress=bool(spec.get("progress")))
    before = len(env.trained)
    env.execute(job)
    return env.trained[before:]


def _describe_error(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:2000]


class RayBackend:
    """Executes the jobs of a stage as Ray tasks; ``run`` returns the jobs that failed after their retries
    (see the module docstring)."""

    def __init__(self, env: Any, log: Callable[[str], None] = print, *, address: str | None = None,
                 gpus_per_run: float | None = None, cpus_per_run: float = 1.0, max_retries: int = 1,
                 init_kwargs: dict[str, Any] | None = None, ship_code: bool | None = None) -> None:
        if gpus_per_run is not None and gpus_per_run < 0:
            raise VptuneError(f"--gpus-per-run must be >= 0, got {gpus_per_run}")
        if cpus_per_run <= 0:
            raise VptuneError(f"--cpus-per-run must be > 0, got {cpus_per_run}")
        if max_retries < 0:
            raise VptuneError(f"max_retries must be >= 0, got {max_retries}")
        self.env, self.log = env, log
        self.address, self.gpus_per_run, self.cpus_per_run = address, gpus_per_run, float(cpus_per_run)
        self.max_retries, self.init_kwargs = int(max_retries), dict(init_kwargs or {})
        self.ship_code = bool(address) if ship_code is None else ship_code
        self._ray: Any = None
        self._owns = False

    # --- the cluster ------------------------------------------------------------------------------
    def connect(self) -> Any:
        """Ray, initialised (see the module docstring)."""
        if self._ray is not None:
            return self._ray
        ray = _import_ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False}
            if self.address:
                kwargs["address"] = self.address
                if self.ship_code:  # this package's folder (vptune/), shipped to the workers
                    kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).resolve().parents[1])]}
            else:
                kwargs["address"] = "local"
            kwargs.update(self.init_kwargs)
            if kwargs.get("address") and kwargs["address"] != "local":
                kwargs.pop("include_dashboard", None)  # only a new local instance takes it
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise VptuneError(f"cannot start or join Ray (address {self.address or 'local'}): {e}") from None
            self._owns = True
        self._ray = ray
        return ray

    def resources(self) -> tuple[float, float]:
        """(GPUs, CPUs) each task asks for; ``gpus_per_run=None``: 1 when the cluster has GPUs, else 0."""
        ray = self.connect()
        gpus = self.gpus_per_run
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        return float(gpus), self.cpus_per_run

    def _check_fits(self, gpus: float, cpus: float) -> None:
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        if nodes and not any(r.get("GPU", 0) >= gpus and r.get("CPU", 0) >= cpus for r in nodes):
            most = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)))
            raise VptuneError(f"no Ray node has {gpus:g} GPU(s) and {cpus:g} CPU(s) for one run (the largest has "
                              f"{most.get('GPU', 0):g} GPU(s), {most.get('CPU', 0):g} CPU(s)); lower "
                              "--gpus-per-run / --cpus-per-run")

    # --- execution --------------------------------------------------------------------------------
    def run(self, jobs: Sequence[Any]) -> list[dict[str, Any]]:
        if not jobs:
            return []
        ray = self.connect()
        gpus, cpus = self.resources()
        self._check_fits(gpus, cpus)
        env = self.env
        spec = {"train_fn": env.train_fn, "cache_dir": str(env.cache_dir) if env.cache_dir else None,
                "progress": False, "threads": max(1, int(cpus))}
        backbone = ray.put(env.backbone) if env.backbone is not None else None
        task = ray.remote(execute_job)
        refs: dict[Any, Any] = {}
        for job in jobs:
            opts = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": self.max_retries,
                    "retry_exceptions": self.max_retries > 0, "name": job.describe()}
            refs[task.options(**opts).remote(job, spec, backbone)] = job
        self.log(f"ray: {len(jobs)} job(s) submitted, {gpus:g} GPU(s) and {cpus:g} CPU(s) each, "
                 f"up to {self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}")
        failures: list[dict[str, Any]] = []
        pending, finished, t0 = list(refs), 0, time.time()
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    job = refs[ref]
                    finished += 1
                    try:
                        trained = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 -- any task error (after max_retries) or a dead worker: recorded
                        failures.append({"job": job.describe(), "stage": job.runs[0].stage,
                                         "folders": [str(r.folder) for r in job.runs],
                                         "attempts": self.max_retries + 1, "error": _describe_error(e)})
                        self.log(f"[{finished}/{len(jobs)}] FAILED {job.describe()}: {failures[-1]['error']}")
                        continue
                    env.trained.extend(trained)
                    self.log(f"[{finished}/{len(jobs)}] done {job.describe()} ({time.time() - t0:.0f} s)")
        except BaseException:
            for ref in pending:  # interrupted: do not leave the cluster training
                ray.cancel(ref, force=True)
            raise
        return failures

    def close(self) -> None:
        """Shut down the Ray instance this backend started (a joined or caller-made one stays)."""
        if self._owns and self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
        self._ray, self._owns = None, False


def make_backend(env: Any, log: Callable[[str], None] = print, **options: Any) -> RayBackend:
    """The factory :data:`vptune.engine.sweep.BACKENDS` calls for ``backend: ray``."""
    known = {"address", "gpus_per_run", "cpus_per_run", "max_retries", "init_kwargs", "ship_code"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise VptuneError(f"unknown ray backend option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return RayBackend(env, log, **{k: v for k, v in options.items() if v is not None})
