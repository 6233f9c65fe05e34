"""`relaxtune data ...`: build, generate (EMT), info (--json), split, datasheet, and one-line user errors."""

from __future__ import annotations

import json

import pytest
from ase.build import bulk
from ase.io import read, write

from relaxtune.data.builders import SI_DEFECT_TYPES, rattle
from helpers import run_cli as run




@pytest.fixture
def structures(tmp_path):
    frames = []
    for i in range(3):
        atoms = rattle(bulk("Cu", "fcc", a=3.61, cubic=True), 0.08, seed=i)
        atoms.info.update(name=f"cu_{i}", group=f"g{i}")
        frames.append(atoms)
    si = rattle(bulk("Si", "diamond", a=5.43), 0.05, seed=0)
    si.info.update(name="si_0", group="si")
    frames.append(si)
    path = tmp_path / "in.extxyz"
    write(path, frames)
    return path


def test_generate_then_info(monkeypatch, capsys, tmp_path, structures):
    out = tmp_path / "refs"
    code, stdout, _ = run(monkeypatch, capsys, "data", "generate", structures, "--out", out, "--calculator", "emt",
                          "--fmax", "0.02")
    assert code == 0
    assert "4 structures, 0 already done or failed before, 4 to relax with emt" in stdout
    assert "cu_0: converged in" in stdout and "si_0: FAILED: NotImplementedError: No EMT-potential for Si" in stdout
    assert "3 converged, 0 not converged (max steps), 1 failed, 0 skipped" in stdout
    assert "failed structures in" in stdout
    code, stdout, _ = run(monkeypatch, capsys, "data", "generate", structures, "--out", out, "--calculator", "emt")
    assert "0 to relax" in stdout and "4 skipped" in stdout  # resumable
    code, stdout, _ = run(monkeypatch, capsys, "data", "info", out, "--json", tmp_path / "info.json")
    assert code == 0 and "3 relaxations, 3 converged" in stdout and f"wrote {tmp_path / 'info.json'}" in stdout
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["n_structures"] == 3 and info["n_converged"] == 3 and info["species"] == ["Cu"]
    assert info["n_failed"] == 1 and "No EMT-potential" in info["failed"]["si_0"]
    assert set(info["splits"]) >= {"train", "val", "test"}
    assert info["settings"]["fmax_target"] == [0.02] and info["settings"]["level"] == {"emt": 3}
    code, stdout, _ = run(monkeypatch, capsys, "data", "info", out)
    assert code == 0 and "3 relaxations, 3 converged" in stdout and "failed si_0:" in stdout


def test_generate_with_two_jobs(monkeypatch, capsys, tmp_path, structures):
    frames = read(structures, index=":")[:3]
    path = tmp_path / "cu.extxyz"
    write(path, frames)
    code, stdout, _ = run(monkeypatch, capsys, "data", "generate", path, "--out", tmp_path / "o", "--calculator",
                          "emt", "--jobs", "2")
    assert code == 0 and "3 converged" in stdout
    assert sorted(p.name for p in (tmp_path / "o").glob("*.extxyz")) == ["cu_0.extxyz", "cu_1.extxyz", "cu_2.extxyz"]


def test_generate_user_errors(monkeypatch, capsys, tmp_path, structures):
    code, _, err = run(monkeypatch, capsys, "data", "generate", tmp_path / "none.xyz", "--out", tmp_path / "o")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'none.xyz'}: file not found"
    code, _, err = run(monkeypatch, capsys, "data", "generate", structures, "--out", tmp_path / "o",
                       "--calculator", "vasp")
    assert code == 2 and "unknown calculator 'vasp'" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("ESPRESSO_COMMAND", "pw-missing.x")
    code, _, err = run(monkeypatch, capsys, "data", "generate", structures, "--out", tmp_path / "o",
                       "--calculator", "espresso")
    assert code == 2 and "pw-missing.x not found" in err
    assert not (tmp_path / "o").exists()  # nothing started


def test_build(monkeypatch, capsys, tmp_path):
    code, stdout, _ = run(monkeypatch, capsys, "data", "build", "si-defects", "-o", tmp_path / "s.extxyz",
                          "--seed", "7")
    assert code == 0 and f"wrote {len(SI_DEFECT_TYPES)} structures" in stdout
    frames = read(tmp_path / "s.extxyz", index=":")
    assert {a.info["group"] for a in frames} == set(SI_DEFECT_TYPES) and {a.info["seed"] for a in frames} == {7}
    code, stdout, _ = run(monkeypatch, capsys, "data", "build", "crystals", "--out", tmp_path / "c.extxyz",
                          "--n-per-prototype", "2")
    assert code == 0 and "wrote 28 structures (14 groups)" in stdout
    code, _, err = run(monkeypatch, capsys, "data", "build", "zeolites", "--output", tmp_path / "z.extxyz")
    assert code == 2 and "zeolites: unknown structure set" in err


def test_data_commands_follow_the_output_convention(monkeypatch, capsys, tmp_path):
    """-o/--output names a file (build), --out a folder (generate); the old spellings still work, a missing or
    doubly given output is one line, exit 2."""
    code, _, err = run(monkeypatch, capsys, "data", "build", "si-defects")
    assert code == 2 and err.strip().endswith("-o/--output: missing (the extxyz file to write)")
    code, _, err = run(monkeypatch, capsys, "data", "build", "si-defects", "-o", tmp_path / "a.extxyz", "--out",
                       tmp_path / "b.extxyz")
    assert code == 2 and "give the extxyz file to write once" in err and not (tmp_path / "a.extxyz").exists()
    structures = tmp_path / "in.extxyz"
    write(structures, [bulk("Cu", "fcc", a=3.6)])
    code, _, err = run(monkeypatch, capsys, "data", "generate", structures, "--calculator", "emt")
    assert code == 2 and "--out: missing" in err
    code, stdout, _ = run(monkeypatch, capsys, "data", "generate", structures, "-o", tmp_path / "gen", "--calculator",
                          "emt")
    assert code == 0 and len(list((tmp_path / "gen").glob("*.extxyz"))) == 1
    for command in ("generate", "build", "info", "datasheet", "split"):
        code, stdout, _ = run(monkeypatch, capsys, "data", command, "--help")
        assert code == 0 and "-o/--output FILE writes a file" in " ".join(stdout.split()), command


def test_info_builtin_and_errors(monkeypatch, capsys, tmp_path):
    code, stdout, _ = run(monkeypatch, capsys, "data", "info", "builtin:si-defects", "--json", "-")
    info = json.loads(stdout)
    assert code == 0 and info["n_structures"] >= 3 and "Si" in info["species"]
    assert info["splits"]["val"]["groups"] == ["int_H", "As_V"] and info["n_planned"] == 3 * len(SI_DEFECT_TYPES)
    code, stdout, _ = run(monkeypatch, capsys, "data", "info", "builtin:si-defects")
    assert "progress:" in stdout and "split test:" in stdout and "level: GPAW" in stdout
    code, _, err = run(monkeypatch, capsys, "data", "info", "builtin:nothing")
    assert code == 2 and err.startswith("error: builtin:nothing: dataset: unknown")
    code, _, err = run(monkeypatch, capsys, "data", "info", "builtin:si-defects", "--json", tmp_path)
    assert code == 2 and err.strip() == f"error: --json {tmp_path}: is a folder, not a file"
    bad = tmp_path / "bad.extxyz"
    one = bulk("Cu", "fcc", a=3.6, cubic=True)
    write(bad, [one, one[:3]])
    code, _, err = run(monkeypatch, capsys, "data", "info", bad)
    assert code == 2 and err.strip() == (f"error: {bad}: structure 0: n_atoms: initial has 4 atoms, "
                                         "final structure has 3")


def test_split_writes_a_group_split(monkeypatch, capsys, tmp_path, structures):
    out = tmp_path / "refs"
    run(monkeypatch, capsys, "data", "generate", structures, "--out", out, "--calculator", "emt")
    code, stdout, _ = run(monkeypatch, capsys, "data", "split", out, "--seed", "1", "--fractions", "1,1,1",
                          "--out", out)
    assert code == 0 and "wrote" in stdout
    split = json.loads((out / "splits.json").read_text())
    assert sorted(g for v in split.values() for g in v) == ["g0", "g1", "g2"]
    code, stdout, _ = run(monkeypatch, capsys, "data", "info", out, "--json", "-")
    assert {k: v["groups"] for k, v in json.loads(stdout)["splits"].items()} == split
    code, _, err = run(monkeypatch, capsys, "data", "split", out, "--fractions", "a,b")
    assert code == 2 and "--fractions" in err


def test_datasheet_prints_markdown(monkeypatch, capsys):
    code, stdout, _ = run(monkeypatch, capsys, "data", "datasheet", "builtin:si-defects")
    assert code == 0 and stdout.startswith("# Datasheet: `builtin:si-defects`") and "## Splits" in stdout
