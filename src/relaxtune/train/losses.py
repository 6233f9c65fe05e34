"""Training losses per structure: the structure loss (Dq and RMSD of ``relaxtune.metrics`` to the DFT-relaxed
structure) and the energy, force and stress terms of DFT frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ase.units import GPa

from relaxtune.metrics import dq, rmsd
from relaxtune.state import Batch, per_system_sum


def stress_loss(stress: torch.Tensor, reference_stress: torch.Tensor) -> torch.Tensor:
    """Mean squared stress error per structure (n_systems,), GPa^2, from (n_systems, 3, 3) stresses in eV/Å^3."""
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
