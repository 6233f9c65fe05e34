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
  it is done, the others keeping their optimizer state and topology, so finished structures cost nothing.
* ``full``: forces with ``create_graph=True`` at every step; the final positions carry the whole graph.
* ``truncated``: a graph-free pass finds the trajectory, then the last ``truncate_steps`` steps are replayed
  from their stored (detached) start with the graph. Learnable step sizes re-enter that start multiplicatively
  (eta_t = eta_0 * (eta_t / eta_0 detached)); initial positions get no gradient unless the whole relaxation
  fits in the window (then it is ``full``).
* ``checkpoint``: as ``full``, but blocks of ``checkpoint_every`` steps run under
  ``torch.utils.checkpoint`` (``use_reentrant=False``) and are recomputed in the backward pass: memory
  O(k / block + block), same gradient as ``full`` to round-off.

Topology (``relax.topology``): built at the start (positions are never wrapped mid-run). With a model whose
neighbour lists carry a ``skin`` (every shipped adapter: pairs out to the cutoff plus the skin, so the energy is
exact until an atom moved skin / 2), a structure's topology is rebuilt whenever one of its own atoms (or lattice
vectors) moved more than skin / 2 since its last build. The energy is then the model's true energy at every
step, so convergence is judged on true forces and a structure lands where it would alone, whatever else is in
the batch. A model without a skin keeps its topology for the whole call.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.utils.checkpoint

from relaxtune.potentials.base import EnergyModel
from relaxtune.relax.config import RelaxConfig, RelaxResult
from relaxtune.relax.params import StepParameters
from relaxtune.relax.steps import GDState
from relaxtune.relax.working import (Carry, Problem, check_finite, evaluate_at, frozen_parameters, init_carry, one_step,
                                     report_progress, segment, select_systems, setup, to_result)
from relaxtune.state import Batch

GRAD_MODES = ("none", "full", "truncated", "checkpoint")
#: in inference, drop done structures from the working batch once this fraction of it is done.
COMPACT_FRACTION = 0.25


def _run_graph(prob, carry, *, block: int | None, record_trace: bool, progress) -> tuple[Carry, list | None]:
    trace = [carry.ev.energy.detach()] if record_trace else None
    step = 0
    max_steps = prob.config.max_steps
    while not bool(carry.status.done(max_steps).all()):
        if block is None:
            carry, energies = segment(prob, carry, 1)
        else:
            carry, energies = torch.utils.checkpoint.checkpoint(segment, prob, carry, block, use_reentrant=False)
        step += len(energies)
        if trace is not None:
            trace.extend(energies)
        report_progress(progress, step, carry.status, max_steps)
    return carry, trace


def _reattach(state, step_graph, step_plain):
    """Give a detached optimizer state's step size the graph of the learnable one (multiplicatively)."""
    if not isinstance(step_graph, torch.Tensor) or not step_graph.requires_grad:
        return state
    name = "step_size" if isinstance(state, GDState) else "dt"
    value = getattr(state, name)
    return replace(state, **{name: step_graph * (value / step_plain).detach()})


def _run_truncated(model, batch, config, step_params, prepared, m: int, record_trace, progress) -> RelaxResult:
    plain, rows, step_plain = setup(model, batch, config, step_params, create_graph=False)
    carry = init_carry(plain, rows, step_plain, prepared)
    history: deque[Carry] = deque([carry], maxlen=m + 1)
    trace = [carry.ev.energy] if record_trace else None
    t = 0
    while not bool(carry.status.done(config.max_steps).all()):
        carry = one_step(plain, carry)
        history.append(carry)
        t += 1
        if trace is not None:
            trace.append(carry.ev.energy)
        report_progress(progress, t, carry.status, config.max_steps)
    graph, rows_g, step_graph = setup(model, batch, config, step_params, create_graph=True)
    if t <= m:  # the whole relaxation fits in the window: exactly full BPTT
        carry, _ = _run_graph(graph, init_carry(graph, rows_g, step_graph, prepared), block=None,
                              record_trace=False, progress=None)
        return to_result(graph, carry, trace)
    start = history[0]
    state = _reattach(start.state, step_graph, step_plain)
    batch0 = graph.batch_at(state.positions)
    ev = evaluate_at(graph, batch0, state.positions, start.topology.prepared)
    carry = replace(start, state=state, ev=ev)
    for _ in range(m):
        carry = one_step(graph, carry)
    return to_result(graph, carry, trace)


def _run_inference(prob: Problem, carry: Carry, *, record_trace: bool, progress) -> RelaxResult:
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

    def flush(prob_w: Problem, carry_w: Carry, which: torch.Tensor, ids_w: torch.Tensor) -> None:
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
            prob, carry = select_systems(prob, carry, keep)
            ids = ids[keep]
        carry = one_step(prob, carry)
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
    check_finite(batch)
    if grad_mode == "truncated":
        if not truncate_steps or truncate_steps < 1:
            raise ValueError("grad_mode='truncated' needs truncate_steps >= 1")
        return _run_truncated(model, batch, config, step_params, prepared, int(truncate_steps), record_trace,
                              progress)
    if grad_mode == "checkpoint" and (not checkpoint_every or checkpoint_every < 1):
        raise ValueError("grad_mode='checkpoint' needs checkpoint_every >= 1")
    create_graph = grad_mode != "none"
    if grad_mode == "none":
        with frozen_parameters(model):
            prob, rows, step = setup(model, batch, config, step_params, create_graph)
            carry = init_carry(prob, rows, step, prepared)
            return _run_inference(prob, carry, record_trace=record_trace, progress=progress)
    prob, rows, step = setup(model, batch, config, step_params, create_graph)
    carry = init_carry(prob, rows, step, prepared)
    block = checkpoint_every if grad_mode == "checkpoint" else None
    carry, trace = _run_graph(prob, carry, block=block, record_trace=record_trace, progress=progress)
    return to_result(prob, carry, trace)
