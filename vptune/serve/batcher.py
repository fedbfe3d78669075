"""Dynamic micro-batching off the event loop: request handlers put preprocessed images on a bounded
queue; ``compute_workers`` background threads each take the first waiting request, collect more for up
to ``max_wait_ms`` or until ``max_batch_size``, and run them -- samples of any tasks mixed -- as one
:class:`~vptune.multitask.MultiTaskModel` call. Each job carries the
:class:`~vptune.multitask.TaskEntry` its request resolved, so a task replaced or unloaded meanwhile
answers with the version the request was accepted with (never a mix). A job whose caller gave up
(deadline, cancelled future) is skipped. The threads are daemons: a batch still computing never keeps
the process from exiting."""

# (no "from __future__ import annotations", as in vptune.serve)

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from vptune.multitask import MultiTaskModel, TaskEntry
from vptune.serving_limits import ApiError, ServeConfig

logger = logging.getLogger("vptune.serve")


@dataclass
class _Job:
    entry: TaskEntry
    image: torch.Tensor  # (3, H, W)
    future: concurrent.futures.Future
    deadline: float  # time.monotonic() after which nobody waits for the answer


_STOP = object()


class MicroBatcher:
    """Background threads that batch queued samples of any tasks into ``MultiTaskModel`` calls."""

    def __init__(self, model: MultiTaskModel, cfg: ServeConfig, metrics: Any = None) -> None:
        self.model, self.cfg, self.metrics = model, cfg, metrics
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.max_queue)
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def in_flight(self) -> int:
        """Batches being computed right now."""
        return self._busy

    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if not self.alive:
            self._threads = [
                threading.Thread(target=self._loop, name=f"vptune-batcher-{i}", daemon=True)
                for i in range(self.cfg.compute_workers)
            ]
            for t in self._threads:
                t.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the workers to stop and wait up to ``timeout`` s in all (a batch still computing is left
        to its daemon thread); queued jobs are answered 503."""
        for _ in self._threads:
            try:
                self._queue.put(_STOP, timeout=0.5)
            except queue.Full:
                break
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        for job in self._drain():
            _fail(job, ApiError(503, "the server is shutting down"))

    def submit(self, entry: TaskEntry, image: torch.Tensor, deadline: float) -> concurrent.futures.Future:
        if not self.alive:
            raise ApiError(503, "the batching worker is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait(_Job(entry, image, fut, deadline))
        except queue.Full:
            raise ApiError(503, f"server busy: {self.cfg.max_queue} requests are already queued") from None
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())
        return fut

    def _loop(self) -> None:
        while True:
            batch, stopping = self._collect()
            if batch:
                self._guarded_run(batch)
            if stopping:
                return

    def _collect(self) -> tuple[list[_Job], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000.0
        while len(batch) < self.cfg.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())
        return batch, False

    def _guarded_run(self, batch: list[_Job]) -> None:
        with self._busy_lock:
            self._busy += 1
        if self.metrics:
            self.metrics.in_flight.set(self._busy)
        try:
            self._run(batch)
        except BaseException as e:  # never let a worker die: fail this batch only
            logger.exception("batch failed")
            for job in batch:
                _fail(job, e)
        finally:
            with self._busy_lock:
                self._busy -= 1
            if self.metrics:
                self.metrics.in_flight.set(self._busy)

    def _run(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        jobs = []
        for j in batch:
            if not j.future.set_running_or_notify_cancel():
                continue  # the caller gave up (its deadline fired)
            if now > j.deadline:
                j.future.set_exception(ApiError(504, "the request's deadline passed while it was queued"))
                continue
            jobs.append(j)
        if not jobs:
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.model.forward([j.image for j in jobs], [j.entry for j in jobs])
        if self.metrics:
            self.metrics.batch_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(jobs))
            self.metrics.batch_tasks.observe(len({j.entry.uid for j in jobs}))
        for j, lg in zip(jobs, logits):
            j.future.set_result(lg)

    def _drain(self) -> list[_Job]:
        jobs = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if item is not _STOP:
                jobs.append(item)


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        try:
            if job.future.running() or job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass
