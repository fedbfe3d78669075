"""The server's task store (LRU of task folders loaded on first use, atomic reload on change, the
server's own checks of task files), the API token and the bind rule."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")
pytest.importorskip("prometheus_client", reason="the 'serve' extra (prometheus_client) is not installed")
pytest.importorskip("httpx", reason="httpx is needed to talk to the test server")

from tests.helpers import tiny_vit
from tests.test_serve import _png, _predict, running
from vptune import create_model
from vptune.errors import VptuneError
from vptune.multitask import MultiTaskModel
from vptune.serve import ApiError, Metrics, ServeConfig, TaskStore, check_bind, create_app, is_loopback
from vptune.serving_limits import task_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    return tiny_vit()


def _save(backbone, folder, num_classes=3, method="linear", seed=0, **opts):
    torch.manual_seed(seed)
    m = create_model(backbone, method, num_classes, label_names=[f"c{i}" for i in range(num_classes)], **opts)
    with torch.no_grad():
        for _, p in m.trainable_parameters():
            p.add_(torch.randn_like(p))
    m.save_pretrained(folder)
    return m


def _edit_json(folder, **changes):
    meta = json.loads((folder / "task.json").read_text())
    for key, value in changes.items():
        target = meta
        *path, last = key.split("__")
        for k in path:
            target = target[k]
        target[last] = value
    (folder / "task.json").write_text(json.dumps(meta))


def _store(backbone, root, **cfg):
    metrics = Metrics()
    mt = MultiTaskModel(backbone)
    return TaskStore(mt, ServeConfig(task_root=str(root), **cfg), metrics), mt, metrics


def _sample(metrics, name, labels=None):
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_lru_keeps_the_most_recent_tasks_and_reloads_evicted_ones(backbone, tmp_path):
    refs = {f"t{i}": _save(backbone, tmp_path / f"t{i}", num_classes=2 + i, seed=i) for i in range(6)}
    store, mt, metrics = _store(backbone, tmp_path, max_resident_tasks=3)
    for name in ["t0", "t1", "t2", "t0", "t3", "t4"]:  # t0 touched again: t1 and t2 go first
        assert store.resolve(name).num_classes == refs[name].num_classes
    assert mt.task_names() == ["t0", "t3", "t4"] and len(store) == 3
    assert _sample(metrics, "vptune_task_evictions_total") == 2
    assert _sample(metrics, "vptune_task_loads_total", {"outcome": "loaded"}) == 5
    entry = store.resolve("t1")  # evicted: loaded again, same answers as the saved task
    assert mt.task_names() == ["t1", "t3", "t4"]
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        got = torch.stack(mt.forward(x, ["t1", "t1"]))
        torch.testing.assert_close(got, refs["t1"].eval()(x), rtol=1e-5, atol=1e-6)
    assert entry.model is not refs["t1"]
    with pytest.raises(ApiError) as e:
        store.resolve("t9")
    assert e.value.status == 404 and "resident tasks: t1, t3, t4" in e.value.message


def test_memory_bound_evicts_by_bytes(backbone, tmp_path):
    for i in range(4):
        _save(backbone, tmp_path / f"t{i}", num_classes=50)
    one = task_bytes(create_model(backbone, "linear", 50), backbone)
    assert one == (50 * 32 + 50) * 4  # head weight and bias, float32; the shared backbone is not counted
    store, mt, metrics = _store(backbone, tmp_path, max_resident_mb=2.5 * one / 2**20)
    for i in range(4):
        store.resolve(f"t{i}")
    assert mt.task_names() == ["t2", "t3"]
    assert _sample(metrics, "vptune_resident_task_bytes") == 2 * one
    assert _sample(metrics, "vptune_task_evictions_total") == 2


def test_a_changed_task_folder_is_swapped_in_atomically(backbone, tmp_path):
    _save(backbone, tmp_path / "t", num_classes=3, seed=1)
    store, mt, metrics = _store(backbone, tmp_path, reload_check_s=0.0)
    old = store.resolve("t")
    new_ref = _save(backbone, tmp_path / "t", num_classes=5, seed=2)
    time.sleep(0.01)
    new = store.resolve("t")
    assert (old.num_classes, new.num_classes) == (3, 5) and mt.get_task("t") is new
    assert _sample(metrics, "vptune_task_loads_total", {"outcome": "reloaded"}) == 1
    # a request accepted with the old entry is still answered by it, in the same batch as the new one
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = mt.forward(x, [old, new])
        torch.testing.assert_close(out[0], old.model(x[:1])[0])
        torch.testing.assert_close(out[1], new_ref.eval()(x[1:])[0], rtol=1e-5, atol=1e-6)
    # a broken rewrite keeps the last good task serving (and is not retried until it changes again)
    (tmp_path / "t" / "task.json").write_text("{not json")
    assert store.resolve("t") is new and store.resolve("t") is new
    assert _sample(metrics, "vptune_task_loads_total", {"outcome": "failed"}) == 1


def test_unchanged_folders_are_checked_at_most_once_per_interval(backbone, tmp_path, monkeypatch):
    _save(backbone, tmp_path / "t")
    store, _, _ = _store(backbone, tmp_path, reload_check_s=60.0)
    first = store.resolve("t")
    calls = []
    monkeypatch.setattr("vptune.serve.store.folder_signature", lambda f: calls.append(f))
    assert store.peek("t") is first and store.resolve("t") is first
    assert calls == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"preprocessing__input_size": 4096}, "input_size' is 4096; this server accepts 1 to 1024"),
        ({"preprocessing__input_size": "224"}, "input_size' must be an integer"),
        ({"num_classes": True}, "'num_classes' must be an integer"),
        ({"num_classes": 10**9}, "'num_classes' is 1000000000"),
        ({"label_names": ["a"]}, "'label_names' must be num_classes strings"),
        ({"preprocessing__std": [0.5, 0.0, 0.5]}, "'preprocessing.std' must be 3 finite numbers"),
        ({"method": 3}, "'method' must be a string"),
        ({"options": []}, "'options' must be an object"),
    ],
)
def test_task_json_is_checked_at_the_servers_boundary(backbone, tmp_path, changes, message):
    _save(backbone, tmp_path / "bad")
    _edit_json(tmp_path / "bad", **changes)
    store, mt, metrics = _store(backbone, tmp_path)
    with pytest.raises(ApiError) as e:
        store.resolve("bad")
    assert e.value.status == 422 and message in e.value.message, e.value.message
    assert len(mt) == 0 and _sample(metrics, "vptune_task_loads_total", {"outcome": "failed"}) == 1


def test_an_input_size_the_patches_do_not_divide_is_refused(backbone, tmp_path):
    _save(backbone, tmp_path / "odd")
    _edit_json(tmp_path / "odd", preprocessing__input_size=36)  # patch 8
    store, _, _ = _store(backbone, tmp_path)
    with pytest.raises(ApiError, match=r"input size 36 is not a multiple of the backbone's patch size \(8, 8\)"):
        store.resolve("odd")


def test_non_finite_weights_are_refused(backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    _save(backbone, tmp_path / "nan")
    state = load_file(str(tmp_path / "nan" / "weights.safetensors"))
    key = min(state)
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(tmp_path / "nan" / "weights.safetensors"))
    meta_path = tmp_path / "nan" / "task.json"  # a consistent folder (sha256 matches) whose tensors are NaN
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = hashlib.sha256((tmp_path / "nan" / "weights.safetensors").read_bytes()).hexdigest()
    meta["weights_bytes"] = (tmp_path / "nan" / "weights.safetensors").stat().st_size
    meta_path.write_text(json.dumps(meta))
    store, mt, _ = _store(backbone, tmp_path)
    with pytest.raises(ApiError) as e:
        store.resolve("nan")
    # refused when loaded (task.json validation: 400) or at the server's own boundary check (422)
    assert e.value.status in (400, 422) and "holds NaN" in e.value.message and key in e.value.message
    assert len(mt) == 0


def test_names_outside_the_root_are_not_loaded(backbone, tmp_path):
    root = tmp_path / "root"
    _save(backbone, root / "ok")
    _save(backbone, tmp_path / "outside")
    store, _, _ = _store(backbone, root)
    for name in ("../outside", "..", ".", "ok/../../outside", ""):
        with pytest.raises(ApiError) as e:
            store.resolve(name)
        assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        store.add("x", "../outside", replace=False)
    assert e.value.status == 403
    assert store.resolve("ok").name == "ok"


def test_startup_tasks_over_the_limits_are_refused(backbone, tmp_path):
    m = _save(backbone, tmp_path / "big")
    m.preprocessing.input_size = 2048
    mt = MultiTaskModel(backbone)
    mt.add_model("big", m)
    with pytest.raises(VptuneError, match="input size 2048 is over this server's limit 1024"):
        TaskStore(mt, ServeConfig())


def test_token_is_required_off_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "localhost", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""))
    with pytest.raises(VptuneError, match="0.0.0.0 is not a loopback address"):
        check_bind("0.0.0.0", ServeConfig())
    check_bind("0.0.0.0", ServeConfig(token="s3cret-token"))
    check_bind("127.0.0.1", ServeConfig())
    with pytest.raises(VptuneError, match="at least 8 characters"):
        ServeConfig(token="short").validate()


def test_cli_refuses_a_public_address_without_a_token(capsys, monkeypatch):
    from vptune.cli import main

    monkeypatch.delenv("VPTUNE_API_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--backbone", "vit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.0.0.0 is not a loopback address" in err[0]


def test_api_token_guards_every_route_but_healthz(backbone, tmp_path):
    _save(backbone, tmp_path / "t")
    token = "correct-horse-battery"
    app = create_app(MultiTaskModel(backbone), ServeConfig(task_root=str(tmp_path), token=token))
    with running(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong-token-xx"}, {"Authorization": token}):
            r = client.post("/v1/tasks/t/predict", files={"file": ("x.png", _png(), "image/png")},
                            headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
            assert client.get("/metrics", headers=headers).status_code == 401
            assert client.delete("/v1/tasks/t", headers=headers).status_code == 401
        assert client.get("/healthz").status_code == 200
        auth = {"Authorization": f"Bearer {token}"}
        r = client.post("/v1/tasks/t/predict", files={"file": ("x.png", _png(), "image/png")}, headers=auth)
        assert r.status_code == 200 and r.json()["task"] == "t"
        assert client.get("/metrics", headers=auth).status_code == 200


def test_task_loading_over_http_is_off_without_a_task_root(backbone, tmp_path):
    _save(backbone, tmp_path / "t")
    with running(create_app(MultiTaskModel(backbone), ServeConfig())) as client:
        r = client.post("/v1/tasks", json={"name": "t", "path": str(tmp_path / "t")})
        assert r.status_code == 403 and "--task-root" in r.json()["error"]["message"]
        assert _predict(client, "t", _png()).status_code == 404
