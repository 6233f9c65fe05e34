"""The one interface every energy model implements, and forces/stress from it by autograd.

A model splits its work in two: ``prepare`` builds what stays fixed during an unroll (neighbor lists, graph
topology; no gradients), ``energy`` maps the current positions and cells to total energies per structure,
differentiably. Forces are ``-dE/dX`` and stress is ``(1/V) dE/dε`` for a homogeneous strain ε applied to
positions and cell together, so every model gets a differentiable stress for cell relaxation for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from ase.data import chemical_symbols

from relaxtune.state import Batch


class UnsupportedElementError(ValueError):
    """A structure holds an element the model was not trained on."""


class EnergyModel(torch.nn.Module):
    """Total energy per structure, differentiable in positions, cell and parameters."""

    name: str = "model"
    #: atomic numbers the model knows; ``None`` means any.
    supported_numbers: frozenset[int] | None = None
    #: Module names (components of parameter names) by role, for what fine-tuning trains and how fast: the
    #: readout (``train_params="readout"``; none declared: the last top-level module with parameters), the
    #: embeddings and basis expansions (``"freeze-embeddings"`` freezes them) and the per-element embeddings,
    #: a row or block per element (``embedding_lr``). Each adapter names its own network's modules.
    readout_modules: tuple[str, ...] = ()
    embedding_modules: tuple[str, ...] = ()
    element_embedding_modules: tuple[str, ...] = ()
    #: Å of neighbour-list padding: ``prepare`` lists pairs out to the cutoff plus ``skin``, so the energy stays
    #: exact until an atom moved skin / 2 (relaxations rebuild then); 0: the topology is fixed for a whole call.
    skin: float = 0.0

    def prepare(self, batch: Batch) -> Any:
        """Topology kept fixed for one unroll (neighbor list, graphs). Called on a detached batch."""
        raise NotImplementedError

    def energy(self, batch: Batch, prepared: Any) -> torch.Tensor:
        """Total energies (n_systems,) in eV."""
        raise NotImplementedError

    def prepare_parts(self, batch: Batch) -> list[Any] | None:
        """Optional: ``prepare`` split per structure, so that a relaxation rebuilds only the structures that moved
        and keeps the others' topology when structures leave or join its working batch. ``None``: not split
        (the model builds its topology for a whole batch only). Called on a detached batch."""
        return None

    def join_parts(self, parts: Sequence[Any], batch: Batch) -> Any:
        """The topology of ``batch`` from its structures' ``prepare_parts``, in order (no neighbour search)."""
        raise NotImplementedError(f"{self.name} does not split its topology per structure")

    def check_supported(self, batch: Batch) -> None:
        """Raise ``UnsupportedElementError`` naming the structure and element the model cannot handle."""
        if self.supported_numbers is None:
            return
        for k, sl in enumerate(batch.system_slices()):
            for z in set(batch.numbers[sl].tolist()) - set(self.supported_numbers):
                raise UnsupportedElementError(
                    f"structure {k}: element {chemical_symbols[z]} (Z={z}) is not supported by {self.name}"
                )


@dataclass(frozen=True)
class EnergyForces:
    energy: torch.Tensor  # (n_systems,) eV
    forces: torch.Tensor  # (n_atoms, 3) eV/Å
    stress: torch.Tensor | None = None  # (n_systems, 3, 3) eV/Å^3, ASE sign convention (positive = tensile)


def single_points(model: "EnergyModel", structures: Sequence, dtype: torch.dtype, stress: bool = False,
                  chunk: int = 16) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray] | None]:
    """Energies, forces per structure (and stresses) of ASE ``structures`` without a graph, ``chunk`` per call."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    energies, forces, stresses = [], [], []
    for i in range(0, len(structures), chunk):
        batch = Batch.from_atoms(list(structures[i:i + chunk]), dtype=dtype, device=device)
        ef = energy_and_forces(model, batch, model.prepare(batch), compute_stress=stress)
        energies.extend(ef.energy.double().cpu().tolist())
        f = ef.forces.double().cpu().numpy()
        forces.extend(f[sl] for sl in batch.system_slices())
        if stress:
            stresses.extend(ef.stress.double().cpu().numpy())
    return np.array(energies), forces, (stresses if stress else None)


def energy_and_forces(
    model: EnergyModel,
    batch: Batch,
    prepared: Any,
    *,
    create_graph: bool = False,
    compute_stress: bool = False,
) -> EnergyForces:
    """Energies, forces (and stress) of a batch. ``create_graph=True`` keeps the graph for second derivatives
    (training); otherwise results are detached."""
    positions = batch.positions
    if not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    cell = batch.cell
    inputs = [positions]
    strain = None
    with torch.enable_grad():  # also under an outer no_grad(): the strain must enter the graph
        if compute_stress:
            strain = torch.zeros_like(cell).requires_grad_(True)
            deform = torch.eye(3, dtype=cell.dtype, device=cell.device) + strain
            positions_eval = torch.einsum("ak,akl->al", positions, deform[batch.system_idx])
            cell = cell @ deform
            inputs.append(strain)
        else:
            positions_eval = positions
        energy = model.energy(batch.replace(positions=positions_eval, cell=cell), prepared)
        grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
    forces = -grads[0] if grads[0] is not None else torch.zeros_like(positions)
    stress = None
    if compute_stress:
        d_strain = grads[1] if grads[1] is not None else torch.zeros_like(strain)
        volume = torch.linalg.det(batch.cell).abs()
        stress = d_strain / volume[:, None, None]
        stress = 0.5 * (stress + stress.transpose(1, 2))
    if not create_graph:
        energy, forces = energy.detach(), forces.detach()
        stress = stress.detach() if stress is not None else None
    return EnergyForces(energy=energy, forces=forces, stress=stress)
