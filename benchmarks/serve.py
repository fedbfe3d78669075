"""Benchmark: one backbone serving many tasks (issue 7).

1. Throughput of one mixed batch over K = 1, 4, 16 tasks (``MultiTaskModel``: one shared backbone pass)
   against running each task's samples separately (one ``TunedModel`` call per task).
2. Latency p50/p99 of the HTTP server (``vptune.serve``, in a child process) under a bounded load test
   from this process over loopback, with the error count; then the fault mix against the same server
   (malformed JSON, empty bodies, non-images, oversized uploads, unknown tasks, bad parameters from
   concurrent clients, a task removed while requests for it are queued): wrong answers, 5xx, transport
   errors, and whether it is healthy afterwards.
3. Many tasks (issue 15): ``--many-tasks`` (200) task folders behind one backbone, a uniform random task
   per request, all resident vs ``--max-resident`` (16) resident (least recently used, loaded on first
   use from the task root): throughput, p99, loads and evictions.
4. Mixed batches beyond prompts (issue 14): ``--peft`` runs part 1 only, for K = 4 and 16 tasks cycled
   over LoRA (r 8 and 4, MLP too), DoRA, SSF, VPT-deep/shallow and a linear probe (:data:`PEFT_CYCLE`),
   one shared pass with per-sample taps against each task separately; results to ``serve_peft.json``.

    .venv/bin/python benchmarks/serve.py [--size 112] [--batch 32] [--requests 200] [--concurrency 8]
        [--many-tasks 200 --max-resident 16] [--skip-throughput] [--skip-http]

Backbone: ViT-Ti/16 -- the real Tiny-ImageNet checkpoint when ``VPTUNE_ASSETS`` is set, else random
weights (timings do not depend on the values). Tasks are freshly initialised VPT-deep/VPT-shallow
tasks of mixed prompt lengths plus linear probes (trained values do not change timings). Results go to
``benchmarks/results/serve.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vptune import create_model
from vptune.engine.evaluate import cpu_model
from vptune.multitask import MultiTaskModel

# cycled over the K tasks: (method, prompt length)
TASK_CYCLE = [
    ("vpt-deep", 10),
    ("vpt-shallow", 5),
    ("linear", 0),
    ("vpt-deep", 50),
    ("vpt-shallow", 1),
    ("vpt-deep", 1),
    ("linear", 0),
    ("vpt-shallow", 50),
]


# issue 14: (method, options) cycled over the K tasks of ``--peft``
PEFT_CYCLE = [
    ("lora", {"r": 8}),
    ("ssf", {}),
    ("vpt-deep", {"num_tokens": 10}),
    ("lora", {"r": 4, "targets": [r"^attn\.", r"^mlp\."]}),
    ("dora", {"r": 8}),
    ("vpt-shallow", {"num_tokens": 5}),
    ("linear", {}),
    ("ssf", {}),
]


def weights_path() -> Path | None:
    root = os.environ.get("VPTUNE_ASSETS")
    if not root:
        return None
    p = Path(root) / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k_ft_tinyimagenet"
    return p if p.is_dir() else None


def make_backbone(size: int):
    from vptune.backbones import create_backbone

    w = weights_path()
    if w is not None:
        return create_backbone(weights=w, input_size=size).eval(), f"ViT-Ti/16 ({w.name})"
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", input_size=size).eval(), "ViT-Ti/16 (random weights)"


def make_tasks(backbone, root: Path, k: int, peft: bool = False) -> dict[str, Path]:
    out = {}
    for j in range(k):
        if peft:
            method, opts = PEFT_CYCLE[j % len(PEFT_CYCLE)]
            p = opts.get("num_tokens", opts.get("r", 0))
        else:
            method, p = TASK_CYCLE[j % len(TASK_CYCLE)]
            opts = {"num_tokens": p} if method.startswith("vpt") else {}
        torch.manual_seed(100 + j)
        model = create_model(backbone, method, 10 + j, **opts)
        name = f"t{j:02d}_{method.replace('vpt-', '')}{p or ''}"
        out[name] = model.save_pretrained(root / name)
    return out


def bench_pair(fa, fb, reps: int) -> tuple[float, float]:
    """Median seconds of ``fa`` and ``fb``, measured interleaved (a, b, a, b, ...) so that load from
    other processes hits both alike."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(reps):
        for f, out in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def throughput(backbone, root: Path, size: int, batch: int, reps: int, peft: bool = False) -> list[dict]:
    rows = []
    for k in (4, 16) if peft else (1, 4, 16):
        dirs = make_tasks(backbone, root / f"k{k}", k, peft)
        mt = MultiTaskModel(backbone)
        for name, d in dirs.items():
            mt.add_task(name, d)
        names = [list(dirs)[b % k] for b in range(batch)]
        x = torch.randn(batch, 3, size, size)
        by_task = {n: [b for b, t in enumerate(names) if t == n] for n in dirs}

        def mixed(mt=mt, x=x, names=names):
            with torch.inference_mode():
                mt(x, names)

        def separate(mt=mt, x=x, by_task=by_task):
            with torch.inference_mode():
                for n, idx in by_task.items():
                    mt.tasks[n].model(x[idx])

        t_mixed, t_sep = bench_pair(mixed, separate, reps)
        rows.append(
            {
                "K": k,
                "batch": batch,
                "mixed_s": t_mixed,
                "separate_s": t_sep,
                "mixed_img_per_s": batch / t_mixed,
                "separate_img_per_s": batch / t_sep,
                "speedup": t_sep / t_mixed,
                "max_prompts": max(e.num_prompts for e in mt.tasks.values()),
            }
        )
        print(f"  K={k}: mixed {batch / t_mixed:.1f} img/s, separate {batch / t_sep:.1f} img/s", flush=True)
    return rows


# --- HTTP load test -----------------------------------------------------------------------------------
def child_server(args: argparse.Namespace) -> None:
    """The server process: every task of ``--tasks-dir`` loaded at start, or (``--max-resident N``) the
    folder as ``--task-root``, tasks loaded on first use and at most N resident."""
    from vptune.serve import ServeConfig, run_server

    torch.set_num_threads(args.threads)
    backbone, _ = make_backbone(args.size)
    mt = MultiTaskModel(backbone)
    cfg = ServeConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                      max_upload_bytes=FAULT_MAX_UPLOAD, compute_workers=args.compute_workers)
    if args.max_resident:
        cfg.task_root, cfg.max_resident_tasks = args.tasks_dir, args.max_resident
    else:
        for d in sorted(Path(args.tasks_dir).iterdir()):
            mt.add_task(d.name, d)
        cfg.task_root = args.tasks_dir  # admin routes (the fault run's removal) need one
        cfg.max_resident_tasks = max(64, len(mt))
    run_server(mt, cfg, host="127.0.0.1", port=args.port, log_level="warning")


class ChildServer:
    """``benchmarks/serve.py --child-server`` in a subprocess on a free loopback port."""

    def __init__(self, args: argparse.Namespace, tasks_dir: Path, max_resident: int = 0) -> None:
        self.port = free_port()
        cmd = [sys.executable, __file__, "--child-server", "--port", str(self.port), "--tasks-dir",
               str(tasks_dir), "--size", str(args.size), "--threads", str(args.threads), "--max-batch-size",
               str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms), "--max-resident",
               str(max_resident), "--compute-workers", str(args.compute_workers)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        self.client = httpx.Client(base_url=self.base, timeout=60)
        deadline = time.time() + 180
        while True:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return self.client
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load_test(client, names: list[str], args: argparse.Namespace, seed: int = 0) -> dict:
    """``args.requests`` predictions from ``args.concurrency`` clients, each for a task drawn uniformly
    (seeded) from ``names``; latency percentiles, errors, and the server's mean batch size."""
    import httpx

    images = [png_bytes(i) for i in range(16)]
    order = np.random.default_rng(seed).integers(0, len(names), args.requests)
    stop_at = time.time() + args.max_seconds

    def one(i: int) -> tuple[float, bool]:
        if time.time() > stop_at:
            return -1.0, True
        t0 = time.perf_counter()
        try:
            r = client.post(f"/v1/tasks/{names[order[i]]}/predict",
                            files={"file": ("x.png", images[i % len(images)], "image/png")})
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        return time.perf_counter() - t0, ok

    before = client.get("/metrics").text
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - t0
    metrics = client.get("/metrics").text
    done = [(lat, ok) for lat, ok in results if lat >= 0]
    lat = np.array([d[0] for d in done]) * 1000
    bs = [_metric(metrics, n) - _metric(before, n) for n in ("vptune_batch_size_sum", "vptune_batch_size_count")]
    return {
        "tasks": len(names),
        "requests": len(done),
        "skipped_over_time": len(results) - len(done),
        "concurrency": args.concurrency,
        "errors": sum(1 for _, ok in done if not ok),
        "wall_s": wall,
        "req_per_s": len(done) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_batch_size": bs[0] / bs[1] if bs[1] else 0.0,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "task_loads": _metric(metrics, 'vptune_task_loads_total{outcome="loaded"}'),
        "evictions": _metric(metrics, "vptune_task_evictions_total"),
    }


def http_load(args: argparse.Namespace, root: Path, backbone) -> dict:
    """The load test over ``--http-tasks`` resident tasks, then the fault mix against the same server."""
    tasks_dir = root / "http_tasks"
    names = list(make_tasks(backbone, tasks_dir, args.http_tasks))
    with ChildServer(args, tasks_dir) as client:
        for n in names:  # warm-up: one request per task
            client.post(f"/v1/tasks/{n}/predict", files={"file": ("x.png", png_bytes(0), "image/png")})
        out = load_test(client, names, args)
        faults = fault_mix(client, names, FAULT_MAX_UPLOAD, clients=args.concurrency, per_client=20)
        faults["removal_statuses"] = remove_while_queued(client, "doomed", names[0], n=8)
        faults["healthy_after"] = client.get("/healthz").status_code == 200
    out["faults"] = {k: v for k, v in faults.items() if k != "wrong"} | {"wrong": len(faults["wrong"])}
    return out


def many_tasks(args: argparse.Namespace, root: Path, backbone) -> list[dict]:
    """``--many-tasks`` task folders behind one backbone: all resident vs ``--max-resident`` resident
    (LRU, loaded on first use), the same seeded uniform task draw."""
    tasks_dir = root / "many_tasks"
    names = list(make_tasks(backbone, tasks_dir, args.many_tasks))
    rows = []
    for resident in (0, args.max_resident):
        with ChildServer(args, tasks_dir, max_resident=resident) as client:
            client.post(f"/v1/tasks/{names[0]}/predict", files={"file": ("x.png", png_bytes(0), "image/png")})
            row = load_test(client, names, args, seed=1)
        row["resident"] = resident or len(names)
        rows.append(row)
        print(f"  {len(names)} tasks, {row['resident']} resident: {row['req_per_s']:.1f} req/s, "
              f"p99 {row['p99_ms']:.0f} ms, {row['errors']} errors", flush=True)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(seed: int, side: int = 160) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


# --- fault mix (also run by tests/test_serve_faults.py) -------------------------------------------------
FAULT_MAX_UPLOAD = 1024 * 1024  # the child server's upload limit
FAULT_KINDS = {  # kind -> the status the server must answer
    "ok": 200,
    "unknown_task": 404,
    "malformed_json": 422,
    "empty_json": 422,
    "empty_body": 422,  # an empty form: no file part
    "not_multipart": 415,
    "not_image": 415,
    "garbage_png": 400,
    "oversized": 413,
    "bad_top_k": 422,
}


def fault_request(client, kind: str, task: str, max_upload: int, seed: int = 0):
    """One request of the fault mix; returns the httpx response."""
    url = f"/v1/tasks/{task}/predict"
    png = ("x.png", png_bytes(seed, side=48), "image/png")
    if kind == "ok":
        return client.post(url, files={"file": png})
    if kind == "unknown_task":
        return client.post(f"/v1/tasks/no-such-task-{seed}/predict", files={"file": png})
    if kind in ("malformed_json", "empty_json"):
        body = b'{"name": "x", "path":' if kind == "malformed_json" else b""
        return client.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    if kind == "empty_body":
        return client.post(url, content=b"", headers={"content-type": "multipart/form-data; boundary=x"})
    if kind == "not_multipart":
        return client.post(url, json={"file": "aGVsbG8="})
    if kind == "not_image":
        return client.post(url, files={"file": ("x.txt", b"hello world", "text/plain")})
    if kind == "garbage_png":
        return client.post(url, files={"file": ("x.png", os.urandom(2000), "image/png")})
    if kind == "oversized":
        return client.post(url, files={"file": ("x.png", os.urandom(max_upload + 70_000), "image/png")})
    if kind == "bad_top_k":
        return client.post(url, files={"file": png}, params={"top_k": "many"})
    raise ValueError(kind)


def fault_mix(client, tasks: list[str], max_upload: int, clients: int = 8, per_client: int = 20) -> dict:
    """``clients`` concurrent clients, each sending ``per_client`` requests that cycle through
    :data:`FAULT_KINDS`; returns counts of statuses, wrong answers, 5xx and transport errors."""
    import httpx

    kinds = list(FAULT_KINDS)

    def one(i: int) -> tuple[str, int]:
        kind = kinds[i % len(kinds)]
        try:
            return kind, fault_request(client, kind, tasks[i % len(tasks)], max_upload, seed=i).status_code
        except httpx.HTTPError:
            return kind, -1

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * per_client)))
    statuses: dict[str, int] = {}
    for _, st in results:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    return {
        "requests": len(results),
        "statuses": statuses,
        "wrong": [(k, st) for k, st in results if st != FAULT_KINDS[k]],
        "server_errors": sum(1 for _, st in results if st >= 500),
        "transport_errors": sum(1 for _, st in results if st < 0),
    }


def remove_while_queued(client, name: str, path: str, n: int = 8, delay_s: float = 0.05) -> list[int]:
    """Load ``path`` as ``name``, send ``n`` concurrent predictions for it and unload it while they wait;
    returns their statuses (each must be 200 or 404) followed by the DELETE's."""
    r = client.post("/v1/tasks", json={"name": name, "path": path, "replace": True})
    if r.status_code != 201:
        raise RuntimeError(f"cannot load {path} as {name}: {r.text}")
    with ThreadPoolExecutor(n + 1) as pool:
        futs = [
            pool.submit(fault_request, client, "ok", name, 0, seed=i) for i in range(n)
        ]
        time.sleep(delay_s)
        deleted = pool.submit(client.delete, f"/v1/tasks/{name}")
        return [f.result().status_code for f in futs] + [deleted.result().status_code]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=112, help="input side (default 112)")
    ap.add_argument("--batch", type=int, default=32, help="mixed batch size for the throughput part")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200, help="HTTP requests in the load test (bounded)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=90.0, help="stop issuing requests after this long")
    ap.add_argument("--http-tasks", type=int, default=4)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2 threads ran ~5x slower)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true", help="skip part 1 (in-process batches)")
    ap.add_argument("--many-tasks", type=int, default=200,
                    help="task folders for the many-task run (0: skip it)")
    ap.add_argument("--max-resident", type=int, default=16, help="resident tasks in the many-task run")
    ap.add_argument("--compute-workers", type=int, default=2)
    ap.add_argument("--peft", action="store_true",
                    help="issue 14: mixed LoRA/DoRA/SSF/prompt batches, K = 4 and 16 (part 1 only)")
    ap.add_argument("--child-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tasks-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_server:
        child_server(args)
        return
    if args.peft:
        args.skip_http = True
        if args.out == str(ROOT / "benchmarks" / "results" / "serve.json"):
            args.out = str(ROOT / "benchmarks" / "results" / "serve_peft.json")

    torch.set_num_threads(args.threads)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }
    print(
        f"# vptune serve benchmark\n\ncommand: `{command}`\nmachine: {env['cpu']}, {env['cores']} cores "
        f"(torch threads {args.threads}), load average {env['load_average_at_start']}\ndate: {env['date']}\n",
        flush=True,
    )
    backbone, desc = make_backbone(args.size)
    env["backbone"], env["input_size"] = desc, args.size
    print(f"backbone: {desc}, input {args.size}x{args.size}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [] if args.skip_throughput else throughput(backbone, root, args.size, args.batch, args.reps,
                                                                args.peft)
        http = None if args.skip_http else http_load(args, root, backbone)
        many = many_tasks(args, root, backbone) if args.many_tasks and not args.skip_http else []
    env["commit"] = _commit()
    result = {"env": env, "throughput": rows, "http": http, "many_tasks": many, "task_cycle": PEFT_CYCLE if args.peft else TASK_CYCLE}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_tables(args, rows, http, many)


def print_tables(args: argparse.Namespace, rows: list[dict], http: dict | None, many: list[dict]) -> None:
    if rows:
        print(f"\n## Mixed batch vs each task separately (batch {args.batch}, {args.size}x{args.size})\n")
        print("| K tasks | max prompts | mixed (img/s) | separate (img/s) | speed-up |")
        print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['K']} | {r['max_prompts']} | {r['mixed_img_per_s']:.1f} | {r['separate_img_per_s']:.1f} "
            f"| {r['speedup']:.2f}x |"
        )
    if http:
        print(
            f"\n## HTTP server ({http['tasks']} tasks, max batch {http['max_batch_size']}, "
            f"max wait {http['max_wait_ms']} ms, {http['concurrency']} concurrent clients, other process)\n"
        )
        print("| requests | errors | req/s | p50 (ms) | p90 (ms) | p99 (ms) | mean batch |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {http['requests']} | {http['errors']} | {http['req_per_s']:.1f} | {http['p50_ms']:.1f} | "
            f"{http['p90_ms']:.1f} | {http['p99_ms']:.1f} | {http['mean_batch_size']:.2f} |"
        )
    if http:
        f = http["faults"]
        print(f"\nFault mix ({f['requests']} requests, {len(FAULT_KINDS)} kinds, {args.concurrency} clients): "
              f"{f['wrong']} wrong answers, {f['server_errors']} 5xx, {f['transport_errors']} transport errors; "
              f"removal while queued {f['removal_statuses']}; healthy after: {f['healthy_after']}")
    if many:
        print(f"\n## {args.many_tasks} task folders, uniform random task per request\n")
        print("| resident | requests | errors | req/s | p50 (ms) | p99 (ms) | loads | evictions | mean batch |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in many:
            print(f"| {r['resident']} | {r['requests']} | {r['errors']} | {r['req_per_s']:.1f} | {r['p50_ms']:.0f} | "
                  f"{r['p99_ms']:.0f} | {r['task_loads']:.0f} | {r['evictions']:.0f} | {r['mean_batch_size']:.2f} |")
    print(f"\nresults: {args.out}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
