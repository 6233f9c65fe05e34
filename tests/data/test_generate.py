"""The resumable reference-relaxation generator, on fast real calculators (ASE EMT, LJ; QE when installed)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write

from relaxtune.data import load_pairs
from relaxtune.data.builders import rattle
from relaxtune.data.generate import (
    CELL_RELAX_MIN_ECUT,
    DEFAULT_PSEUDO_DIR,
    GenerateError,
    GenerateSettings,
    choose_pseudopotentials,
    cutoff_warning,
    generate,
    is_pbe,
    partial_path,
    preflight,
    read_structures,
    upf_header,
)

EMT_SETTINGS = GenerateSettings(calculator="emt", fmax=0.02, max_steps=200)


def _cu(n: int, stdev: float = 0.1) -> list:
    out = []
    for i in range(n):
        atoms = rattle(bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1)), stdev, seed=i)
        atoms.info.update(name=f"cu_{i}", group=f"g{i % 2}", seed=i)
        out.append(atoms)
    return out


def test_generate_writes_whole_trajectories_with_settings(tmp_path):
    structures = _cu(2)
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


def test_finished_structures_are_skipped(tmp_path):
    generate(_cu(2), tmp_path, EMT_SETTINGS)
    stamp = (tmp_path / "cu_0.extxyz").stat().st_mtime_ns
    results = generate(_cu(3), tmp_path, EMT_SETTINGS)
    assert [r["name"] for r in results] == ["cu_2"]  # only the new one
    assert (tmp_path / "cu_0.extxyz").stat().st_mtime_ns == stamp
    assert generate(_cu(3), tmp_path, EMT_SETTINGS) == []


def test_a_changed_input_with_a_finished_name_warns(tmp_path):
    generate(_cu(1), tmp_path, EMT_SETTINGS)
    other = _cu(1, stdev=0.12)
    with pytest.warns(UserWarning, match="exists but its initial structure differs"):
        assert generate(other, tmp_path, EMT_SETTINGS) == []


def test_stale_temporary_file_restarts_cleanly(tmp_path):
    (tmp_path / ".cu_0.extxyz.tmp").write_text("torn write from a killed run")
    partial_path(tmp_path, "cu_0").write_text("2\ngarbage")  # an unreadable partial trajectory
    (result,) = generate(_cu(1), tmp_path, EMT_SETTINGS)
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


def test_interrupted_relaxation_continues_from_its_last_step(tmp_path):
    structures = _cu(1, stdev=0.15)
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


def test_partial_file_of_another_structure_is_discarded(tmp_path):
    write(partial_path(tmp_path, "cu_0"), _cu(2)[1], format="extxyz")  # same name, different atoms
    (result,) = generate(_cu(1), tmp_path, EMT_SETTINGS)
    assert "resumed_at_step" not in result
    np.testing.assert_allclose(read(tmp_path / "cu_0.extxyz", index=0).positions, _cu(1)[0].positions, atol=1e-7)


def test_a_finished_file_at_another_level_warns_and_is_kept(tmp_path):
    generate(_cu(1), tmp_path, EMT_SETTINGS)
    assert read(tmp_path / "cu_0.extxyz", index=0).info["level"] == "emt"
    stamp = (tmp_path / "cu_0.extxyz").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="exists at level 'emt', not 'sw'"):
        assert generate(_cu(1), tmp_path, GenerateSettings(calculator="sw", fmax=0.02)) == []
    assert (tmp_path / "cu_0.extxyz").stat().st_mtime_ns == stamp


def test_partial_frames_at_another_level_restart_cleanly(tmp_path):
    structures = _cu(1, stdev=0.15)
    with pytest.raises(_Interrupt):
        generate(structures, tmp_path, EMT_SETTINGS, calculator_factory=_interrupting_factory(after=4))
    assert read(partial_path(tmp_path, "cu_0"), index=0).info["level"] == "emt"
    frames = read(partial_path(tmp_path, "cu_0"), index=":")
    frames[0].info["level"] = "GPAW 26.7.0 PBE PW300 kpts=auto FD0.05"  # as if begun at another level
    write(partial_path(tmp_path, "cu_0"), frames, format="extxyz")
    (result,) = generate(structures, tmp_path, EMT_SETTINGS)
    assert result["status"] == "converged" and "resumed_at_step" not in result


def test_cutoff_warning_for_cell_relaxations_with_first_row_elements():
    diamond, silicon = bulk("C", "diamond", a=3.57), bulk("Si", "diamond", a=5.47)
    diamond.info["name"], silicon.info["name"] = "C_0", "Si_0"
    low = GenerateSettings(calculator="gpaw", relax_cell=True, ecut=300.0)
    message = cutoff_warning([silicon, diamond], low)
    assert "'C_0'" in message and "500 eV" in message and "with C" in message
    assert cutoff_warning([silicon], low) is None  # Si's pressure is converged at 300 eV
    assert cutoff_warning([diamond], GenerateSettings(calculator="gpaw", relax_cell=True, ecut=500.0)) is None
    assert cutoff_warning([diamond], GenerateSettings(calculator="gpaw", ecut=300.0)) is None  # fixed cell
    assert cutoff_warning([diamond], GenerateSettings(calculator="emt", relax_cell=True)) is None  # no basis set
    bn = bulk("BN", "zincblende", a=3.615)
    bn.info["name"] = "BN_0"
    assert f"{CELL_RELAX_MIN_ECUT['N']:g} eV" in cutoff_warning([bn], GenerateSettings(calculator="espresso",
                                                                                        relax_cell=True, ecut=500.0))


def test_failing_structure_is_recorded_and_the_others_go_on(tmp_path):
    structures = _cu(2)
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


def test_not_converged_within_max_steps_is_recorded(tmp_path):
    settings = GenerateSettings(calculator="emt", fmax=1e-6, max_steps=3)
    (result,) = generate(_cu(1), tmp_path, settings)
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
def test_two_workers(tmp_path):
    results = generate(_cu(4), tmp_path, EMT_SETTINGS, jobs=2)
    assert sorted(r["name"] for r in results) == ["cu_0", "cu_1", "cu_2", "cu_3"]
    assert all(r["status"] == "converged" for r in results)
    serial = generate(_cu(4), tmp_path / "serial", EMT_SETTINGS)
    for i in range(4):  # same trajectories as one worker
        a = read(tmp_path / f"cu_{i}.extxyz", index=-1)
        b = read(tmp_path / "serial" / f"cu_{i}.extxyz", index=-1)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)


def test_names_must_be_unique_and_file_safe(tmp_path):
    a, b = _cu(2)
    b.info["name"] = "cu_0"
    with pytest.raises(GenerateError, match="unique"):
        generate([a, b], tmp_path, EMT_SETTINGS)
    b.info["name"] = "bad/name"
    with pytest.raises(GenerateError, match="'bad/name'"):
        generate([a, b], tmp_path, EMT_SETTINGS)


def test_read_structures_names_unnamed_frames(tmp_path):
    path = tmp_path / "mine.extxyz"
    frames = _cu(3)
    del frames[1].info["name"]
    write(path, frames)
    assert [a.info["name"] for a in read_structures(path)] == ["cu_0", "mine_1", "cu_2"]


def test_preflight_catches_setup_errors(tmp_path, monkeypatch):
    atoms = _cu(1)
    with pytest.raises(GenerateError, match="unknown calculator 'vasp'"):
        preflight(atoms, GenerateSettings(calculator="vasp"))
    with pytest.raises(GenerateError, match="cannot import"):
        preflight(atoms, GenerateSettings(calculator="no_such_module:Calc"))
    with pytest.raises(GenerateError, match="kpts"):
        preflight(atoms, GenerateSettings(calculator="emt", kpts="dense"))
    monkeypatch.setenv("ESPRESSO_COMMAND", "pw-not-installed.x")
    with pytest.raises(GenerateError, match="pw-not-installed.x not found"):
        preflight(atoms, GenerateSettings(calculator="espresso"))
    preflight(atoms, GenerateSettings(calculator="ase.calculators.emt:EMT"))


def test_preflight_gpaw_setups():
    pytest.importorskip("gpaw")
    si = bulk("Si")
    preflight([si], GenerateSettings(calculator="gpaw"))


# ------------------------------------------------------------------------------------ Quantum ESPRESSO


def test_pbe_spellings():
    assert is_pbe("PBE") and is_pbe(" SLA  PW   PBE  PBE") and is_pbe("SLA PW PBX PBC") and is_pbe("SLA-PW-PBX-PBC")
    assert not is_pbe("SLA PZ NOGX NOGC") and not is_pbe("SLA PW PSX PSC") and not is_pbe("PBESOL")


needs_debian_pseudos = pytest.mark.skipif(not Path(DEFAULT_PSEUDO_DIR, "Si.pbe-rrkj.UPF").exists(),
                                          reason="Debian quantum-espresso-data not installed")


@needs_debian_pseudos
def test_pseudopotentials_are_chosen_by_header_not_name(tmp_path):
    settings = GenerateSettings(calculator="espresso", pseudo_dir=DEFAULT_PSEUDO_DIR)
    head = upf_header(Path(DEFAULT_PSEUDO_DIR) / "Si.pz-vbc.UPF")
    assert head["element"] == "Si" and not is_pbe(head["functional"])  # LDA file in the same folder
    chosen = choose_pseudopotentials(["Si", "Si", "Ge", "N"], settings)
    for el, fname in chosen.items():
        h = upf_header(Path(DEFAULT_PSEUDO_DIR) / fname)
        assert h["element"] == el and is_pbe(h["functional"]), (el, fname)
    assert chosen["Si"] == "Si.pbe-rrkj.UPF"  # norm-conserving, scalar-relativistic
    # Co: the file named "Co.pbesol-..." is PBEsol; the PBE one hides behind a name that says nothing (UPF v1)
    assert choose_pseudopotentials(["Co"], settings) == {"Co": "CorelUSPBE.RRKJ3.UPF"}
    with pytest.raises(GenerateError, match="no PBE pseudopotential for As, Ga in "):
        choose_pseudopotentials(["Ga", "As"], settings)
    forced = GenerateSettings(calculator="espresso", pseudo_dir=DEFAULT_PSEUDO_DIR,
                              pseudopotentials="Si=Si.pbe-nl-rrkjus_psl.1.0.0.UPF")
    assert choose_pseudopotentials(["Si"], forced) == {"Si": "Si.pbe-nl-rrkjus_psl.1.0.0.UPF"}
    with pytest.raises(GenerateError, match="ELEMENT=FILE"):
        choose_pseudopotentials(["Si"], GenerateSettings(calculator="espresso", pseudopotentials="Si=nope.UPF"))
    local = tmp_path / "pseudo"  # a folder without PBE files
    local.mkdir()
    shutil.copy(Path(DEFAULT_PSEUDO_DIR) / "Si.pz-vbc.UPF", local)
    with pytest.raises(GenerateError, match="no PBE pseudopotential for Si"):
        choose_pseudopotentials(["Si"], GenerateSettings(calculator="espresso", pseudo_dir=str(local)))


@needs_debian_pseudos
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pw.x") is None, reason="Quantum ESPRESSO (pw.x) not installed")
def test_quantum_espresso_relaxation(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    atoms = rattle(bulk("Si", "diamond", a=5.43), 0.08, seed=3)
    atoms.info.update(name="si2", group="Si")
    settings = GenerateSettings(calculator="espresso", fmax=0.05, ecut=150.0, kpts="density:1.5")
    preflight([atoms], settings)
    (result,) = generate([atoms], tmp_path, settings)
    assert result["status"] == "converged", result
    frames = read(tmp_path / "si2.extxyz", index=":")
    head = frames[0].info
    assert head["pseudopotentials"] == "Si=Si.pbe-rrkj.UPF" and head["level"].startswith("QuantumESPRESSO PBE")
    assert frames[-1].get_potential_energy() < frames[0].get_potential_energy()
    assert np.linalg.norm(frames[-1].get_forces(), axis=1).max() <= 0.05
    assert not (tmp_path / ".work").exists()


def test_sw_calculator_when_available(tmp_path):
    pytest.importorskip("relaxtune.calculator")
    pytest.importorskip("relaxtune.potentials.classical")
    atoms = rattle(bulk("Si", "diamond", a=5.43, cubic=True), 0.05, seed=2)
    atoms.info["name"] = "si8"
    (result,) = generate([atoms], tmp_path, GenerateSettings(calculator="sw", fmax=0.01))
    assert result["status"] == "converged"
