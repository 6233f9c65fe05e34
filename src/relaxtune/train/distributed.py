"""Data-parallel fine-tuning and evaluation over ``torch.distributed`` ranks, launched by ``torchrun``.

    torchrun --nproc_per_node 4 -m relaxtune finetune builtin:si-defects --out runs/si
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m relaxtune finetune ...

Every rank runs the same trainer loop on the same data order (seeded by (seed, epoch)); each global mini-batch
of ``batch_size`` structures is dealt out over the ranks (``batch[rank::world_size]``) and every rank runs the
trainer's optimizer step (``Trainer._step``) on its share. After the local backward, the gradients are summed
over the ranks (one all-reduce per dtype) and divided by the global number of structures (or DFT frames) that
entered the loss, so the step equals the single-process step on the whole batch even when the shares are
unequal or empty (loss averaged over the global batch, not an average of per-rank averages). Blow-up retries
and skipped batches are decided on the reduced values, and a rank whose share raised reports it in the same
reduction, so every rank takes the same decision and none waits for another. Validation and ``relaxtune
evaluate`` spread their structures the same way and gather the per-structure rows, so the metrics equal a
one-process run. Rank 0 alone writes checkpoints, ``metrics.csv``, ``summary.json``, progress and logs;
``--resume`` makes every rank load ``last.pt`` (it must be on a file system all nodes see).

Why not ``DistributedDataParallel``: DDP itself handles the double backward of the relaxation fine (measured,
torch 2.13, gloo, Stillinger-Weber: DDP's gradients equal the all-reduced ones to 0 for grad full, checkpoint,
implicit and the forces objective; benchmarks/ddp_double_backward_check.py), but it needs the whole step as
exactly one ``forward`` through the wrapper followed by exactly one synchronised backward on every rank. The
trainer does not fit that: the forces objective accumulates one backward per frame chunk (a different number
per rank), a rank whose share is empty or blew up entirely has nothing to backward (DDP would hang waiting for
its gradients), a batch with NaN gradients is retried without its blown-up structures, and the loss weights
depend on the global count. So this module does what DDP does, explicitly: parameters and buffers are
broadcast from rank 0 at start (as DDP's constructor), and gradients are all-reduced (summed) after the
backward. DDP's overlap of communication with the backward buys nothing here: one backward through a
relaxation costs seconds, the all-reduce of the weights (CHGNet: 0.4 M parameters) milliseconds.

Backend: NCCL when the rank computes on a GPU (``cuda:LOCAL_RANK``), gloo on CPU; ``RELAXTUNE_DIST_BACKEND``
overrides it. Outside ``torchrun`` (no ``WORLD_SIZE`` > 1) nothing here changes the single-process trainer.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from relaxtune.evaluate import Evaluation, evaluate, summarize
from relaxtune.potentials import load_model
from relaxtune.potentials.checkpoint import DTYPES, read_checkpoint
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import Trainer
from relaxtune.train.history import EpochStats
from relaxtune.train.step_loss import RelaxationCounts, StepLoss

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- context
@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node), the ``backend`` of the
    process group (None when single-process) and the ``device`` this rank computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there are other ranks to talk to."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one rank (``torchrun`` sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(spec: str | None, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The compute device: ``spec`` cpu | cuda | cuda:N; None = cpu, or under torchrun the rank's own GPU
    (``cuda:LOCAL_RANK``) when CUDA is available. A bare ``cuda`` under torchrun also means cuda:LOCAL_RANK."""
    if spec is None or spec == "auto":
        if distributed and torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count() if distributed else 0)
    return dev


def init_from_env(device: str | None = None, backend: str | None = None) -> DistContext:
    """Join the process group ``torchrun`` describes (env vars RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a plain process gets a one-rank context and no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, distributed=world > 1)
    if world <= 1:
        return DistContext(device=dev)
    backend = backend or os.environ.get("RELAXTUNE_DIST_BACKEND") or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       backend=dist.get_backend(), device=dev, owns_group=owns)


def shutdown(ctx: DistContext) -> None:
    """Wait for every rank (so rank 0's last files are written when any rank returns), then leave the process
    group if this process created it (a group set up by the caller stays)."""
    if ctx.active and dist.is_initialized():
        dist.barrier()
        if ctx.owns_group:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- collectives
def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th one from ``rank`` (balanced to within one)."""
    return list(items[ctx.rank::ctx.world_size])


def _reduce_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float], ctx: DistContext, op=None) -> list[float]:
    """Sum (or ``op``) of a few float64 numbers over the ranks."""
    if not ctx.active:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device(ctx))
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _groups(params: Sequence[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return groups


def reduce_gradients(params: Sequence[torch.Tensor], ctx: DistContext, scale: float = 1.0) -> None:
    """Replace each ``p.grad`` by the sum over ranks of ``scale * p.grad`` (missing grads count as zeros):
    one flat all-reduce per (device, dtype), like a DDP bucket."""
    for _, group in _groups(params).items():
        flat = torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in group])
        if scale != 1.0:
            flat = flat * scale
        if ctx.active:
            moved = flat.to(_reduce_device(ctx))
            dist.all_reduce(moved)
            flat = moved.to(flat.device)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def broadcast_module(module: torch.nn.Module | None, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP's constructor does)."""
    if module is None or not ctx.active:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.detach().to(_reduce_device(ctx)).clone()
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))


def parameters_in_sync(params: Sequence[torch.Tensor], ctx: DistContext) -> bool:
    """True when every rank holds bitwise the same ``params`` (compares float64 checksums)."""
    if not ctx.active:
        return True
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in params]) if params else torch.zeros(1)
    sums = (float(flat.sum()), float(flat.abs().sum()), float((flat * torch.arange(1, flat.numel() + 1,
                                                                                    dtype=torch.float64)).sum()))
    gathered = all_gather_objects(sums, ctx)
    return all(g == gathered[0] for g in gathered)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_distributed(model, pairs: Sequence, ctx: DistContext, **kwargs):
    """``relaxtune.evaluate.evaluate`` with the structures dealt out over the ranks; every rank returns the
    same ``Evaluation`` (rows in the order of ``pairs``, metrics summarised over all of them)."""
    if not ctx.active:
        return evaluate(model, pairs, **kwargs)
    if not ctx.is_main:
        kwargs = {**kwargs, "progress": False}
    idx = list(range(len(pairs)))[ctx.rank::ctx.world_size]
    local = evaluate(model, [pairs[i] for i in idx], **kwargs)
    gathered = all_gather_objects((idx, local.rows), ctx)
    rows: list[Any] = [None] * len(pairs)
    for ids, part in gathered:
        for i, row in zip(ids, part):
            rows[i] = row
    metrics = summarize(rows)
    # the settings evaluate() adds to its metrics (fmax, optimizer, ...): the same on every rank
    metrics.update({k: v for k, v in local.metrics.items() if k not in metrics})
    return Evaluation(metrics=metrics, rows=rows)


# ---------------------------------------------------------------------------------------------- training
class DistributedTrainer(Trainer):
    """The trainer with each global mini-batch relaxed by all ranks together (see the module docstring).

    Every rank keeps the full trainer state (same weights, optimizer, history, early stopping) and runs the
    trainer's own optimizer step on its share of each batch (``_share``); ``_combine`` makes the gradients and
    counts those of the whole batch, so every rank takes the same decisions. Rank 0 alone writes files and logs.
    """

    def __init__(self, config, train, val, out_dir, *, ctx: DistContext, model=None, progress: bool = True,
                 log: Callable[[str], None] | None = None, data: str | None = None):
        self.ctx = ctx  # first: the overridden hooks below read it
        super().__init__(config, train, val, out_dir, model=model, progress=progress and ctx.is_main, log=log,
                         data=data)
        self.main_process = ctx.is_main

    # -------------------------------------------------------------- rank-0-only side effects
    def log(self, msg: str) -> None:
        if self.ctx.is_main:
            super().log(msg)

    def _save(self, row: dict[str, Any], val: dict | None) -> None:
        params = self.model_params + self.relax_params
        if not parameters_in_sync(params, self.ctx):  # cannot happen unless a collective went wrong
            self.log("warning: ranks disagree on the weights; re-synchronising from rank 0")
            broadcast_module(self.model, self.ctx)
            broadcast_module(self.step_params, self.ctx)
        if self.ctx.is_main:
            super()._save(row, val)
        if self.ctx.active:
            dist.barrier()

    def _write_summary(self, summary: dict[str, Any]) -> None:
        if self.ctx.is_main:
            super()._write_summary(summary)

    # -------------------------------------------------------------- evaluation (validation, dq_scale)
    def _evaluate(self, pairs: Sequence, **kwargs: Any) -> Evaluation:
        return evaluate_distributed(self.model, pairs, self.ctx, **kwargs)

    # -------------------------------------------------------------- epoch statistics
    def _record(self, epoch: int, stats: EpochStats | None, val: dict | None, seconds: float) -> dict[str, Any]:
        if stats is not None and self.ctx.active:
            # loss, counts, skips and CG iterations are already global (reduced every step); the rest of the
            # relaxation counts are per rank
            merged = RelaxationCounts(cg_iterations=stats.relaxations.cg_iterations)
            for part in all_gather_objects(dataclasses.replace(stats.relaxations, cg_iterations=0), self.ctx):
                merged.add(part)
            stats.relaxations = merged
        return super()._record(epoch, stats, val, seconds)

    # -------------------------------------------------------------- one optimizer step
    def _share(self, pairs: Sequence) -> list:
        return shard(pairs, self.ctx)

    def _combine(self, step: StepLoss) -> StepLoss:
        """The whole batch's loss from every rank's ``step`` (every rank calls this once per attempt, also after
        an error). Gradients: each rank's (of its loss divided by ``weight``) times ``weight``, summed over the
        ranks and divided by the global weight, i.e. the mean over the whole batch as one process takes it, even
        for unequal or empty shares. Counts are summed, CG iterations the max (one batched solve), errors
        gathered, and the warm starts of this step shared (another rank may relax a structure next epoch)."""
        ctx = self.ctx
        if not ctx.active:
            return step
        params = self.model_params + self.relax_params
        reduce_gradients(params, ctx, scale=step.weight)
        total, n_ok, weight, n_blew, failed = all_reduce_sum(
            [step.total, step.n_ok, step.weight, step.n_blew, step.error is not None], ctx)
        cg_iterations = all_reduce_sum([step.relaxations.cg_iterations], ctx, op=dist.ReduceOp.MAX)[0]
        for fresh in all_gather_objects(self.state.warm.take_fresh(), ctx):
            self.state.warm.merge(fresh)
        errors = [e for e in all_gather_objects(step.error, ctx) if e] if failed else []
        if weight > 0:
            for p in params:
                p.grad = p.grad / weight
        relaxations = dataclasses.replace(step.relaxations, cg_iterations=int(cg_iterations))
        return dataclasses.replace(step, total=total, n_ok=int(n_ok), weight=weight, n_blew=int(n_blew),
                                   relaxations=relaxations, error="; ".join(errors) or None)


def finetune_distributed(config, train: Sequence, val: Sequence, out_dir: str | Path, ctx: DistContext, *,
                         resume: bool = False, model=None, progress: bool = True,
                         log: Callable[[str], None] | None = None, data: str | None = None) -> dict[str, Any]:
    """``relaxtune.train.finetune.finetune`` on all ranks of ``ctx`` (and on ``ctx.device``); returns the
    summary on every rank (rank 0 writes it)."""
    out = Path(out_dir)
    if resume:
        seen = all_gather_objects((out / "last.pt").exists(), ctx)
        if any(seen) and not all(seen):
            missing = [r for r, s in enumerate(seen) if not s]
            raise ValueError(f"--resume: {out / 'last.pt'} exists on rank 0's node but not on rank(s) "
                             f"{', '.join(map(str, missing))}: --out must be on a file system every node sees")
    if resume and (out / "last.pt").exists():  # the same rule as finetune(): the stored settings win
        stored = TrainConfig.from_dict(read_checkpoint(out / "last.pt")["config"])
        config = stored.replace(epochs=max(stored.epochs, config.epochs), patience=config.patience)
    if model is None:
        model = load_model(config.model, dtype=DTYPES[config.dtype])
    model = model.to(ctx.device)
    broadcast_module(model, ctx)
    trainer = DistributedTrainer(config, train, val, out, ctx=ctx, model=model, progress=progress,
                                 log=log if ctx.is_main else (lambda _m: None), data=data)
    return trainer.run(resume=resume)
