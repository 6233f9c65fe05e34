"""In-flight batching for inference relaxations: relax many structures through a working batch kept full.

``relax_stream`` holds at most ``max_structures`` structures (and ``max_atoms`` atoms) in one working batch and
steps them together with the iteration of ``relaxtune.relax.working`` (no graph). Whenever structures finish (converged,
blew up or reached ``max_steps``) they are handed out, in completion order with their input index, and the next
input structures take their place, so a few slow structures never leave the batch nearly empty. A newcomer
starts with a fresh optimizer state and 0 steps, as if relaxed alone; the others keep theirs. With a model that
has a neighbour-list skin every structure's energy is exact at every step, so a structure lands where ``relax``
of that structure alone lands, whatever shares the batch with it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from ase import Atoms

from relaxtune.potentials.base import EnergyModel
from relaxtune.relax.config import RelaxConfig
from relaxtune.relax.working import (Carry, Problem, check_finite, concat_systems, frozen_parameters, init_carry,
                                     one_step, select_systems, setup)
from relaxtune.state import Batch


@dataclass(frozen=True)
class RelaxedStructure:
    """One finished relaxation, detached, float64 numpy on the CPU."""

    atoms: Atoms  # relaxed positions and cell (numbers, pbc and FixAtoms as the input)
    energy: float  # eV
    forces: np.ndarray  # (n_atoms, 3) eV/Å, model forces (fixed atoms included)
    stress: np.ndarray | None  # (3, 3) eV/Å^3 with relax_cell, else None
    n_steps: int
    converged: bool
    blew_up: bool
    fmax: float  # final max row force (the convergence measure)


@dataclass(frozen=True)
class StreamProgress:
    """What ``relax_stream`` reports after every step of its working batch."""

    step: int  # steps of the working batch so far
    n_finished: int  # structures handed out so far
    n_total: int
    n_structures: int  # structures in the working batch during this step
    n_atoms: int  # their atoms


@dataclass(frozen=True)
class _Working:
    """The structures in flight: their problem, loop state and input indices."""

    problem: Problem
    carry: Carry
    ids: tuple[int, ...]


@contextlib.contextmanager
def _inference(model: EnergyModel):
    """As ``relax(grad_mode="none")``: forces by autograd, no parameter gradients. Entered around each piece of
    work, never across a ``yield``, so that the caller's grad mode and parameters are untouched."""
    with torch.enable_grad(), frozen_parameters(model):
        yield


def relax_stream(model: EnergyModel, structures: Sequence[Atoms], config: RelaxConfig = RelaxConfig(), *,
                 max_structures: int = 16, max_atoms: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu",
                 progress: Callable[[StreamProgress], None] | None = None) -> Iterator[tuple[int, RelaxedStructure]]:
    """Relax ``structures`` with at most ``max_structures`` structures and ``max_atoms`` atoms in flight (a
    structure larger than ``max_atoms`` runs alone); yields ``(input index, RelaxedStructure)`` as each one
    finishes, every index exactly once. The inputs are checked (supported elements, finite coordinates) before
    anything is relaxed; errors name the input index ("structure k: ...")."""
    if max_structures < 1:
        raise ValueError(f"max_structures must be >= 1, got {max_structures}")
    if max_atoms is not None and max_atoms < 1:
        raise ValueError(f"max_atoms must be >= 1 or None, got {max_atoms}")
    if len(structures) > 0:
        everything = Batch.from_atoms(list(structures), dtype=dtype)
        model.check_supported(everything)
        check_finite(everything)
    return _stream(model, structures, config, max_structures, max_atoms, dtype, device, progress)


def _stream(model: EnergyModel, structures: Sequence[Atoms], config: RelaxConfig, max_structures: int,
            max_atoms: int | None, dtype: torch.dtype, device: torch.device | str,
            progress: Callable[[StreamProgress], None] | None) -> Iterator[tuple[int, RelaxedStructure]]:
    """The generator behind ``relax_stream``: fill the working batch, hand out what finished, else step."""
    working: _Working | None = None
    next_input = n_finished = step = 0
    while True:
        report = None
        with _inference(model):
            count = _fitting([len(a) for a in structures[next_input: next_input + max_structures]],
                             _size(working), max_structures, max_atoms)
            if count:
                newcomers = _start(model, config, structures, range(next_input, next_input + count), dtype, device)
                working = newcomers if working is None else _join(working, newcomers)
                next_input += count
            if working is None:
                return
            working, finished = _retire(working, config.max_steps)
            if not finished:
                step += 1
                report = StreamProgress(step, n_finished, len(structures), *_size(working))
                working = replace(working, carry=one_step(working.problem, working.carry))
        yield from finished
        n_finished += len(finished)
        if progress is not None and report is not None:
            progress(report)


def _size(working: _Working | None) -> tuple[int, int]:
    """(structures, atoms) in flight."""
    if working is None:
        return 0, 0
    return working.problem.n_systems, working.problem.base.n_atoms


def _fitting(sizes: Sequence[int], held: tuple[int, int], max_structures: int, max_atoms: int | None) -> int:
    """How many of the next structures (atom counts ``sizes``, in input order) join a working batch holding
    ``held`` = (structures, atoms): in order, until one would break a limit. A structure larger than
    ``max_atoms`` joins only an empty batch, and then runs alone."""
    n_structures, n_atoms = held
    count = 0
    for size in sizes:
        if n_structures >= max_structures:
            break
        if max_atoms is not None and n_structures > 0 and n_atoms + size > max_atoms:
            break
        n_structures, n_atoms, count = n_structures + 1, n_atoms + size, count + 1
    return count


def _start(model: EnergyModel, config: RelaxConfig, structures: Sequence[Atoms], ids: range, dtype,
           device) -> _Working:
    """Newcomers as a working batch of their own: fresh optimizer states, evaluated, 0 steps."""
    batch = Batch.from_atoms([structures[i] for i in ids], dtype=dtype, device=device)
    problem, rows, step = setup(model, batch, config, None, create_graph=False)
    return _Working(problem, init_carry(problem, rows, step, None), tuple(ids))


def _join(working: _Working, newcomers: _Working) -> _Working:
    """The working batch with the newcomers appended (everyone keeps their state)."""
    problem, carry = concat_systems(working.problem, working.carry, newcomers.problem, newcomers.carry)
    return _Working(problem, carry, working.ids + newcomers.ids)


def _retire(working: _Working, max_steps: int) -> tuple[_Working | None, list[tuple[int, RelaxedStructure]]]:
    """Take the finished structures out of the working batch: (what is left, or None; the finished ones)."""
    done = working.carry.status.done(max_steps)
    if not bool(done.any()):
        return working, []
    finished = _finished(working, torch.nonzero(done).flatten())
    keep = torch.nonzero(~done).flatten()
    if len(keep) == 0:
        return None, finished
    problem, carry = select_systems(working.problem, working.carry, keep)
    return _Working(problem, carry, tuple(working.ids[k] for k in keep.tolist())), finished


def _finished(working: _Working, which: torch.Tensor) -> list[tuple[int, RelaxedStructure]]:
    """The results of the working structures ``which`` (local indices), with their input indices."""
    carry = working.carry
    batch = working.problem.batch_at(carry.state.positions)
    slices = batch.system_slices()
    status, ev = carry.status, carry.ev
    out = []
    for k, atoms in zip(which.tolist(), batch.select(which).to_atoms()):
        stress = ev.stress[k].detach().cpu().double().numpy() if ev.stress is not None else None
        out.append((working.ids[k], RelaxedStructure(
            atoms=atoms, energy=float(ev.energy[k]), forces=ev.forces[slices[k]].detach().cpu().double().numpy(),
            stress=stress, n_steps=int(status.n_steps[k]), converged=bool(status.converged[k]),
            blew_up=bool(status.blew_up[k]), fmax=float(status.fmax[k]))))
    return out
