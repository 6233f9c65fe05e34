"""`relaxtune relax`: SW and CHGNet on tiny inputs in several formats, output contents, and one-line errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.constraints import FixAtoms
from ase.io import read, write

from helpers import run_cli as run




def _si(a=5.40, seed=0, rattle=0.05):
    atoms = bulk("Si", "diamond", a=a, cubic=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


@pytest.fixture
def si_file(tmp_path):
    frames = [_si(seed=0), bulk("Si", "diamond", a=5.45), _si(a=5.43, seed=2)]
    frames[1].rattle(0.03, seed=1)
    frames[2].set_constraint(FixAtoms([0]))
    for i, f in enumerate(frames):
        f.info["name"] = f"si_{i}"
    path = tmp_path / "in.extxyz"
    write(path, frames)
    return path


def test_relax_sw_extxyz(monkeypatch, capsys, tmp_path, si_file):
    out = tmp_path / "out.extxyz"
    code, stdout, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw", "--fmax", "0.01",
                               "--batch-size", "2")
    assert code == 0, stderr
    assert "relaxed 3 structures with sw: 3 converged" in stdout and "mean steps" in stdout and "wall time" in stdout
    frames = read(out, ":")
    initial = read(si_file, ":")
    assert [f.info["name"] for f in frames] == ["si_0", "si_1", "si_2"]
    for before, after in zip(initial, frames):
        assert after.info["converged"] is True or after.info["converged"] == True  # noqa: E712
        assert after.info["n_steps"] > 0 and after.info["fmax"] < 0.01
        free = np.ones(len(after), bool)
        if before.constraints:
            free[before.constraints[0].get_indices()] = False
        assert np.linalg.norm(after.get_forces(apply_constraint=False)[free], axis=1).max() < 0.01
        assert after.get_potential_energy() < before.get_potential_energy() if before.calc else True
        np.testing.assert_allclose(after.cell.array, before.cell.array)
    np.testing.assert_allclose(frames[2].positions[0], initial[2].positions[0])  # fixed atom kept


def test_max_atoms_changes_what_runs_together_not_the_result(monkeypatch, capsys, tmp_path, si_file):
    outs = []
    for limits in (["--batch-size", "3"], ["--batch-size", "3", "--max-atoms", "10"]):  # 8-atom cells: one at a time
        outs.append(tmp_path / f"out{len(outs)}.extxyz")
        code, stdout, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", outs[-1], "--model", "sw",
                                   "--fmax", "0.01", *limits)
        assert code == 0 and "3 converged" in stdout, stderr
    _assert_same_relaxation(read(outs[1], ":"), read(outs[0], ":"))


def test_relax_cell_gd_poscar_and_cif(monkeypatch, capsys, tmp_path):
    atoms = _si(a=5.30, seed=3)
    for fmt, name in (("vasp", "POSCAR"), ("cif", "si.cif")):
        path = tmp_path / name
        write(path, atoms, format=fmt)
        out = tmp_path / f"relaxed_{fmt}.extxyz"
        code, stdout, stderr = run(monkeypatch, capsys, "relax", path, "-o", out, "--model", "sw", "--cell",
                                   "--optimizer", "fire", "--fmax", "0.005")
        assert code == 0, stderr
        relaxed = read(out)
        a = (abs(np.linalg.det(relaxed.cell.array)) / len(relaxed) * 8) ** (1 / 3)
        assert a == pytest.approx(5.431, abs=5e-3)
        assert np.abs(relaxed.get_stress()).max() < 1e-3
    out = tmp_path / "gd.extxyz"
    code, stdout, _ = run(monkeypatch, capsys, "relax", tmp_path / "POSCAR", "-o", out, "--model", "sw",
                          "--optimizer", "gd", "--step-size", "0.03", "--max-steps", "3")
    assert code == 0 and "0 converged" in stdout
    assert read(out).info["n_steps"] == 3


@pytest.mark.parametrize("make,problem", [
    (lambda p: p.write_text("this is not a structure file\n"), "cannot read structures"),
    (lambda p: write(p, [_si(), Atoms("Si2", positions=[[0, 0, 0], [np.nan, 0, 0]], cell=[5, 5, 5], pbc=True)],
                     format="extxyz"), "structure 1: positions: non-finite coordinates"),
    (lambda p: write(p, [_si(), _si(), Atoms("Si2", positions=[[0, 0, 0], [1, 1, 1]],
                                            cell=[[5, 0, 0], [5, 0, 0], [0, 0, 5]], pbc=True)], format="extxyz"),
     "structure 2: cell: singular"),
    (lambda p: write(p, [_si(), bulk("Ge", "diamond", a=5.66)], format="extxyz"),
     "structure 1: element Ge (Z=32) is not supported by sw"),
    (lambda p: p.write_text(""), "in.extxyz"),
])
def test_bad_input_is_one_line_exit_2(monkeypatch, capsys, tmp_path, make, problem):
    path = tmp_path / "in.extxyz"
    make(path)
    code, stdout, stderr = run(monkeypatch, capsys, "relax", path, "-o", tmp_path / "o.extxyz", "--model", "sw")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr
    assert str(path) in lines[0] and problem in lines[0]


def test_missing_file_and_bad_model(monkeypatch, capsys, tmp_path, si_file):
    code, _, stderr = run(monkeypatch, capsys, "relax", tmp_path / "nope.xyz", "-o", tmp_path / "o.extxyz")
    assert code == 2 and "nope.xyz: no such file" in stderr
    code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", tmp_path / "o.extxyz", "--model", "nonsense")
    assert code == 2 and "--model nonsense" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_relax_chgnet_traj(monkeypatch, capsys, tmp_path):
    frames = [_si(seed=5), _si(a=5.46, seed=6)]
    path = tmp_path / "in.traj"
    write(path, frames)
    out = tmp_path / "out.extxyz"
    code, stdout, stderr = run(monkeypatch, capsys, "relax", path, "-o", out, "--model", "chgnet", "--fmax", "0.05")
    assert code == 0, stderr
    assert "relaxed 2 structures with chgnet: 2 converged" in stdout
    relaxed = read(out, ":")
    assert all(f.info["converged"] for f in relaxed)
    assert all(np.linalg.norm(f.get_forces(), axis=1).max() < 0.05 for f in relaxed)
    # CHGNet knows Ge; a structure with an element outside CHGNet's range is refused by name
    bad = tmp_path / "bad.extxyz"
    write(bad, [_si(), Atoms("Og", positions=[[0, 0, 0]], cell=[6, 6, 6], pbc=True)])
    code, _, stderr = run(monkeypatch, capsys, "relax", bad, "-o", out, "--model", "chgnet")
    assert code == 2 and "structure 1: element Og" in stderr


def test_an_unwritable_output_is_found_before_any_compute(monkeypatch, capsys, tmp_path, si_file):
    import os

    (tmp_path / "folder.extxyz").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        for out, message in ((tmp_path / "folder.extxyz", "is a folder"), (tmp_path / "nope" / "o.extxyz", "does not exist"),
                             (locked / "o.extxyz", "not writable")):
            if message == "not writable" and os.access(locked, os.W_OK):
                continue  # root ignores permissions
            code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw")
            assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    finally:
        os.chmod(locked, 0o700)


def test_resume_keeps_the_finished_structures_and_relaxes_the_rest(monkeypatch, capsys, tmp_path, si_file):
    """Output is written after every batch; --resume continues after what is there (the same input only)."""
    out = tmp_path / "out.extxyz"
    code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw", "--fmax", "0.01",
                          "--batch-size", "2", "--index", "0:2")
    assert code == 0, stderr
    first = read(out, ":")
    assert len(first) == 2
    first[0].info["marker"] = "kept"  # an earlier run's frame, recognisable
    write(out, first, format="extxyz")
    code, stdout, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw", "--fmax", "0.01",
                               "--batch-size", "2", "--resume")
    assert code == 0, stderr
    assert "resuming: 2 of 3" in stderr
    frames = read(out, ":")
    assert [f.info["name"] for f in frames] == ["si_0", "si_1", "si_2"]
    assert frames[0].info.get("marker") == "kept" and frames[2].info["converged"]
    other = tmp_path / "other.extxyz"
    write(other, [bulk("Si", "diamond", a=5.43)] * 3)  # 2 atoms each, not 8
    code, _, stderr = run(monkeypatch, capsys, "relax", other, "-o", out, "--model", "sw", "--resume")
    assert code == 2 and "not the first" in stderr


def _wait_for(condition, proc, timeout=120.0):
    """Poll ``condition`` until it holds; fail if the command ends or the time runs out first."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (exit code {proc.returncode}) before it could be interrupted: "
                                 f"{proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def test_ctrl_c_keeps_every_finished_structure_and_exits_130(tmp_path):
    """The real command in its own process: SIGINT once the output holds finished structures gives exit code
    130, one line on stderr (no traceback), and an output whose structures are readable and are the first
    inputs' relaxed, as many as the line says (each append completes before the interrupt takes effect)."""
    import os
    import signal
    import subprocess
    import sys

    frames = []
    for i in range(200):  # SW relaxes ~10 of these a second: far more than the test waits for
        atoms = _si(seed=i, rattle=0.1)
        atoms.info["name"] = f"si_{i}"
        frames.append(atoms)
    write(tmp_path / "in.extxyz", frames)
    out = tmp_path / "out.extxyz"

    def finished():
        try:
            return len(read(out, ":")) >= 4
        except Exception:  # not there yet, or a frame being appended
            return False

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "relaxtune", "relax", "in.extxyz", "-o", "out.extxyz", "-m", "sw",
                             "--batch-size", "2", "--fmax", "0.001", "--threads", "1", "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(finished, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aborted"), stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "relaxed 200 structures" not in stdout
    kept = read(out, ":")
    assert 4 <= len(kept) < 200
    assert f"{len(kept)} of 200 structures relaxed are in out.extxyz; --resume relaxes the rest" in lines[0]
    assert [a.info["name"] for a in kept] == [f"si_{i}" for i in range(len(kept))]  # the first inputs, in order
    for atoms, source in zip(kept, frames):
        assert list(atoms.numbers) == list(source.numbers)
        assert atoms.info["converged"] and atoms.info["fmax"] < 0.001
        assert np.isfinite(atoms.get_potential_energy())


def _relaxed_inputs(tmp_path, count):
    """``count`` rattled 8-atom Si cells named si_0, si_1, ... written to in.extxyz."""
    frames = []
    for i in range(count):
        atoms = _si(seed=i, rattle=0.1)
        atoms.info["name"] = f"si_{i}"
        frames.append(atoms)
    write(tmp_path / "in.extxyz", frames)
    return frames


def _assert_same_relaxation(frames, reference):
    assert [a.info["name"] for a in frames] == [a.info["name"] for a in reference]
    for atoms, ref in zip(frames, reference):
        assert atoms.info["n_steps"] == ref.info["n_steps"] and atoms.info["converged"] == ref.info["converged"]
        np.testing.assert_allclose(atoms.positions, ref.positions, atol=1e-6)
        assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-8)


def test_sigkill_leaves_a_prefix_that_resume_completes(monkeypatch, capsys, tmp_path):
    """Killed without warning mid-run, the command leaves the first inputs' relaxed structures (whole frames,
    perhaps a last one cut short); --resume completes the file to what an uninterrupted run writes."""
    import os
    import subprocess
    import sys

    from relaxtune.cli.relax_cmd import complete_frames

    count = 60
    _relaxed_inputs(tmp_path, count)
    out = tmp_path / "out.extxyz"
    options = ["-m", "sw", "--batch-size", "4", "--fmax", "0.001", "--threads", "1", "--no-progress"]

    def written():
        return out.exists() and complete_frames(out.read_text()).count("Lattice=") >= 4

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "relaxtune", "relax", "in.extxyz", "-o", "out.extxyz", *options],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(written, proc)
    proc.kill()
    proc.communicate(timeout=60)
    kept = read(io.StringIO(complete_frames(out.read_text())), ":", format="extxyz")
    assert 4 <= len(kept) < count
    reference_out = tmp_path / "reference.extxyz"
    code, _, stderr = run(monkeypatch, capsys, "relax", tmp_path / "in.extxyz", "-o", reference_out, *options)
    assert code == 0, stderr
    reference = read(reference_out, ":")
    _assert_same_relaxation(kept, reference[:len(kept)])
    code, _, stderr = run(monkeypatch, capsys, "relax", tmp_path / "in.extxyz", "-o", out, *options, "--resume")
    assert code == 0, stderr
    assert f"resuming: {len(kept)} of {count}" in stderr
    _assert_same_relaxation(read(out, ":"), reference)


@pytest.mark.parametrize("cut", ["mid_line", "after_count_line", "whole"])
def test_resume_drops_a_last_frame_cut_short(monkeypatch, capsys, tmp_path, si_file, cut):
    out = tmp_path / "out.extxyz"
    code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw", "--fmax", "0.01",
                          "--index", "0:2")
    assert code == 0, stderr
    text = out.read_text()
    second = text.index("\n", text.index("Lattice=", text.index("Lattice=") + 1)) + 1  # its first atom line
    truncated = {"mid_line": text[:second + 20], "after_count_line": text[:text.rindex("\n", 0, second - 1) + 1],
                 "whole": text}[cut]
    out.write_text(truncated)
    code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw", "--fmax", "0.01",
                          "--resume")
    assert code == 0, stderr
    assert f"resuming: {2 if cut == 'whole' else 1} of 3" in stderr
    frames = read(out, ":")
    assert [f.info["name"] for f in frames] == ["si_0", "si_1", "si_2"] and all(f.info["converged"] for f in frames)
    assert out.read_text().startswith(text[:text.index("\n", text.index("Lattice=")) + 1])


def test_resume_refuses_an_output_that_is_not_extxyz_frames(monkeypatch, capsys, tmp_path, si_file):
    out = tmp_path / "out.extxyz"
    out.write_text("8\nLattice=...\nnot a structure file at all\n" * 5)
    before = out.read_text()
    code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw", "--resume")
    assert code == 2 and "cannot read the earlier output" in stderr and len(stderr.strip().splitlines()) == 1
    assert out.read_text() == before


def test_option_values_are_checked_before_reading_anything(monkeypatch, capsys, tmp_path, si_file):
    for args, message in (
            (["--optimizer", "bfgs"], "Invalid value for '--optimizer': 'bfgs' is not one of 'fire', 'gd', 'lbfgs'"),
            (["--max-steps", "-5"], "Invalid value for '--max-steps'"),
            (["--index", "first"], "--index first: not an index of frames"),
    ):
        code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", tmp_path / "o.extxyz", "-m", "sw", *args)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], stderr
        assert not (tmp_path / "o.extxyz").exists()


def test_both_lbfgs_hessians_reach_the_same_minimum(monkeypatch, capsys, tmp_path, si_file):
    """--lbfgs-h0 scaled (the default) and fixed (ASE's LBFGS) end at the same structures, the scaled one in no
    more steps; a value that is not a choice is one line, exit 2."""
    results = {}
    for h0 in ("scaled", "fixed"):
        out = tmp_path / f"{h0}.extxyz"
        code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw", "--optimizer",
                              "lbfgs", "--lbfgs-h0", h0, "--fmax", "1e-4", "--no-progress")
        assert code == 0, stderr
        results[h0] = read(out, ":")
    for scaled, fixed in zip(results["scaled"], results["fixed"]):
        assert np.abs(scaled.positions - fixed.positions).max() < 1e-3
    assert sum(a.info["n_steps"] for a in results["scaled"]) <= sum(a.info["n_steps"] for a in results["fixed"])
    code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", tmp_path / "x.extxyz", "--model", "sw",
                          "--lbfgs-h0", "exact")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--lbfgs-h0" in stderr


def test_step_size_with_the_default_lbfgs_is_one_line_exit_2(monkeypatch, capsys, tmp_path, si_file):
    """L-BFGS (the default optimizer) has no step size: --step-size alone would be silently ignored."""
    out = tmp_path / "o.extxyz"
    code, _, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw", "--step-size", "0.05")
    assert code == 2 and "--step-size" in stderr and "lbfgs" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() or out.stat().st_size == 0
    code, stdout, stderr = run(monkeypatch, capsys, "relax", si_file, "-o", out, "--model", "sw", "--step-size",
                               "0.05", "--optimizer", "fire", "--fmax", "0.01")
    assert code == 0 and "3 converged" in stdout, stderr
