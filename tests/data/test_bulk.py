"""The bulk crystals of a run's elements: shipped crystals plus ASE's reference lattices."""

from relaxtune.data.bulk import bulk_prototypes, crystals_of


def test_crystals_of_picks_the_shipped_crystals_made_only_of_those_elements():
    si = crystals_of(["Si"])
    assert len(si) == 18 and {p.group for p in si} == {"Si", "Si8", "Si16"}
    with_c = crystals_of(["Si", "C"])
    assert {p.group for p in with_c} == {"Si", "Si8", "Si16", "C", "SiC"}
    assert crystals_of(["Cu"]) == []


def test_bulk_prototypes_add_ase_lattices_only_for_elements_without_a_shipped_crystal():
    names = [a.info["name"] for a in bulk_prototypes(["Si", "Al"])]
    assert sorted(names) == ["Al-fcc", "Si", "Si16", "Si8"]
    (cu,) = bulk_prototypes(["Cu"])
    assert cu.info["name"] == "Cu-fcc" and cu.calc is None
    # a shipped prototype is its DFT-relaxed cell, without the DFT calculator attached
    si = next(a for a in bulk_prototypes(["Si"]) if a.info["name"] == "Si")
    assert si.calc is None and abs(si.get_volume() / len(si) - 5.4755 ** 3 / 8) < 0.5
