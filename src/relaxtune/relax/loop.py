"""The unrolled relaxation loop: batched, per-structure convergence, differentiable end to end.

One iteration, for every structure not yet done: take an optimizer step (``steps.py``) with the forces at the
current point, evaluate energy and forces at the new point, update convergence (fmax over free atoms, and with
the cell the cell rows as in ASE's FrechetCellFilter). A structure is done when it converged, blew up
(non-finite energy/forces or |F| > ``blowup_force``) or reached ``max_steps``; done structures are frozen
with ``torch.where`` (their coordinates and optimizer state stop changing) while the rest continue.
Step counts follow ASE: a structure converged at the start takes 0 steps; energy and forces are evaluated
n_steps + 1 times.

Gradient modes (``grad_mode``):

* ``none``: inference. No graph; structures that are done are dropped from the working batch once a quarter of
  it is done (the model is re-prepared on the smaller batch, or ``model.select_prepared(prepared, idx)`` is
  used if the model has it), so finished structures cost nothing.
* ``full``: forces with ``create_graph=True`` at every step; the final positions carry the whole graph.
* ``truncated``: a graph-free pass finds the trajectory, then the last ``truncate_steps`` steps are replayed
  from their stored (detached) start with the graph. Learnable step sizes re-enter that start multiplicatively
  (eta_t = eta_0 * (eta_t / eta_0 detached)); initial positions get no gradient unless the whole relaxation
  fits in the window (then it is ``full``).
* ``checkpoint``: as ``full``, but blocks of ``checkpoint_every`` steps run under
  ``torch.utils.checkpoint`` (``use_reentrant=False``) and are recomputed in the backward pass: memory
  O(k / block + block), same gradient as ``full`` to round-off.

Topology: ``model.prepare`` runs at the start (positions are never wrapped mid-run). A model with a
neighbour-list ``skin`` attribute (Å: every shipped adapter lists pairs out to its cutoff plus the skin, so the
energy is exact until an atom moved skin / 2) is re-prepared whenever an atom (or a lattice vector) moved more
than skin / 2 since the last prepare. The energy is then the model's true energy at every step, so convergence
is judged on true forces and a structure lands where it would alone, whatever else is in the batch. A model
without a skin keeps its topology for the whole call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.utils.checkpoint

from relaxtune.potentials.base import EnergyModel, energy_and_forces
from relaxtune.relax import cell as cellmod
from relaxtune.relax.params import StepParameters, StepValues
from relaxtune.relax.steps import (FireParams, FireState, GDState, LBFGSParams, fire_init, fire_step, gd_init,
                                   gd_step, lbfgs_init, lbfgs_step, concat_states, merge_states,
                                   select_state)
from relaxtune.state import Batch, per_system_max

GRAD_MODES = ("none", "full", "truncated", "checkpoint")
#: relaxation optimizers; L-BFGS only without a graph (its history is not differentiated)
OPTIMIZERS = ("fire", "gd", "lbfgs")
#: in inference, drop done structures from the working batch once this fraction of it is done.
COMPACT_FRACTION = 0.25


@dataclass(frozen=True)
class RelaxConfig(FireParams):
    """How to relax. FIRE parameters (inherited from ``FireParams``) are ASE's defaults; ``step_size`` etc. are
    for gradient descent."""

    optimizer: str = "fire"  # "fire" | "gd" | "lbfgs"
    fmax: float = 0.05  # eV/Å; converged when max row force < fmax (strict, as ASE)
    max_steps: int = 500
    relax_cell: bool = False
    pressure: float = 0.0  # eV/Å^3, target pressure with relax_cell
    # gradient descent
    step_size: float = 0.02  # Å²/eV
    max_displacement: float | None = 0.2  # Å per atom per step (smooth cap), None = no cap
    anneal: float = 1.0  # eta multiplied by this every step
    momentum: float = 0.0
    # L-BFGS (ASE's defaults; its step is capped by ``maxstep`` too)
    memory: int = 100
    alpha: float = 70.0  # eV/Å², initial Hessian
    # safety
    blowup_force: float = 1e3  # eV/Å

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.fmax <= 0 or self.max_steps < 0:
            raise ValueError("fmax must be > 0 and max_steps >= 0")
        if self.step_size <= 0 or self.dt <= 0 or self.maxstep <= 0:
            raise ValueError("step_size, dt and maxstep must be positive")
        if self.max_displacement is not None and self.max_displacement <= 0:
            raise ValueError("max_displacement must be positive or None")

    @staticmethod
    def step_field(optimizer: str) -> str:
        """The field that is the step size η for ``optimizer``: GD's ``step_size`` (Å²/eV) or FIRE's initial
        ``dt``; so that one option (``--step-size``) can set either."""
        return "step_size" if optimizer == "gd" else "dt"

    @property
    def eta(self) -> float:
        """This configuration's step size η (see ``step_field``)."""
        return getattr(self, self.step_field(self.optimizer))

    @property
    def lbfgs_params(self) -> LBFGSParams:
        return LBFGSParams(maxstep=self.maxstep, memory=self.memory, alpha=self.alpha)

    @property
    def fire_params(self) -> FireParams:
        return FireParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FireParams)})


@dataclass(frozen=True)
class RelaxResult:
    batch: Batch  # final structures (positions/cell carry the graph when training)
    energy: torch.Tensor  # (n_systems,) eV, at the final structures
    forces: torch.Tensor  # (n_atoms, 3) eV/Å, model forces at the final structures (fixed atoms included)
    stress: torch.Tensor | None  # (n_systems, 3, 3) eV/Å^3 with relax_cell, else None
    n_steps: torch.Tensor  # (n_systems,) long, optimizer steps taken
    converged: torch.Tensor  # (n_systems,) bool
    blew_up: torch.Tensor  # (n_systems,) bool
    fmax: torch.Tensor  # (n_systems,) final max row force (the convergence measure)
    energy_trace: torch.Tensor | None = None  # (n_evaluations, n_systems) when record_trace


# ---------------------------------------------------------------------------------------------- internals
@dataclass(frozen=True)
class _Problem:
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
class _Eval:
    energy: torch.Tensor
    forces: torch.Tensor  # Cartesian model forces
    stress: torch.Tensor | None
    row_forces: torch.Tensor  # generalized forces, zero on fixed atoms and non-finite rows
    fmax: torch.Tensor  # detached
    bad: torch.Tensor  # detached bool: blew up


@dataclass(frozen=True)
class _Status:
    n_steps: torch.Tensor
    converged: torch.Tensor
    blew_up: torch.Tensor
    fmax: torch.Tensor

    def done(self, max_steps: int) -> torch.Tensor:
        return self.converged | self.blew_up | (self.n_steps >= max_steps)


@dataclass(frozen=True)
class _Carry:
    state: GDState | FireState
    ev: _Eval
    status: _Status
    prepared: Any = field(compare=False)
    anchor: tuple[torch.Tensor, torch.Tensor]  # detached positions and cell at the last prepare


def _detached(batch: Batch) -> Batch:
    return batch.replace(positions=batch.positions.detach(), cell=batch.cell.detach())


def _evaluate(prob: _Problem, batch: Batch, rows: torch.Tensor, prepared: Any) -> _Eval:
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
    return _Eval(energy=out.energy, forces=forces, stress=out.stress, row_forces=gen, fmax=fmax, bad=bad)


def _initial_status(prob: _Problem, ev: _Eval) -> _Status:
    n = prob.n_systems
    return _Status(n_steps=torch.zeros(n, dtype=torch.long, device=ev.fmax.device),
                   converged=(ev.fmax < prob.config.fmax) & ~ev.bad, blew_up=ev.bad.clone(), fmax=ev.fmax)


def _maybe_reprepare(prob: _Problem, batch: Batch, prepared: Any, anchor):
    if not prob.skin:
        return prepared, anchor
    pos, cell = batch.positions.detach(), batch.cell.detach()
    moved = torch.linalg.vector_norm(pos - anchor[0], dim=-1).max() if pos.shape[0] else pos.new_zeros(())
    strained = torch.linalg.vector_norm(cell - anchor[1], dim=-1).max()
    if max(moved.item(), strained.item()) <= 0.5 * prob.skin:
        return prepared, anchor
    return prob.model.prepare(_detached(batch)), (pos, cell)


def _one_step(prob: _Problem, carry: _Carry) -> _Carry:
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
    prepared, anchor = _maybe_reprepare(prob, batch, carry.prepared, carry.anchor)
    ev = _evaluate(prob, batch, state.positions, prepared)
    old = carry.status
    fmax = torch.where(active, ev.fmax, old.fmax)
    status = _Status(
        n_steps=old.n_steps + active.long(),
        converged=torch.where(active, (ev.fmax < cfg.fmax) & ~ev.bad, old.converged),
        blew_up=torch.where(active, ev.bad, old.blew_up),
        fmax=fmax,
    )
    return _Carry(state=state, ev=ev, status=status, prepared=prepared, anchor=anchor)


def _segment(prob: _Problem, carry: _Carry, n: int) -> tuple[_Carry, list[torch.Tensor]]:
    """Up to ``n`` iterations (fewer once everything is done). Pure: safe to recompute under checkpoint."""
    energies = []
    for _ in range(n):
        if bool(carry.status.done(prob.config.max_steps).all()):
            break
        carry = _one_step(prob, carry)
        energies.append(carry.ev.energy.detach())
    return carry, energies


def _setup(model, batch, config, step_params, create_graph) -> tuple[_Problem, Any, Any]:
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
    skin = getattr(model, "skin", None)
    base = _detached(batch) if cf is not None else batch.replace(cell=batch.cell if create_graph else batch.cell.detach())
    prob = _Problem(model=model, config=config, base=base, cell=cf, row_system=row_system, free_rows=free,
                    row_scale=atom_scale, momentum=momentum, create_graph=create_graph,
                    skin=float(skin) if isinstance(skin, (int, float)) and skin > 0 else None)
    return prob, rows, step


def _init_carry(prob: _Problem, rows: torch.Tensor, step, prepared) -> _Carry:
    cfg = prob.config
    n = prob.n_systems
    if cfg.optimizer == "gd":
        state = gd_init(rows, n, step)
    elif cfg.optimizer == "lbfgs":
        state = lbfgs_init(rows, n, cfg.lbfgs_params)
    else:
        state = fire_init(rows, n, cfg.fire_params, dt=step)
    batch = prob.batch_at(rows)
    if prepared is None:
        prepared = prob.model.prepare(_detached(batch))
    ev = _evaluate(prob, batch, rows, prepared)
    anchor = (batch.positions.detach(), batch.cell.detach())
    return _Carry(state=state, ev=ev, status=_initial_status(prob, ev), prepared=prepared, anchor=anchor)


def _result(prob: _Problem, carry: _Carry, trace: list[torch.Tensor] | None) -> RelaxResult:
    final = prob.batch_at(carry.state.positions)
    st = carry.status
    return RelaxResult(batch=final, energy=carry.ev.energy, forces=carry.ev.forces, stress=carry.ev.stress,
                       n_steps=st.n_steps, converged=st.converged, blew_up=st.blew_up, fmax=st.fmax,
                       energy_trace=torch.stack(trace) if trace is not None else None)


def _report(progress, step: int, status: _Status, max_steps: int) -> None:
    if progress is not None:
        progress(step, int(status.done(max_steps).sum()), int(status.n_steps.shape[0]))


# ---------------------------------------------------------------------------------------------- drivers
def _run_graph(prob, carry, *, block: int | None, record_trace: bool, progress) -> tuple[_Carry, list | None]:
    trace = [carry.ev.energy.detach()] if record_trace else None
    step = 0
    max_steps = prob.config.max_steps
    while not bool(carry.status.done(max_steps).all()):
        if block is None:
            carry, energies = _segment(prob, carry, 1)
        else:
            carry, energies = torch.utils.checkpoint.checkpoint(_segment, prob, carry, block, use_reentrant=False)
        step += len(energies)
        if trace is not None:
            trace.extend(energies)
        _report(progress, step, carry.status, max_steps)
    return carry, trace


def _reattach(state, step_graph, step_plain):
    """Give a detached optimizer state's step size the graph of the learnable one (multiplicatively)."""
    if not isinstance(step_graph, torch.Tensor) or not step_graph.requires_grad:
        return state
    name = "step_size" if isinstance(state, GDState) else "dt"
    value = getattr(state, name)
    return replace(state, **{name: step_graph * (value / step_plain).detach()})


def _run_truncated(model, batch, config, step_params, prepared, m: int, record_trace, progress) -> RelaxResult:
    plain, rows, step_plain = _setup(model, batch, config, step_params, create_graph=False)
    carry = _init_carry(plain, rows, step_plain, prepared)
    history: deque[_Carry] = deque([carry], maxlen=m + 1)
    trace = [carry.ev.energy] if record_trace else None
    t = 0
    while not bool(carry.status.done(config.max_steps).all()):
        carry = _one_step(plain, carry)
        history.append(carry)
        t += 1
        if trace is not None:
            trace.append(carry.ev.energy)
        _report(progress, t, carry.status, config.max_steps)
    graph, rows_g, step_graph = _setup(model, batch, config, step_params, create_graph=True)
    if t <= m:  # the whole relaxation fits in the window: exactly full BPTT
        carry, _ = _run_graph(graph, _init_carry(graph, rows_g, step_graph, prepared), block=None,
                              record_trace=False, progress=None)
        return _result(graph, carry, trace)
    start = history[0]
    state = _reattach(start.state, step_graph, step_plain)
    batch0 = graph.batch_at(state.positions)
    ev = _evaluate(graph, batch0, state.positions, start.prepared)
    carry = replace(start, state=state, ev=ev)
    for _ in range(m):
        carry = _one_step(graph, carry)
    return _result(graph, carry, trace)


def _run_inference(prob: _Problem, carry: _Carry, *, record_trace: bool, progress) -> RelaxResult:
    """Graph-free loop that drops finished structures from the working batch."""
    cfg = prob.config
    full = prob
    n_total = full.n_systems
    dev = full.base.device
    ids = torch.arange(n_total, device=dev)
    # global outputs, filled as structures finish
    out_pos = full.base.positions.detach().clone()
    out_cell = full.base.cell.detach().clone()
    out_energy = carry.ev.energy.detach().clone()
    out_forces = carry.ev.forces.detach().clone()
    out_stress = carry.ev.stress.detach().clone() if carry.ev.stress is not None else None
    out_steps = carry.status.n_steps.clone()
    out_conv = carry.status.converged.clone()
    out_blew = carry.status.blew_up.clone()
    out_fmax = carry.status.fmax.clone()
    last_energy = out_energy.clone()
    trace = [last_energy.clone()] if record_trace else None
    global_atoms = {int(s): sl for s, sl in enumerate(full.base.system_slices())}

    def flush(prob_w: _Problem, carry_w: _Carry, which: torch.Tensor, ids_w: torch.Tensor) -> None:
        """Write the working structures ``which`` (local indices) into the global outputs."""
        if len(which) == 0:
            return
        batch_w = prob_w.batch_at(carry_w.state.positions)
        local = prob_w.base.system_slices()
        for k in which.tolist():
            g = int(ids_w[k])
            gsl, lsl = global_atoms[g], local[k]
            out_pos[gsl] = batch_w.positions[lsl]
            out_forces[gsl] = carry_w.ev.forces[lsl]
            out_cell[g] = batch_w.cell[k]
            out_energy[g] = carry_w.ev.energy[k]
            if out_stress is not None:
                out_stress[g] = carry_w.ev.stress[k]
            out_steps[g] = carry_w.status.n_steps[k]
            out_conv[g] = carry_w.status.converged[k]
            out_blew[g] = carry_w.status.blew_up[k]
            out_fmax[g] = carry_w.status.fmax[k]

    step = 0
    while True:
        done = carry.status.done(cfg.max_steps)
        n_done = int(done.sum())
        if n_done == len(ids):
            flush(prob, carry, torch.arange(len(ids), device=dev), ids)
            break
        if n_done > 0 and n_done >= COMPACT_FRACTION * len(ids):
            flush(prob, carry, torch.nonzero(done).flatten(), ids)
            keep = torch.nonzero(~done).flatten()
            prob, carry = _select(prob, carry, keep)
            ids = ids[keep]
        carry = _one_step(prob, carry)
        step += 1
        last_energy[ids] = carry.ev.energy.detach()
        if trace is not None:
            trace.append(last_energy.clone())
        if progress is not None:
            n_finished = n_total - len(ids) + int(carry.status.done(cfg.max_steps).sum())
            progress(step, n_finished, n_total)
    final = full.base.replace(positions=out_pos, cell=out_cell)
    return RelaxResult(batch=final, energy=out_energy, forces=out_forces, stress=out_stress, n_steps=out_steps,
                       converged=out_conv, blew_up=out_blew, fmax=out_fmax,
                       energy_trace=torch.stack(trace) if trace is not None else None)


def _select(prob: _Problem, carry: _Carry, keep: torch.Tensor) -> tuple[_Problem, _Carry]:
    """The working problem restricted to structures ``keep`` (local indices), re-prepared."""
    atoms, rows = prob.rows_of(keep)
    batch_now = prob.batch_at(carry.state.positions)
    base = prob.base.select(keep)
    cf = prob.cell.select(keep) if prob.cell is not None else None
    row_system = cellmod.row_system(base) if cf is not None else base.system_idx
    new_prob = replace(prob, base=base, cell=cf, row_system=row_system, free_rows=prob.free_rows[rows],
                       row_scale=prob.row_scale[rows] if prob.row_scale is not None else None)
    ev = carry.ev
    new_ev = _Eval(energy=ev.energy[keep], forces=ev.forces[atoms],
                   stress=ev.stress[keep] if ev.stress is not None else None, row_forces=ev.row_forces[rows],
                   fmax=ev.fmax[keep], bad=ev.bad[keep])
    st = carry.status
    new_status = _Status(n_steps=st.n_steps[keep], converged=st.converged[keep], blew_up=st.blew_up[keep],
                         fmax=st.fmax[keep])
    sub_batch = _detached(batch_now.select(keep))
    selector = getattr(prob.model, "select_prepared", None)
    prepared = selector(carry.prepared, keep) if selector is not None else prob.model.prepare(sub_batch)
    return new_prob, _Carry(state=select_state(carry.state, keep, rows), ev=new_ev, status=new_status,
                            prepared=prepared, anchor=(sub_batch.positions, sub_batch.cell))


def _merged_rows(first: _Problem, second: _Problem) -> torch.Tensor:
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


def _concat(first: _Problem, first_carry: _Carry, second: _Problem, second_carry: _Carry) -> tuple[_Problem, _Carry]:
    """One working problem of ``first``'s structures followed by ``second``'s (same model and configuration),
    each keeping its optimizer state and status; re-prepared on the merged batch. The inverse of ``_select``."""
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
    ev = _Eval(energy=torch.cat([a.energy, b.energy]), forces=torch.cat([a.forces, b.forces]),
               stress=torch.cat([a.stress, b.stress]) if a.stress is not None else None,
               row_forces=torch.cat([a.row_forces, b.row_forces])[rows], fmax=torch.cat([a.fmax, b.fmax]),
               bad=torch.cat([a.bad, b.bad]))
    status = _Status(**{f.name: torch.cat([getattr(first_carry.status, f.name), getattr(second_carry.status, f.name)])
                        for f in dataclasses.fields(_Status)})
    state = concat_states(first_carry.state, second_carry.state, rows)
    batch = _detached(prob.batch_at(state.positions))
    return prob, _Carry(state=state, ev=ev, status=status, prepared=prob.model.prepare(batch),
                        anchor=(batch.positions, batch.cell))


# ---------------------------------------------------------------------------------------------- public
@contextlib.contextmanager
def _frozen_parameters(model: torch.nn.Module):
    """Inference: no autograd bookkeeping for parameter gradients (~12% of a CHGNet E+F), restored after."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _check_finite(batch: Batch) -> None:
    """Non-finite input coordinates are a data error (raised), unlike blow-ups during the run (flagged)."""
    bad_atoms = ~torch.isfinite(batch.positions.detach()).all(-1)
    bad = torch.zeros(batch.n_systems, dtype=torch.bool, device=batch.device)
    bad[batch.system_idx[bad_atoms]] = True
    bad |= ~torch.isfinite(batch.cell.detach()).reshape(batch.n_systems, -1).all(-1)
    if bad.any():
        raise ValueError(f"structure {int(torch.nonzero(bad)[0])}: non-finite positions or cell")


def relax(model: EnergyModel, batch: Batch, config: RelaxConfig = RelaxConfig(), *,
          step_params: StepParameters | None = None, grad_mode: str = "none", truncate_steps: int | None = None,
          checkpoint_every: int | None = None, prepared: Any = None, record_trace: bool = False,
          progress: Callable[[int, int, int], None] | None = None) -> RelaxResult:
    """Relax every structure of ``batch`` with ``model`` (see the module docstring for the modes).

    ``prepared``: the model's topology for ``batch`` if already built. ``progress(step, n_done, n_total)`` is
    called after every iteration (every block with ``checkpoint``). ``record_trace`` returns the energies at
    every evaluation, (n_iterations + 1, n_systems); finished structures repeat their last energy.
    Works the same inside ``torch.no_grad()`` (forces need autograd; with ``grad_mode="none"`` nothing returned
    carries a graph).
    """
    with torch.enable_grad():  # forces are autograd: also when called under torch.no_grad()
        return _relax(model, batch, config, step_params, grad_mode, truncate_steps, checkpoint_every, prepared,
                      record_trace, progress)


def _relax(model, batch, config, step_params, grad_mode, truncate_steps, checkpoint_every, prepared, record_trace,
           progress) -> RelaxResult:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES} (implicit/hybrid live in relax.implicit), "
                         f"got {grad_mode!r}")
    if batch.n_systems == 0:
        raise ValueError("empty batch")
    if config.optimizer == "lbfgs" and grad_mode != "none":
        raise ValueError(f"optimizer lbfgs relaxes without a graph (grad_mode none, or the implicit gradient); "
                         f"grad_mode {grad_mode!r} needs fire or gd")
    model.check_supported(batch)
    _check_finite(batch)
    if grad_mode == "truncated":
        if not truncate_steps or truncate_steps < 1:
            raise ValueError("grad_mode='truncated' needs truncate_steps >= 1")
        return _run_truncated(model, batch, config, step_params, prepared, int(truncate_steps), record_trace,
                              progress)
    if grad_mode == "checkpoint" and (not checkpoint_every or checkpoint_every < 1):
        raise ValueError("grad_mode='checkpoint' needs checkpoint_every >= 1")
    create_graph = grad_mode != "none"
    if grad_mode == "none":
        with _frozen_parameters(model):
            prob, rows, step = _setup(model, batch, config, step_params, create_graph)
            carry = _init_carry(prob, rows, step, prepared)
            return _run_inference(prob, carry, record_trace=record_trace, progress=progress)
    prob, rows, step = _setup(model, batch, config, step_params, create_graph)
    carry = _init_carry(prob, rows, step, prepared)
    block = checkpoint_every if grad_mode == "checkpoint" else None
    carry, trace = _run_graph(prob, carry, block=block, record_trace=record_trace, progress=progress)
    return _result(prob, carry, trace)
