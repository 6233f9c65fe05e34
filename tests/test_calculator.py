"""RelaxtuneCalculator: an EnergyModel (or a spec string) as an ASE calculator, checked against CHGNet's own."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.cluster import Icosahedron
from ase.optimize import BFGS

from relaxtune.calculator import RelaxtuneCalculator
from relaxtune.potentials.chgnet import CHGNetModel
from relaxtune.potentials.classical import StillingerWeber


@pytest.fixture(scope="module")
def chgnet():
    return CHGNetModel()


@pytest.fixture(scope="module")
def reference(chgnet):
    from chgnet.model.dynamics import CHGNetCalculator

    return CHGNetCalculator(model=chgnet.model, use_device="cpu")


def si8(seed=1):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_energy_forces_stress_match_chgnet(chgnet, reference):
    atoms = si8()
    atoms.set_cell(atoms.cell.array @ np.diag([1.02, 0.99, 1.0]), scale_atoms=True)
    ours, ref = atoms.copy(), atoms.copy()
    ours.calc, ref.calc = RelaxtuneCalculator(chgnet), reference
    assert ours.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-4 * len(atoms))
    assert ours.get_potential_energy(force_consistent=True) == pytest.approx(ours.get_potential_energy())
    np.testing.assert_allclose(ours.get_forces(), ref.get_forces(), atol=1e-4)
    np.testing.assert_allclose(ours.get_stress(), ref.get_stress(), atol=2e-5)
    assert ours.get_forces().dtype == np.float64


def test_topology_rebuilt_after_large_moves(chgnet, reference):
    atoms = si8()
    atoms.calc = RelaxtuneCalculator(chgnet)
    before = atoms.get_forces()
    # atom 0 gets new neighbours well inside CHGNet's 3 Å three-body cutoff: forces from the old topology
    # differ from a rebuilt one by 0.3 eV/Å here (a move that only brushes the cutoff differs by 1e-5)
    atoms.positions[0] += [0.0, 0.8, 0.8]
    after = atoms.get_forces()
    assert np.abs(after - before).max() > 0.1
    fresh = atoms.copy()
    fresh.calc = RelaxtuneCalculator(chgnet)  # built for the new positions: what a rebuilt topology must give
    np.testing.assert_allclose(after, fresh.get_forces(), atol=1e-6)
    ref = atoms.copy()
    ref.calc = reference
    np.testing.assert_allclose(after, ref.get_forces(), atol=1e-4)


def test_drives_an_ase_optimizer_like_chgnet(chgnet, reference):
    trajectories = []
    for calc in (RelaxtuneCalculator(chgnet), reference):
        atoms = si8(seed=5)
        atoms.calc = calc
        BFGS(atoms, logfile=None).run(fmax=0.05, steps=4)
        trajectories.append(atoms.positions.copy())
    np.testing.assert_allclose(trajectories[0], trajectories[1], atol=1e-4)


def test_spec_string_and_non_periodic():
    calc = RelaxtuneCalculator("sw")
    assert isinstance(calc.model, StillingerWeber) and calc.dtype == torch.float64
    cluster = Icosahedron("Si", noshells=2, latticeconstant=5.43)  # 13 atoms, no cell, no pbc
    cluster.rattle(0.02, seed=0)
    cluster.calc = calc
    forces = cluster.get_forces()
    assert np.isfinite(forces).all() and np.abs(forces.sum(axis=0)).max() < 1e-8  # Newton's third law
    with pytest.raises(PropertyNotImplementedError):
        cluster.get_stress()


def test_unknown_spec_raises_value_error():
    with pytest.raises(ValueError, match="unknown model"):
        RelaxtuneCalculator("not-a-model")
