"""Self-distillation: the pretrained model's own energies, forces and stress on bulk of the training elements.

Fitting defects moves weights that every structure of those elements shares; without a counterweight the
host's equation of state drifts (bulk Si's lattice constant moved by +1.3% when trained on Si defects alone).
Before training, the run builds strained and rattled copies of the bulk crystals of its elements (the
DFT-relaxed prototypes of ``builtin:crystals`` whose elements all occur in training, plus ASE's reference
lattice of any training element without one) and labels them with the pretrained model; every optimizer step
then fits a few of them, so the fine-tuned model keeps the pretrained bulk wherever the data do not ask for a
change. No DFT is needed, and the labels are exactly what "do no harm" means: the pretrained model's answers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from relaxtune.data.bulk import bulk_prototypes
from relaxtune.potentials.base import EnergyModel, energy_and_forces, single_points
from relaxtune.state import Batch
from relaxtune.train import losses


def perturbed_copies(prototypes: Sequence[Atoms], n_per_prototype: int, seed: int, max_volume_strain: float = 0.03,
                     max_shear: float = 0.01, rattle: float = 0.03) -> list[Atoms]:
    """``n_per_prototype`` copies of each prototype: an isotropic strain spread evenly over ±``max_volume_strain``
    (linear), a random symmetric strain up to ``max_shear`` per component, atoms rattled by ``rattle`` Å."""
    rng = np.random.default_rng([int(seed), 7919])
    out = []
    iso = np.linspace(-max_volume_strain, max_volume_strain, n_per_prototype) if n_per_prototype > 1 else [0.0]
    for proto in prototypes:
        for k, s in enumerate(iso):
            eps = rng.uniform(-max_shear, max_shear, (3, 3))
            eps = 0.5 * (eps + eps.T) + s * np.eye(3)
            atoms = proto.copy()
            atoms.set_cell(proto.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            atoms.positions = atoms.positions + rng.normal(0.0, rattle, atoms.positions.shape)
            atoms.info = {"name": f"{proto.info['name']}~{k}"}
            out.append(atoms)
    return out


def label(model: EnergyModel, structures: Sequence[Atoms], dtype: torch.dtype) -> list[Atoms]:
    """Copies of ``structures`` with ``model``'s energy, forces and stress attached (a SinglePointCalculator each)."""
    energies, forces, stresses = single_points(model, structures, dtype, stress=True)
    out = []
    for atoms, e, f, s in zip(structures, energies, forces, stresses):
        atoms = atoms.copy()
        atoms.calc = SinglePointCalculator(atoms, energy=float(e), forces=f, stress=s)
        out.append(atoms)
    return out


def distillation_set(model: EnergyModel, species: Sequence[str], n_per_prototype: int, seed: int,
                     dtype: torch.dtype) -> list[Atoms]:
    """The labelled structures of a run (module docstring); [] when ``n_per_prototype`` is 0."""
    if n_per_prototype <= 0:
        return []
    structures = perturbed_copies(bulk_prototypes(species), n_per_prototype, seed)
    with torch.no_grad():
        return label(model, structures, dtype)


def distillation_loss(model: EnergyModel, structures: Sequence[Atoms], stress_weight: float, dtype: torch.dtype,
                      force_weight: float = 1.0) -> torch.Tensor:
    """Mean over ``structures`` of ``force_weight`` x force MSE ((eV/Å)^2) + squared energy error per atom
    ((eV/atom)^2) + ``stress_weight`` x stress MSE (GPa^2) against their labels, with the graph (for the
    weights). With ``force_weight`` 0 only the equation of state (energy and stress against strain) is kept and
    the bulk force constants are free to change."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = Batch.from_atoms(list(structures), dtype=dtype, device=device)
    ef = energy_and_forces(model, batch, model.prepare(batch), create_graph=True, compute_stress=stress_weight > 0)
    e_ref = torch.tensor([a.get_potential_energy() for a in structures], dtype=dtype, device=device)
    f_ref = torch.tensor(np.concatenate([a.get_forces() for a in structures]), dtype=dtype, device=device)
    n_atoms = torch.tensor([len(a) for a in structures], dtype=dtype, device=device)
    per = force_weight * losses.force_loss(ef.forces, f_ref, batch.system_idx, batch.n_systems) + losses.energy_loss(
        ef.energy, e_ref, n_atoms)
    if stress_weight > 0:
        s_ref = torch.tensor(np.stack([a.get_stress(voigt=False) for a in structures]), dtype=dtype, device=device)
        per = per + stress_weight * losses.stress_loss(ef.stress, s_ref)
    return per.mean()


def draw(n_structures: int, k: int, seed: int, step: int, salt: int = 104729) -> list[int]:
    """Which ``k`` of a set one optimizer step fits: a draw without replacement from a generator of (seed,
    step, salt) alone, so that every rank and a resumed run draw the same."""
    rng = np.random.default_rng([int(seed), int(step), int(salt)])
    k = min(int(k), n_structures)
    return sorted(rng.choice(n_structures, size=k, replace=False).tolist()) if k else []
