"""Quantum ESPRESSO pseudopotentials: PBE files chosen by their header (real Debian files when installed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from relaxtune.dft import (
    DEFAULT_PSEUDO_DIR,
    GenerateError,
    GenerateSettings,
    choose_pseudopotentials,
    is_pbe,
    upf_header,
)


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
