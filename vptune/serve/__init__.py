"""``vptune serve``: an HTTP service for many tasks on one frozen backbone
(a :class:`~vptune.multitask.MultiTaskModel`), in the manner of multi-adapter servers.

Endpoints (JSON unless noted; every error is ``{"error": {"status", "type", "message"}}``):

* ``POST /v1/tasks/{task}/predict?top_k=5`` -- multipart/form-data with one image part named ``file``
  (``image`` also accepted); answers ``{"task", "method", "predictions": [{"label", "index", "score"}]}``
  with softmax scores, best first. A task not resident is loaded first: by folder name from
  ``task_root``, or from the folder it was named with (:mod:`vptune.serve.store`).
* ``GET /v1/tasks`` -- the resident tasks. Admin (off with ``allow_task_loading=False``):
  ``POST /v1/tasks`` ``{"name", "path", "replace": false}`` loads a folder under ``task_root`` (off
  without one), ``POST /v1/tasks/{task}/reload``, ``DELETE /v1/tasks/{task}`` unloads one.
* ``GET /healthz`` -- liveness of the server and its batching workers (open without the token).
* ``GET /metrics`` -- Prometheus text: ``vptune_http_requests_total{method,route,status}``,
  ``vptune_http_request_duration_seconds{route}``, per task ``vptune_task_requests_total{task,status}``,
  ``vptune_task_request_duration_seconds{task}`` and ``vptune_predictions_total{task}``;
  ``vptune_batch_size``, ``vptune_batch_tasks``, ``vptune_batch_duration_seconds`` (histograms),
  ``vptune_queue_depth``, ``vptune_batches_in_flight``, ``vptune_tasks_loaded``,
  ``vptune_resident_task_bytes``, ``vptune_task_loads_total{outcome}``, ``vptune_task_evictions_total``.

Nothing slow runs on the event loop (:mod:`vptune.serve.app`); the model runs in micro-batching threads
(:mod:`vptune.serve.batcher`) on registry snapshots, without a lock across the pass. Each request has
one deadline (``request_timeout_s``, 504) that fires even while its batch computes; a full queue
answers 503. With ``token`` set every route but ``/healthz`` needs ``Authorization: Bearer <token>``
(401; constant-time comparison); :func:`run_server` refuses a non-loopback address without one.

Input guards, each a 4xx that never takes the server down: a request body over ``max_upload_bytes``
(checked on Content-Length and while streaming) -> 413; a request that is not multipart/form-data, or
an image part whose Content-Type is not an accepted image type -> 415; no ``file`` part -> 422; an
image with more than ``max_pixels`` pixels (checked from the header, before decoding: the
decompression-bomb guard) -> 413; a corrupt, truncated or unsupported image -> 400; an unknown task ->
404; a task folder with wrong types, an input size over ``max_input_size``, too many classes or
non-finite tensors -> 422 (:func:`~vptune.serving_limits.check_task_meta`). Preprocessing follows each
task's ``task.json`` ``preprocessing`` through :func:`vptune.data.build_transform`.
"""

from vptune.serve.app import create_app, task_transform
from vptune.serve.batcher import MicroBatcher
from vptune.serve.metrics import Metrics
from vptune.serve.runner import TOKEN_ENV, check_bind, is_loopback, resolve_token, run_server
from vptune.serve.store import TaskStore
from vptune.serving_limits import (
    IMAGE_TYPES,
    MULTIPART_SLACK,
    ApiError,
    ServeConfig,
    decode_upload,
)

__all__ = [
    "IMAGE_TYPES",
    "MULTIPART_SLACK",
    "TOKEN_ENV",
    "ApiError",
    "Metrics",
    "MicroBatcher",
    "ServeConfig",
    "TaskStore",
    "check_bind",
    "create_app",
    "decode_upload",
    "is_loopback",
    "resolve_token",
    "run_server",
    "task_transform",
]
