"""Per-structure topology: only the structures that moved past skin / 2 are rebuilt, the others keep theirs, and
every joined, selected or concatenated topology gives the energies of one built from scratch."""

import numpy as np
import pytest
import torch
from ase.build import bulk

from relaxtune.potentials.base import energy_and_forces
from relaxtune.potentials.chgnet import CHGNetModel
from relaxtune.potentials.classical import StillingerWeber
from relaxtune.relax import topology
from relaxtune.state import Batch


def _cells(n: int = 3) -> list:
    out = []
    for k in range(n):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.05, seed=k)
        out.append(atoms)
    return out


def _moved(batch: Batch, shifts: dict[int, float]) -> Batch:
    """``batch`` with the first atom of structure k moved ``shifts[k]`` Å along x."""
    pos = batch.positions.clone()
    for k, dx in shifts.items():
        pos[batch.system_slices()[k].start, 0] += dx
    return batch.replace(positions=pos)


def _energies(model, batch: Batch, prepared) -> np.ndarray:
    return energy_and_forces(model, batch, prepared).energy.detach().numpy()


@pytest.fixture(scope="module")
def chgnet():
    return CHGNetModel(dtype=torch.float64)


def test_only_the_structures_that_moved_are_rebuilt(chgnet):
    batch = Batch.from_atoms(_cells(), dtype=torch.float64)
    topo = topology.built(chgnet, batch)
    half = 0.5 * chgnet.skin
    moved = _moved(batch, {0: 0.5 * half, 1: 1.2 * half})  # structure 2 stays
    assert topology.stale(topo, moved, chgnet.skin).tolist() == [False, True, False]
    fresh = topology.refreshed(chgnet, topo, moved, chgnet.skin)
    assert fresh.parts[0] is topo.parts[0] and fresh.parts[2] is topo.parts[2] and fresh.parts[1] is not topo.parts[1]
    first = batch.system_slices()[0].start
    second = batch.system_slices()[1].start
    assert torch.equal(fresh.positions[first], topo.positions[first])  # kept where its part was built
    assert torch.equal(fresh.positions[second], moved.positions[second])
    np.testing.assert_allclose(_energies(chgnet, moved, fresh.prepared),
                               _energies(chgnet, moved, chgnet.prepare(moved)), rtol=0, atol=1e-8)
    assert topology.refreshed(chgnet, fresh, moved, chgnet.skin) is fresh  # nothing stale: unchanged


def test_selected_and_concatenated_topologies_match_fresh_ones(chgnet):
    batch = Batch.from_atoms(_cells(), dtype=torch.float64)
    topo = topology.built(chgnet, batch)
    keep = torch.tensor([0, 2])
    atoms = torch.cat([torch.arange(s.start, s.stop) for s in (batch.system_slices()[0], batch.system_slices()[2])])
    sub = batch.select(keep)
    picked = topology.selected(chgnet, topo, keep, atoms, sub)
    assert picked.parts == (topo.parts[0], topo.parts[2])
    np.testing.assert_allclose(_energies(chgnet, sub, picked.prepared), _energies(chgnet, sub, chgnet.prepare(sub)),
                               rtol=0, atol=1e-8)
    other = batch.select(torch.tensor([1]))
    joined = topology.concatenated(chgnet, picked, topology.built(chgnet, other), sub.concat(other))
    np.testing.assert_allclose(_energies(chgnet, sub.concat(other), joined.prepared),
                               _energies(chgnet, batch, chgnet.prepare(batch))[[0, 2, 1]], rtol=0, atol=1e-8)


def test_a_model_without_parts_rebuilds_the_whole_batch():
    sw = StillingerWeber().double()
    batch = Batch.from_atoms(_cells(2), dtype=torch.float64)
    topo = topology.built(sw, batch)
    assert topo.parts is None
    moved = _moved(batch, {1: sw.skin})
    fresh = topology.refreshed(sw, topo, moved, sw.skin)
    assert fresh is not topo and torch.equal(fresh.positions, moved.positions)
    assert topology.refreshed(sw, topo, moved, None) is topo  # no skin: the topology is kept
