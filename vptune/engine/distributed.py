"""Data-parallel training (``torch.distributed`` DDP), launched by ``torchrun``.

    torchrun --nproc_per_node=8 -m vptune train --config configs/vpt_deep_vtab.yaml --data vtab-1k/dtd ...

:func:`vptune.engine.trainer.run_training` checks the launch environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, set by ``torchrun``); with ``WORLD_SIZE > 1`` it trains with :func:`run_training_ddp`:

- one ``init_process_group`` per run (NCCL on GPUs, each process on ``cuda:LOCAL_RANK``; gloo on CPU;
  ``VPTUNE_DIST_BACKEND`` overrides), destroyed at the end -- unless the caller had already made a group,
  which is then used and left alone;
- the same run as one process with the same **global** batch (``optim.batch_size``): every process builds
  the same model from the same seed, the lr rule ``base_lr * batch_size / 256`` uses the global batch, and
  the data order of epoch ``e`` is the single-process order (a permutation fixed by ``(seed, e)``). Each
  global minibatch is split by stride, so process ``r`` of ``W`` takes items ``r, r + W, ...`` of it --
  equivalently, its strided share of the global permutation in chunks of ``batch_size / W``. Each
  process back-propagates its share of the global-batch mean loss (its per-image losses summed and
  divided by the global batch size, times ``W`` because DDP averages gradients), so the summed gradient
  is the single-process gradient even when the last batch does not split evenly (a process with no image
  in it gets a padding image of weight 0);
- DDP wraps the model; frozen backbone parameters have ``requires_grad=False`` and are never
  all-reduced. ``find_unused_parameters`` is turned on only when a one-image probe (forward and backward,
  RNG untouched) finds a trained parameter without a gradient. BatchNorm layers (MLP head, side network)
  become ``SyncBatchNorm`` on GPUs; on CPU (gloo) their batch statistics are per process;
- validation and test split by stride over the processes; confusion matrix, top-5 hits, loss sum and
  counts are summed across processes, so every process gets the metrics of the whole split;
- a process that joined a group ends without Python's interpreter teardown (:func:`leave_process`, called by
  the ``vptune`` entry point), because gloo frees a finished collective on its own worker thread and that
  thread aborts the process when it needs the GIL during teardown;
- only rank 0 writes the run folder (config, metrics, TensorBoard, checkpoint, task, result) and logs;
  it holds the folder's run lock (:class:`~vptune.engine.runlock.RunLock`) for the whole run, and the
  other processes wait for it to be taken, so a second launch (or a one-process run) on the same output is
  refused on every process, naming the owner;
  ``--resume`` works as in one process (every process reads the checkpoint, so a multi-node run needs
  the output folder on a shared filesystem).

Differences from one process, by design: dropout and random augmentations draw from a different stream
per process (rank 0 keeps the single-process stream), and float summation order differs (results agree
to float rounding, not bit for bit).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset

from vptune.engine.checkpoint import CHECKPOINT
from vptune.engine.evaluate import accumulate, compute_metrics, make_loader
from vptune.engine.runlock import RunLock
from vptune.engine.trainer import PARALLEL_LAUNCHERS, Trainer, build_trainer, prepare_output
from vptune.errors import VptuneError

_joined = False  # this process joined a process group (setup): leave_process applies

logger = logging.getLogger("vptune")

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BACKEND_ENV = "VPTUNE_DIST_BACKEND"


# ------------------------------------------------------------------------------------------ launch environment

def launch_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the environment ``torchrun`` sets, or None outside it."""
    if "WORLD_SIZE" not in os.environ:
        return None
    values = []
    for name, default in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0")):
        raw = os.environ.get(name, default)
        if raw is None and name == "RANK":
            raw = "0"
        try:
            values.append(int(raw))
        except (TypeError, ValueError):
            raise VptuneError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world or local < 0:
        raise VptuneError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def launched() -> bool:
    """True in a process of a multi-process ``torchrun`` launch (``WORLD_SIZE > 1``)."""
    env = launch_env()
    return env is not None and env[1] > 1


@dataclass
class DistContext:
    """This process's place in the process group, and the few collectives the engine uses."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device  # where this process trains
    owns_group: bool  # made by setup(): destroyed by close()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: the GPU for NCCL, the CPU otherwise."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.comm_device if self.backend == "nccl" else None)
        return box[0]

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum over processes (a new tensor on ``tensor``'s device)."""
        t = tensor.detach().to(self.comm_device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(tensor.device)

    def run_on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, its result (or its VptuneError) on every process."""
        result: Any = None
        if self.is_main:
            try:
                result = ("ok", fn())
            except VptuneError as e:
                result = ("error", str(e))
            except Exception as e:
                self.broadcast_object(("error", f"rank 0 failed: {type(e).__name__}: {e}"))
                raise
        kind, value = self.broadcast_object(result)
        if kind == "error":
            raise VptuneError(value)
        return value

    def sync_buffers(self, module: nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm statistics) before evaluating."""
        for buf in module.buffers():
            if buf.is_floating_point() or buf.dtype in (torch.int64, torch.int32):
                t = buf.data.to(self.comm_device)
                dist.broadcast(t, src=0)
                buf.data.copy_(t.to(buf.device))

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def joined_group() -> bool:
    """Whether this process joined a process group in :func:`setup` (it stays true after the group is
    destroyed: gloo's worker threads outlive it while DDP holds the group)."""
    return _joined


def leave_process(code: int) -> None:
    """End this process with exit status ``code``, skipping the interpreter's teardown.

    Gloo runs each collective on a worker thread, and that thread frees the finished work -- and with it
    the tensors Python made for it -- after the caller has its result. When the last collective of a run
    (the summary's broadcast) is freed while the interpreter finalises, the thread cannot take the GIL and
    the process aborts with SIGABRT ("terminate called without an active exception") after a run that
    succeeded (seen about once in 40 launches here; the same cause as pytorch/pytorch#179291). Everything
    vptune writes is closed by then (atomic writes; the TensorBoard writer closed), so this flushes the
    standard streams and logging, then exits with ``os._exit``.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to lose
            pass
    os._exit(code)


def resolve_ddp_device(name: str, local_rank: int) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``cuda``/``cuda:N``: ``cuda:LOCAL_RANK``
    (each process of a launch drives its own GPU); ``cpu``: CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name == "auto" or name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VptuneError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise VptuneError(f"LOCAL_RANK {local_rank} but only {count} GPU(s) are visible: start at most "
                              f"{count} processes per node (--nproc_per_node)")
        if name not in ("auto", "cuda", f"cuda:{local_rank}"):
            logger.warning("runtime.device %s ignored: process %d of a torchrun launch uses cuda:%d",
                           name, local_rank, local_rank)
        return torch.device("cuda", local_rank)
    raise VptuneError(f"device {name!r} is not supported for data-parallel training; use auto, cuda or cpu")


def setup(device_name: str = "auto") -> DistContext:
    """Join (or make) the process group of a ``torchrun`` launch; see the module docstring."""
    env = launch_env()
    if env is None:
        raise VptuneError("not started by torchrun: RANK, WORLD_SIZE and LOCAL_RANK are not set")
    rank, world, local = env
    device = resolve_ddp_device(device_name, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise VptuneError(f"the existing process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                              f"does not match RANK={rank}, WORLD_SIZE={world}")
        backend = str(dist.get_backend())
    else:
        backend = os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise VptuneError("the NCCL backend needs GPUs; use gloo on CPU (unset VPTUNE_DIST_BACKEND)")
        try:
            _init_process_group(backend, device)
        except ValueError as e:  # env:// without MASTER_ADDR / MASTER_PORT
            raise VptuneError(f"cannot join the process group ({e}); launch with torchrun, which sets "
                              "MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK") from None
        owns = True
    global _joined
    _joined = True
    return DistContext(rank, world, local, backend, device, owns)


# ------------------------------------------------------------------------------------------ sampling

def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The single-process order of epoch ``epoch`` (1-based): the trainer's DataLoader generator is seeded
    with ``seed * 1_000_003 + epoch``, draws one int64 (its workers' base seed), then ``randperm(n)``."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return torch.randperm(n, generator=g)


@dataclass(frozen=True)
class RankBatch:
    indices: list[int]  # this process's images of the global minibatch (one padding image when none)
    valid: int  # how many of ``indices`` are real (0 for a padding batch)
    global_size: int  # images in the global minibatch (the loss denominator)


def rank_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
                 drop_last: bool = False) -> list[RankBatch]:
    """Process ``rank``'s minibatches of an epoch: items ``rank::world_size`` of each global minibatch
    (``batch_size`` consecutive items of :func:`epoch_permutation`; ``drop_last`` drops a short last one)."""
    perm = epoch_permutation(n, seed, epoch)
    used = (n // batch_size) * batch_size if drop_last else n
    out = []
    for start in range(0, used, batch_size):
        chunk = perm[start:min(start + batch_size, used)]
        mine = chunk[rank::world_size].tolist()
        out.append(RankBatch(mine or [int(chunk[0])], len(mine), len(chunk)))
    return out


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Items ``rank, rank + world_size, ...`` of ``dataset`` (evaluation shards)."""
    return Subset(dataset, range(rank, len(dataset), world_size))


# ------------------------------------------------------------------------------------------ the trainer

def unused_trainable_parameters(model: nn.Module, dataset: Dataset, device: torch.device) -> list[str]:
    """Trained parameters that get no gradient from a forward/backward of the first image of ``dataset``
    (eval mode, every RNG left as it was, gradients cleared afterwards): DDP needs
    ``find_unused_parameters`` when there are any."""
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            image = torch.as_tensor(dataset[0][0]).to(device)
            model.zero_grad(set_to_none=True)
            model(image[None]).float().sum().backward()
        named = (model.trainable_parameters() if hasattr(model, "trainable_parameters")
                 else [(n, p) for n, p in model.named_parameters() if p.requires_grad])
        return [n for n, p in named if p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)


class DistributedTrainer(Trainer):
    """:class:`~vptune.engine.trainer.Trainer` for one process of a data-parallel run."""

    def __init__(self, cfg: Any, model: nn.Module, splits: dict[str, Dataset], device: torch.device,
                 out: Path, *, ctx: DistContext) -> None:
        bs, world = cfg.optim.batch_size, ctx.world_size
        if bs % world:
            raise VptuneError(f"optim.batch_size {bs} (the global batch) must be divisible by the number of "
                              f"processes {world}; each process takes batch_size / {world} images per step")
        self.ctx, self.is_main, self.local_batch = ctx, ctx.is_main, bs // world
        if device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root; same Parameters
        super().__init__(cfg, model, splits, device, out)
        unused = unused_trainable_parameters(model, self.train_ds, device)
        if unused:
            logger.info("DDP: %d trained parameter(s) unused in the forward pass (e.g. %s): "
                        "find_unused_parameters on", len(unused), unused[0])
        self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                       find_unused_parameters=bool(unused))
        self.forward = torch.compile(self.ddp) if cfg.runtime.compile else self.ddp
        self.plan: list[RankBatch] = []
        self.cursor = 0
        self.local_sum = torch.zeros(())
        if ctx.rank:  # dropout / augmentation: a stream per process; rank 0 keeps the single-process one
            torch.manual_seed(cfg.runtime.seed * 1_000_003 + 7_919 * ctx.rank)

    # --- data and loss ----------------------------------------------------------------------
    def train_loader(self, epoch: int) -> DataLoader:
        c = self.ctx
        self.plan = rank_batches(len(self.train_ds), self.cfg.optim.batch_size, self.cfg.runtime.seed, epoch,
                                 c.rank, c.world_size, self.drop_last)
        self.cursor = 0
        gen = torch.Generator().manual_seed((self.cfg.runtime.seed * 1_000_003 + epoch) * 131 + c.rank)
        return DataLoader(self.train_ds, batch_sampler=[b.indices for b in self.plan],
                          num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                          generator=gen)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """This process's share of the global-batch mean loss, times W (DDP averages gradients)."""
        b = self.plan[self.cursor]
        per_image = F.cross_entropy(logits.float(), labels, reduction="none",
                                    label_smoothing=self.cfg.optim.label_smoothing)
        self.local_sum = per_image[:b.valid].sum()
        return self.local_sum * (self.ctx.world_size / b.global_size)

    def step_stats(self, loss: Tensor, logits: Tensor, labels: Tensor) -> tuple[float, int, int]:
        """The global batch's mean loss, correct and images (summed over processes)."""
        b = self.plan[self.cursor]
        self.cursor += 1
        hits = (logits.detach()[:b.valid].argmax(dim=1) == labels[:b.valid]).sum()
        t = torch.stack([self.local_sum.detach().double(), hits.double(), torch.tensor(float(b.valid), dtype=torch.float64,
                                                               device=hits.device)])
        total = self.ctx.all_reduce_sum(t).tolist()
        return total[0] / b.global_size, round(total[1]), round(total[2])

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, dataset: Dataset, name: str) -> dict[str, Any]:
        """Metrics of the whole split: each process evaluates its strided shard; counts are summed."""
        c = self.ctx
        c.sync_buffers(self.model)
        loader = make_loader(shard(dataset, c.rank, c.world_size), self.local_batch,
                             num_workers=self.cfg.data.num_workers, device=self.device)
        acc = accumulate(self.model, loader, device=self.device, precision=self.cfg.runtime.precision,
                         num_classes=self.model.num_classes, progress=self.cfg.runtime.progress, desc=name)
        counts = c.all_reduce_sum(torch.tensor([acc.top5_hits, acc.n], dtype=torch.int64))
        confusion = c.all_reduce_sum(acc.confusion)
        loss_sum = float(c.all_reduce_sum(torch.tensor([acc.loss_sum], dtype=torch.float64))[0])
        return compute_metrics(confusion, int(counts[0]), loss_sum, int(counts[1]))

    # --- run, resume, summary ---------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        ckpt = self.out / CHECKPOINT
        here = ckpt.is_file()
        on_main = self.ctx.broadcast_object(here)
        if resume and on_main and not here:
            raise VptuneError(f"rank {self.ctx.rank} cannot see {ckpt}, which rank 0 resumes from: put the "
                              "output folder on a filesystem every node shares")
        summary = super().run(resume=resume and on_main)
        return self.ctx.broadcast_object(summary)  # every process returns rank 0's summary

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        if self.ctx.rank:  # restore_rng put rank 0's streams everywhere
            torch.manual_seed((self.cfg.runtime.seed * 1_000_003 + 7_919 * self.ctx.rank) ^ self.epoch)

    def summary(self, val: dict | None, test: dict | None, completed: bool, wall: float) -> dict[str, Any]:
        out = super().summary(val, test, completed, wall)
        c = self.ctx
        out["distributed"] = {"world_size": c.world_size, "backend": c.backend,
                              "batch_per_process": self.local_batch, "global_batch": self.cfg.optim.batch_size,
                              "find_unused_parameters": bool(self.ddp.find_unused_parameters)}
        return out


def _init_process_group(backend: str, device: torch.device) -> None:
    """Join the group, binding the GPU (``device_id``) where this torch accepts it (torch >= 2.3)."""
    if device.type == "cuda":
        try:
            dist.init_process_group(backend=backend, device_id=device)
            return
        except TypeError:  # an older torch without the keyword
            pass
    dist.init_process_group(backend=backend)


# ------------------------------------------------------------------------------------------ entry point

def run_training_ddp(cfg: Any, *, resume: bool = False, overwrite: bool = False,
                     datasets: dict[str, Dataset] | None = None, backbone: Any = None,
                     num_classes: int | None = None, label_names: list[str] | None = None) -> dict[str, Any]:
    """:func:`~vptune.engine.trainer.run_training` for one process of a ``torchrun`` launch (the module
    docstring says what differs); every process returns rank 0's summary."""
    ctx = setup(cfg.runtime.device)
    log = logging.getLogger("vptune")
    level = log.level
    try:
        if not ctx.is_main:
            log.setLevel(logging.WARNING)
            cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, progress=False))
        out = Path(cfg.output)
        lock = RunLock(out)
        # rank 0 takes the lock; the others wait in the broadcast (a barrier) and get its refusal, if any
        ctx.run_on_main(lock.acquire)
        try:
            stored = ctx.run_on_main(lambda: prepare_output(out, cfg, resume=resume, overwrite=overwrite))
            if stored is not None:
                logger.info("%s already holds a finished run of this config: returning its result", out)
                return stored
            logger.info("data-parallel training: %d processes (%s), global batch %d = %d per process",
                        ctx.world_size, ctx.backend, cfg.optim.batch_size, cfg.optim.batch_size // ctx.world_size)
            trainer = build_trainer(cfg, ctx.device, datasets=datasets, backbone=backbone,
                                    num_classes=num_classes, label_names=label_names,
                                    trainer_cls=functools.partial(DistributedTrainer, ctx=ctx))
            return trainer.run(resume=resume)
        finally:
            lock.release()  # rank 0 only: the others never held it
    finally:
        log.setLevel(level)
        ctx.close()


PARALLEL_LAUNCHERS.append((launched, run_training_ddp))
