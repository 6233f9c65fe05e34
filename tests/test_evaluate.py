"""Dataset metrics: relax every initial structure and compare with its reference."""

import math

import numpy as np
import pytest
import torch

from swdata import TRUTH, make_cell_relaxation, make_sw_pairs

from relaxtune.data import RelaxationPair
from relaxtune.evaluate import BASIN_TOLERANCE, cell_errors, evaluate, summarize
from relaxtune.potentials.classical import StillingerWeber


def test_evaluate_metrics_on_sw_pairs():
    pairs = make_sw_pairs(3)
    ev = evaluate(StillingerWeber(), pairs, batch_size=2)
    m = ev.metrics
    assert m["n"] == 3 and len(ev.rows) == 3
    for key in ("n", "dq_mean", "dq_median", "rmsd_mean", "max_disp_mean", "basin_match_rate", "converged_rate",
                "steps_mean"):
        assert key in m
    dqs = [r["dq"] for r in ev.rows]
    assert m["dq_mean"] == pytest.approx(np.mean(dqs)) and m["dq_median"] == pytest.approx(np.median(dqs))
    assert all(r["dq"] > 0 and r["converged"] and r["steps"] > 0 for r in ev.rows)
    assert m["converged_rate"] == 1.0
    assert [r["name"] for r in ev.rows] == ["sw0", "sw1", "sw2"]
    assert all(r["basin_match"] == (r["max_disp"] < BASIN_TOLERANCE) for r in ev.rows)
    assert all(r["energy_error_per_atom"] is not None for r in ev.rows)


def test_evaluate_with_the_reference_model_gives_near_zero_distance():
    pairs = make_sw_pairs(2)
    ev = evaluate(StillingerWeber(**TRUTH), pairs, fmax=1e-4)
    assert ev.metrics["dq_mean"] < 1e-3
    assert ev.metrics["basin_match_rate"] == 1.0
    assert abs(ev.rows[0]["energy_error_per_atom"]) < 1e-8


def test_start_relaxed_measures_the_offset_of_the_models_own_minimum():
    pairs = make_sw_pairs(2)
    truth = evaluate(StillingerWeber(**TRUTH), pairs, fmax=1e-4, start="relaxed")
    assert truth.metrics["start"] == "relaxed" and truth.metrics["dq_mean"] < 1e-4  # already at its minimum
    assert all(r["steps"] <= 1 for r in truth.rows)
    model = StillingerWeber()
    from_relaxed = evaluate(model, pairs, fmax=1e-4, start="relaxed")
    from_initial = evaluate(model, pairs, fmax=1e-4)
    assert from_relaxed.metrics["dq_mean"] > 0.05  # the untuned model's minimum lies elsewhere
    assert all(r["steps"] < i["steps"] for r, i in zip(from_relaxed.rows, from_initial.rows))
    with pytest.raises(ValueError, match="start"):
        evaluate(model, pairs, start="halfway")


def test_cell_relaxed_pairs_relax_the_cell_and_report_its_error():
    import dataclasses

    pair, _ = make_cell_relaxation(seed=3)
    assert abs(pair.final.get_volume() / pair.initial.get_volume() - 1) > 0.01  # the reference cell moved
    truth = StillingerWeber(**TRUTH)
    ev = evaluate(truth, [pair, *make_sw_pairs(1)], fmax=1e-4)
    cell_row, fixed_row = ev.rows
    assert cell_row["name"] == "si8_cell" and cell_row["dq"] < 1e-2
    assert abs(cell_row["volume_error"]) < 1e-3 and cell_row["strain_max"] < 1e-3
    assert "volume_error" not in fixed_row and fixed_row["dq"] < 1e-3
    assert ev.metrics["n_cell_relaxed"] == 1 and ev.metrics["volume_error_abs_mean"] < 1e-3
    # the same pair relaxed at its initial cell lands far from the reference: the cell must be free
    fixed = evaluate(truth, [dataclasses.replace(pair, relax_cell=False)], fmax=1e-4)
    assert fixed.rows[0]["dq"] > 20 * cell_row["dq"] and "n_cell_relaxed" not in fixed.metrics
    # the untuned SW has another lattice constant: the volume error shows it, and Dq, which compares the atoms'
    # arrangement in the DFT cell, does not (relaxed diamond Si has no free internal coordinate)
    other = evaluate(StillingerWeber(), [pair], fmax=1e-4)
    assert abs(other.rows[0]["volume_error"]) > 5e-3 and other.rows[0]["dq"] < 0.05


def test_cell_errors_of_a_known_strain():
    cell = np.diag([5.0, 5.0, 5.0])
    errors = cell_errors(cell @ np.diag([1.01, 1.0, 1.0]), cell)
    assert errors["volume_error"] == pytest.approx(0.01) and errors["strain_max"] == pytest.approx(0.01)
    shear = np.array([[1.0, 0.02, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    errors = cell_errors(cell @ shear, cell)
    assert errors["volume_error"] == pytest.approx(0.0, abs=1e-12) and errors["strain_max"] == pytest.approx(0.01)


def test_summarize_counts_blowups_as_failures():
    rows = [
        {"dq": 1.0, "rmsd": 0.1, "max_disp": 0.05, "basin_match": True, "steps": 10, "converged": True},
        {"dq": None, "rmsd": None, "max_disp": None, "basin_match": False, "steps": 3, "converged": False,
         "blew_up": True},
    ]
    m = summarize(rows)
    assert m["n"] == 2 and m["dq_mean"] == 1.0 and m["n_blew_up"] == 1
    assert m["basin_match_rate"] == 0.5 and m["converged_rate"] == 0.5 and m["steps_mean"] == 6.5


@pytest.mark.slow
def test_evaluate_real_chgnet_on_real_dft_pair():
    from relaxtune.data import load_pairs
    from relaxtune.potentials import load_model

    pairs = [p for p in load_pairs("builtin:si-defects") if p.name == "vacancy_1"]
    ev = evaluate(load_model("chgnet"), pairs)
    row = ev.rows[0]
    # pretrained CHGNet lands near, not on, the PBE structure (DESIGN.md: Dq ~0.7 on a Ga_Si defect)
    assert 0.2 < row["dq"] < 3.0 and row["converged"] and math.isfinite(row["energy"])
