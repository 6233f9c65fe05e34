"""Readers and validation of relaxation pairs, on real files (GPAW, QE, VASP outputs, EMT relaxations)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from ase.io import Trajectory, read, write

from relaxtune.data import DataError, DataWarning, load_pairs, minimum_image_displacement
from relaxtune.data.pairs import detect_format, read_initial_final

FILES = Path(__file__).parent / "files"
ASE_VASP = Path(__import__("ase").__file__).parent / "test" / "testdata" / "vasp"
needs_ase_vasp = pytest.mark.skipif(not (ASE_VASP / "vasprun_pstress.xml").exists(),
                                    reason="ASE's test data (real VASP files) not installed")


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------- formats


def test_shipped_gpaw_relaxation(si_seed_file):
    (pair,) = load_pairs(si_seed_file)
    frames = read(si_seed_file, index=":")
    assert pair.name == "vacancy_1" and pair.group == "vacancy"
    assert pair.n_atoms == 63 and pair.species == ["Si"]
    assert pair.converged is True and pair.relax_cell is False
    assert len(pair.trajectory) == len(frames) == pair.info["n_steps"] + 1
    np.testing.assert_allclose(pair.initial.positions, frames[0].positions)
    np.testing.assert_allclose(pair.final.positions, frames[-1].positions)
    assert pair.energy_final == pytest.approx(frames[-1].get_potential_energy())
    assert pair.energy_final < frames[0].get_potential_energy()  # relaxing lowers the energy
    assert pair.info["level"].startswith("GPAW")


def test_extxyz_trajectory_first_and_last_frame(emt_file):
    (pair,) = load_pairs(emt_file)
    frames = read(emt_file, index=":")
    assert pair.name == "cu_relax" and pair.group == "cu_relax"  # no header: file stem
    assert pair.converged is None  # not recorded in a plain trajectory
    np.testing.assert_allclose(pair.final.positions, frames[-1].positions)
    assert np.abs(pair.final.get_forces()).max() < 0.01 + 1e-9


def test_ase_traj_file(tmp_path, make_relaxation):
    path = tmp_path / "relax.traj"
    with Trajectory(path, "w") as traj:
        for frame in make_relaxation(seed=2):
            traj.write(frame)
    (pair,) = load_pairs(path)
    assert len(pair.trajectory) >= 3 and pair.energy_final is not None
    assert pair.name == tmp_path.name  # "relax" is a generic name: the folder names the run


def test_file_with_several_named_trajectories(tmp_path, make_relaxation):
    path = tmp_path / "many.extxyz"
    a = make_relaxation(seed=3, name="a", group="g1")
    b = make_relaxation(seed=4, name="b", group="g2")
    write(path, a + b, format="extxyz")
    pairs = load_pairs(path)
    assert [(p.name, p.group) for p in pairs] == [("a", "g1"), ("b", "g2")]
    assert len(pairs[0].trajectory) == len(a) and len(pairs[1].trajectory) == len(b)


def test_quantum_espresso_relax_output():
    path = FILES / "si2_relax.pwo.gz"
    assert detect_format(path) == "espresso-out"
    (pair,) = load_pairs(path)
    assert pair.name == "si2_relax" and len(pair.trajectory) == 8 and pair.relax_cell is False
    assert pair.energy_final < pair.trajectory[0].get_potential_energy()
    assert np.abs(pair.final.get_forces()).max() < np.abs(pair.initial.get_forces()).max()


def test_quantum_espresso_vc_relax_detects_cell_relaxation():
    (pair,) = load_pairs(FILES / "si2_vcrelax.pwo.gz")
    assert pair.relax_cell is True
    assert not np.allclose(pair.initial.cell.array, pair.final.cell.array)
    # ... and refusing cell relaxation explicitly is an error naming the field
    with pytest.raises(DataError, match=r"si2_vcrelax\.pwo\.gz: structure 0: cell:") as exc:
        load_pairs(FILES / "si2_vcrelax.pwo.gz", relax_cell=False)
    _one_line(exc)


@needs_ase_vasp
def test_vasp_files_are_recognised(tmp_path):
    assert detect_format(ASE_VASP / "vasprun_pstress.xml") == "vasp-xml"
    assert detect_format(ASE_VASP / "OUTCAR_example_1") == "vasp-out"
    # a real single-point vasprun is not a relaxation: a clear one-line error
    with pytest.raises(DataError, match=r"vasprun_pstress\.xml: structure 0: frames: only 1 frame") as exc:
        load_pairs(ASE_VASP / "vasprun_pstress.xml")
    _one_line(exc)


@needs_ase_vasp
def test_vasp_run_folders_and_initial_final_files(tmp_path):
    for run in ("run_a", "run_b"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        shutil.copy(ASE_VASP / "vasprun_pstress.xml", tmp_path / "runs" / run / "vasprun.xml")
        (tmp_path / "runs" / run / "INCAR").write_text("IBRION = 2\n")
    with pytest.raises(DataError, match=r"run_a/vasprun\.xml: structure 0: frames"):
        load_pairs(tmp_path / "runs")
    # initial and final structures from two files (here the same real VASP structure: zero displacement)
    xml = ASE_VASP / "vasprun_pstress.xml"
    (pair,) = load_pairs(f"{xml}:{xml}")
    assert pair.n_atoms == 2 and pair.species == ["C"]
    assert np.abs(pair.displacements()).max() == 0.0
    assert pair.energy_final == pytest.approx(read(xml).get_potential_energy())


def test_unrecognised_and_missing_files(tmp_path):
    (tmp_path / "notes.dat").write_text("hello\n")
    with pytest.raises(DataError, match="notes.dat: format: not a recognised relaxation file"):
        load_pairs(tmp_path / "notes.dat")
    with pytest.raises(DataError, match="nothere.extxyz: file: not found"):
        load_pairs(tmp_path / "nothere.extxyz")
    with pytest.raises(DataError, match="files: no relaxation files"):
        load_pairs(tmp_path)
    bad = tmp_path / "broken.extxyz"
    bad.write_text("3\nLattice=\"1 0 0 0 1 0 0 0 1\" Properties=species:S:1:pos:R:3\nCu 0 0\n")
    with pytest.raises(DataError, match="broken.extxyz: format: cannot read as extxyz"):
        load_pairs(bad)


# ---------------------------------------------------------------------------------------- validation


def test_initial_final_atom_count_mismatch(tmp_path, make_relaxation):
    frames = make_relaxation(seed=5)
    ini, fin = tmp_path / "ini.extxyz", tmp_path / "fin.extxyz"
    write(ini, [frames[0], frames[0]])
    short = frames[-1].copy()
    del short[3]
    write(fin, [frames[-1], short])
    with pytest.raises(DataError, match=r"ini\.extxyz:fin\.extxyz: structure 1: n_atoms: initial has 4 atoms, "
                                        r"final structure has 3") as exc:
        load_pairs(f"{ini}:{fin}")
    _one_line(exc)
    write(fin, [frames[-1]])
    with pytest.raises(DataError, match="2 initial structures in ini.extxyz but 1 final"):
        read_initial_final(ini, fin)


def test_species_order_mismatch_names_the_atom(tmp_path, make_relaxation):
    frames = make_relaxation(seed=6)
    fin = frames[-1].copy()
    fin.symbols[2] = "Ag"
    ini_path, fin_path = tmp_path / "a.extxyz", tmp_path / "b.extxyz"
    write(ini_path, frames[0])
    write(fin_path, fin)
    with pytest.raises(DataError, match=r"structure 0: species: atom 2 is Cu in the initial structure but Ag"):
        load_pairs(f"{ini_path}:{fin_path}")


def test_inconsistent_frame_inside_a_trajectory(tmp_path, make_relaxation):
    frames = make_relaxation(seed=7)
    frames[1] = frames[1].copy()
    frames[1].symbols[0] = "Au"
    path = tmp_path / "mixed.extxyz"
    write(path, frames)
    with pytest.raises(DataError, match=r"mixed\.extxyz: structure 0: species: atom 0 .* in frame 1"):
        load_pairs(path)


def test_cell_change_between_two_files_needs_the_flag(tmp_path, make_relaxation):
    frames = make_relaxation(seed=8)
    fin = frames[-1].copy()
    fin.set_cell(fin.cell.array * 1.01, scale_atoms=True)
    a, b = tmp_path / "a.extxyz", tmp_path / "b.extxyz"
    write(a, frames[0])
    write(b, fin)
    with pytest.raises(DataError, match=r"structure 0: cell: the final cell differs"):
        load_pairs(f"{a}:{b}")
    (pair,) = load_pairs(f"{a}:{b}", relax_cell=True)
    assert pair.relax_cell
    fin.info["relax_cell"] = True  # or a header flag
    write(b, fin)
    assert load_pairs(f"{a}:{b}")[0].relax_cell


def test_nan_positions_and_forces(tmp_path, make_relaxation):
    frames = make_relaxation(seed=9)
    frames[-1].positions[1, 0] = np.nan
    path = tmp_path / "nan.extxyz"
    write(path, frames)
    with pytest.raises(DataError, match=r"nan\.extxyz: structure 0: positions: NaN"):
        load_pairs(path)
    frames = make_relaxation(seed=9)
    frames[2].calc.results["forces"][0, 0] = np.inf
    write(path, frames)
    with pytest.raises(DataError, match=r"structure 0: frame 2: forces: NaN or infinite"):
        load_pairs(path)


def test_wrapped_atoms_are_not_displacements(tmp_path, make_relaxation):
    frames = make_relaxation(seed=10)
    frames[-1] = frames[-1].copy()
    frames[-1].positions[0] += frames[-1].cell[0]  # same atom, one lattice vector away
    path = tmp_path / "wrapped.extxyz"
    write(path, frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        (pair,) = load_pairs(path)
    assert np.linalg.norm(pair.displacements(), axis=1).max() < 0.3


def test_reordered_atoms_warn(tmp_path, make_relaxation):
    frames = make_relaxation(seed=11)
    fin = frames[-1].copy()
    fin.positions[[0, 1]] = fin.positions[[1, 0]]  # swapped atoms of the same species: > 1.5 Å apart
    frames[-1] = fin
    path = tmp_path / "swapped.extxyz"
    write(path, frames)
    with pytest.warns(DataWarning, match=r"swapped\.extxyz: structure 0: positions: atom [01] moves 2\.\d+ Å"):
        load_pairs(path)


def test_minimum_image_with_a_relaxed_cell():
    from ase.build import bulk

    a = bulk("Si", "diamond", a=5.43, cubic=True)
    b = a.copy()
    b.set_cell(a.cell.array * 1.02, scale_atoms=True)  # pure strain: no atom moves relative to the cell
    b.positions[3] += 0.1
    d = minimum_image_displacement(a, b)
    assert np.linalg.norm(d, axis=1)[3] == pytest.approx(np.sqrt(3) * 0.1, abs=1e-9)
    assert np.abs(np.delete(d, 3, axis=0)).max() < 1e-9


# ---------------------------------------------------------------------------------------- directories


def test_directory_reads_relaxations_and_skips_the_rest(tmp_path, make_relaxation):
    for i, (name, group) in enumerate([("s1", "A"), ("s2", "A"), ("s3", "B")]):
        write(tmp_path / f"{name}.extxyz", make_relaxation(seed=20 + i, group=group))
    (tmp_path / ".s4.extxyz.tmp").write_text("partial")
    (tmp_path / ".s5.partial.extxyz").write_text("partial")
    (tmp_path / "s6.failed.json").write_text(json.dumps({"reason": "SCF"}))
    (tmp_path / "DATASHEET.md").write_text("# x\n")
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["A"], "test": ["B"]}))
    pairs = load_pairs(tmp_path)
    assert [(p.name, p.group, p.split) for p in pairs] == [("s1", "A", "train"), ("s2", "A", "train"),
                                                          ("s3", "B", "test")]
    assert [p.name for p in load_pairs(f"{tmp_path}:test")] == ["s3"]
    with pytest.raises(DataError, match="no split 'val'"):
        load_pairs(f"{tmp_path}:val")


def test_duplicate_names_are_an_error(tmp_path, make_relaxation):
    write(tmp_path / "x.extxyz", make_relaxation(seed=30, name="same"))
    write(tmp_path / "y.extxyz", make_relaxation(seed=31, name="same"))
    with pytest.raises(DataError, match="y.extxyz: name: structure name 'same' also used in .*x.extxyz"):
        load_pairs(tmp_path)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
