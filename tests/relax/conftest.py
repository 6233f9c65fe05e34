"""Fixtures for the relaxation tests: a fast ASE calculator for the torch Stillinger-Weber.

matscipy's calculator (which our SW matches to 1e-12, tests/potentials/test_classical.py) takes ~0.2 s per call
on this machine; ASE-parity tests of the optimizers drive ASE with this float64 wrapper instead.
"""

import pytest
import torch

from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from relaxtune.potentials.base import energy_and_forces
from relaxtune.potentials.classical import StillingerWeber
from relaxtune.state import Batch


class TorchSWCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self):
        super().__init__()
        self.model = StillingerWeber().double()

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        batch = Batch.from_atoms([self.atoms], dtype=torch.float64)
        out = energy_and_forces(self.model, batch, self.model.prepare(batch), compute_stress=True)
        self.results = {"energy": out.energy.item(), "free_energy": out.energy.item(),
                        "forces": out.forces.numpy().copy(),
                        "stress": full_3x3_to_voigt_6_stress(out.stress[0].numpy())}


@pytest.fixture
def sw_calc():
    return TorchSWCalculator
