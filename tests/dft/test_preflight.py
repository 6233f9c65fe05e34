"""Preflight: one-line setup errors before any structure is relaxed."""

from __future__ import annotations

import pytest
from ase.build import bulk

from relaxtune.dft import GenerateError, GenerateSettings, preflight


def test_preflight_catches_setup_errors(tmp_path, monkeypatch, cu_cells):
    atoms = cu_cells(1)
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
