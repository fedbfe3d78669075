"""The HTTP server: real requests over a loopback socket, micro-batching, and every bad-input class."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the 'serve' extra (uvicorn) is not installed")
pytest.importorskip("prometheus_client", reason="the 'serve' extra (prometheus_client) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is needed to talk to the test server")

from PIL import Image

from tests.helpers import TINY, tiny_vit
from vptune import create_model
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.multitask import MultiTaskModel
from vptune.serve import ServeConfig, create_app, task_transform

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


MAX_UPLOAD = 200_000


def _png(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    backbone = tiny_vit()
    root = tmp_path_factory.mktemp("serve_tasks")
    specs = {
        "deep": ("vpt-deep", 4, {"num_tokens": 3}),
        "shallow": ("vpt-shallow", 3, {"num_tokens": 5}),
        "lin": ("linear", 5, {}),
        "bias": ("bias", 2, {}),
        "late": ("vpt-shallow", 6, {"num_tokens": 2}),
    }
    for name, (method, nc, opts) in specs.items():
        m = create_model(backbone, method, nc, label_names=[f"{name}_{i}" for i in range(nc)], **opts)
        with torch.no_grad():
            for _, p in m.trainable_parameters():
                p.add_(0.5 * torch.randn_like(p))
        m.save_pretrained(root / name)
    other = create_model(VisionTransformer(ViTConfig(**TINY)), "linear", 2)  # other random weights
    other.save_pretrained(root / "other")

    mt = MultiTaskModel(backbone)
    for name in ("deep", "shallow", "lin", "bias"):
        mt.add_task(name, root / name)
    cfg = ServeConfig(
        max_batch_size=16,
        max_wait_ms=100,
        max_upload_bytes=MAX_UPLOAD,
        max_pixels=1_000_000,
        task_root=str(root),
    )
    with running(create_app(mt, cfg)) as client:
        yield client, mt, root


@contextlib.contextmanager
def running(app, timeout: float = 30.0):
    """Serve ``app`` with uvicorn on an ephemeral loopback port in a thread; yields an httpx client."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the test server did not start")
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as client:
            yield client
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def _predict(client, task, data, ctype="image/png", field="file", **params):
    return client.post(f"/v1/tasks/{task}/predict", files={field: ("x.img", data, ctype)}, params=params)


def _error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["status"] == status and body["error"]["message"]
    return body["error"]["message"]


def test_health_and_tasks(server):
    client, _, _ = server
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert set(tasks) >= {"deep", "shallow", "lin", "bias"}
    assert tasks["deep"]["pass"] == "shared" and tasks["bias"]["pass"] == "own"


def test_predict_matches_the_model(server):
    client, mt, _ = server
    data = _png()
    r = _predict(client, "deep", data, top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "deep" and body["method"] == "vpt-deep"
    preds = body["predictions"]
    assert len(preds) == 3 and all(p["label"] == f"deep_{p['index']}" for p in preds)
    assert preds[0]["score"] >= preds[1]["score"] >= preds[2]["score"]
    entry = mt.tasks["deep"]
    x = task_transform(entry)(Image.open(io.BytesIO(data)).convert("RGB"))
    ref = torch.softmax(entry.model(x[None])[0], -1)
    assert preds[0]["index"] == int(ref.argmax())
    assert abs(preds[0]["score"] - float(ref.max())) < 1e-5
    r = _predict(client, "lin", _jpeg(), ctype="image/jpeg", top_k=100)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5  # clamped to the class count


def test_concurrent_mixed_requests_are_batched(server):
    client, _, _ = server
    tasks = ["deep", "shallow", "lin", "bias"] * 4
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda it: _predict(client, it[1], _png(seed=it[0])), enumerate(tasks)))
    assert [r.status_code for r in results] == [200] * len(tasks)
    assert [r.json()["task"] for r in results] == tasks
    text = client.get("/metrics").text
    count = _metric(text, "vptune_batch_size_count")
    total = _metric(text, "vptune_batch_size_sum")
    assert total >= len(tasks) and count < total, "16 concurrent requests with 100 ms wait must share batches"


def test_metrics_count_each_tasks_requests_and_latency(server):
    client, _, _ = server

    def read(name, labels=""):
        try:
            return _metric(client.get("/metrics").text, name, labels)
        except AssertionError:  # a series appears with its first observation
            return 0.0

    ok, latency = '{status="200",task="shallow"}', '{task="shallow"}'
    before = read("vptune_task_requests_total", ok), read("vptune_task_request_duration_seconds_count", latency)
    others = read("vptune_task_requests_total", '{status="200",task="lin"}')
    for seed in range(3):
        assert _predict(client, "shallow", _png(seed=seed)).status_code == 200
    assert _predict(client, "nope", _png()).status_code == 404
    assert read("vptune_task_requests_total", ok) == before[0] + 3
    assert read("vptune_task_request_duration_seconds_count", latency) == before[1] + 3
    assert read("vptune_task_request_duration_seconds_sum", latency) > 0
    assert read("vptune_task_requests_total", '{status="200",task="lin"}') == others  # per task
    assert read("vptune_queue_depth") == 0  # nothing waits once every request is answered


def _metric(text, name, labels=""):
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    raise AssertionError(f"metric {name}{labels} not found")


def test_bad_inputs_get_clear_4xx_and_the_server_survives(server):
    client, _, _ = server
    # 404 unknown task
    assert "unknown task 'nope'" in _error(_predict(client, "nope", _png()), 404)
    # 415: not multipart, and a non-image part
    _error(client.post("/v1/tasks/deep/predict", json={"file": "x"}), 415)
    assert "content type 'text/plain'" in _error(_predict(client, "deep", b"hello", ctype="text/plain"), 415)
    # 422: no 'file' part
    assert "missing field 'file'" in _error(
        client.post("/v1/tasks/deep/predict", files={"other": ("x.png", _png(), "image/png")}), 422
    )
    _error(_predict(client, "deep", _png(), top_k=0), 422)
    # 400: corrupt and truncated images
    _error(_predict(client, "deep", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), 400)
    good = _png(64, 64)
    assert "truncated" in _error(_predict(client, "deep", good[: len(good) // 2]), 400)
    _error(_predict(client, "deep", _jpeg()[:300], ctype="image/jpeg"), 400)
    # 413: too many bytes (Content-Length) and too many pixels (decompression-bomb guard)
    big = np.random.default_rng(0).integers(0, 256, MAX_UPLOAD + 100_000, dtype=np.uint8).tobytes()
    _error(_predict(client, "deep", big), 413)
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000)).save(buf, format="PNG")  # 2e6 pixels in a few KB
    assert len(buf.getvalue()) < MAX_UPLOAD
    assert "pixels" in _error(_predict(client, "deep", buf.getvalue()), 413)

    # 413 also for a streamed (chunked, no Content-Length) body
    def chunks():  # a well-formed multipart file part that never ends within the limit
        yield (
            b'--abc\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        for _ in range(40):
            yield b"x" * 10_000
        yield b"\r\n--abc--\r\n"

    r = client.post(
        "/v1/tasks/deep/predict",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=abc"},
    )
    _error(r, 413)
    # still serving, and the metrics count the refusals
    assert _predict(client, "shallow", _png()).status_code == 200
    text = client.get("/metrics").text
    for status in ("404", "415", "422", "400", "413", "200"):
        assert f'status="{status}"' in text
    assert "vptune_http_request_duration_seconds_bucket" in text


def test_load_task_over_http(server):
    client, _mt, _root = server
    r = client.post("/v1/tasks", json={"name": "late", "path": "late"})
    assert r.status_code == 201, r.text
    assert r.json()["loaded"]["method"] == "vpt-shallow"
    r = _predict(client, "late", _png())
    assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("late_")
    assert "already loaded" in _error(client.post("/v1/tasks", json={"name": "late", "path": "late"}), 409)
    assert "trained on backbone" in _error(client.post("/v1/tasks", json={"name": "o", "path": "other"}), 400)
    _error(client.post("/v1/tasks", json={"name": "x", "path": "../../etc"}), 403)
    _error(client.post("/v1/tasks", json={"path": "late"}), 422)
    _error(client.post("/v1/tasks", json={"name": "../x", "path": "late"}), 422)
    # a task named apart from its folder: gone after DELETE
    assert client.post("/v1/tasks", json={"name": "late2", "path": "late"}).status_code == 201
    assert _predict(client, "late2", _png()).status_code == 200
    assert client.delete("/v1/tasks/late2").status_code == 200
    assert "unknown task 'late2'" in _error(_predict(client, "late2", _png()), 404)
    _error(client.delete("/v1/tasks/late2"), 404)
    # a folder under the task root: DELETE unloads it, and its next request loads it again
    assert client.delete("/v1/tasks/late").status_code == 200
    assert "late" not in {t["name"] for t in client.get("/v1/tasks").json()["tasks"]}
    assert _predict(client, "late", _png()).status_code == 200
    assert "late" in {t["name"] for t in client.get("/v1/tasks").json()["tasks"]}


def test_cli_serve_subprocess(server, tmp_path):
    """``vptune serve`` end to end: a child process, one real prediction, then SIGTERM."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    _, mt, root = server
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in mt.backbone.state_dict().items()}, str(weights))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "vptune",
        "serve",
        "--backbone",
        "vit_tiny_patch16_224",
        "--weights",
        str(weights),
        *[f"--backbone-option={k}={v}" for k, v in TINY.items()],
        "--task",
        f"d={root / 'deep'}",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-wait-ms",
        "1",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(__import__("pathlib").Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 60
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline, "vptune serve did not come up"
                time.sleep(0.2)
            r = _predict(client, "d", _png())
            assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("deep_")
    finally:
        proc.terminate()
        proc.wait(20)
