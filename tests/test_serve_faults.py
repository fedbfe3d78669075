"""Load and fault test of the server (loopback only, bounded in count and time): the fault mix of
``benchmarks/serve.py``, a task removed while requests for it are queued, a task with a huge input size
computing while ``/healthz`` answers, and SIGTERM during a forward pass."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the 'serve' extra (uvicorn) is not installed")
pytest.importorskip("prometheus_client", reason="the 'serve' extra (prometheus_client) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is needed to talk to the test server")

from tests.helpers import tiny_vit
from tests.test_serve import _png, _predict, running
from vptune import create_model
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.multitask import MultiTaskModel
from vptune.serve import ServeConfig, create_app

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
HUGE = {"img_size": 64, "patch_size": 32, "embed_dim": 32, "depth": 4, "num_heads": 2}  # 4096 px: 16384 tokens, ~5 s


def _bench():
    spec = importlib.util.spec_from_file_location("vptune_bench_serve", ROOT / "benchmarks" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tasks(backbone, root, specs):
    for name, (method, nc, opts, size) in specs.items():
        m = create_model(backbone, method, nc, **opts)
        if size:
            m.preprocessing.input_size = size
        m.save_pretrained(root / name)


def _no_5xx(client):
    text = client.get("/metrics").text
    return [ln for ln in text.splitlines() if ln.startswith("vptune_http_requests_total") and 'status="5' in ln]


def test_fault_mix_and_removal_while_queued(tmp_path):
    bench = _bench()
    backbone = tiny_vit()
    _tasks(backbone, tmp_path, {
        "deep": ("vpt-deep", 4, {"num_tokens": 3}, None),
        "lin": ("linear", 3, {}, None),
        "bias": ("bias", 2, {}, None),
    })
    max_upload = 100_000
    cfg = ServeConfig(max_upload_bytes=max_upload, max_wait_ms=200, task_root=str(tmp_path),
                      request_timeout_s=20, max_resident_tasks=2)
    with running(create_app(MultiTaskModel(backbone), cfg)) as client:
        out = bench.fault_mix(client, ["deep", "lin", "bias"], max_upload, clients=8, per_client=15)
        assert out["requests"] == 120 and out["transport_errors"] == 0 and out["server_errors"] == 0
        assert out["wrong"] == [], out["wrong"]
        assert out["statuses"]["200"] == 12  # one kind in ten is a valid request
        for _ in range(2):
            statuses = bench.remove_while_queued(client, "doomed", "deep", n=8, delay_s=0.05)
            assert len(statuses) == 9 and set(statuses[:-1]) <= {200, 404} and statuses[-1] == 200, statuses
        # the server answers afterwards, and has answered nothing with a 5xx
        assert client.get("/healthz").json()["status"] == "ok"
        assert _predict(client, "lin", _png()).status_code == 200
        assert _no_5xx(client) == []


def test_a_huge_task_computes_while_healthz_and_other_tasks_answer(tmp_path):
    torch.manual_seed(0)
    backbone = VisionTransformer(ViTConfig(**HUGE)).eval()
    _tasks(backbone, tmp_path, {"huge": ("linear", 3, {}, 4096), "small": ("linear", 3, {}, None)})
    # the default limit refuses it before anything is built
    with running(create_app(MultiTaskModel(backbone), ServeConfig(task_root=str(tmp_path)))) as client:
        r = _predict(client, "huge", _png())
        assert r.status_code == 422 and "input_size' is 4096; this server accepts 1 to 1024" in r.text
    # a deadline well below the huge pass (seconds even on an idle machine: 512x512 tokens), so it fires
    cfg = ServeConfig(task_root=str(tmp_path), max_input_size=4096, request_timeout_s=0.75, compute_workers=2)
    with running(create_app(MultiTaskModel(backbone), cfg)) as client:
        assert _predict(client, "small", _png()).status_code == 200
        huge: dict = {}

        def call_huge():
            t0 = time.perf_counter()
            huge["r"] = _predict(client, "huge", _png())
            huge["s"] = time.perf_counter() - t0

        for _attempt in range(3):  # on a loaded machine the deadline can fire while the image is decoded
            thread = threading.Thread(target=call_huge)
            thread.start()
            deadline = time.time() + 60
            while client.get("/healthz").json()["computing"] == 0 and thread.is_alive():  # wait for its batch
                assert time.time() < deadline, "the huge batch never started"
                time.sleep(0.02)
            if thread.is_alive():
                break
            assert huge["r"].status_code == 504, huge["r"].text  # timed out before its batch started
        else:
            pytest.skip("the huge request's deadline fired before its batch started, three times: "
                        "this machine is too loaded to show a computing batch")
        worst = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            body = client.get("/healthz").json()
            worst = max(worst, time.perf_counter() - t0)
            assert body["status"] == "ok"
        r = _predict(client, "small", _png())  # the other compute worker serves other tasks meanwhile
        assert r.status_code == 200
        still = client.get("/healthz").json()["computing"]
        thread.join(30)
        assert still >= 1, "the huge batch finished too early to show anything"
        assert worst < 1.0, f"/healthz took {worst:.2f} s while the huge task computed"
        assert huge["r"].status_code == 504 and huge["s"] < 4.0, (huge["r"].text, huge["s"])
        assert _no_5xx_except_504(client)


def _no_5xx_except_504(client):
    return all('status="504"' in ln for ln in _no_5xx(client))


def test_sigterm_stops_the_server_within_seconds_while_it_computes(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    backbone = VisionTransformer(ViTConfig(**HUGE)).eval()
    weights = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    _tasks(backbone, tmp_path / "tasks", {"huge": ("linear", 3, {}, 4096)})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vptune", "serve", "--backbone", "vit_tiny_patch16_224",
           "--weights", str(weights), *[f"--backbone-option={k}={v}" for k, v in HUGE.items()],
           "--task-root", str(tmp_path / "tasks"), "--max-input-size", "4096", "--port", str(port),
           "--log-level", "warning", "--threads", "1", "--shutdown-timeout", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("VPTUNE_API_TOKEN", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.time() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline, "vptune serve did not come up"
                time.sleep(0.2)
            thread = threading.Thread(target=lambda: _swallow(_predict, client, "huge", _png()), daemon=True)
            thread.start()
            while client.get("/healthz").json()["computing"] == 0:
                assert time.time() < deadline + 30, "the huge batch never started"
                time.sleep(0.02)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(15)
            took = time.perf_counter() - t0
        assert took < 8.0, f"SIGTERM took {took:.1f} s"
        assert rc in (0, -signal.SIGTERM), rc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _swallow(fn, *args):
    try:
        fn(*args)
    except httpx.HTTPError:
        pass
