"""The three training objectives. Each computes a step's loss and never differentiates it: it yields the loss
in pieces, each already divided by what the step averages over, and the trainer backpropagates each piece as
it comes (one piece's graph alive at a time, e.g. one chunk of DFT frames), then the objective returns the
``StepLoss`` it measured.

- ``structure``: relax the structures with the model (``relax_for_training``, gradient mode ``config.grad``)
  and take Dq (and RMSD) of each to its DFT-relaxed counterpart, averaged over those that did not blow up.
  With ``grad`` implicit or hybrid the relaxed positions carry the custom backward of
  ``relaxtune.relax.implicit`` (the implicit-function-theorem gradient, a CG solve on Hessian-vector
  products), which runs inside the trainer's backward; the solve's statistics are read after it.
- ``forces``: the baseline, the energy/force(/stress) loss averaged over every DFT frame of the structures.
- ``structure+forces``: ``structure`` plus ``forces_mix`` x each kept structure's mean frame loss, estimated
  from ``frames_per_structure`` frames.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch

from relaxtune.evaluate import start_structures
from relaxtune.potentials.base import EnergyModel
from relaxtune.relax import RelaxConfig
from relaxtune.relax.implicit import ImplicitConfig, relax_for_training
from relaxtune.state import Batch
from relaxtune.train import losses
from relaxtune.train.config import TrainConfig
from relaxtune.train.frame_loss import FrameLoss
from relaxtune.train.run_state import RunState
from relaxtune.train.step_loss import LossParts, RelaxationCounts, StepLoss


class Objectives:
    """The objectives of ``config`` on ``model``; ``loss`` picks ``config.objective``."""

    def __init__(self, config: TrainConfig, model: EnergyModel, step_params: torch.nn.Module | None,
                 dtype: torch.dtype, device: torch.device, frames: FrameLoss, state: RunState):
        self.config = config
        self.model = model
        self.step_params = step_params
        self.dtype = dtype
        self.device = device
        self.frames = frames
        self.state = state  # its warm starts and dq_scale

    @property
    def per_frame(self) -> bool:
        """True when the loss is a mean over DFT frames (``forces``), not over structures."""
        return self.config.objective == "forces"

    def loss(self, pairs: Sequence, epoch: int) -> LossParts:
        """``config.objective`` on ``pairs`` in ``epoch`` (the epoch seeds the draw of DFT frames)."""
        if self.config.objective == "structure":
            return self.structure(pairs)
        if self.config.objective == "forces":
            return self.forces(pairs)
        return self.combined(pairs, epoch)

    def relax_config(self) -> RelaxConfig:
        """The training relaxation: ``optimizer``, ``fmax``, ``steps``, ``max_force`` and the step size η."""
        c = self.config
        return RelaxConfig(optimizer=c.optimizer, fmax=c.fmax, max_steps=c.steps, blowup_force=c.max_force,
                           **{c.relax_step_field: c.relax_step_size})

    def implicit_config(self) -> ImplicitConfig:
        """The implicit backward's CG settings."""
        c = self.config
        return ImplicitConfig(cg_tol=c.cg_tol, cg_max_iter=c.cg_max_iter, damping=c.damping)

    def structure(self, pairs: Sequence) -> LossParts:
        """Relax ``pairs`` with the graph; the mean structure loss over those that did not blow up."""
        c = self.config
        warm = self.state.warm
        batch = Batch.from_atoms(warm.starts(pairs, start_structures(pairs, c.start)), dtype=self.dtype,
                                 device=self.device)
        reference = torch.tensor(np.concatenate([p.final.get_positions() for p in pairs]), dtype=self.dtype,
                                 device=self.device)
        out = relax_for_training(
            self.model, batch, self.relax_config(), grad_mode=c.grad, step_params=self.step_params,
            truncate_steps=c.truncate_steps, checkpoint_every=c.checkpoint_every, hybrid_steps=c.hybrid_steps,
            head_mode=c.hybrid_head, implicit=self.implicit_config(), cg_guess=warm.cg_guess(pairs, batch),
        )
        res = out.result
        weights = losses.StructureLossWeights(dq=c.dq_weight, rmsd=c.rmsd_weight)
        per = losses.structure_loss(res.batch, reference, weights)
        if self.state.dq_scale:
            index = warm.train_index
            scale = [self.state.dq_scale[index[id(p)]] if id(p) in index else 1.0 for p in pairs]
            per = per / torch.tensor(scale, dtype=per.dtype, device=per.device)
        blew = res.blew_up.to(torch.bool) | ~torch.isfinite(per.detach())
        n_ok = int((~blew).sum())
        kept = torch.where(blew, torch.zeros_like(per), per)
        if n_ok:
            yield kept.sum() / n_ok  # the trainer's backward (implicit, hybrid: the CG solve) runs here
        counts = RelaxationCounts(steps=res.n_steps.tolist(), converged=res.converged.tolist())
        if out.stats is not None:
            warm.remember_solutions(pairs, batch, out.stats.solution, blew)
            counts.cg_iterations, counts.fallback = out.stats.cg_iterations, out.stats.fallback
            counts.truncated = out.stats.truncated
        step = StepLoss(float(kept.detach().sum()), float(n_ok), n_ok, blew.cpu(), n_blew=int(blew.sum()),
                        relaxations=counts)
        warm.remember_minima(pairs, res.batch, blew)
        return step

    def forces(self, pairs: Sequence) -> LossParts:
        """The baseline: the mean energy/force(/stress) loss over every DFT frame of ``pairs``, chunk by chunk."""
        chunks = self.frames.chunks(pairs)
        n_frames = sum(len(ch.frames) for ch in chunks)
        if n_frames == 0:
            return StepLoss.empty(len(pairs), per_frame=True)
        total = 0.0
        for ch in chunks:
            loss = self.frames.terms(ch.reference, ch.frames, ch.use_stress).sum()
            yield loss / n_frames  # the mean over the batch's frames
            total += float(loss.detach())
        return StepLoss(total, float(n_frames), len(pairs), torch.zeros(len(pairs), dtype=torch.bool),
                        per_frame=True)

    def combined(self, pairs: Sequence, epoch: int) -> LossParts:
        """``structure`` plus ``forces_mix`` x each kept structure's mean frame loss over its DFT frames (this
        epoch's draw of ``frames_per_structure``): the frames anchor the energy surface along the whole DFT path,
        which the relaxed end point alone constrains weakly."""
        step = yield from self.structure(pairs)
        if not step.n_ok:
            return step
        kept = [p for p, bad in zip(pairs, step.blew.tolist()) if not bad]
        mix = self.config.forces_mix
        total = step.total
        for ch in self.frames.chunks(kept, epoch, sample=True):
            terms = self.frames.terms(ch.reference, ch.frames, ch.use_stress)
            loss = (terms * torch.tensor(ch.weights, dtype=terms.dtype, device=terms.device)).sum()
            yield loss * mix / step.n_ok
            total += mix * float(loss.detach())
        return dataclasses.replace(step, total=total)


def check_cell_pairs(pairs: Sequence, config: TrainConfig) -> None:
    """Training relaxes with the cell fixed. From the DFT-relaxed structure that is the reference's own cell
    (Dq of the positions in it; the stress enters through the DFT frames); from the initial structure of a
    cell relaxation it would compare positions in two different cells, so that is an error."""
    if config.objective == "forces" or config.start != "initial":
        return
    for pair in pairs:
        if pair.relax_cell:
            raise ValueError(f"structure {pair.name!r}: its reference relaxed the cell, and training relaxes from "
                             "the initial structure with the cell fixed; use --start relaxed (positions at the DFT "
                             "cell, stress from the DFT frames) or --objective forces")


def objective_used(config: TrainConfig, pairs: Sequence, frames: FrameLoss, log: Callable[[str], None]) -> str:
    """The objective the data allow: a frame objective on data without DFT energies and forces trains on what
    is left (said in the log and summary.json, never silently)."""
    with_frames = sum(1 for p in pairs if len(frames.frames(p)) > 0)
    if config.objective == "structure+forces" and with_frames == 0:
        log("note: no training structure carries DFT energies and forces: structure+forces trains on Dq alone "
            "(objective used: structure)")
        return "structure"
    if config.objective == "forces" and with_frames == 0:
        raise ValueError("objective forces: no training structure carries DFT energies and forces")
    if with_frames < len(pairs) and config.objective != "structure":
        log(f"note: {len(pairs) - with_frames} of {len(pairs)} training structures carry no DFT energies and "
            "forces: their frame term is 0")
    return config.objective
