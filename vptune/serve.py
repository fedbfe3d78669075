"""``vptune serve``: an HTTP service over a :class:`~vptune.multitask.MultiTaskModel`.

Endpoints (JSON unless noted; every error is ``{"error": {"status", "type", "message"}}``):

* ``POST /v1/tasks/{task}/predict?top_k=5`` -- multipart/form-data with one image part named ``file``
  (``image`` also accepted); answers ``{"task", "method", "predictions": [{"label", "index", "score"}]}``
  with softmax scores, best first.
* ``GET /v1/tasks`` -- the loaded tasks. ``POST /v1/tasks`` ``{"name", "path", "replace": false}`` loads
  a task folder without a restart (paths must lie under ``task_root`` when one is set; disabled by
  ``allow_task_loading=False``); ``DELETE /v1/tasks/{task}`` unloads one.
* ``GET /healthz`` -- liveness of the server and its batching worker.
* ``GET /metrics`` -- Prometheus text exposition: ``vptune_http_requests_total{method,route,status}``,
  ``vptune_http_request_duration_seconds{route}`` (histogram), ``vptune_batch_size`` and
  ``vptune_batch_tasks`` (histograms), ``vptune_queue_depth``, ``vptune_predictions_total{task}``,
  ``vptune_tasks_loaded``.

Dynamic micro-batching: request handlers decode and preprocess their image (in a thread pool), then put
it on a bounded queue; one background worker thread takes the first waiting request, collects more for
up to ``max_wait_ms`` or until ``max_batch_size``, and runs them -- samples of any tasks mixed -- as one
``MultiTaskModel`` call. A full queue answers 503, a request not served within ``request_timeout_s`` 504.

Input guards, each a 4xx that never takes the server down: a request body over ``max_upload_bytes``
(checked on Content-Length and while streaming) -> 413; a request that is not multipart/form-data, or
an image part whose Content-Type is not an accepted image type -> 415; no ``file`` part -> 422; an
image with more than ``max_pixels`` pixels (checked from the header, before decoding: the
decompression-bomb guard) -> 413; a corrupt, truncated or unsupported image -> 400; an unknown task ->
404. Preprocessing follows each task's ``task.json`` ``preprocessing`` (resize to ``input_size``,
mean/std) through :func:`vptune.data.build_transform` (Pillow + numpy, no torchvision).
"""

# (no "from __future__ import annotations": FastAPI reads the endpoint annotations defined in create_app)

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vptune.errors import VptuneError
from vptune.multitask import MultiTaskModel
from vptune.serving_limits import (  # noqa: F401  (re-exported: vptune.serve.<name> keeps working)
    IMAGE_TYPES,
    MULTIPART_SLACK,
    ApiError,
    ServeConfig,
    decode_upload,
)

logger = logging.getLogger("vptune.serve")


# --- preprocessing ------------------------------------------------------------------------------------
def task_transform(entry: Any):  # -> Callable[[PIL.Image.Image], Tensor]
    """The evaluation transform of a task from its ``task.json`` preprocessing (and training protocol)."""
    from vptune.data.transforms import PROTOCOLS, build_transform

    protocol = str((entry.meta.get("training") or {}).get("protocol", "vtab"))
    return build_transform(entry.preprocessing, protocol if protocol in PROTOCOLS else "vtab", train=False)


# --- metrics ------------------------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vptune_http_requests",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vptune_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.batch_size = Histogram(
            "vptune_batch_size",
            "Samples per backbone batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_tasks = Histogram(
            "vptune_batch_tasks",
            "Distinct tasks per backbone batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "vptune_batch_duration_seconds",
            "Model time per batch",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )
        self.queue_depth = Gauge("vptune_queue_depth", "Requests waiting for the batching worker", registry=r)
        self.predictions = Counter("vptune_predictions", "Served predictions by task", ["task"], registry=r)
        self.tasks_loaded = Gauge("vptune_tasks_loaded", "Loaded tasks", registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --- micro-batching -----------------------------------------------------------------------------------
@dataclass
class _Job:
    task: str
    image: torch.Tensor  # (3, H, W)
    future: concurrent.futures.Future


_STOP = object()


class MicroBatcher:
    """A background thread that batches queued samples of any tasks into ``MultiTaskModel`` calls."""

    def __init__(self, model: MultiTaskModel, cfg: ServeConfig, metrics: Metrics | None = None) -> None:
        self.model, self.cfg, self.metrics = model, cfg, metrics
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.max_queue)
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if not self.alive:
            self._thread = threading.Thread(target=self._loop, name="vptune-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive:
            self._queue.put(_STOP)
            self._thread.join(timeout)  # type: ignore[union-attr]

    def submit(self, task: str, image: torch.Tensor) -> concurrent.futures.Future:
        if not self.alive:
            raise ApiError(503, "the batching worker is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait(_Job(task, image, fut))
        except queue.Full:
            raise ApiError(503, f"server busy: {self.cfg.max_queue} requests are already queued") from None
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())
        return fut

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self.cfg.max_wait_ms / 1000.0
            while len(batch) < self.cfg.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            if self.metrics:
                self.metrics.queue_depth.set(self._queue.qsize())
            try:
                self._run(batch)
            except BaseException as e:  # never let the worker die: fail this batch only
                logger.exception("batch failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
        for job in self._drain():
            job.future.set_exception(ApiError(503, "the server is shutting down"))

    def _drain(self) -> list[_Job]:
        jobs = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if item is not _STOP:
                jobs.append(item)

    def _run(self, batch: list[_Job]) -> None:
        jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
        loaded = self.model.tasks
        for j in jobs:
            if j.task not in loaded:  # unloaded while it waited
                j.future.set_exception(ApiError(404, f"unknown task {j.task!r} (it was unloaded)"))
        jobs = [j for j in jobs if j.task in loaded]
        if not jobs:
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.model.forward([j.image for j in jobs], [j.task for j in jobs])
        if self.metrics:
            self.metrics.batch_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(jobs))
            self.metrics.batch_tasks.observe(len({j.task for j in jobs}))
        for j, lg in zip(jobs, logits):
            j.future.set_result(lg)


# --- the ASGI guard: body size limit and request metrics -----------------------------------------------
class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Refuses request bodies over ``max_body`` (Content-Length or streamed count) with 413 and records
    request counts and latency by route template."""

    def __init__(self, app: Any, max_body: int, metrics: Metrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = {"status": 500, "started": False, "received": 0}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = int(message["status"]), True
            await send(message)

        async def receive_wrapper() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    raise _BodyTooLarge()
            return message

        headers = dict(scope.get("headers") or [])
        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        try:
            if length > self.max_body:
                raise _BodyTooLarge()
            await self.app(scope, receive_wrapper, send_wrapper)
        except _BodyTooLarge:
            if not state["started"]:
                await self._drain(receive, state["received"])
                await _send_json(
                    send_wrapper, 413, _error_body(413, f"request body exceeds {self.max_body} bytes")
                )
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope.get("method", ""), template, str(state["status"])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - t0)

    async def _drain(self, receive: Any, received: int) -> None:
        """Read (and drop) the rest of a refused body, up to a bound, so that the client is still
        reading when the 413 arrives instead of seeing the connection reset mid-upload."""
        limit = max(4 * self.max_body, 8 * 1024 * 1024)
        try:
            while received <= limit:
                message = await asyncio.wait_for(receive(), timeout=5.0)
                if message["type"] != "http.request":
                    return
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
        except (asyncio.TimeoutError, OSError):
            return


def _error_body(status: int, message: str, type_: str = "") -> dict[str, Any]:
    e = ApiError(status, message, type_)
    return {"error": {"status": status, "type": e.type, "message": message}}


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


# --- the app ------------------------------------------------------------------------------------------
def create_app(model: MultiTaskModel, cfg: ServeConfig | None = None) -> Any:
    """The FastAPI app. The batching worker starts and stops with the app's lifespan."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServeConfig()
    cfg.validate()
    metrics = Metrics()
    batcher = MicroBatcher(model, cfg, metrics)
    transforms: dict[tuple[str, int], Any] = {}

    @asynccontextmanager
    async def lifespan(app: Any):
        batcher.start()
        metrics.tasks_loaded.set(len(model))
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    from vptune import __version__

    app = FastAPI(
        title="vptune",
        version=__version__,
        lifespan=lifespan,
        description="Visual Prompt Tuning tasks on one shared frozen backbone",
    )
    app.state.model, app.state.batcher, app.state.metrics, app.state.config = model, batcher, metrics, cfg

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.status, exc.message, exc.type), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(_error_body(422, "; ".join(parts) or "invalid request"), status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(_error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    def _entry(task: str) -> Any:
        entry = model.tasks.get(task)
        if entry is None:
            raise ApiError(
                404, f"unknown task {task!r}; loaded tasks: {', '.join(sorted(model.tasks)) or '(none)'}"
            )
        return entry

    def _preprocess(entry: Any, data: bytes, content_type: str | None) -> torch.Tensor:
        img = decode_upload(data, content_type, cfg)
        key = (entry.name, id(entry))
        tf = transforms.get(key)
        if tf is None:
            if len(transforms) > 1024:  # tasks reloaded many times: start over
                transforms.clear()
            tf = transforms[key] = task_transform(entry)
        return tf(img)

    @app.post(
        "/v1/tasks/{task}/predict",
        summary="Classify one image (multipart field 'file')",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            }
        },
    )
    async def predict(
        task: str, request: Request, top_k: int = Query(default=cfg.default_top_k, ge=1, le=1000)
    ) -> dict[str, Any]:
        from starlette.formparsers import MultiPartException

        entry = _entry(task)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise ApiError(
                415, f"send the image as multipart/form-data (field 'file'), not {ctype or '(none)'!r}"
            )
        try:
            form = await request.form(max_files=2, max_fields=16)
        except _BodyTooLarge:
            raise
        except (MultiPartException, StarletteHTTPException, ValueError) as e:
            raise ApiError(400, f"malformed multipart body: {getattr(e, 'detail', None) or e}") from None
        try:
            upload = form.get("file") or form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(
                    422, "missing field 'file': upload the image as a multipart file part named 'file'"
                )
            data = await upload.read(cfg.max_upload_bytes + 1)
            if len(data) > cfg.max_upload_bytes:
                raise ApiError(413, f"image exceeds {cfg.max_upload_bytes} bytes")
            x = await run_in_threadpool(_preprocess, entry, data, upload.content_type)
        finally:
            await form.close()
        fut = batcher.submit(entry.name, x)
        try:
            logits = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=cfg.request_timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()
            raise ApiError(504, f"not served within {cfg.request_timeout_s} s") from None
        probs = torch.softmax(logits.float(), dim=-1)
        k = min(top_k, probs.shape[-1])
        scores, idx = probs.topk(k)
        labels = entry.label_names
        metrics.predictions.labels(entry.name).inc()
        return {
            "task": entry.name,
            "method": entry.method,
            "predictions": [
                {"label": labels[int(i)], "index": int(i), "score": float(s)} for s, i in zip(scores, idx)
            ],
        }

    @app.get("/v1/tasks", summary="The loaded tasks")
    async def list_tasks() -> dict[str, Any]:
        return {"tasks": [e.describe() for _, e in sorted(model.tasks.items())]}

    class LoadTask(BaseModel):
        name: str
        path: str
        replace: bool = False

    @app.post("/v1/tasks", status_code=201, summary="Load a task folder without a restart")
    async def load_task(body: LoadTask) -> dict[str, Any]:
        if not cfg.allow_task_loading:
            raise ApiError(403, "loading tasks over HTTP is disabled on this server")
        path = Path(body.path)
        if cfg.task_root is not None:
            root = Path(cfg.task_root).resolve()
            path = (root / path).resolve()
            if root != path and root not in path.parents:
                raise ApiError(403, f"task folders must lie under the server's task root {str(root)!r}")
        if body.name in model.tasks and not body.replace:
            raise ApiError(409, f'task {body.name!r} is already loaded; send "replace": true to swap it')
        try:
            entry = await run_in_threadpool(model.add_task, body.name, path, replace=body.replace)
        except VptuneError as e:
            raise ApiError(400, str(e)) from None
        metrics.tasks_loaded.set(len(model))
        return {"loaded": entry.describe()}

    @app.delete("/v1/tasks/{task}", summary="Unload a task")
    async def unload_task(task: str) -> dict[str, Any]:
        if not cfg.allow_task_loading:
            raise ApiError(403, "unloading tasks over HTTP is disabled on this server")
        _entry(task)
        try:
            model.remove_task(task)
        except VptuneError as e:
            raise ApiError(404, str(e)) from None
        metrics.tasks_loaded.set(len(model))
        return {"unloaded": task}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> Any:
        body = {
            "status": "ok" if batcher.alive else "worker_down",
            "tasks": len(model),
            "queue_depth": batcher.depth(),
        }
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(batcher.depth())
        data, ctype = metrics.render()
        return Response(content=data, media_type=ctype)

    app.add_middleware(GuardMiddleware, max_body=cfg.max_upload_bytes + MULTIPART_SLACK, metrics=metrics)
    return app


def run_server(
    model: MultiTaskModel,
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    limit_concurrency: int | None = None,
) -> None:
    """Serve ``model`` with uvicorn until interrupted."""
    import uvicorn

    app = create_app(model, cfg)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=5,
    )
