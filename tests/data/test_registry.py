"""Shipped datasets: builtin:NAME resolution, splits, the mini view, and the datasheet made from the files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from relaxtune.data import DataError, load_pairs, split_pairs
from relaxtune.data import registry
from relaxtune.data.builders import SI_DEFECT_TYPES
from relaxtune.data.info import datasheet, dataset_info, write_datasheet

SHIPPED_SPLIT = {  # by defect type; every chemical family of val/test has a member in train (docs/results.md)
    "train": ["vacancy", "sub_B", "int_T", "int_split110", "sub_Al", "sub_C", "sub_N", "sub_P", "int_B", "P_V"],
    "val": ["int_H", "As_V"],
    "test": ["sub_As", "sub_Ge", "int_P", "sub_Ga", "sub_Sb"],
}


def test_si_defects_split_is_the_agreed_one_and_covers_every_type():
    splits = registry.get_dataset("si-defects").splits()
    assert splits == SHIPPED_SPLIT
    assert sorted(g for v in splits.values() for g in v) == sorted(SI_DEFECT_TYPES)


def test_crystals_split_covers_every_material():
    from relaxtune.data.builders import build_crystals

    splits = json.loads((registry.BUILTIN_DIR / "crystals" / "splits.json").read_text())
    listed = [g for v in splits.values() for g in v]
    assert sorted(listed) == sorted({a.info["group"] for a in build_crystals()}) and len(listed) == len(set(listed))


def test_builtin_si_defects_loads_real_dft_pairs():
    pairs = load_pairs("builtin:si-defects")
    assert len(pairs) >= 3
    for p in pairs:
        assert p.group in SI_DEFECT_TYPES and p.split in SHIPPED_SPLIT
        assert p.n_atoms in (63, 64, 65) and p.energy_final is not None and not p.relax_cell
        assert p.info["fmax_target"] == 0.02
    by_split = split_pairs(pairs)
    assert {p.group for p in by_split["train"]} <= set(SHIPPED_SPLIT["train"])
    val = load_pairs("builtin:si-defects:val")
    assert {p.name for p in val} == {p.name for p in by_split["val"]}


def test_si_defects_carry_the_stress_of_the_relaxed_structure_unless_first_row():
    """The relaxed frame's DFT stress (scripts/add_final_stress.py) holds the host's pressure in fine-tuning;
    structures with B, C or N have none (the 300 eV basis-set stress would be as large as the signal)."""
    import numpy as np
    from ase.units import GPa

    from relaxtune.data.pairs import frame_stress

    for p in load_pairs("builtin:si-defects"):
        stress = frame_stress(p.final)
        if {"B", "C", "N"} & set(p.species):
            assert stress is None, p.name
            continue
        assert stress is not None, f"{p.name}: run scripts/add_final_stress.py"
        pressure = -np.trace(stress) / 3 / GPa
        assert 0.0 < pressure < 3.0, (p.name, pressure)  # Γ-only 64-atom cells: the perfect one is at +1.10 GPa
        np.testing.assert_allclose(stress, stress.T)
        assert all(frame_stress(frame) is None for frame in p.trajectory[:-1])


def test_mini_view_is_seed_one_of_si_defects():
    full = load_pairs("builtin:si-defects")
    mini = load_pairs("builtin:si-defects-mini")
    assert {p.name for p in mini} == {p.name for p in full if p.info["seed"] == 1}
    assert len(registry.get_dataset("si-defects-mini").expected_names()) == len(SI_DEFECT_TYPES)
    assert len(registry.get_dataset("si-defects").expected_names()) == 3 * len(SI_DEFECT_TYPES)


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="builtin:nope: dataset: unknown; available: builtin:si-defects"):
        load_pairs("builtin:nope")
    with pytest.raises(DataError, match="builtin:si-defects:holdout: split: unknown; available: train, val, test"):
        load_pairs("builtin:si-defects:holdout")


def test_dataset_without_files_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "BUILTIN_DIR", tmp_path)
    with pytest.raises(DataError, match=r"builtin:crystals: files: no relaxations shipped yet .*generate_builtin\.py"):
        load_pairs("builtin:crystals")


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A builtin folder holding copies of two real shipped relaxations, to watch the datasheet follow the files."""
    src = Path(registry.BUILTIN_DIR) / "si-defects"
    dst = tmp_path / "si-defects"
    dst.mkdir()
    for name in ("vacancy_1.extxyz", "sub_B_1.extxyz", "splits.json"):
        shutil.copy(src / name, dst / name)
    monkeypatch.setattr(registry, "BUILTIN_DIR", tmp_path)
    return src, dst


def test_datasheet_follows_the_files(fake_builtin):
    src, dst = fake_builtin
    planned = 3 * len(SI_DEFECT_TYPES)  # three rattle seeds per type
    sheet = datasheet("builtin:si-defects")
    assert f"- 2 of {planned} planned relaxations present (2 converged to the target fmax), 0 failed, {planned - 2} pending." in sheet
    assert "| sub_B | train | 1 | 1 | 64 |" in sheet and "| vacancy | train | 1 | 1 | 63 |" in sheet
    assert "plane waves 300 eV" in sheet and "fmax 0.02" in sheet  # the reference level of theory
    assert "relaxtune data build si-defects" in sheet  # how to regenerate
    shutil.copy(src / "int_H_1.extxyz", dst / "int_H_1.extxyz")  # a relaxation arrives
    (dst / "int_T_1.failed.json").write_text(json.dumps({"reason": "SCF did not converge"}))
    path = write_datasheet("si-defects")
    sheet = path.read_text()
    assert path == dst / "DATASHEET.md"
    assert f"- 3 of {planned} planned relaxations present (3 converged to the target fmax), 1 failed, {planned - 4} pending." in sheet
    assert "| val | int_H, As_V | 1 | 1 |" in sheet and "`int_T_1`: SCF did not converge" in sheet
    assert f"3 structures present (of {len(SI_DEFECT_TYPES)} planned): train 2, val 1, test 0." in sheet  # mini view


def test_info_of_builtin(fake_builtin):
    info = dataset_info("builtin:si-defects")
    assert info["n_structures"] == 2 and info["n_converged"] == 2 and info["species"] == ["B", "Si"]
    assert info["splits"]["train"]["n_structures"] == 2 and info["splits"]["test"]["n_structures"] == 0
    planned = 3 * len(SI_DEFECT_TYPES)
    assert info["n_planned"] == planned and info["n_pending"] == planned - 2 and info["n_failed"] == 0


def test_shipped_datasheets_exist():
    for name in ("si-defects", "crystals"):
        text = (registry.BUILTIN_DIR / name / "DATASHEET.md").read_text()
        assert text.startswith(f"# Datasheet: `builtin:{name}`") and "How to regenerate" in text
