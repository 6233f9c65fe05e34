"""Cutoffs for cell relaxations: the warning when a plane-wave cutoff is too low for the elements."""

from __future__ import annotations

from ase.build import bulk

from relaxtune.dft import CELL_RELAX_MIN_ECUT, GenerateSettings, cutoff_warning


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
