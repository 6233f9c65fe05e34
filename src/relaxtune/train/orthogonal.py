"""Updates that keep the bulk's equation of state (``distill_orthogonal``): orthogonal gradient descent.

At the pretrained weights θ0 the energy per atom and the six stress components of each distillation structure
(``relaxtune.train.distill``) define outputs y(θ) with gradients J (one row per output). An update δ with
J δ = 0 leaves them unchanged to first order, whatever the optimizer (Adam's per-weight scaling included) made
of the gradients: each step is projected onto the complement of the row space of J after the optimizer took it.
What second order leaves (the steps add up, and J changes along the way) the self-distillation loss pulls back.
"""

from __future__ import annotations

from typing import Sequence

import torch
from ase import Atoms
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from relaxtune.potentials.base import EnergyModel, energy_and_forces
from relaxtune.state import Batch

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def bulk_outputs(model: EnergyModel, structures: Sequence[Atoms], dtype: torch.dtype,
                 create_graph: bool = False) -> list[torch.Tensor]:
    """Energy per atom and the six stress components (eV/Å³) of each of ``structures``, in that order."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = Batch.from_atoms(list(structures), dtype=dtype, device=device)
    ef = energy_and_forces(model, batch, model.prepare(batch), create_graph=create_graph, compute_stress=True)
    per_atom = ef.energy / batch.n_atoms_per_system.to(ef.energy.dtype)
    return [o for k in range(batch.n_systems) for o in [per_atom[k]] + [ef.stress[k, i, j] for i, j in VOIGT]]


class OrthogonalUpdates:
    """The row space of the bulk outputs' gradients at the current (pretrained) weights of ``params``, as an
    orthonormal basis (n_weights, k)."""

    def __init__(self, model: EnergyModel, structures: Sequence[Atoms], params: Sequence[torch.Tensor],
                 dtype: torch.dtype):
        self.params = list(params)
        rows = torch.zeros(sum(p.numel() for p in self.params), (1 + len(VOIGT)) * len(structures), dtype=dtype,
                           device=next((p.device for p in model.parameters()), torch.device("cpu")))
        column = 0
        for atoms in structures:  # one graph per structure: each backward walks only its own
            for out in bulk_outputs(model, [atoms], dtype, create_graph=True):
                grads = torch.autograd.grad(out, self.params, retain_graph=True, materialize_grads=True)
                rows[:, column] = parameters_to_vector(grads).detach()
                column += 1
        norms = rows.norm(dim=0)
        used = norms > 1e-6 * norms.max()  # outputs no weight moves (zero by symmetry) are left out
        q, r = torch.linalg.qr(rows[:, used] / norms[used])
        self.basis = q[:, r.diagonal().abs() > 1e-4]  # an output that others fix (equal by symmetry) adds nothing

    def weights(self) -> torch.Tensor:
        """The weights as one flat vector (a copy)."""
        return parameters_to_vector(self.params).detach()

    def project(self, before: torch.Tensor) -> None:
        """Remove from the step the weights took since ``before`` (``weights()`` then) its component in the row
        space."""
        delta = self.weights() - before
        with torch.no_grad():
            vector_to_parameters(before + delta - self.basis @ (self.basis.T @ delta), self.params)
