"""The retention check: equations of state, cell relaxations and DFT frames, fine-tuned against pretrained."""

import pytest
import torch
from ase.build import bulk

from relaxtune.potentials.classical import SW_SI_1985, StillingerWeber
from relaxtune.retention import equation_of_state, retention, retention_lines


def _sw(sigma_scale: float = 1.0) -> StillingerWeber:
    return StillingerWeber(sigma=SW_SI_1985["sigma"] * sigma_scale).to(torch.float64)


def test_equation_of_state_finds_stillinger_webers_lattice_constant_and_bulk_modulus():
    eos = equation_of_state(_sw(), bulk("Si", "diamond", a=5.40, cubic=True))
    # SW silicon: a0 = 2^(1/6) sigma * 4 / sqrt(3) = 5.431 Å, B = 101.4 GPa (Stillinger & Weber 1985)
    assert 5.40 * eos["lattice_scale"] == pytest.approx(5.431, abs=2e-3)
    assert eos["bulk_modulus_gpa"] == pytest.approx(101.4, rel=0.02)


def test_the_same_model_keeps_everything_and_a_shifted_lattice_is_flagged_worse():
    same = retention(_sw(), _sw(), ["Si"])
    assert same["kept"] and same["counts"]["worse"] == 0 and same["n_crystals"] == 18
    assert {i["verdict"] for i in same["items"]} == {"same"}
    # sigma sets SW's length scale: 1% smaller sigma = 1% smaller lattice constant, further below PBE's
    shifted = retention(_sw(0.99), _sw(), ["Si"])
    items = {i["item"]: i for i in shifted["items"]}
    lattice = items["eos Si: lattice constant vs DFT"]
    assert lattice["change_vs_pretrained"] == pytest.approx(-0.01, abs=1e-3) and lattice["verdict"] == "worse"
    assert not shifted["kept"]
    # the other way, 1% larger, SW's lattice constant (5.431 Å) moves toward PBE's (5.4755 Å): better
    closer = {i["item"]: i for i in retention(_sw(1.01), _sw(), ["Si"])["items"]}
    assert closer["eos Si: lattice constant vs DFT"]["verdict"] == "better"
    assert any("NOT kept" in line for line in retention_lines(shifted))
    relaxed = [i for name, i in items.items() if name.startswith("relax Si")]
    assert relaxed and all(i["verdict"] != "same" for i in relaxed)


def test_crystals_the_run_fitted_are_named_as_not_held_out():
    from relaxtune.data import load_pairs

    replayed = load_pairs("builtin:crystals:train")
    result = retention(_sw(), _sw(), ["Si"], trained_on=replayed)
    assert result["trained_on_groups"] == ["Si", "Si16", "Si8"]  # Si's crystals of the train split
    assert any(line.startswith("note: the run fitted DFT frames of the crystals of Si, Si16, Si8")
               for line in retention_lines(result))
    assert retention(_sw(), _sw(), ["Si"])["trained_on_groups"] == []
