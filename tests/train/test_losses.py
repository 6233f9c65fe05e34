"""Training losses: energy, force and stress terms, the weighted structure loss."""

import numpy as np
import torch
from ase import Atoms

from relaxtune.state import Batch
from relaxtune.train import losses


def test_energy_and_force_terms():
    e = torch.tensor([-10.0, -20.0], dtype=torch.float64)
    ref = torch.tensor([-11.0, float("nan")], dtype=torch.float64)
    n = torch.tensor([2, 4])
    np.testing.assert_allclose(losses.energy_loss(e, ref, n).numpy(), [0.25, 0.0])
    f = torch.ones(6, 3, dtype=torch.float64)
    sys = torch.tensor([0, 0, 1, 1, 1, 1])
    fixed = torch.tensor([False, True, False, False, False, False])
    fl = losses.force_loss(f, torch.zeros_like(f), sys, 2, fixed)
    np.testing.assert_allclose(fl.numpy(), [1.0, 1.0])
    a = Atoms("Si2", positions=[[0, 0, 0], [1, 1, 1]], cell=np.eye(3) * 4, pbc=True)
    b = Batch.from_atoms([a], dtype=torch.float64)
    w = losses.StructureLossWeights(dq=1.0, forces=2.0)
    total = losses.structure_loss(b, b.positions + 0.1, w, forces=torch.ones(2, 3, dtype=torch.float64))
    expect = np.sqrt(2 * 28.0855 * 3 * 0.01) + 2.0 * 1.0
    np.testing.assert_allclose(total.item(), expect, rtol=1e-4)
