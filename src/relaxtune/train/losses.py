"""Structure losses between a relaxed structure and its DFT reference, per structure.

``Dq = sqrt(sum_j m_j |x*_j - x^_j|^2)`` (masses in amu, positions in Å, so Dq is in sqrt(amu)·Å), RMSD and max
displacement (Å), all on minimum-image displacements: under periodic boundaries an atom that crossed the cell
face is compared with the nearest image of its reference. The image shift is an integer choice computed on
detached values (it is piecewise constant), the displacement itself stays differentiable in the positions.
Optional energy and force terms serve the conventional (energies and forces) objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from relaxtune.state import Batch, per_system_max, per_system_sum


def minimum_image_displacement(
    positions: torch.Tensor,
    reference: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
) -> torch.Tensor:
    """``positions - reference`` (n_atoms, 3) wrapped to the nearest periodic image along periodic axes.

    The wrap ``round(frac)`` is taken from detached values, so the result is differentiable in ``positions``
    (and ``reference``) with the same derivative as the plain difference.
    """
    diff = positions - reference
    cell_a = cell[system_idx].to(diff.dtype)  # (n_atoms, 3, 3)
    with torch.no_grad():
        frac = torch.linalg.solve(cell_a.transpose(1, 2), diff.detach().unsqueeze(-1)).squeeze(-1)
        periodic = pbc[system_idx].to(diff.dtype)
        shift = torch.round(frac) * periodic
    return diff - torch.einsum("ak,akl->al", shift, cell_a.detach())


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a finite gradient at 0 (a structure exactly on its reference gets zero gradient, not NaN)."""
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, torch.sqrt(safe), torch.zeros_like(x))


def _free(batch: Batch) -> torch.Tensor:
    return (~batch.fixed).to(batch.positions.dtype)


def dq(batch: Batch, reference_positions: torch.Tensor) -> torch.Tensor:
    """Mass-weighted distance per structure (n_systems,), sqrt(amu)·Å, over all atoms (fixed ones add 0
    when they sit on their reference)."""
    d = minimum_image_displacement(batch.positions, reference_positions, batch.cell, batch.pbc, batch.system_idx)
    sq = batch.masses.to(d.dtype) * (d * d).sum(-1)
    return _safe_sqrt(per_system_sum(sq, batch.system_idx, batch.n_systems))


def rmsd(batch: Batch, reference_positions: torch.Tensor) -> torch.Tensor:
    """Root-mean-square displacement per structure (n_systems,), Å."""
    d = minimum_image_displacement(batch.positions, reference_positions, batch.cell, batch.pbc, batch.system_idx)
    sq = per_system_sum((d * d).sum(-1), batch.system_idx, batch.n_systems)
    n = batch.n_atoms_per_system.to(d.dtype)
    return _safe_sqrt(sq / n)


def max_displacement(batch: Batch, reference_positions: torch.Tensor) -> torch.Tensor:
    """Largest per-atom displacement per structure (n_systems,), Å."""
    d = minimum_image_displacement(batch.positions, reference_positions, batch.cell, batch.pbc, batch.system_idx)
    return per_system_max(_safe_sqrt((d * d).sum(-1)), batch.system_idx, batch.n_systems)


def stress_loss(stress: torch.Tensor, reference_stress: torch.Tensor) -> torch.Tensor:
    """Mean squared stress error per structure (n_systems,), GPa^2, from (n_systems, 3, 3) stresses in eV/Å^3."""
    from ase.units import GPa

    err = (stress - reference_stress.to(stress.dtype)) / GPa
    return (err * err).mean(dim=(-2, -1))


def energy_loss(energy: torch.Tensor, reference_energy: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
    """Squared energy error per atom per structure (n_systems,), (eV/atom)^2. NaN references count 0."""
    err = (energy - reference_energy.to(energy.dtype)) / n_atoms.to(energy.dtype)
    err = torch.where(torch.isfinite(reference_energy.to(energy.dtype)), err, torch.zeros_like(err))
    return err * err


def force_loss(
    forces: torch.Tensor, reference_forces: torch.Tensor, system_idx: torch.Tensor, n_systems: int,
    fixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared force-component error per structure (n_systems,), (eV/Å)^2, over free atoms."""
    err = ((forces - reference_forces.to(forces.dtype)) ** 2).sum(-1)
    free = torch.ones_like(err) if fixed is None else (~fixed).to(err.dtype)
    total = per_system_sum(err * free, system_idx, n_systems)
    count = per_system_sum(free, system_idx, n_systems).clamp_min(1.0)
    return total / (3.0 * count)


@dataclass(frozen=True)
class StructureLossWeights:
    """Weights of the terms of the structure objective. ``dq`` is the reference method's loss."""

    dq: float = 1.0
    rmsd: float = 0.0
    energy: float = 0.0
    forces: float = 0.0


def structure_loss(
    batch: Batch,
    reference_positions: torch.Tensor,
    weights: StructureLossWeights = StructureLossWeights(),
    *,
    energy: torch.Tensor | None = None,
    reference_energy: torch.Tensor | None = None,
    forces: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted per-structure loss (n_systems,). Energy/force terms need the model's relaxed energy/forces;
    the force term pulls the model's residual force at its minimum towards the DFT one (zero)."""
    total = torch.zeros(batch.n_systems, dtype=batch.positions.dtype, device=batch.device)
    if weights.dq:
        total = total + weights.dq * dq(batch, reference_positions)
    if weights.rmsd:
        total = total + weights.rmsd * rmsd(batch, reference_positions)
    if weights.energy and energy is not None and reference_energy is not None:
        total = total + weights.energy * energy_loss(energy, reference_energy, batch.n_atoms_per_system)
    if weights.forces and forces is not None:
        zero = torch.zeros_like(forces)
        total = total + weights.forces * force_loss(forces, zero, batch.system_idx, batch.n_systems, batch.fixed)
    return total
