"""E2VPT's prompt pruning and rewinding (Han et al., "E^2VPT: An Effective and Efficient Approach for Visual
Prompt Tuning", ICCV 2023, Sec. 3.3), written from the paper, for ``vpt-kv`` runs with input prompts.

1. **Score** a trained run's input prompts on its training split. A mask variable rho multiplies each
   prompt token (and, for segment-wise pruning, each of its R segments); its importance is the magnitude
   of the loss gradient at rho = 1 (Michel et al., 2019, which E2VPT follows), accumulated over batches:

       S_k = sum_batches | dL/d rho_k | = sum_batches | <P_k, dL/dP_k> |     (token k of a block)

   and likewise over the dims of each segment. The frozen model runs in eval mode (no dropout), the
   training split in its evaluation transform, so the scores are deterministic.
2. **Prune**, per prompted block (so every block keeps prompts): the fraction ``tokens`` of its (still
   kept) prompt tokens with the lowest scores, then the fraction ``segment_fraction`` of the remaining tokens'
   segments with the lowest scores. The result is two method options, ``keep_tokens`` and
   ``pruned_segments`` (:class:`vptune.methods.vpt_kv.VPTKVOptions`).
3. **Rewind and retrain**: the same config with those options and the same seed, so every prompt, key-value
   prompt and the head start from the values the first run started from (the lottery-ticket rewind E2VPT
   uses), trained again from there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vptune.artifact import load_task
from vptune.data import open_split
from vptune.engine.config import config_from_dict
from vptune.engine.evaluate import make_loader
from vptune.engine.runfolder import read_result, read_run_config
from vptune.engine.trainer import build_backbone, data_config, resolve_device, run_training
from vptune.errors import VptuneError
from vptune.io import atomic_write_json

logger = logging.getLogger("vptune")
PRUNE_FILE = "prune.json"


def prompt_importance(model: Any, dataset: Any, device: torch.device, *, segments: int = 1,
                      batch_size: int = 32, max_batches: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Per prompted block, the (p,) token scores and (p, segments) segment scores of ``model``'s input
    prompts (the module docstring's S), summed over the batches of ``dataset``."""
    method = model.method
    prompts = list(method.prompts)
    if any(p.shape[1] % segments for p in prompts):
        raise VptuneError(f"segments={segments} must divide every prompt width "
                          f"({sorted({p.shape[1] for p in prompts})})")
    slots = [torch.tensor(method.kept_slots(j)) for j in range(len(prompts))]  # parameter row -> slot
    n = method.options.num_tokens
    tok = [torch.zeros(n, dtype=torch.float64) for _ in prompts]  # pruned slots score 0
    seg = [torch.zeros(n, segments, dtype=torch.float64) for _ in prompts]
    was = model.training
    model.eval()
    try:
        for b, (images, labels) in enumerate(make_loader(dataset, batch_size, device=device)):
            if max_batches is not None and b >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            logits = model(images.to(device))
            logits = logits if logits.dtype == torch.float64 else logits.float()
            F.cross_entropy(logits, labels.to(device)).backward()
            for j, p in enumerate(prompts):
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                per_dim = (p.detach() * g).double().cpu()  # (p, d): rho's gradient, dim by dim
                tok[j][slots[j]] += per_dim.sum(dim=1).abs()
                seg[j][slots[j]] += per_dim.reshape(p.shape[0], segments, -1).sum(dim=2).abs()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return tok, seg


def check_fractions(tokens: float, segment_fraction: float, segments: int = 1,
                    max_batches: int | None = None) -> None:
    """Refuse pruning settings outside their ranges, naming them."""
    for name, v in (("tokens", tokens), ("segment_fraction", segment_fraction)):
        if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
            raise VptuneError(f"{name} is the fraction to prune, in [0, 1), got {v}")
    if segments < 1 or (max_batches is not None and max_batches < 1):
        raise VptuneError(f"segments and max_batches must be >= 1, got {segments} and {max_batches}")


def prune_plan(token_scores: list[Tensor], segment_scores: list[Tensor], *, tokens: float,
               segment_fraction: float = 0.0, keep_tokens: Any = None,
               pruned_segments: Any = None) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """``keep_tokens`` and ``pruned_segments`` options: per block, drop ``round(tokens * k)`` (Python's round:
    halves to even) of the k tokens
    still kept (lowest scores first; at least one stays), then ``round(segment_fraction * n)`` of the n
    segments of the kept tokens not yet pruned. Earlier pruning (the options given) is kept, so each round
    prunes a fraction of what the last one left."""
    check_fractions(tokens, segment_fraction)
    keeps, pruned = [], []
    for j, (ts, ss) in enumerate(zip(token_scores, segment_scores)):
        p, r = ss.shape
        alive = list(keep_tokens[j]) if keep_tokens is not None else list(range(p))
        n_drop = min(round(tokens * len(alive)), len(alive) - 1)
        order = sorted(alive, key=lambda k: (float(ts[k]), k))  # ties: the lower slot goes first
        keep = sorted(order[n_drop:])
        done = set(pruned_segments[j]) if pruned_segments is not None else set()
        live = [k * r + s for k in keep for s in range(r) if k * r + s not in done]
        n_seg = min(round(segment_fraction * len(live)), max(len(live) - 1, 0))
        flat = ss.reshape(-1)
        cut = sorted(live, key=lambda q: (float(flat[q]), q))[:n_seg]
        keeps.append(tuple(keep))
        pruned.append(tuple(sorted(done | set(cut))))
    return tuple(keeps), tuple(pruned)


def prune_run(run_dir: str | Path, output: str | Path, *, tokens: float, segments: int = 1,
              segment_fraction: float = 0.0, max_batches: int | None = None,
              overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Score the finished ``vpt-kv`` run in ``run_dir``, prune its input prompts and retrain from the
    rewound initialisation into ``output``; returns that run's summary (and writes ``prune.json``)."""
    check_fractions(tokens, segment_fraction, segments, max_batches)
    run_dir = Path(run_dir)
    raw, result = read_run_config(run_dir), read_result(run_dir)
    if raw is None or result is None or not (run_dir / "task").is_dir():
        raise VptuneError(f"{run_dir} is not a finished training run (config.yaml, result.json and task/)")
    cfg = config_from_dict(raw)
    opts = dict(cfg.method.options)
    if cfg.method.name != "vpt-kv" or not int(opts.get("num_tokens", 0)):
        raise VptuneError(f"{run_dir} trained {cfg.method.name!r}: pruning needs a vpt-kv run with input "
                          "prompts (method.options.num_tokens > 0), E2VPT's visual prompts")
    if int(opts.get("segments", 1)) not in (1, segments) and opts.get("pruned_segments"):
        raise VptuneError(f"{run_dir} was pruned with segments={opts['segments']}; prune it again with the same")
    device = resolve_device(cfg.runtime.device)
    model = load_task(run_dir / "task", build_backbone(cfg)).to(device)
    tok, seg = prompt_importance(model, _eval_view(cfg, model), device, segments=segments,
                                 batch_size=cfg.optim.batch_size, max_batches=max_batches)
    keep, pruned = prune_plan(tok, seg, tokens=tokens, segment_fraction=segment_fraction,
                              keep_tokens=opts.get("keep_tokens"), pruned_segments=opts.get("pruned_segments"))
    # lists, as config.yaml holds them (a tuple would read as a changed config on --resume)
    opts.update(keep_tokens=[list(k) for k in keep], segments=segments, pruned_segments=[list(q) for q in pruned])
    new = dataclasses.replace(cfg, output=str(output), method=dataclasses.replace(cfg.method, options=opts),
                              runtime=dataclasses.replace(cfg.runtime, progress=cfg.runtime.progress and progress))
    summary = run_training(new, resume=resume, overwrite=overwrite)
    p, n = int(opts["num_tokens"]), len(keep)
    record = {"from": str(run_dir), "tokens": tokens, "segments": segments, "segment_fraction": segment_fraction,
              "prompt_tokens_kept": sum(map(len, keep)), "prompt_tokens": p * n,
              "segments_pruned": sum(map(len, pruned)), "token_scores": [t.tolist() for t in tok],
              "segment_scores": [s.tolist() for s in seg]}
    atomic_write_json(Path(output) / PRUNE_FILE, record)
    logger.info("pruned %d of %d prompt tokens and %d segments; retrained from the rewound init: val top-1 %s",
                p * n - record["prompt_tokens_kept"], p * n, record["segments_pruned"],
                _pct(summary.get("val")))
    return summary


def _eval_view(cfg: Any, model: Any) -> Any:
    """The training split read with the evaluation transform (no augmentation): scores are deterministic."""
    return open_split(data_config(cfg), cfg.data.train_split, model.preprocessing, train=False,
                      seed=cfg.runtime.seed)


def _pct(metrics: dict | None) -> str:
    top1 = (metrics or {}).get("top1")
    return "n/a" if top1 is None or not math.isfinite(top1) else f"{top1:.2f}%"
