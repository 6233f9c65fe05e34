"""The trainer: fine-tune a pretrained potential by backpropagating through relaxations (or, as the baseline,
on the energies and forces of the DFT trajectory frames).

One optimizer step per mini-batch (``Trainer._step``): the objective's loss (``relaxtune.train.objectives``)
is backpropagated into the model's trainable weights (``relaxtune.train.parameters``) and, with
``learn_step``, the relaxation's ``StepParameters``; the terms that keep the pretrained model are added
(``relaxtune.train.keep_pretrained``), each group's gradient clipped, AdamW and the LR schedule stepped.
Structures whose relaxation blew up are left out of the loss and counted; a batch whose gradient is still not
finite is retried once without them, and a batch that raised or failed twice is skipped (counted). On many
processes (``relaxtune.train.distributed``) every rank runs this step on its share of the batch.

Each epoch ends with validation (Dq of relaxations to ``eval_fmax``, as ``relaxtune evaluate``), a row of
``metrics.csv`` (``relaxtune.train.history``), ``best.pt`` when validation Dq improved and ``last.pt``, from
which ``resume=True`` continues a killed run to the same result (``relaxtune.train.run_state``). Epoch 0 is
the pretrained model; ``summary.json`` (``relaxtune.train.summary``) holds the before / after validation
metrics and how far each parameter group moved.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from tqdm import tqdm

from relaxtune.evaluate import Evaluation, evaluate
from relaxtune.potentials import load_checkpoint_model, load_model
from relaxtune.potentials.base import EnergyModel
from relaxtune.potentials.checkpoint import DTYPES, base_model_spec, read_checkpoint
from relaxtune.relax import StepParameters
from relaxtune.retention import retention, retention_lines
from relaxtune.train import checkpoint as ckpt
from relaxtune.train.averaging import WeightAverage
from relaxtune.train.config import TrainConfig
from relaxtune.train.frame_loss import FrameLoss
from relaxtune.train.history import EpochStats, History, epoch_line
from relaxtune.train.keep_pretrained import KeepPretrained
from relaxtune.train.lowrank import add_low_rank
from relaxtune.train.objectives import Objectives, check_cell_pairs, objective_used
from relaxtune.train.parameters import lr_factor, optimizer_groups, select_trainable
from relaxtune.train.run_state import RunState, checkpoint_payload
from relaxtune.train.step_loss import LossParts, StepLoss
from relaxtune.train.summary import Movement, jsonable, run_summary
from relaxtune.train.warm_start import WarmStarts

#: what a relaxation gone so wrong that the model or the neighbour search raised (e.g. NaN coordinates) raises
STEP_ERRORS = (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError)


class Trainer:
    """Fine-tunes ``config.model`` on ``train`` pairs, validating on ``val`` pairs, writing into ``out_dir``."""

    def __init__(self, config: TrainConfig, train: Sequence, val: Sequence, out_dir: str | Path, *,
                 model: EnergyModel | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
                 data: str | None = None):
        if len(train) == 0:
            raise ValueError("no training structures")
        check_cell_pairs(list(train), config)
        self.config = config
        self.train = list(train)
        self.train_species = sorted({s for p in self.train for s in p.initial.get_chemical_symbols()})
        self.val = list(val)
        self.out = Path(out_dir)
        self.data = data
        self.progress = progress
        self._log = log
        self.main_process = True  # the process that writes the run's files and checks retention
        self.dtype = DTYPES[config.dtype]
        self.model_spec = base_model_spec(config.model)
        self.model = model if model is not None else load_model(config.model, dtype=self.dtype)
        self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.model.eval()  # no dropout / batch statistics: training differentiates the inference model
        self.counts = select_trainable(self.model, config.train_params)
        if config.low_rank:
            self.counts = add_low_rank(self.model, config.low_rank, seed=config.seed)
        self.step_params_kwargs = {"step_size": config.relax_step_size} if config.learn_step else None
        self.step_params = StepParameters(**self.step_params_kwargs).to(self.device) if config.learn_step else None
        if config.learn_step and (config.grad == "implicit" or config.objective == "forces"):
            why = ("the relaxed fixed point does not depend on the step size" if config.objective != "forces"
                   else "the forces objective does not relax")
            self.log(f"note: --learn-step with --grad {config.grad} --objective {config.objective}: {why}, so the "
                     "step size gets no gradient (use --grad full, checkpoint, truncated or hybrid)")
        self.model_params = [p for p in self.model.parameters() if p.requires_grad]
        self.relax_params = list(self.step_params.parameters()) if self.step_params is not None else []
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, config, self.relax_params), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.batches_per_epoch = int(math.ceil(len(self.train) / config.batch_size))
        self.total_steps = config.epochs * self.batches_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config, self.total_steps))
        train_index = {id(p): i for i, p in enumerate(self.train)}
        self.state = RunState(History(bool(self.val), config.min_delta, config.patience),
                              WarmStarts(config, train_index), Movement(self.model, self.relax_params),
                              WeightAverage(self.model_params + self.relax_params, config.average_epochs,
                                            self.batches_per_epoch))
        self.keep = KeepPretrained(config, self.model, self.model_params, self.train_species, self.dtype,
                                   self.device, fits_cells=any(p.relax_cell for p in self.train), log=self.log)
        self.frames = FrameLoss(config, self.model, self.dtype, self.device, train_index)
        self.objectives = Objectives(config, self.model, self.step_params, self.dtype, self.device, self.frames,
                                     self.state)
        self.objective_used = objective_used(config, self.train, self.frames, self.log)

    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        elif self.progress:
            tqdm.write(msg)

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = False, stop_after_epoch: int | None = None) -> dict[str, Any]:
        """Train (or continue from ``out_dir/last.pt`` with ``resume``); returns the summary dict.
        ``stop_after_epoch`` ends the run after that epoch's checkpoint, as a kill would (tests)."""
        c, state = self.config, self.state
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(c.seed)
        np.random.seed(c.seed % (2**32))
        if resume and (self.out / "last.pt").exists():
            self._restore(self.out / "last.pt")
            self.log(f"resumed from {self.out / 'last.pt'} at epoch {state.epoch}")
        else:
            self._start()
        while state.epoch < c.epochs and not state.history.stopped_early:
            if stop_after_epoch is not None and state.epoch >= stop_after_epoch:
                return {}
            epoch, t0 = state.epoch + 1, time.time()
            stats = self._train_epoch(epoch)
            val = self.validate()
            state.epoch = epoch
            self._end_epoch(epoch, stats, val, time.time() - t0)
        summary = self.summary()
        if c.retention_check and self.main_process:
            summary["retention"] = self.check_retention()
        self._write_summary(summary)
        return summary

    def _start(self) -> None:
        """A fresh run: the resolved settings (reusable as ``relaxtune finetune --config``), the pretrained Dq
        scale of each training structure and epoch 0, the pretrained model."""
        if self.main_process:
            ckpt.atomic_write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False), self.out / "config.yaml")
        t0 = time.time()
        self.state.dq_scale = self._measure_dq_scale()
        self._end_epoch(0, None, self.validate(), time.time() - t0)

    def _train_epoch(self, epoch: int) -> EpochStats:
        """One pass over the training structures in the order of (seed, epoch), ``batch_size`` per step."""
        c, stats = self.config, EpochStats()
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(int(c.seed) * 100003 + epoch))
        bar = tqdm(total=len(order), desc=f"epoch {epoch}/{c.epochs}", unit="structure", leave=False,
                   disable=not self.progress)
        for b in range(self.batches_per_epoch):
            idx = order[b * c.batch_size:(b + 1) * c.batch_size].tolist()
            self._step([self.train[i] for i in idx], stats, epoch)
            bar.update(len(idx))
            if stats.n:
                bar.set_postfix(loss=f"{stats.loss_sum / stats.n:.4f}")
        bar.close()
        return stats

    def _end_epoch(self, epoch: int, stats: EpochStats | None, val: dict | None, seconds: float) -> None:
        row = self._record(epoch, stats, val, seconds)
        self._save(row, val)
        c = self.config
        self.log(epoch_line(row, self.state.history, objective=c.objective, relative=bool(self.state.dq_scale),
                            val_start=c.val_start, elapsed=self.state.elapsed(), epochs=c.epochs,
                            n_train=len(self.train)))

    # ------------------------------------------------------------------ one optimizer step
    def _step(self, pairs: Sequence, stats: EpochStats, epoch: int) -> None:
        """One optimizer step on the mini-batch ``pairs`` (of which this process relaxes ``_share``)."""
        share = self._share(pairs)
        step = self._attempt(share, epoch)
        attempted = len(pairs)  # structures a failure of this attempt skips
        if step.error is None:
            stats.relaxations.add(step.relaxations)
            stats.skipped_structures += step.n_blew
            if step.n_ok and step.n_blew and not self._grads_finite():
                # NaNs of a blown-up structure can leak into the shared gradient (0 * inf): retry without them
                attempted -= step.n_blew
                step = self._attempt([p for p, bad in zip(share, step.blew.tolist()) if not bad], epoch)
                stats.skipped_structures += step.n_blew
        if step.error is not None or step.n_ok == 0 or step.weight == 0 or not self._grads_finite():
            if step.error is not None:
                self.log(f"skipped a batch ({', '.join(p.name for p in pairs)}): {step.error}")
                stats.skipped_structures += attempted
            self.optimizer.zero_grad(set_to_none=True)
            stats.skipped_batches += 1
            self.scheduler.step()  # keep the schedule aligned with the planned number of steps
            return
        self._update(stats, step.loss_sum, step.n_ok)

    def _share(self, pairs: Sequence) -> list:
        """The structures of a mini-batch this process relaxes: all of them."""
        return list(pairs)

    def _attempt(self, share: Sequence, epoch: int) -> StepLoss:
        """The loss of ``share`` backpropagated into zeroed gradients; an error is returned, not raised, so that
        every process reaches ``_combine`` and decides alike."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            step = (self._backward(self.objectives.loss(share, epoch)) if share
                    else StepLoss.empty(0, self.objectives.per_frame))
        except STEP_ERRORS as exc:
            self.optimizer.zero_grad(set_to_none=True)
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            step = StepLoss.empty(len(share), self.objectives.per_frame, error=error)
        return self._combine(step)

    @staticmethod
    def _backward(parts: LossParts) -> StepLoss:
        """Backpropagate each piece of loss as the objective yields it; returns what the objective measured."""
        while True:
            try:
                piece = next(parts)
            except StopIteration as done:
                return done.value
            if piece.requires_grad:
                piece.backward()

    def _combine(self, step: StepLoss) -> StepLoss:
        """The mini-batch's loss from this process's ``step``: on one process, the same."""
        return step

    def _grads_finite(self) -> bool:
        return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.model_params + self.relax_params)

    def _update(self, stats: EpochStats, loss_sum: float, n_ok: int) -> None:
        """The end of every optimizer step (the data gradient complete): the terms that keep the pretrained
        model, gradient norms per group (metrics.csv), clipping, AdamW."""
        for name, value in self.keep.add_gradients(self.scheduler.last_epoch).items():
            stats.keep_losses.setdefault(name, []).append(value)
        for p in self.model_params + self.relax_params:  # unreached this step: a zero gradient, as on many ranks
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for group in self.optimizer.param_groups:  # norms before clipping (diagnostics in metrics.csv)
            grads = [p.grad.detach().double().reshape(-1) for p in group["params"] if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0
            stats.grad_norms.setdefault(group.get("name", "model"), []).append(norm)
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(group["params"], self.config.grad_clip)
        self.keep.before_step()
        self.optimizer.step()
        self.keep.after_step()
        self.state.average.update()
        self.scheduler.step()
        stats.loss_sum += loss_sum
        stats.n += n_ok

    # ------------------------------------------------------------------ validation
    def _evaluate(self, pairs: Sequence, **kwargs: Any) -> Evaluation:
        """Relax ``pairs`` without a graph (``relaxtune.evaluate.evaluate``; all ranks share it when distributed)."""
        return evaluate(self.model, pairs, **kwargs)

    def validate(self) -> dict[str, Any] | None:
        """Validation metrics (and Dq by structure) of FIRE relaxations of the validation pairs, or None."""
        if not self.val:
            return None
        c = self.config
        with self.state.average.applied():
            result = self._evaluate(self.val, fmax=c.eval_fmax, optimizer=c.eval_optimizer,
                                    max_steps=c.eval_max_steps, batch_size=c.batch_size, dtype=self.dtype,
                                    start=c.val_start)
        return {**result.metrics, "dq_by_structure": {r["name"]: r["dq"] for r in result.rows}}

    def _measure_dq_scale(self) -> list[float]:
        """Pretrained Dq of every training structure from the training start (``dq_scale="pretrained"``),
        floored at ``dq_scale_floor``, in training order; [] for absolute losses and the forces objective."""
        c = self.config
        if c.dq_scale != "pretrained" or c.objective == "forces":
            return []
        rows = self._evaluate(self.train, fmax=c.fmax, optimizer=c.optimizer, max_steps=c.steps,
                              batch_size=c.batch_size, dtype=self.dtype, start=c.start).rows
        # a pretrained relaxation that blew up (NaN) gets weight 1: no information on its scale
        return [max(float(r["dq"]), c.dq_scale_floor) if math.isfinite(float(r["dq"])) else 1.0 for r in rows]

    # ------------------------------------------------------------------ history, checkpoints, summary
    def _record(self, epoch: int, stats: EpochStats | None, val: dict | None, seconds: float) -> dict[str, Any]:
        step_size = float(self.step_params.step_size.detach()) if self.step_params is not None else None
        return self.state.history.record(epoch, stats, val, lr=self.optimizer.param_groups[0]["lr"],
                                         step_size=step_size, seconds=seconds)

    def _payload(self, metrics: dict[str, Any] | None, with_trainer: bool) -> dict[str, Any]:
        return checkpoint_payload(
            self.model, self.config, model_spec=self.model_spec, step_params=self.step_params,
            step_params_kwargs=self.step_params_kwargs, epoch=self.state.epoch, metrics=metrics,
            train_species=self.train_species,
            trainer=self.state.entry(self.optimizer, self.scheduler, self.model) if with_trainer else None)

    def _save(self, row: dict[str, Any], val: dict | None) -> None:
        """best.pt (the averaged weights, which validation measured) when the epoch is the best so far, last.pt
        (the trained weights and the average) and metrics.csv."""
        if row["is_best"]:
            with self.state.average.applied():
                ckpt.atomic_save(self._payload(val, with_trainer=False), self.out / "best.pt")
        ckpt.atomic_save(self._payload(val, with_trainer=True), self.out / "last.pt")
        ckpt.atomic_write_text(self.state.history.csv_text(), self.out / "metrics.csv")

    def _restore(self, path: Path) -> None:
        data = read_checkpoint(path)
        if "trainer" not in data:
            raise ValueError(f"{path}: has no trainer state (resume needs last.pt)")
        if self.step_params is not None and data.get("step_params") is not None:
            self.step_params.load_state_dict(data["step_params"])
        self.state.load(data, self.optimizer, self.scheduler, self.model)

    def check_retention(self) -> dict[str, Any]:
        """best.pt against the pretrained model on what neither trained on (``relaxtune.retention``): the crystals
        of the training elements and the validation structures' DFT frames; logged item by item."""
        self.log(f"checking retention: best.pt against {self.config.model} on the bulk crystals of "
                 f"{', '.join(self.train_species)} (about a minute for CHGNet on 2 cores; --no-retention skips it)")
        best = load_checkpoint_model(self.out / "best.pt", dtype=self.dtype).to(self.device)
        pretrained = load_model(self.config.model, dtype=self.dtype).to(self.device)
        frames = {"validation": [f for p in self.val for f in self.frames.frames(p)]}
        result = retention(best, pretrained, self.train_species, extra_frames=frames,
                           trained_on=self.keep.replay.pairs)
        for line in retention_lines(result):
            self.log(line)
        return result

    def _write_summary(self, summary: dict[str, Any]) -> None:
        ckpt.atomic_write_text(json.dumps(jsonable(summary), indent=2) + "\n", self.out / "summary.json")

    def summary(self) -> dict[str, Any]:
        step_size = None
        if self.step_params is not None:
            step_size = (float(self.step_params_kwargs["step_size"]), float(self.step_params.step_size.detach()))
        return run_summary(self.config, self.state.history, model_spec=self.model_spec,
                           train_names=[p.name for p in self.train], val_names=[p.name for p in self.val],
                           counts=self.counts, objective_used=self.objective_used, epochs_run=self.state.epoch,
                           moved=self.state.movement.report(), time_s=self.state.elapsed(), step_size=step_size,
                           data=self.data)


def finetune(config: TrainConfig, train: Sequence, val: Sequence, out_dir: str | Path, *, resume: bool = False,
             model: EnergyModel | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None, data: str | None = None) -> dict[str, Any]:
    """Run a fine-tuning (see the module docstring); returns the summary written to ``out_dir/summary.json``.
    ``data``: the dataset ``train`` came from, recorded there (``relaxtune.data.load.dataset_of``).

    With ``resume`` and an existing ``out_dir/last.pt`` the stored config is used (``epochs`` and
    ``patience`` may be raised to train longer).
    """
    out = Path(out_dir)
    if resume and (out / "last.pt").exists():
        stored = TrainConfig.from_dict(read_checkpoint(out / "last.pt")["config"])
        config = stored.replace(epochs=max(stored.epochs, config.epochs), patience=config.patience)
    trainer = Trainer(config, train, val, out, model=model, progress=progress, log=log, data=data)
    return trainer.run(resume=resume)
