"""In-flight batching: every structure lands where it lands alone (FIRE, L-BFGS, cell), the working batch respects
its limits and stays full, every input comes out once, and the pure helpers (admission, state concatenation)."""

import numpy as np
import pytest
import torch
from ase.build import bulk

from relaxtune.potentials import load_model
from relaxtune.relax import RelaxConfig, relax
from relaxtune.relax.steps import concat_states, fire_init, lbfgs_init, select_state
from relaxtune.relax.stream import _fitting, relax_stream
from relaxtune.state import Batch


def _structures(n=8):
    """Si cells of 2, 8 and 16 atoms, rattled from 0.02 to 0.2 Å so that they finish at different times."""
    out = []
    for i in range(n):
        atoms = bulk("Si", "diamond", a=5.40 + 0.01 * (i % 3), cubic=True)
        if i % 3 == 1:
            atoms = atoms.repeat((2, 1, 1))
        if i % 4 == 3:
            atoms = bulk("Si", "diamond", a=5.43)
        atoms.rattle(0.02 + 0.06 * (i % 4), seed=i)
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def sw():
    return load_model("sw", torch.float64)


@pytest.mark.parametrize("optimizer,relax_cell", [("fire", False), ("lbfgs", False), ("fire", True)])
def test_each_structure_lands_where_it_lands_alone(sw, optimizer, relax_cell):
    structures = _structures()
    config = RelaxConfig(optimizer=optimizer, fmax=0.01, relax_cell=relax_cell)
    seen = []
    in_flight = []
    for index, result in relax_stream(sw, structures, config, max_structures=3, dtype=torch.float64,
                                      progress=lambda p: in_flight.append(p.n_structures)):
        seen.append(index)
        alone = relax(sw, Batch.from_atoms([structures[index]], dtype=torch.float64), config)
        assert result.n_steps == int(alone.n_steps[0]) and result.converged == bool(alone.converged[0])
        assert not result.blew_up and result.fmax < 0.01
        np.testing.assert_allclose(result.atoms.positions, alone.batch.positions.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(result.atoms.cell.array, alone.batch.cell[0].numpy(), atol=1e-6, rtol=0)
        assert result.energy == pytest.approx(float(alone.energy[0]), abs=1e-9)
        np.testing.assert_allclose(result.forces, alone.forces.numpy(), atol=1e-8)
        assert (result.stress is not None) == relax_cell
    assert sorted(seen) == list(range(len(structures))) and seen != sorted(seen)  # completion order
    assert max(in_flight) == 3 and in_flight.count(3) > len(in_flight) // 2  # kept full while inputs remain


def test_max_atoms_is_respected_and_a_larger_structure_runs_alone(sw):
    big = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 1))  # 32 atoms
    big.rattle(0.05, seed=11)
    structures = _structures(6)
    structures.insert(3, big)
    reports = []
    results = dict(relax_stream(sw, structures, RelaxConfig(fmax=0.01), max_structures=8, max_atoms=20,
                                dtype=torch.float64, progress=reports.append))
    assert sorted(results) == list(range(len(structures)))
    assert all(r.converged for r in results.values())
    assert all(p.n_atoms <= 20 or (p.n_structures == 1 and p.n_atoms == 32) for p in reports)
    assert any(p.n_atoms == 32 for p in reports) and max(p.n_structures for p in reports) > 1
    assert reports[-1].n_total == len(structures)


def test_admission_follows_input_order_and_limits():
    assert _fitting([8, 8, 8], (0, 0), 2, None) == 2
    assert _fitting([8, 8, 8], (1, 8), 4, 20) == 1  # the next one would make 24 atoms
    assert _fitting([32, 2], (0, 0), 4, 20) == 1  # too big: alone
    assert _fitting([32], (1, 2), 4, 20) == 0  # ... and only into an empty batch
    assert _fitting([2, 16, 2], (0, 0), 4, 10) == 1  # in order: no overtaking
    assert _fitting([], (0, 0), 4, None) == 0


@pytest.mark.parametrize("make", [lambda pos, n: fire_init(pos, n), lambda pos, n: lbfgs_init(pos, n)])
def test_concat_states_inverts_select_state(make):
    rows = torch.randn(7, 3, dtype=torch.float64)
    state = make(rows, 2)
    state = type(state)(**{**state.__dict__, "started": torch.tensor([True, False])})
    first = select_state(state, torch.tensor([0]), torch.arange(3))
    second = select_state(state, torch.tensor([1]), torch.arange(3, 7))
    joined = concat_states(first, second, torch.arange(7))
    for name, value in state.__dict__.items():
        assert torch.equal(getattr(joined, name), value), name


def test_inputs_come_out_once_even_when_done_at_the_start(sw):
    structures = [bulk("Si", "diamond", a=5.431)] + _structures(4)  # the first is already relaxed
    results = list(relax_stream(sw, structures, RelaxConfig(fmax=0.01, max_steps=0), max_structures=2,
                                dtype=torch.float64))
    assert sorted(i for i, _ in results) == list(range(5))
    assert all(r.n_steps == 0 for _, r in results)
    assert [i for i, r in results if r.converged] == [0]


def test_callers_grad_mode_and_parameters_are_untouched_between_results(sw):
    with torch.no_grad():
        for _ in relax_stream(sw, _structures(3), RelaxConfig(fmax=0.05), max_structures=2, dtype=torch.float64):
            assert not torch.is_grad_enabled()
    assert all(p.requires_grad for p in sw.parameters())


def test_bad_arguments_and_inputs_fail_at_the_call(sw):
    with pytest.raises(ValueError, match="max_structures"):
        relax_stream(sw, _structures(2), max_structures=0)
    with pytest.raises(ValueError, match="max_atoms"):
        relax_stream(sw, _structures(2), max_atoms=0)
    bad = _structures(3)
    bad[2].positions[1, 0] = np.nan
    with pytest.raises(ValueError, match="structure 2"):
        relax_stream(sw, bad, dtype=torch.float64)
    assert list(relax_stream(sw, [], dtype=torch.float64)) == []


@pytest.mark.slow
def test_chgnet_stream_matches_relaxing_alone():
    """CHGNet re-prepares per its skin, so batch-mates that come and go do not move where a structure lands."""
    from relaxtune.data.builders import rattle, si_defect

    model = load_model("chgnet")
    structures = [rattle(si_defect(kind), 0.1, seed) for seed, kind in enumerate(("vacancy", "int_T", "sub_B"))]
    config = RelaxConfig(fmax=0.05, max_steps=300)
    for index, result in relax_stream(model, structures, config, max_structures=2):
        alone = relax(model, Batch.from_atoms([structures[index]]), config)
        assert result.converged and bool(alone.converged[0])
        assert np.abs(result.atoms.positions - alone.batch.positions.double().numpy()).max() <= 1e-3
