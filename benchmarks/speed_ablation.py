"""The optimisation ablation of ``benchmarks/speed.py --ablation`` (its module docstring lists the items),
the benchmark configuration :class:`Job` and the reference implementations the ablation measures against.

The two scripts are not a package: ``speed.py`` imports this module; the measuring primitives of
``speed.py`` (``build_runner``, ``interleaved``, ``run_single_subprocess``) reach the ablation as the
``bench`` argument, so this module never imports ``speed.py`` (which would run it a second time).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import vptune
from vptune.backbones import vit as vit_mod


# --------------------------------------------------------------------------------------------------
# One benchmark configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    backbone: str
    method: str
    kind: str = "train"  # train | infer
    attention: str = "sdpa"  # sdpa (vptune) | explicit (reference softmax(QK^T)V)
    frozen: bool = True  # False: every backbone weight requires grad, only the method's tensors train
    checkpointing: bool = False
    grad_mode: str = "inference_mode"  # infer only: inference_mode | no_grad | enabled
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False
    forward: str = "vptune"  # vptune | full-sequence (baseline of (g), vpt-deep only)

    def label(self) -> str:
        parts = [self.method, self.kind]
        for f in dataclasses.fields(self):
            if f.name in ("backbone", "method", "kind"):
                continue
            v = getattr(self, f.name)
            if v != f.default:
                parts.append(f"{f.name}={v}")
        return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# Reference implementations used by the ablation
# --------------------------------------------------------------------------------------------------
_SDPA_FORWARD = vit_mod.Attention.forward


def explicit_attention_forward(self, x, attn_mask=None, kv_extra=None):
    """timm's non-fused path: softmax(q k^T / sqrt(d_h)) v with the (B, h, N, N) matrix materialised."""
    B, N, C = x.shape
    hd = C // self.num_heads
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    if kv_extra is not None:  # VPT-deep prompts as keys/values only (see vit.Attention)
        w, b = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
        kv = F.linear(kv_extra, w, b).reshape(kv_extra.shape[0], -1, 2, self.num_heads, hd)
        kv = kv.permute(2, 0, 3, 1, 4).expand(-1, B, -1, -1, -1)
        k, v = torch.cat([k, kv[0]], dim=2), torch.cat([v, kv[1]], dim=2)
    attn = (q * hd**-0.5) @ k.transpose(-2, -1)  # (B, h, N, N+p)
    if attn_mask is not None:
        attn = attn.masked_fill(~attn_mask, float("-inf"))
    x = attn.softmax(dim=-1) @ v
    return self.proj(x.transpose(1, 2).reshape(B, N, C))


@contextlib.contextmanager
def attention_impl(name: str):
    vit_mod.Attention.forward = explicit_attention_forward if name == "explicit" else _SDPA_FORWARD
    try:
        yield
    finally:
        vit_mod.Attention.forward = _SDPA_FORWARD


def full_sequence_features(model: vptune.TunedModel, images: torch.Tensor) -> torch.Tensor:
    """Baseline for (g): VPT-deep with the prompts inside the sequence ``[CLS, P, patches]`` of every
    block and their outputs computed (what the reference code and vptune before this optimisation do).
    vptune now passes ``prompt_outputs=False`` so the prompts only supply keys and values."""
    return model.forward_features(images, hooks=_KeepPromptOutputs(model.method))


class _KeepPromptOutputs:
    """The method's hooks with ``prompt_outputs=True`` at every block (the baseline of (g))."""

    def __init__(self, method: Any) -> None:
        self.method = method

    def block_input(self, i: int, tokens: Any, batch: int) -> Any:
        tokens, given = self.method.block_input(i, tokens, batch)
        return tokens, dataclasses.replace(given, prompt_outputs=True)

    def pool(self, backbone: Any, tokens: Any) -> Any:
        return self.method.pool(backbone, tokens)

    def fuse(self, features: Any, images: Any) -> Any:
        return self.method.fuse(features, images)


# --------------------------------------------------------------------------------------------------
# Ablation
# --------------------------------------------------------------------------------------------------
def _ab(backbone: str, item: str, name: str, workload: str, metric: str, baseline: str, optimised: str,
        b: float | None, o: float | None, note: str = "") -> dict[str, Any]:
    ratio = o / b if (b and o is not None) else None
    return {"backbone": backbone, "item": item, "name": name, "workload": workload, "metric": metric,
            "baseline": baseline, "optimised": optimised, "baseline_value": b, "optimised_value": o,
            "ratio": ratio, "note": note}


VD = "vpt-deep"


@dataclass
class Ablation:
    """One backbone's ablation: the reference jobs (T: VPT-deep training, I: plain-backbone inference,
    V: VPT-deep inference), every configuration measured, and what was measured."""

    name: str
    args: argparse.Namespace
    skip: set[str]
    use_bf16: bool
    T: Job
    I: Job  # the plain backbone (+ a linear head)
    V: Job
    train_jobs: list[Job]
    infer_jobs: list[Job]
    ips: dict[Job, float] = dataclasses.field(default_factory=dict)
    mem: dict[Job, float | None] = dataclasses.field(default_factory=dict)
    checks: dict[str, float] = dataclasses.field(default_factory=dict)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def workload(self, job: Job) -> str:
        p = self.args.num_tokens
        if job.kind == "train":
            return f"{VD} train (p={p})"
        return f"{VD} inference (p={p})" if job.method == VD else "plain backbone inference"

    def both(self, item: str, title: str, base: Job, opt: Job, bl: str, ol: str, note: str = "") -> None:
        """The img/s row of ``opt`` vs ``base`` and, when both were measured, the memory row."""
        wl = self.workload(base)
        self.rows.append(_ab(self.name, item, title, wl, "img/s", bl, ol, self.ips[base], self.ips[opt], note))
        if base in self.mem and opt in self.mem:
            self.rows.append(_ab(self.name, item, title, wl, "peak MB above baseline", bl, ol, self.mem[base],
                                 self.mem[opt], note))


def ablation_plan(name: str, args: argparse.Namespace, device: torch.device) -> Ablation:
    """The configurations of one backbone's ablation (items skipped by ``--ablation-skip`` left out)."""
    skip = set(args.ablation_skip)
    use_bf16 = "bf16" not in skip and (device.type == "cuda" or args.ablation_bf16)
    T, I, V = Job(name, VD, "train"), Job(name, "linear", "infer"), Job(name, VD, "infer")
    rep = dataclasses.replace
    train_jobs = [T] + [rep(T, **kw) for flag, kw in (
        ("attention" not in skip, {"attention": "explicit"}), ("frozen" not in skip, {"frozen": False}),
        ("checkpointing" not in skip, {"checkpointing": True}), (use_bf16, {"precision": "bf16"}),
        ("proposal" not in skip, {"forward": "full-sequence"})) if flag]
    infer_jobs = [I, V]
    if "attention" not in skip:
        infer_jobs.append(rep(I, attention="explicit"))
    if "grad_mode" not in skip:
        infer_jobs += [rep(j, grad_mode=g) for j in (I, V) for g in ("no_grad", "enabled")]
    if use_bf16:
        infer_jobs.append(rep(I, precision="bf16"))
    if "proposal" not in skip:
        infer_jobs.append(rep(V, forward="full-sequence"))
    return Ablation(name, args, skip, use_bf16, T, I, V, train_jobs, infer_jobs)


def reference_checks(model: vptune.TunedModel, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """The reference paths compute the same logits: max |difference| of each against vptune's."""
    xb = torch.randn(2, 3, args.input_size, args.input_size, device=device)
    checks = {}
    with torch.inference_mode():
        ref = model(xb)
        with attention_impl("explicit"):
            checks["explicit_attention_max_abs_diff"] = (model(xb) - ref).abs().max().item()
        checks["kv_prompts_max_abs_diff"] = (model.head(full_sequence_features(model, xb)) - ref).abs().max().item()
    return checks


def measure_ablation(ab: Ablation, device: torch.device, log: Callable[[str], None], bench: Any) -> None:
    """Time every configuration interleaved (and their memory in subprocesses) into ``ab``."""
    args, skip, V = ab.args, ab.skip, ab.V
    runners = [bench.build_runner(j, args, device) for j in ab.train_jobs + ab.infer_jobs]
    if "attention" not in skip or "proposal" not in skip:
        ab.checks = reference_checks(next(r.model for r in runners if r.job == V), args, device)
    log(f"[{ab.name}] ablation: {len(ab.train_jobs)} training and {len(ab.infer_jobs)} inference configs "
        "interleaved")
    res = bench.interleaved(runners, args.ablation_steps or args.steps, args.warmup, device, log)
    ab.ips = {j: res[j]["ips"] for j in res}
    del runners
    gc.collect()
    if args.memory == "subprocess" and "memory" not in skip:
        mem_jobs = [j for j in ab.train_jobs if j.precision == "fp32"] + [V] + \
            [dataclasses.replace(V, grad_mode=g) for g in ("no_grad", "enabled") if "grad_mode" not in skip]
        log(f"[{ab.name}] ablation memory, {len(mem_jobs)} subprocesses")
        for j in mem_jobs:
            ab.mem[j] = bench.run_single_subprocess(j, args, args.memory_timeout, log).get("delta_mb")


def ablation_rows(ab: Ablation) -> None:
    """Items (a), (b), (c), (e), (f) and (g) as rows of ``ab``."""
    skip, T, I, V, rep = ab.skip, ab.T, ab.I, ab.V, dataclasses.replace
    if "attention" not in skip:
        n = f"max |logit diff| {ab.checks['explicit_attention_max_abs_diff']:.1e}"
        for j in (T, I):
            ab.both("a", "SDPA vs explicit softmax(QK^T)V", rep(j, attention="explicit"), j, "explicit", "sdpa", n)
    if "grad_mode" not in skip:
        for j in (I, V):
            for g in ("no_grad", "enabled"):
                note = "frozen weights: no graph is built even with grad enabled" if j is I and g == "enabled" \
                    else ("prompts require grad: grad-enabled eval builds and keeps the graph" if g == "enabled"
                          else "")
                ab.both("b", "inference_mode vs " + g, rep(j, grad_mode=g), j, g, "inference_mode", note)
    if "frozen" not in skip:
        ab.both("c", "frozen backbone (requires_grad=False) vs all weights requiring grad", rep(T, frozen=False), T,
                "requires_grad=True, prompts-only optimizer", "requires_grad=False")
    if "checkpointing" not in skip:
        ab.both("e", "gradient checkpointing (cost and saving)", T, rep(T, checkpointing=True),
                "no checkpointing", "gradient_checkpointing=True",
                "optimised here = checkpointing on: img/s ratio < 1 is its time cost, memory ratio < 1 its saving")
    if ab.use_bf16:
        for j in (T, I):
            ab.both("f", "bf16 autocast vs fp32", j, rep(j, precision="bf16"), "fp32", "bf16 autocast")
    if "proposal" not in skip:
        n = (f"max |logit diff| {ab.checks['kv_prompts_max_abs_diff']:.1e}; prompt slots get only keys/values "
             "(their outputs are discarded in VPT-deep)")
        for job in (T, V):
            ab.both("g", "VPT-deep prompts as keys/values only", rep(job, forward="full-sequence"), job,
                    "prompts in the sequence, outputs computed", "vptune (prompt_outputs=False)", n)


def compile_rows(ab: Ablation, device: torch.device, log: Callable[[str], None], bench: Any) -> None:
    """Item (d): torch.compile vs eager, each probe in a time-boxed subprocess."""
    args = ab.args
    for j in (ab.T, ab.I):
        wl = ab.workload(j)
        log(f"[{ab.name}] torch.compile probe ({j.label()}), time-boxed to {args.compile_timeout:.0f}s")
        c = bench.run_single_subprocess(dataclasses.replace(j, compile=True), args, args.compile_timeout, log)
        if "error" in c:
            ab.rows.append(_ab(ab.name, "d", "torch.compile vs eager", wl, "img/s", "eager", "torch.compile",
                               None, None, f"skipped: {c['error']}"))
        else:
            ab.rows.append(_ab(ab.name, "d", "torch.compile vs eager", wl, "img/s", "eager", "torch.compile",
                               c["eager_ips"], c["compiled_ips"],
                               f"compile (first call) {c['compile_s']:.1f}s, second call {c['second_call_s']:.1f}s; "
                               f"inductor on {device.type}"))


def ablation_backbone(name: str, args: argparse.Namespace, device: torch.device, log: Callable[[str], None],
                      bench: Any) -> list[dict[str, Any]]:
    """Every ablation row of one backbone; ``bench``: the speed module (its measuring primitives)."""
    ab = ablation_plan(name, args, device)
    measure_ablation(ab, device, log, bench)
    ablation_rows(ab)
    if "compile" not in ab.skip:
        compile_rows(ab, device, log, bench)
    return ab.rows
