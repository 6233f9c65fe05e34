"""Dq up to a symmetry of the initial structure: operations from spglib as atom permutations, and a relaxed
structure in an equivalent orientation counted as DFT's own."""

import numpy as np
import pytest
import torch

from relaxtune.data import load_pairs
from relaxtune.data.builders import si_defect
from relaxtune.evaluate import evaluate
from relaxtune.potentials.classical import StillingerWeber
from relaxtune.state import Batch
from relaxtune.symmetry import symmetric_distance, symmetric_images, symmetry_operations
from relaxtune import metrics


@pytest.fixture(scope="module")
def vacancy():
    """The shipped DFT relaxation of the rattled Si vacancy (seed 1)."""
    return next(p for p in load_pairs("builtin:si-defects") if p.name == "vacancy_1")


def test_the_operations_of_a_defect_site_are_permutations_within_species():
    ideal = si_defect("sub_B")
    ops = symmetry_operations(ideal, symprec=1e-3)
    assert len(ops) == 24  # T_d: the point group of a substitutional site in diamond
    numbers = ideal.get_atomic_numbers()
    for perm in ops.permutations:
        assert sorted(perm) == list(range(len(ideal)))
        assert (numbers[perm] == numbers).all()  # B stays on B
    frac = ideal.get_scaled_positions()
    for rotation, translation, perm in zip(ops.rotations, ops.translations, ops.permutations):
        moved = frac @ rotation.T + translation - frac[perm]
        assert np.abs(moved - np.round(moved)).max() < 1e-6


def test_a_rattle_hides_the_symmetry_until_the_tolerance_sees_through_it(vacancy):
    assert len(symmetry_operations(vacancy.initial, symprec=0.05)) == 1  # identity alone
    assert len(symmetry_operations(vacancy.initial, symprec=0.5)) == 24


def test_an_equivalent_orientation_of_the_dft_structure_has_zero_symmetric_dq(vacancy):
    ops = symmetry_operations(vacancy.initial, symprec=0.5)
    final = vacancy.final
    images = symmetric_images(final.get_positions(), final.cell.array, ops)
    reference = torch.tensor(final.get_positions(), dtype=torch.float64)
    batch = Batch.from_atoms([final], dtype=torch.float64)
    plain = [float(metrics.dq(batch.replace(positions=torch.tensor(im)), reference)[0]) for im in images]
    rotated = int(np.argmax(plain))
    assert plain[rotated] > 0.5  # the distorted vacancy turned by a symmetry operation: far in plain Dq
    dq_sym, max_disp_sym = symmetric_distance(batch.replace(positions=torch.tensor(images[rotated])), 0, reference,
                                              ops)
    assert dq_sym < 1e-8 and max_disp_sym < 1e-8


def test_symmetric_dq_never_exceeds_plain_dq_and_equals_it_without_symmetry(vacancy):
    ops = symmetry_operations(vacancy.initial, symprec=0.5)
    reference = torch.tensor(vacancy.final.get_positions(), dtype=torch.float64)
    batch = Batch.from_atoms([vacancy.initial], dtype=torch.float64)
    plain = float(metrics.dq(batch, reference)[0])
    assert symmetric_distance(batch, 0, reference, ops)[0] <= plain + 1e-12
    alone = symmetry_operations(vacancy.initial, symprec=0.05)
    assert symmetric_distance(batch, 0, reference, alone)[0] == pytest.approx(plain, rel=1e-12)


def test_evaluate_reports_symmetric_metrics_only_when_asked(vacancy):
    plain = evaluate(StillingerWeber(), [vacancy], dtype=torch.float64, max_steps=200)
    assert "dq_sym" not in plain.rows[0] and "dq_sym_mean" not in plain.metrics
    ev = evaluate(StillingerWeber(), [vacancy], dtype=torch.float64, max_steps=200, symprec=0.5)
    row = ev.rows[0]
    assert row["dq"] == pytest.approx(plain.rows[0]["dq"])
    assert row["n_symmetry_ops"] == 24 and row["dq_sym"] <= row["dq"] + 1e-9
    assert row["basin_match_sym"] == (row["max_disp_sym"] < 0.1)
    assert ev.metrics["dq_sym_mean"] == pytest.approx(row["dq_sym"])
    assert ev.metrics["basin_match_sym_rate"] in (0.0, 1.0)
