"""The model's topology (neighbour lists, graphs) of a working batch, rebuilt per structure as atoms move.

A model with a neighbour-list ``skin`` lists pairs out to its cutoff plus the skin, so its energy stays exact
until an atom has moved skin / 2 since the list was built. ``refreshed`` rebuilds a structure's part when one of
*its own* atoms (or lattice vectors) moved that far since *its* last build, so what a structure's energy is, and
when its graph changes, never depends on what else shares the batch. Models that split ``prepare`` per structure
(``EnergyModel.prepare_parts``) rebuild only those structures and keep the others' parts, also when structures
leave (``selected``) or join (``concatenated``) the batch; other models rebuild the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from relaxtune.potentials.base import EnergyModel
from relaxtune.state import Batch, per_system_max


@dataclass(frozen=True)
class Topology:
    """A working batch's topology and where each structure stood when its part was built."""

    prepared: Any  # what ``model.energy`` takes
    parts: tuple[Any, ...] | None  # per structure (``model.prepare_parts``); None: built for the whole batch
    positions: torch.Tensor  # (n_atoms, 3) detached: each atom where it was at its structure's last build
    cell: torch.Tensor  # (n_systems, 3, 3) detached, likewise


def detached(batch: Batch) -> Batch:
    """``batch`` without the graph of its positions and cell."""
    return batch.replace(positions=batch.positions.detach(), cell=batch.cell.detach())


def _joined(model: EnergyModel, parts, batch: Batch, positions: torch.Tensor, cell: torch.Tensor) -> Topology:
    """The topology of ``batch`` made of its structures' ``parts`` (in order), built where ``positions`` and
    ``cell`` say."""
    parts = tuple(parts)
    return Topology(model.join_parts(parts, detached(batch)), parts, positions, cell)


def built(model: EnergyModel, batch: Batch) -> Topology:
    """The topology of every structure of ``batch``, built now."""
    batch = detached(batch)
    parts = model.prepare_parts(batch)
    if parts is None:
        return Topology(model.prepare(batch), None, batch.positions, batch.cell)
    return _joined(model, parts, batch, batch.positions, batch.cell)


def given(prepared: Any, batch: Batch) -> Topology:
    """A topology the caller built for the whole of ``batch`` (at its current positions)."""
    return Topology(prepared, None, batch.positions.detach(), batch.cell.detach())


def stale(topology: Topology, batch: Batch, skin: float) -> torch.Tensor:
    """(n_systems,) bool: the structures with an atom or a lattice vector moved more than skin / 2 since their
    part was built."""
    pos, cell = batch.positions.detach(), batch.cell.detach()
    moved = per_system_max(torch.linalg.vector_norm(pos - topology.positions, dim=-1), batch.system_idx,
                           batch.n_systems)
    strained = torch.linalg.vector_norm(cell - topology.cell, dim=-1).amax(dim=-1)
    return torch.maximum(moved, strained) > 0.5 * skin


def refreshed(model: EnergyModel, topology: Topology, batch: Batch, skin: float | None) -> Topology:
    """``topology`` with the stale structures rebuilt at ``batch``'s positions (no skin: kept as it is)."""
    if not skin:
        return topology
    rebuild = stale(topology, batch, skin)
    if not bool(rebuild.any()):
        return topology
    if topology.parts is None:
        return built(model, batch)
    which = torch.nonzero(rebuild).flatten()
    fresh = model.prepare_parts(detached(batch.select(which)))
    parts = list(topology.parts)
    for k, part in zip(which.tolist(), fresh):
        parts[k] = part
    moved_atoms = rebuild[batch.system_idx][:, None]
    positions = torch.where(moved_atoms, batch.positions.detach(), topology.positions)
    cell = torch.where(rebuild[:, None, None], batch.cell.detach(), topology.cell)
    return _joined(model, parts, batch, positions, cell)


def selected(model: EnergyModel, topology: Topology, keep: torch.Tensor, atoms: torch.Tensor,
             batch: Batch) -> Topology:
    """The topology of structures ``keep`` (atoms ``atoms``) of a working batch, ``batch`` being them now."""
    if topology.parts is None:
        return built(model, batch)
    return _joined(model, [topology.parts[k] for k in keep.tolist()], batch, topology.positions[atoms],
                   topology.cell[keep])


def concatenated(model: EnergyModel, first: Topology, second: Topology, batch: Batch) -> Topology:
    """The topology of ``first``'s structures followed by ``second``'s, ``batch`` being all of them now."""
    if first.parts is None or second.parts is None:
        return built(model, batch)
    return _joined(model, first.parts + second.parts, batch, torch.cat([first.positions, second.positions]),
                   torch.cat([first.cell, second.cell]))
