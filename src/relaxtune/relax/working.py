"""The working batch of a relaxation and its one iteration, shared by every driver (``loop``, ``stream``).

``Problem`` is what stays fixed for one working batch (model, configuration, atoms, cell filter); ``Carry`` is
what one iteration changes (optimizer state, energies and forces at the current point, per-structure status, the
model's topology). ``one_step`` is pure, so the graph drivers can recompute it under checkpointing;
``select_systems`` and ``concat_systems`` shrink and grow a working batch, each structure keeping its state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from relaxtune.potentials.base import EnergyModel, energy_and_forces
from relaxtune.relax import cell as cellmod
from relaxtune.relax import topology
from relaxtune.relax.config import RelaxConfig, RelaxResult
from relaxtune.relax.params import StepValues
from relaxtune.relax.steps import (FireState, GDState, LBFGSState, concat_states, fire_init, fire_step, gd_init,
                                   gd_step, lbfgs_init, lbfgs_step, merge_states, select_state)
from relaxtune.relax.topology import Topology, detached
from relaxtune.state import Batch, per_system_max


@dataclass(frozen=True)
class Problem:
    """What stays fixed for one working batch."""

    model: EnergyModel
    config: RelaxConfig
    base: Batch  # numbers, masses, fixed, system_idx, pbc (positions/cell replaced from the rows)
    cell: cellmod.CellFilter | None
    row_system: torch.Tensor
    free_rows: torch.Tensor
    row_scale: torch.Tensor | None  # per-row step scale (per-element), None = 1
    momentum: Any  # float or tensor
    create_graph: bool
    skin: float | None

    @property
    def n_systems(self) -> int:
        return self.base.n_systems

    def batch_at(self, rows: torch.Tensor) -> Batch:
        if self.cell is None:
            return self.base.replace(positions=rows)
        return cellmod.apply_rows(self.cell, self.base, rows)

    def rows_of(self, systems: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(atom indices, row indices) of some structures, in order."""
        slices = self.base.system_slices()
        dev = self.base.device
        atoms = torch.cat([torch.arange(slices[s].start, slices[s].stop, device=dev) for s in systems.tolist()])
        if self.cell is None:
            return atoms, atoms
        cell_rows = self.base.n_atoms + 3 * systems.repeat_interleave(3) + torch.arange(3, device=dev).repeat(len(systems))
        return atoms, torch.cat([atoms, cell_rows])


@dataclass(frozen=True)
class PointEval:
    """Energies and forces of a working batch at its current point, and what they say about convergence."""

    energy: torch.Tensor
    forces: torch.Tensor  # Cartesian model forces
    stress: torch.Tensor | None
    row_forces: torch.Tensor  # generalized forces, zero on fixed atoms and non-finite rows
    fmax: torch.Tensor  # detached
    bad: torch.Tensor  # detached bool: blew up


@dataclass(frozen=True)
class Status:
    """Per structure: steps taken, converged, blew up, and the last max row force."""

    n_steps: torch.Tensor
    converged: torch.Tensor
    blew_up: torch.Tensor
    fmax: torch.Tensor

    def done(self, max_steps: int) -> torch.Tensor:
        return self.converged | self.blew_up | (self.n_steps >= max_steps)


@dataclass(frozen=True)
class Carry:
    """What one iteration changes."""

    state: GDState | FireState | LBFGSState
    ev: PointEval
    status: Status
    topology: Topology = field(compare=False)


def evaluate_at(prob: Problem, batch: Batch, rows: torch.Tensor, prepared: Any) -> PointEval:
    """Energies and forces at ``batch``; generalized (row) forces, fmax and blow-ups per structure."""
    out = energy_and_forces(prob.model, batch, prepared, create_graph=prob.create_graph,
                            compute_stress=prob.cell is not None)
    forces = out.forces
    if prob.cell is not None:
        gen = cellmod.generalized_forces(prob.cell, batch, rows, forces, out.stress)
    else:
        gen = forces
    gen = torch.where(prob.free_rows[:, None], gen, torch.zeros_like(gen))
    g = gen.detach()
    finite_rows = torch.isfinite(g).all(-1)
    n_sys = prob.n_systems
    nonfinite = torch.zeros(n_sys, device=g.device).index_add(0, prob.row_system, (~finite_rows).float()) > 0
    atom_norm = torch.linalg.vector_norm(forces.detach(), dim=-1)
    atom_norm = torch.where(torch.isfinite(atom_norm), atom_norm, torch.full_like(atom_norm, math.inf))
    huge = per_system_max(atom_norm, batch.system_idx, n_sys) > prob.config.blowup_force
    bad = nonfinite | huge | ~torch.isfinite(out.energy.detach())
    gen = torch.where(finite_rows[:, None], gen, torch.zeros_like(gen))
    row_norm = torch.linalg.vector_norm(gen.detach(), dim=-1)
    fmax = per_system_max(row_norm, prob.row_system, n_sys).clamp_min(0.0)
    return PointEval(energy=out.energy, forces=forces, stress=out.stress, row_forces=gen, fmax=fmax, bad=bad)


def initial_status(prob: Problem, ev: PointEval) -> Status:
    """0 steps; converged where the start already is (as ASE counts it)."""
    n = prob.n_systems
    return Status(n_steps=torch.zeros(n, dtype=torch.long, device=ev.fmax.device),
                   converged=(ev.fmax < prob.config.fmax) & ~ev.bad, blew_up=ev.bad.clone(), fmax=ev.fmax)


def one_step(prob: Problem, carry: Carry) -> Carry:
    """One optimizer step for every structure not done, then energies and forces at the new point."""
    cfg = prob.config
    active = ~carry.status.done(cfg.max_steps)
    forces = carry.ev.row_forces
    if cfg.optimizer == "gd":
        new = gd_step(carry.state, forces, prob.row_system, row_scale=prob.row_scale,
                      max_displacement=cfg.max_displacement, anneal=cfg.anneal, momentum=prob.momentum)
    elif cfg.optimizer == "lbfgs":
        new = lbfgs_step(carry.state, forces, prob.row_system, cfg.lbfgs_params)
    else:
        if prob.row_scale is not None:
            forces = forces * prob.row_scale[:, None]
        new = fire_step(carry.state, forces, prob.row_system, cfg.fire_params)
    state = merge_states(active, new, carry.state, prob.row_system)
    batch = prob.batch_at(state.positions)
    topo = topology.refreshed(prob.model, carry.topology, batch, prob.skin)
    ev = evaluate_at(prob, batch, state.positions, topo.prepared)
    old = carry.status
    fmax = torch.where(active, ev.fmax, old.fmax)
    status = Status(
        n_steps=old.n_steps + active.long(),
        converged=torch.where(active, (ev.fmax < cfg.fmax) & ~ev.bad, old.converged),
        blew_up=torch.where(active, ev.bad, old.blew_up),
        fmax=fmax,
    )
    return Carry(state=state, ev=ev, status=status, topology=topo)


def segment(prob: Problem, carry: Carry, n: int) -> tuple[Carry, list[torch.Tensor]]:
    """Up to ``n`` iterations (fewer once everything is done). Pure: safe to recompute under checkpoint."""
    energies = []
    for _ in range(n):
        if bool(carry.status.done(prob.config.max_steps).all()):
            break
        carry = one_step(prob, carry)
        energies.append(carry.ev.energy.detach())
    return carry, energies


def setup(model, batch, config, step_params, create_graph) -> tuple[Problem, Any, Any]:
    """The problem definition, initial rows and the optimizer's step size (eta for GD, dt0 for FIRE)."""
    values: StepValues | None = step_params(batch.numbers) if step_params is not None else None
    dtype = batch.dtype

    def cast(t):
        if t is None:
            return None
        t = t.to(dtype)
        return t if create_graph else t.detach()

    default = config.eta
    step = cast(values.step_size) if values is not None else default
    momentum = config.momentum
    if values is not None and values.momentum is not None:
        momentum = cast(values.momentum)
    atom_scale = cast(values.atom_scale) if values is not None else None

    cf = cellmod.cell_filter_init(batch, config.pressure) if config.relax_cell else None
    if cf is not None:
        rows = cellmod.initial_rows(batch)
        row_system = cellmod.row_system(batch)
        free = torch.cat([~batch.fixed, torch.ones(3 * batch.n_systems, dtype=torch.bool, device=batch.device)])
        if atom_scale is not None:
            atom_scale = torch.cat([atom_scale, torch.ones(3 * batch.n_systems, dtype=dtype, device=batch.device)])
    else:
        rows, row_system, free = batch.positions, batch.system_idx, ~batch.fixed
    if not create_graph:
        rows = rows.detach()
    base = detached(batch) if cf is not None else batch.replace(cell=batch.cell if create_graph else batch.cell.detach())
    prob = Problem(model=model, config=config, base=base, cell=cf, row_system=row_system, free_rows=free,
                    row_scale=atom_scale, momentum=momentum, create_graph=create_graph,
                    skin=float(model.skin) if model.skin > 0 else None)
    return prob, rows, step


def init_carry(prob: Problem, rows: torch.Tensor, step, prepared) -> Carry:
    """A fresh optimizer state at ``rows``, evaluated (``prepared``: a topology the caller built, or None)."""
    cfg = prob.config
    n = prob.n_systems
    if cfg.optimizer == "gd":
        state = gd_init(rows, n, step)
    elif cfg.optimizer == "lbfgs":
        state = lbfgs_init(rows, n, cfg.lbfgs_params)
    else:
        state = fire_init(rows, n, cfg.fire_params, dt=step)
    batch = prob.batch_at(rows)
    topo = topology.built(prob.model, batch) if prepared is None else topology.given(prepared, batch)
    ev = evaluate_at(prob, batch, rows, topo.prepared)
    return Carry(state=state, ev=ev, status=initial_status(prob, ev), topology=topo)


def to_result(prob: Problem, carry: Carry, trace: list[torch.Tensor] | None) -> RelaxResult:
    """The ``RelaxResult`` of a working batch as it stands."""
    final = prob.batch_at(carry.state.positions)
    st = carry.status
    return RelaxResult(batch=final, energy=carry.ev.energy, forces=carry.ev.forces, stress=carry.ev.stress,
                       n_steps=st.n_steps, converged=st.converged, blew_up=st.blew_up, fmax=st.fmax,
                       energy_trace=torch.stack(trace) if trace is not None else None)


def report_progress(progress, step: int, status: Status, max_steps: int) -> None:
    """``progress(step, n_done, n_total)``, if given."""
    if progress is not None:
        progress(step, int(status.done(max_steps).sum()), int(status.n_steps.shape[0]))


def select_systems(prob: Problem, carry: Carry, keep: torch.Tensor) -> tuple[Problem, Carry]:
    """The working problem restricted to structures ``keep`` (local indices), each keeping its state."""
    atoms, rows = prob.rows_of(keep)
    batch_now = prob.batch_at(carry.state.positions)
    base = prob.base.select(keep)
    cf = prob.cell.select(keep) if prob.cell is not None else None
    row_system = cellmod.row_system(base) if cf is not None else base.system_idx
    new_prob = replace(prob, base=base, cell=cf, row_system=row_system, free_rows=prob.free_rows[rows],
                       row_scale=prob.row_scale[rows] if prob.row_scale is not None else None)
    ev = carry.ev
    new_ev = PointEval(energy=ev.energy[keep], forces=ev.forces[atoms],
                   stress=ev.stress[keep] if ev.stress is not None else None, row_forces=ev.row_forces[rows],
                   fmax=ev.fmax[keep], bad=ev.bad[keep])
    st = carry.status
    new_status = Status(n_steps=st.n_steps[keep], converged=st.converged[keep], blew_up=st.blew_up[keep],
                         fmax=st.fmax[keep])
    topo = topology.selected(prob.model, carry.topology, keep, atoms, batch_now.select(keep))
    return new_prob, Carry(state=select_state(carry.state, keep, rows), ev=new_ev, status=new_status, topology=topo)


def _merged_rows(first: Problem, second: Problem) -> torch.Tensor:
    """Where each row of the merged problem sits in the concatenation of ``first``'s rows and ``second``'s: the
    atoms of both, then (with the cell) the cell rows of both, as ``cell.row_system`` lays them out."""
    dev = first.base.device
    n_first, n_second = first.base.n_atoms, second.base.n_atoms
    if first.cell is None:
        return torch.arange(n_first + n_second, device=dev)
    rows_first = first.row_system.shape[0]
    return torch.cat([torch.arange(n_first, device=dev), rows_first + torch.arange(n_second, device=dev),
                      torch.arange(n_first, rows_first, device=dev),
                      torch.arange(rows_first + n_second, rows_first + second.row_system.shape[0], device=dev)])


def concat_systems(first: Problem, first_carry: Carry, second: Problem, second_carry: Carry) -> tuple[Problem, Carry]:
    """One working problem of ``first``'s structures followed by ``second``'s (same model and configuration),
    each keeping its optimizer state, status and topology. The inverse of ``select_systems``."""
    rows = _merged_rows(first, second)
    base = first.base.concat(second.base)
    cf = None
    if first.cell is not None:
        cf = cellmod.CellFilter(torch.cat([first.cell.reference_cell, second.cell.reference_cell]),
                                torch.cat([first.cell.factor, second.cell.factor]), first.cell.pressure)
    row_scale = None
    if first.row_scale is not None:
        row_scale = torch.cat([first.row_scale, second.row_scale])[rows]
    row_system = cellmod.row_system(base) if cf is not None else base.system_idx
    prob = replace(first, base=base, cell=cf, row_system=row_system,
                   free_rows=torch.cat([first.free_rows, second.free_rows])[rows], row_scale=row_scale)
    a, b = first_carry.ev, second_carry.ev
    ev = PointEval(energy=torch.cat([a.energy, b.energy]), forces=torch.cat([a.forces, b.forces]),
               stress=torch.cat([a.stress, b.stress]) if a.stress is not None else None,
               row_forces=torch.cat([a.row_forces, b.row_forces])[rows], fmax=torch.cat([a.fmax, b.fmax]),
               bad=torch.cat([a.bad, b.bad]))
    status = Status(**{f.name: torch.cat([getattr(first_carry.status, f.name), getattr(second_carry.status, f.name)])
                        for f in dataclasses.fields(Status)})
    state = concat_states(first_carry.state, second_carry.state, rows)
    topo = topology.concatenated(prob.model, first_carry.topology, second_carry.topology,
                                 prob.batch_at(state.positions))
    return prob, Carry(state=state, ev=ev, status=status, topology=topo)


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module):
    """Inference: no autograd bookkeeping for parameter gradients (~12% of a CHGNet E+F), restored after."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def check_finite(batch: Batch) -> None:
    """Non-finite input coordinates are a data error (raised), unlike blow-ups during the run (flagged)."""
    bad_atoms = ~torch.isfinite(batch.positions.detach()).all(-1)
    bad = torch.zeros(batch.n_systems, dtype=torch.bool, device=batch.device)
    bad[batch.system_idx[bad_atoms]] = True
    bad |= ~torch.isfinite(batch.cell.detach()).reshape(batch.n_systems, -1).all(-1)
    if bad.any():
        raise ValueError(f"structure {int(torch.nonzero(bad)[0])}: non-finite positions or cell")
