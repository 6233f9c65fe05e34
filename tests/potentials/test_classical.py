"""Lennard-Jones vs ASE's calculator and Stillinger-Weber vs matscipy's, on rattled periodic cells."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ
from ase.stress import voigt_6_to_full_3x3_stress
from matscipy.calculators.manybody import Manybody
from matscipy.calculators.manybody import StillingerWeber as MatscipySW
from matscipy.calculators.manybody.explicit_forms.stillinger_weber import Stillinger_Weber_PRB_31_5262_Si

from relaxtune.potentials.base import UnsupportedElementError, energy_and_forces
from relaxtune.potentials.classical import LennardJones, StillingerWeber
from relaxtune.state import Batch


def _si_cells():
    a = bulk("Si", "diamond", a=5.431, cubic=True)
    a.rattle(0.1, seed=1)
    b = bulk("Si", "diamond", a=5.30, cubic=True).repeat((2, 1, 1))
    b.rattle(0.15, seed=2)
    c = bulk("Si", "diamond", a=5.50)  # 2-atom primitive cell: many periodic images inside the cutoff
    c.rattle(0.05, seed=3)
    c.set_cell(c.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 0.99, 0.01], [0.0, 0.0, 1.01]]), scale_atoms=True)
    return [a, b, c]


def _compare(model, structures, calc_factory, dtype, tol_e, tol_f, tol_s):
    batch = Batch.from_atoms(structures, dtype=dtype)
    out = energy_and_forces(model, batch, model.prepare(batch), compute_stress=True)
    for k, (atoms, sl) in enumerate(zip(structures, batch.system_slices())):
        atoms = atoms.copy()
        atoms.calc = calc_factory()
        assert out.energy[k].item() == pytest.approx(atoms.get_potential_energy(), abs=tol_e)
        np.testing.assert_allclose(out.forces[sl].double().numpy(), atoms.get_forces(), atol=tol_f)
        np.testing.assert_allclose(out.stress[k].double().numpy(), voigt_6_to_full_3x3_stress(atoms.get_stress()),
                                   atol=tol_s)


def test_stillinger_weber_matches_matscipy_float64():
    _compare(StillingerWeber().double(), _si_cells(), lambda: Manybody(**MatscipySW(Stillinger_Weber_PRB_31_5262_Si)),
             torch.float64, 1e-9, 1e-9, 1e-11)


def test_stillinger_weber_matches_matscipy_float32():
    _compare(StillingerWeber().float(), _si_cells(), lambda: Manybody(**MatscipySW(Stillinger_Weber_PRB_31_5262_Si)),
             torch.float32, 1e-3, 1e-4, 1e-5)


@pytest.mark.parametrize("smooth", [False, True])
def test_lennard_jones_matches_ase(smooth):
    ar = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
    ar.rattle(0.15, seed=3)
    small = bulk("Ar", "fcc", a=5.0)  # 1-atom cell, images only
    small.rattle(0.01, seed=4)
    kwargs = dict(sigma=3.4, epsilon=0.0104, rc=8.0, smooth=smooth)
    _compare(LennardJones(**kwargs).double(), [ar, small], lambda: AseLJ(**kwargs), torch.float64, 1e-10, 1e-10, 1e-12)


def test_sw_minimum_is_diamond_at_5431():
    """The SW equilibrium lattice constant of diamond Si is 5.431 Å: zero pressure there, not at 5.40/5.46."""
    model = StillingerWeber().double()
    pressures = []
    for a in (5.40, 5.431, 5.46):
        batch = Batch.from_atoms(bulk("Si", "diamond", a=a, cubic=True), dtype=torch.float64)
        stress = energy_and_forces(model, batch, model.prepare(batch), compute_stress=True).stress[0]
        pressures.append(-torch.trace(stress).item() / 3)
    assert pressures[0] > 1e-3 and pressures[2] < -1e-3
    assert abs(pressures[1]) < 2e-4


def test_parameters_are_differentiable_and_elements_checked():
    model = StillingerWeber().double()
    batch = Batch.from_atoms(_si_cells()[:1], dtype=torch.float64)
    out = energy_and_forces(model, batch, model.prepare(batch), create_graph=True)
    (out.forces**2).sum().backward()
    assert model.lambda1.grad is not None and model.lambda1.grad.abs() > 0
    assert model.sigma.grad is not None and torch.isfinite(model.sigma.grad)
    bad = bulk("Ge", "diamond", a=5.66)
    with pytest.raises(UnsupportedElementError):
        model.check_supported(Batch.from_atoms([bulk("Si", "diamond", a=5.43), bad]))
