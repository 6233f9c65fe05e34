"""The resumable reference-relaxation run, on fast real calculators (ASE EMT, LJ)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write

from relaxtune.data import load_pairs
from relaxtune.data.builders import rattle
from relaxtune.dft import GenerateError, GenerateSettings, generate, partial_path

EMT_SETTINGS = GenerateSettings(calculator="emt", fmax=0.02, max_steps=200)


def test_generate_writes_whole_trajectories_with_settings(tmp_path, cu_cells):
    structures = cu_cells(2)
    results = generate(structures, tmp_path, EMT_SETTINGS)
    assert [r["status"] for r in results] == ["converged", "converged"]
    frames = read(tmp_path / "cu_0.extxyz", index=":")
    head = frames[0].info
    assert head["name"] == "cu_0" and head["group"] == "g0" and head["seed"] == 0
    assert head["converged"] and head["calculator"] == "emt" and head["fmax_target"] == 0.02
    assert head["n_steps"] == len(frames) - 1 == results[0]["steps"]
    np.testing.assert_allclose(frames[0].positions, structures[0].positions, atol=1e-7)  # frame 0 = input
    ref = structures[0].copy()
    ref.calc = EMT()
    assert frames[0].get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    assert np.linalg.norm(frames[-1].get_forces(), axis=1).max() <= 0.02
    assert head["fmax_final"] == pytest.approx(np.linalg.norm(frames[-1].get_forces(), axis=1).max())
    assert not partial_path(tmp_path, "cu_0").exists() and not (tmp_path / ".work").exists()
    pairs = load_pairs(tmp_path)  # the output is a dataset
    assert [p.group for p in pairs] == ["g0", "g1"] and all(p.converged for p in pairs)


def test_finished_structures_are_skipped(tmp_path, cu_cells):
    generate(cu_cells(2), tmp_path, EMT_SETTINGS)
    stamp = (tmp_path / "cu_0.extxyz").stat().st_mtime_ns
    results = generate(cu_cells(3), tmp_path, EMT_SETTINGS)
    assert [r["name"] for r in results] == ["cu_2"]  # only the new one
    assert (tmp_path / "cu_0.extxyz").stat().st_mtime_ns == stamp
    assert generate(cu_cells(3), tmp_path, EMT_SETTINGS) == []


def test_a_changed_input_with_a_finished_name_warns(tmp_path, cu_cells):
    generate(cu_cells(1), tmp_path, EMT_SETTINGS)
    other = cu_cells(1, stdev=0.12)
    with pytest.warns(UserWarning, match="exists but its initial structure differs"):
        assert generate(other, tmp_path, EMT_SETTINGS) == []


def test_stale_temporary_file_restarts_cleanly(tmp_path, cu_cells):
    (tmp_path / ".cu_0.extxyz.tmp").write_text("torn write from a killed run")
    partial_path(tmp_path, "cu_0").write_text("2\ngarbage")  # an unreadable partial trajectory
    (result,) = generate(cu_cells(1), tmp_path, EMT_SETTINGS)
    assert result["status"] == "converged" and "resumed_at_step" not in result
    assert read(tmp_path / "cu_0.extxyz", index=0).info["name"] == "cu_0"
    assert not partial_path(tmp_path, "cu_0").exists()


class _Interrupt(BaseException):
    """Stands for the process being killed (not an Exception: the generator must not record a failure)."""


def _interrupting_factory(after: int):
    def factory(atoms, settings):
        calc = EMT()
        calls = {"n": 0}
        original = calc.calculate

        def calculate(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise _Interrupt()
            return original(*args, **kwargs)

        calc.calculate = calculate
        return calc

    return factory


def test_interrupted_relaxation_continues_from_its_last_step(tmp_path, cu_cells):
    structures = cu_cells(1, stdev=0.15)
    reference = generate(structures, tmp_path / "ref", EMT_SETTINGS)[0]
    with pytest.raises(_Interrupt):
        generate(structures, tmp_path, EMT_SETTINGS, calculator_factory=_interrupting_factory(after=4))
    partial = read(partial_path(tmp_path, "cu_0"), index=":")
    assert len(partial) == 4 and not (tmp_path / "cu_0.extxyz").exists()
    assert not (tmp_path / "cu_0.failed.json").exists()
    (result,) = generate(structures, tmp_path, EMT_SETTINGS)
    assert result["status"] == "converged" and result["resumed_at_step"] == 3
    frames = read(tmp_path / "cu_0.extxyz", index=":")
    np.testing.assert_allclose(frames[0].positions, structures[0].positions, atol=1e-7)
    for a, b in zip(frames[:4], partial):  # the steps done before the interruption are kept as they were
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-7)
    assert frames[0].info["resumed_at_step"] == 3 and frames[0].info["n_steps"] == len(frames) - 1
    assert np.linalg.norm(frames[-1].get_forces(), axis=1).max() <= 0.02
    # a fresh BFGS history after the restart: same minimum, similar cost
    ref_final = read(tmp_path / "ref" / "cu_0.extxyz", index=-1)
    np.testing.assert_allclose(frames[-1].positions, ref_final.positions, atol=0.02)
    assert abs(len(frames) - 1 - reference["steps"]) <= 6
    assert not partial_path(tmp_path, "cu_0").exists()


def test_partial_file_of_another_structure_is_discarded(tmp_path, cu_cells):
    write(partial_path(tmp_path, "cu_0"), cu_cells(2)[1], format="extxyz")  # same name, different atoms
    (result,) = generate(cu_cells(1), tmp_path, EMT_SETTINGS)
    assert "resumed_at_step" not in result
    np.testing.assert_allclose(read(tmp_path / "cu_0.extxyz", index=0).positions, cu_cells(1)[0].positions,
                               atol=1e-7)


def test_a_finished_file_at_another_level_warns_and_is_kept(tmp_path, cu_cells):
    generate(cu_cells(1), tmp_path, EMT_SETTINGS)
    assert read(tmp_path / "cu_0.extxyz", index=0).info["level"] == "emt"
    stamp = (tmp_path / "cu_0.extxyz").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="exists at level 'emt', not 'sw'"):
        assert generate(cu_cells(1), tmp_path, GenerateSettings(calculator="sw", fmax=0.02)) == []
    assert (tmp_path / "cu_0.extxyz").stat().st_mtime_ns == stamp


def test_partial_frames_at_another_level_restart_cleanly(tmp_path, cu_cells):
    structures = cu_cells(1, stdev=0.15)
    with pytest.raises(_Interrupt):
        generate(structures, tmp_path, EMT_SETTINGS, calculator_factory=_interrupting_factory(after=4))
    assert read(partial_path(tmp_path, "cu_0"), index=0).info["level"] == "emt"
    frames = read(partial_path(tmp_path, "cu_0"), index=":")
    frames[0].info["level"] = "GPAW 26.7.0 PBE PW300 kpts=auto FD0.05"  # as if begun at another level
    write(partial_path(tmp_path, "cu_0"), frames, format="extxyz")
    (result,) = generate(structures, tmp_path, EMT_SETTINGS)
    assert result["status"] == "converged" and "resumed_at_step" not in result



def test_failing_structure_is_recorded_and_the_others_go_on(tmp_path, cu_cells):
    structures = cu_cells(2)
    si = rattle(bulk("Si", "diamond", a=5.43), 0.05, seed=0)
    si.info["name"] = "si_0"
    results = generate([structures[0], si, structures[1]], tmp_path, EMT_SETTINGS)
    status = {r["name"]: r["status"] for r in results}
    assert status == {"cu_0": "converged", "si_0": "failed", "cu_1": "converged"}
    record = json.loads((tmp_path / "si_0.failed.json").read_text())
    assert "No EMT-potential for Si" in record["reason"] and record["settings"]["calculator"] == "emt"
    assert generate([si], tmp_path, EMT_SETTINGS) == []  # failures are not retried by default...
    (again,) = generate([si], tmp_path, EMT_SETTINGS, retry_failed=True)  # ...unless asked
    assert again["status"] == "failed"
    lj = GenerateSettings(calculator="ase.calculators.lj:LennardJones", fmax=0.05, max_steps=50)
    (fixed,) = generate([si], tmp_path, lj, retry_failed=True)
    assert fixed["status"] in ("converged", "not_converged")
    assert (tmp_path / "si_0.extxyz").exists() and not (tmp_path / "si_0.failed.json").exists()


def test_not_converged_within_max_steps_is_recorded(tmp_path, cu_cells):
    settings = GenerateSettings(calculator="emt", fmax=1e-6, max_steps=3)
    (result,) = generate(cu_cells(1), tmp_path, settings)
    assert result["status"] == "not_converged" and result["steps"] == 3
    head = read(tmp_path / "cu_0.extxyz", index=0).info
    assert head["converged"] is False or head["converged"] == False  # noqa: E712 (numpy bool)


def test_cell_relaxation_records_stress_and_changes_the_cell(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True)  # EMT's Cu lattice constant is ~3.59 Å
    atoms = rattle(atoms, 0.05, seed=1)
    atoms.info["name"] = "cu_big"
    settings = GenerateSettings(calculator="emt", fmax=0.01, relax_cell=True)
    (result,) = generate([atoms], tmp_path, settings)
    assert result["status"] == "converged"
    frames = read(tmp_path / "cu_big.extxyz", index=":")
    assert "stress" in frames[-1].calc.results
    assert frames[-1].cell.lengths()[0] < 3.65
    (pair,) = load_pairs(tmp_path)
    assert pair.relax_cell


@pytest.mark.slow
def test_two_workers(tmp_path, cu_cells):
    results = generate(cu_cells(4), tmp_path, EMT_SETTINGS, jobs=2)
    assert sorted(r["name"] for r in results) == ["cu_0", "cu_1", "cu_2", "cu_3"]
    assert all(r["status"] == "converged" for r in results)
    serial = generate(cu_cells(4), tmp_path / "serial", EMT_SETTINGS)
    for i in range(4):  # same trajectories as one worker
        a = read(tmp_path / f"cu_{i}.extxyz", index=-1)
        b = read(tmp_path / "serial" / f"cu_{i}.extxyz", index=-1)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)


def test_names_must_be_unique_and_file_safe(tmp_path, cu_cells):
    a, b = cu_cells(2)
    b.info["name"] = "cu_0"
    with pytest.raises(GenerateError, match="unique"):
        generate([a, b], tmp_path, EMT_SETTINGS)
    b.info["name"] = "bad/name"
    with pytest.raises(GenerateError, match="'bad/name'"):
        generate([a, b], tmp_path, EMT_SETTINGS)
