"""The FastAPI app of ``vptune serve`` (see :mod:`vptune.serve` for the endpoints).

Nothing that can take long runs on the event loop or under a lock it shares: task loading and change
checks run in a loader pool, decoding and preprocessing in a CPU pool, the model in the batching
threads. Every predict request has one deadline (``request_timeout_s``) over all of it: when it fires
the request is answered 504 at once, whatever is still computing for it."""

# (no "from __future__ import annotations": FastAPI reads the endpoint annotations defined below)

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from vptune import __version__
from vptune.data.transforms import PROTOCOLS, build_transform
from vptune.multitask import MultiTaskModel, TaskEntry
from vptune.serve.batcher import MicroBatcher
from vptune.serve.guard import GuardMiddleware, _BodyTooLarge, error_body
from vptune.serve.metrics import Metrics
from vptune.serve.store import TaskStore
from vptune.serving_limits import MULTIPART_SLACK, ApiError, ServeConfig, decode_upload

logger = logging.getLogger("vptune.serve")


def task_transform(entry: Any):  # -> Callable[[PIL.Image.Image], Tensor]
    """The evaluation transform of a task from its ``task.json`` preprocessing (and training protocol)."""
    protocol = str((entry.meta.get("training") or {}).get("protocol", "vtab"))
    return build_transform(entry.preprocessing, protocol if protocol in PROTOCOLS else "vtab", train=False)


@dataclass
class _Ctx:
    model: MultiTaskModel
    cfg: ServeConfig
    metrics: Metrics
    store: TaskStore
    batcher: MicroBatcher
    transforms: dict[int, Any] = field(default_factory=dict)  # TaskEntry.uid -> transform
    cpu: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="vptune-cpu")
    )
    loader: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="vptune-load")
    )


def create_app(model: MultiTaskModel, cfg: ServeConfig | None = None) -> Any:
    """The FastAPI app. The batching workers start and stop with the app's lifespan."""
    from fastapi import FastAPI


    cfg = cfg or ServeConfig()
    cfg.validate()
    metrics = Metrics()
    ctx = _Ctx(model, cfg, metrics, TaskStore(model, cfg, metrics), MicroBatcher(model, cfg, metrics))
    app = FastAPI(
        title="vptune",
        version=__version__,
        lifespan=_lifespan(ctx),
        description="Visual Prompt Tuning tasks on one shared frozen backbone",
    )
    app.state.model, app.state.batcher, app.state.metrics = model, ctx.batcher, metrics
    app.state.config, app.state.store = cfg, ctx.store
    _add_error_handlers(app)
    _add_predict_route(app, ctx)
    _add_task_routes(app, ctx)
    _add_health_routes(app, ctx)
    app.add_middleware(
        GuardMiddleware, max_body=cfg.max_upload_bytes + MULTIPART_SLACK, metrics=metrics, token=cfg.token
    )
    return app


def _lifespan(ctx: _Ctx) -> Callable:
    @asynccontextmanager
    async def lifespan(app: Any):
        ctx.batcher.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, ctx.batcher.stop)
            ctx.cpu.shutdown(wait=False, cancel_futures=True)
            ctx.loader.shutdown(wait=False, cancel_futures=True)

    return lifespan


async def _within(deadline: float, fut: concurrent.futures.Future, what: str, timeout: float) -> Any:
    """Await ``fut`` until ``deadline`` (time.monotonic()); past it, cancel it and answer 504 at once
    (a thread still running for it goes on; its result is dropped)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        fut.cancel()
        raise ApiError(504, f"not served within {timeout:g} s ({what})")
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), remaining)
    except asyncio.TimeoutError:
        fut.cancel()
        raise ApiError(504, f"not served within {timeout:g} s ({what})") from None


def _add_error_handlers(app: Any) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.type), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(error_body(422, "; ".join(parts) or "invalid request"), status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)


_PREDICT_BODY = {
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
}


def _add_predict_route(app: Any, ctx: _Ctx) -> None:
    from fastapi import Query, Request

    cfg, metrics = ctx.cfg, ctx.metrics

    @app.post("/v1/tasks/{task}/predict", summary="Classify one image (multipart field 'file')",
              openapi_extra=_PREDICT_BODY)
    async def predict(
        task: str, request: Request, top_k: int = Query(default=cfg.default_top_k, ge=1, le=1000)
    ) -> dict[str, Any]:
        t0, deadline = time.perf_counter(), time.monotonic() + cfg.request_timeout_s
        entry = ctx.store.peek(task) or await _within(
            deadline, ctx.loader.submit(ctx.store.resolve, task), "loading the task", cfg.request_timeout_s
        )
        try:
            out = await _serve(ctx, entry, request, top_k, deadline)
        except ApiError as e:
            metrics.task_requests.labels(entry.name, str(e.status)).inc()
            raise
        metrics.task_requests.labels(entry.name, "200").inc()
        metrics.task_latency.labels(entry.name).observe(time.perf_counter() - t0)
        metrics.predictions.labels(entry.name).inc()
        return out


async def _serve(ctx: _Ctx, entry: TaskEntry, request: Any, top_k: int, deadline: float) -> dict[str, Any]:
    timeout = ctx.cfg.request_timeout_s
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiError(415, f"send the image as multipart/form-data (field 'file'), not {ctype or '(none)'!r}")
    data, content_type = await _read_upload(ctx.cfg, request)
    x = await _within(deadline, ctx.cpu.submit(_preprocess, ctx, entry, data, content_type), "decoding",
                      timeout)
    fut = ctx.batcher.submit(entry, x, deadline)
    logits = await _within(deadline, fut, "computing", timeout)
    probs = torch.softmax(logits.float(), dim=-1)
    scores, idx = probs.topk(min(top_k, probs.shape[-1]))
    labels = entry.label_names
    return {
        "task": entry.name,
        "method": entry.method,
        "predictions": [
            {"label": labels[int(i)], "index": int(i), "score": float(s)} for s, i in zip(scores, idx)
        ],
    }


async def _read_upload(cfg: ServeConfig, request: Any) -> tuple[bytes, str | None]:
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=2, max_fields=16)
    except _BodyTooLarge:
        raise
    except (MultiPartException, StarletteHTTPException, ValueError) as e:
        raise ApiError(400, f"malformed multipart body: {getattr(e, 'detail', None) or e}") from None
    try:
        upload = form.get("file") or form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing field 'file': upload the image as a multipart file part named 'file'")
        data = await upload.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise ApiError(413, f"image exceeds {cfg.max_upload_bytes} bytes")
        return data, upload.content_type
    finally:
        await form.close()


def _preprocess(ctx: _Ctx, entry: TaskEntry, data: bytes, content_type: str | None) -> torch.Tensor:
    img = decode_upload(data, content_type, ctx.cfg)
    tf = ctx.transforms.get(entry.uid)
    if tf is None:
        if len(ctx.transforms) > 4 * ctx.cfg.max_resident_tasks + 64:  # tasks reloaded or evicted: start over
            ctx.transforms.clear()
        tf = ctx.transforms[entry.uid] = task_transform(entry)
    return tf(img)


def _add_task_routes(app: Any, ctx: _Ctx) -> None:
    from pydantic import BaseModel

    cfg, store = ctx.cfg, ctx.store

    class LoadTask(BaseModel):
        name: str
        path: str | None = None  # relative to the task root; default: the name
        replace: bool = False

    async def admin(fn: Callable, *args: Any) -> Any:
        if not cfg.allow_task_loading:
            raise ApiError(403, "the task admin routes are disabled on this server")
        deadline = time.monotonic() + cfg.request_timeout_s
        return await _within(deadline, ctx.loader.submit(fn, *args), "loading the task", cfg.request_timeout_s)

    @app.get("/v1/tasks", summary="The resident (loaded) tasks")
    async def list_tasks() -> dict[str, Any]:
        return {
            "tasks": store.describe(),
            "task_root": str(store.root) if store.root else None,
            "max_resident_tasks": cfg.max_resident_tasks,
        }

    @app.post("/v1/tasks", status_code=201, summary="Load a task folder under the task root")
    async def load_task(body: LoadTask) -> dict[str, Any]:
        return {"loaded": (await admin(store.add, body.name, body.path, body.replace)).describe()}

    @app.post("/v1/tasks/{task}/reload", summary="Reload a task from its folder")
    async def reload_task(task: str) -> dict[str, Any]:
        return {"loaded": (await admin(store.reload, task)).describe()}

    @app.delete("/v1/tasks/{task}", summary="Unload a task")
    async def unload_task(task: str) -> dict[str, Any]:
        await admin(store.remove, task)
        return {"unloaded": task}


def _add_health_routes(app: Any, ctx: _Ctx) -> None:
    from fastapi.responses import JSONResponse, Response

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> Any:
        alive = ctx.batcher.alive
        body = {
            "status": "ok" if alive else "worker_down",
            "tasks": len(ctx.store),
            "queue_depth": ctx.batcher.depth(),
            "computing": ctx.batcher.in_flight,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        ctx.metrics.queue_depth.set(ctx.batcher.depth())
        data, ctype = ctx.metrics.render()
        return Response(content=data, media_type=ctype)
