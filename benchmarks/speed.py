"""Speed and memory of every vptune method, side by side in one run (issue 5, item 3).

    python benchmarks/speed.py                                   # ViT-Ti and ViT-B/16, all methods, CPU
    python benchmarks/speed.py --backbones vit_tiny_patch16_224 --steps 2 --warmup 1 --ablation

For each backbone x method it measures
  * training images/s: one step = forward + cross-entropy + backward + optimizer step (the method's own
    optimiser, ``model.method.optimizer``: SGD or AdamW, over the trainable parameters only);
  * peak memory of training: on CPU the peak resident set size above the baseline taken after the
    model, optimiser and batch exist (each configuration in a fresh subprocess of this script,
    ``--single``, because a process's peak RSS only grows); on CUDA ``torch.cuda.max_memory_allocated``
    above ``memory_allocated`` at the same point;
  * inference images/s under ``torch.inference_mode()`` (eval mode; "linear" is the plain backbone plus
    a linear head).
Timings are interleaved: every round runs one step of every method (the order rotates each round) and
the median over rounds is reported, so that a noisy shared machine slows every method alike. Ratios
are against full fine-tuning measured in the same run.

VPT uses p=50 prompt tokens (the paper's most common setting for ViT-B, e.g. its Table/Fig. on cost), set
with ``--num-tokens``. Weights are random (speed does not depend on their values).

``--ablation`` records what each optimisation in vptune buys, each as a ratio optimised / baseline
measured side by side in one process (memory in subprocesses): (a) SDPA vs explicit softmax(QK^T)V,
(b) inference_mode vs no_grad vs grad-enabled eval, (c) frozen backbone (requires_grad=False) vs all
weights requiring grad with only the prompts in the optimiser, (d) torch.compile (time-boxed, in a
subprocess, compile time apart), (e) gradient checkpointing (memory saved, time paid), (f) bf16 autocast
(on CUDA; on CPU with --ablation-bf16), (g) VPT-deep computing only keys and values for its prompts,
because every block's prompt outputs are discarded (vptune's default) vs the full sequence.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

import vptune
from benchmarks._provenance import git_commit, machine_info
from benchmarks.speed_ablation import Job, ablation_backbone, attention_impl, full_sequence_features
from vptune.backbones.vit import VIT_CONFIGS, VisionTransformer

DEFAULT_BACKBONES = "vit_tiny_patch16_224,vit_base_patch16_224"
DEFAULT_METHODS = ("linear,full,partial-1,mlp-3,sidetune,bias,adapter,vpt-shallow,vpt-deep,"
                   "lora,dora,ssf,vpt-kv,vfpt,gated")
# methods whose prompt length is --num-tokens (the paper's p = 50 for the cost study); vpt-kv keeps its own
# defaults (5 key/value tokens per block, no input prompts), every other method its defaults too
PROMPT_LENGTH_METHODS = ("vpt-shallow", "vpt-deep", "vfpt", "gated")
ABLATION_ITEMS = ("attention", "grad_mode", "frozen", "compile", "checkpointing", "bf16", "proposal", "memory")
SCHEMA_VERSION = 1


def method_options(method: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"num_tokens": args.num_tokens} if method in PROMPT_LENGTH_METHODS else {}


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"embed_dim=32,depth=2"`` -> {"embed_dim": 32, "depth": 2} (ints, floats or strings)."""
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        k, _, v = item.partition("=")
        for cast in (int, float):
            try:
                out[k.strip()] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[k.strip()] = v
    return out


_BACKBONES: dict[str, VisionTransformer] = {}


def get_backbone(name: str, args: argparse.Namespace, device: torch.device) -> VisionTransformer:
    if name not in _BACKBONES:
        if name not in VIT_CONFIGS:
            raise SystemExit(f"unknown backbone {name!r}; choose from {', '.join(VIT_CONFIGS)}")
        cfg = dataclasses.replace(VIT_CONFIGS[name], **parse_overrides(args.vit_override))
        torch.manual_seed(0)
        _BACKBONES[name] = VisionTransformer(cfg, input_size=args.input_size).to(device).eval()
    return _BACKBONES[name]


# --------------------------------------------------------------------------------------------------
# Building a runnable step
# --------------------------------------------------------------------------------------------------
@dataclass
class Runner:
    job: Job
    model: vptune.TunedModel
    step: Callable[[], None]
    cleanup: Callable[[], None]
    optimizer: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_runner(job: Job, args: argparse.Namespace, device: torch.device) -> Runner:
    backbone = get_backbone(job.backbone, args, device)
    torch.manual_seed(1)
    model = vptune.create_model(backbone, job.method, args.num_classes, **method_options(job.method, args))
    if not job.frozen:  # the naive variant: a private backbone copy with every weight requiring grad
        model.backbone = copy.deepcopy(model.backbone)
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    model.gradient_checkpointing = job.checkpointing
    model.to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    if job.forward == "full-sequence":
        def fwd(images):
            return model.head(full_sequence_features(model, images))
    else:
        fwd = model
    if job.compile:
        fwd = torch.compile(fwd)
    amp = lambda: autocast(job.precision, device)

    if job.kind == "infer":
        model.eval()
        grad_ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
                    "enabled": contextlib.nullcontext}[job.grad_mode]

        def step() -> None:
            with attention_impl(job.attention), grad_ctx(), amp():
                out = fwd(x)
            del out

        return Runner(job, model, step, lambda: None, extra={"batch": args.batch_size})

    model.train()
    params = [p for n, p in model.named_parameters() if n in model.trainable_names]
    if model.method.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        with attention_impl(job.attention):
            model.zero_grad(set_to_none=True)  # every parameter: the naive variant computes them all
            with amp():
                loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()

    def cleanup() -> None:  # between timed steps of other configurations: keep memory low
        model.zero_grad(set_to_none=True)

    return Runner(job, model, step, cleanup, optimizer=model.method.optimizer, extra={"batch": args.batch_size})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(runner: Runner, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    runner.step()
    sync(device)
    return time.perf_counter() - t0


def interleaved(runners: list[Runner], steps: int, warmup: int, device: torch.device,
                log: Callable[[str], None]) -> dict[Job, dict[str, Any]]:
    """Round-robin: each round runs one step of every runner (order rotated each round)."""
    first: dict[Job, float] = {}
    times: dict[Job, list[float]] = {r.job: [] for r in runners}
    n = len(runners)
    for rnd in range(warmup + steps):
        t_round = time.perf_counter()
        for j in range(n):
            r = runners[(j + rnd) % n]
            dt = timed(r, device)
            r.cleanup()
            first.setdefault(r.job, dt)
            if rnd >= warmup:
                times[r.job].append(dt)
        tag = "warmup" if rnd < warmup else "round"
        log(f"  {tag} {rnd + 1 - (0 if rnd < warmup else warmup)}: {time.perf_counter() - t_round:.1f}s")
    out = {}
    for r in runners:
        ts = times[r.job]
        med = statistics.median(ts)
        out[r.job] = {"ips": r_ips(r, med), "median_s": med, "step_s": ts, "first_step_s": first[r.job]}
    return out


def r_ips(runner: Runner, seconds: float) -> float:
    return runner.extra.get("batch", 0) / seconds if seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# Memory: one configuration per fresh process
# --------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_single(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of ``args.memory_steps`` steps of ``job`` above the baseline after model creation."""
    device = torch.device(args.device)
    runner = build_runner(job, args, device)
    _BACKBONES.clear()  # a weight-changing method holds its own copy: drop the shared original
    gc.collect()
    res: dict[str, Any] = {"job": dataclasses.asdict(job)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ts = [timed(runner, device) for _ in range(args.memory_steps)]
        peak = torch.cuda.max_memory_allocated()
        res.update(memory_source="torch.cuda.max_memory_allocated", baseline_mb=base / 2**20,
                   peak_mb=peak / 2**20, delta_mb=(peak - base) / 2**20)
    else:
        base_kb = _status_kb("VmRSS") or 0
        exact = _reset_peak_rss()
        ts = [timed(runner, device) for _ in range(args.memory_steps)]
        if exact and _status_kb("VmHWM") is not None:
            peak_kb, source = _status_kb("VmHWM"), "VmHWM (reset via /proc/self/clear_refs)"
        else:  # monotonic since process start: an upper bound on the baseline side
            peak_kb, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        res.update(memory_source=source, baseline_mb=base_kb / 1024, peak_mb=peak_kb / 1024,
                   delta_mb=(peak_kb - base_kb) / 1024)
    res["step_s"] = ts
    return res


def run_single_subprocess(job: Job, args: argparse.Namespace, timeout: float,
                          log: Callable[[str], None]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", json.dumps(dataclasses.asdict(job)),
           "--batch-size", str(args.batch_size), "--input-size", str(args.input_size),
           "--num-classes", str(args.num_classes), "--num-tokens", str(args.num_tokens),
           "--device", args.device, "--memory-steps", str(args.memory_steps),
           "--compile-steps", str(args.compile_steps)]
    if args.vit_override:
        cmd += ["--vit-override", args.vit_override]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}", "wall_s": wall}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    log(f"  [{job.backbone}] {job.label()}: {wall:.1f}s")
    return out


# --------------------------------------------------------------------------------------------------
# torch.compile probe (in a subprocess, so a hang or crash is time-boxed)
# --------------------------------------------------------------------------------------------------
def compile_single(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """Eager vs compiled for one job in this process: compile time (first call) apart, then interleaved."""
    device = torch.device(args.device)
    eager = build_runner(dataclasses.replace(job, compile=False), args, device)
    comp = build_runner(dataclasses.replace(job, compile=True), args, device)
    t_compile = timed(comp, device)  # trace + compile + first run
    t_second = timed(comp, device)  # a recompile can happen on the second call (e.g. grad mode)
    res = interleaved([eager, comp], args.compile_steps, 1, device, lambda s: None)
    return {"job": dataclasses.asdict(job), "compile_s": t_compile, "second_call_s": t_second,
            "eager_ips": res[eager.job]["ips"], "compiled_ips": res[comp.job]["ips"],
            "ratio": res[comp.job]["ips"] / res[eager.job]["ips"]}


# --------------------------------------------------------------------------------------------------
# Main benchmark
# --------------------------------------------------------------------------------------------------
def bench_backbone(name: str, methods: list[str], args: argparse.Namespace, device: torch.device,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    prec = args.precision
    train = [build_runner(Job(name, m, "train", precision=prec, compile=args.compile), args, device)
             for m in methods]
    infer = [build_runner(Job(name, m, "infer", precision=prec, compile=args.compile), args, device)
             for m in methods]
    log(f"[{name}] training, {len(methods)} methods interleaved, {args.warmup}+{args.steps} rounds")
    t_res = interleaved(train, args.steps, args.warmup, device, log)
    log(f"[{name}] inference (torch.inference_mode)")
    i_res = interleaved(infer, args.steps, args.warmup, device, log)
    rows = []
    for tr, ir in zip(train, infer):
        m = tr.model
        rows.append({
            "backbone": name, "method": tr.job.method, "optimizer": tr.optimizer,
            "options": method_options(tr.job.method, args),
            "trainable_params": m.num_trainable_parameters(),
            "trainable_pct": 100.0 * m.num_trainable_parameters() / m.num_backbone_parameters(),
            "train_ips": t_res[tr.job]["ips"], "train_step_s": t_res[tr.job]["step_s"],
            "train_first_step_s": t_res[tr.job]["first_step_s"],
            "infer_ips": i_res[ir.job]["ips"], "infer_step_s": i_res[ir.job]["step_s"],
            "infer_first_step_s": i_res[ir.job]["first_step_s"],
        })
    del train, infer
    _BACKBONES.pop(name, None)
    gc.collect()
    if args.memory == "subprocess":
        log(f"[{name}] peak training memory, one subprocess per method")
        for row in rows:
            mem = run_single_subprocess(Job(name, row["method"], "train", precision=prec), args,
                                        args.memory_timeout, log)
            row["peak_mb"] = mem.get("delta_mb")
            row["peak_abs_mb"] = mem.get("peak_mb")
            row["baseline_mb"] = mem.get("baseline_mb")
            row["memory_source"] = mem.get("memory_source")
            if "error" in mem:
                row["memory_error"] = mem["error"]
    full = next((r for r in rows if r["method"] == "full"), None)
    for row in rows:
        row["train_ratio_vs_full"] = row["train_ips"] / full["train_ips"] if full else None
        row["infer_ratio_vs_full"] = row["infer_ips"] / full["infer_ips"] if full else None
        fm, rm = (full or {}).get("peak_mb"), row.get("peak_mb")
        row["memory_ratio_vs_full"] = rm / fm if fm and rm is not None else None
    return rows


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------
def _f(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def markdown(report: dict[str, Any]) -> str:
    c = report["config"]
    title = (f"Batch {c['batch_size']}, {c['input_size']}px, {c['device']} {c['precision']}"
             f"{', torch.compile' if c['compile'] else ''}, VPT p={c['num_tokens']}; median of {c['steps']} "
             f"interleaved rounds after {c['warmup']} warmup; {report['machine']['cpu']}, "
             f"{report['machine']['threads']} threads, torch {report['machine']['torch']}.")
    header = ("| backbone | method | trainable params | train img/s | ratio vs full | peak MB | memory ratio vs full "
              "| infer img/s |")
    lines = [title, "", header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['backbone']} | {r['method']} | {r['trainable_params']:,} | {r['train_ips']:.2f} | "
                     f"{_f(r['train_ratio_vs_full'], '.2f')} | {_f(r.get('peak_mb'), '.0f')} | "
                     f"{_f(r['memory_ratio_vs_full'], '.2f')} | {r['infer_ips']:.2f} |")
    if report.get("ablation"):
        header = ("| backbone | item | what | workload | metric | baseline | optimised | baseline value "
                  "| optimised value | ratio (opt/base) | note |")
        lines += ["", header, "|---|---|---|---|---|---|---|---:|---:|---:|---|"]
        for a in report["ablation"]:
            lines.append(f"| {a['backbone']} | {a['item']} | {a['name']} | {a['workload']} | {a['metric']} | "
                         f"{a['baseline']} | {a['optimised']} | {_f(a['baseline_value'], '.2f')} | "
                         f"{_f(a['optimised_value'], '.2f')} | {_f(a['ratio'], '.3f')} | {a['note']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbones", default=DEFAULT_BACKBONES)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--num-tokens", type=int, default=50, help="VPT prompt length p (paper: 50 for the cost study)")
    p.add_argument("--steps", type=int, default=5, help="timed interleaved rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--compile", action="store_true", help="torch.compile every model (first call = compile)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--memory", default="subprocess", choices=("subprocess", "off"))
    p.add_argument("--memory-steps", type=int, default=2, help="steps per memory subprocess (2: optimiser state exists)")
    p.add_argument("--memory-timeout", type=float, default=1800)
    p.add_argument("--ablation", action="store_true", help="also run the optimisation ablation")
    p.add_argument("--ablation-only", action="store_true", help="run only the ablation")
    p.add_argument("--ablation-backbones", default="vit_tiny_patch16_224")
    p.add_argument("--ablation-steps", type=int, default=0, help="rounds for the ablation (0: --steps)")
    p.add_argument("--ablation-skip", default="", type=lambda s: [x for x in s.split(",") if x],
                   help=f"comma list of {','.join(ABLATION_ITEMS)}")
    p.add_argument("--ablation-bf16", action="store_true", help="include bf16 autocast on CPU (slow without AMX)")
    p.add_argument("--compile-timeout", type=float, default=900, help="time box of each torch.compile probe")
    p.add_argument("--compile-steps", type=int, default=3)
    p.add_argument("--vit-override", default="", help="ViTConfig overrides, e.g. embed_dim=32,depth=2 (tests)")
    p.add_argument("--out", default="benchmarks/results/speed_{device}.json")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = sorted(set(args.ablation_skip) - set(ABLATION_ITEMS))
    if bad:
        p.error(f"unknown --ablation-skip item(s) {bad}; valid: {', '.join(ABLATION_ITEMS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    bench = types.SimpleNamespace(build_runner=build_runner, interleaved=interleaved,
                                  run_single_subprocess=run_single_subprocess)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:  # child process: one memory measurement or one compile probe, JSON on stdout
        job = Job(**json.loads(args.single))
        res = compile_single(job, args) if job.compile else measure_single(job, args)
        print(json.dumps(res))
        return res
    device = torch.device(args.device)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "command": " ".join(["python", "benchmarks/speed.py"] + list(sys.argv[1:] if argv is None else argv)),
        "machine": machine_info(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "config": {k: getattr(args, k) for k in ("batch_size", "input_size", "num_classes", "num_tokens", "steps",
                                                 "warmup", "device", "precision", "compile", "memory",
                                                 "memory_steps", "vit_override")},
        "definitions": {
            "train_ips": "images/s of forward + CE + backward + optimizer step, median over interleaved rounds",
            "infer_ips": "images/s of eval-mode forward under torch.inference_mode",
            "peak_mb": ("training peak memory above the baseline after model, optimiser and batch exist "
                        "(CPU: VmHWM - VmRSS in a fresh process; CUDA: max_memory_allocated - memory_allocated)"),
            "ratio": "ablation: optimised / baseline (img/s: > 1 faster; memory: < 1 smaller)",
        },
        "results": [],
        "ablation": [],
    }
    out = Path(args.out.format(device=args.device))
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> str:  # after every backbone too, so a long run that is cut short keeps what it has
        report["wall_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(report, indent=2) + "\n")
        md = markdown(report)
        out.with_suffix(".md").write_text(md + "\n")
        return md

    if not args.ablation_only:
        methods = [m for m in args.methods.split(",") if m]
        for name in [b for b in args.backbones.split(",") if b]:
            report["results"] += bench_backbone(name, methods, args, device, log)
            save()
    if args.ablation or args.ablation_only:
        for name in [b for b in args.ablation_backbones.split(",") if b]:
            report["ablation"] += ablation_backbone(name, args, device, log, bench)
            save()
    md = save()
    if not args.quiet:
        print(md)
        print(f"\nwrote {out} and {out.with_suffix('.md')} in {report['wall_s']:.0f}s", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
