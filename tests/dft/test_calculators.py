"""The calculators a run can use, relaxing real structures: Quantum ESPRESSO (when installed) and SW."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read

from relaxtune.data.builders import rattle
from relaxtune.dft import DEFAULT_PSEUDO_DIR, GenerateSettings, generate, preflight

needs_debian_pseudos = pytest.mark.skipif(not Path(DEFAULT_PSEUDO_DIR, "Si.pbe-rrkj.UPF").exists(),
                                          reason="Debian quantum-espresso-data not installed")


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
