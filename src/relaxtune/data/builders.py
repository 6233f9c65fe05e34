"""Structure builders for the shipped datasets: Si point defects and small strained crystals.

Every structure carries ``info['name']`` (unique, used as its file name), ``info['group']`` (what splits
are made by: defect type or material) and ``info['seed']`` (its rattle seed), so a set is rebuilt exactly.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk

SI_A_PBE = 5.469  # Å, lattice constant of Si at the shipped datasets' PBE level (registry.REFERENCE_LEVEL)

#: every Si defect type, in the order they are generated.
SI_DEFECT_TYPES = (
    "vacancy", "sub_B", "sub_P", "int_T", "int_H", "int_split110", "sub_Al", "sub_As", "sub_C", "sub_Ge",
    "sub_N", "int_B", "int_P", "P_V", "As_V", "sub_Ga", "sub_Sb",
)


def rattle(atoms: Atoms, stdev: float, seed: int) -> Atoms:
    """Gaussian displacements of ``stdev`` Å from ``numpy.random.default_rng(seed)``, then wrap into the cell."""
    out = atoms.copy()
    rng = np.random.default_rng(seed)
    out.positions = out.positions + rng.normal(0.0, stdev, (len(out), 3))
    out.wrap()
    return out


def si_defect(kind: str, a: float = SI_A_PBE) -> Atoms:
    """One unrattled Si point defect in the 2x2x2 cubic cell (64 sites); the defect sits at the origin site."""
    host = bulk("Si", "diamond", a=a, cubic=True).repeat(2)
    tetra = np.array([0.5, 0.5, 0.5]) * a  # tetrahedral interstitial site
    hexa = np.array([0.625, 0.625, 0.625]) * a  # hexagonal site, between two tetrahedral sites on <111>
    neighbor = 1  # index of a nearest neighbour of the origin atom, at (a/4, a/4, a/4)
    assert np.allclose(host.positions[neighbor], [a / 4] * 3)
    if kind == "vacancy":
        del host[0]
    elif kind.startswith("sub_"):
        host[0].symbol = kind[4:]
    elif kind == "int_T":
        host += Atoms("Si", positions=[tetra])
    elif kind == "int_H":
        host += Atoms("Si", positions=[hexa])
    elif kind == "int_split110":
        half = 1.2 * np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)  # dumbbell of ~2.4 Å along [110] on the origin site
        host.positions[0] = half
        host += Atoms("Si", positions=[-half])
    elif kind in ("int_B", "int_P"):
        host += Atoms(kind[4:], positions=[tetra])
    elif kind in ("P_V", "As_V"):
        host[neighbor].symbol = kind.split("_")[0]
        del host[0]
    else:
        raise ValueError(f"unknown Si defect type {kind!r}; known: {', '.join(SI_DEFECT_TYPES)}")
    host.wrap()
    return host


def build_si_defects(seeds: tuple[int, ...] = (1, 2, 3), kinds: tuple[str, ...] = SI_DEFECT_TYPES,
                     stdev: float = 0.05) -> list[Atoms]:
    """Every defect type with every rattle seed, ordered seed-major so early results span all types."""
    out = []
    for seed in seeds:
        for kind in kinds:
            atoms = rattle(si_defect(kind), stdev, seed)
            atoms.info.update(name=f"{kind}_{seed}", group=kind, defect=kind, seed=seed)
            out.append(atoms)
    return out


def _crystal_prototypes() -> dict[str, Atoms]:
    """Unstrained small crystals (2-16 atoms), experimental lattice constants."""
    protos = {
        "Si": bulk("Si", "diamond", a=5.431),
        "Ge": bulk("Ge", "diamond", a=5.658),
        "C": bulk("C", "diamond", a=3.567),
        "SiC": bulk("SiC", "zincblende", a=4.360),
        "GaAs": bulk("GaAs", "zincblende", a=5.653),
        "AlP": bulk("AlP", "zincblende", a=5.463),
        "BN": bulk("BN", "zincblende", a=3.615),
        "GaN": bulk("GaN", "wurtzite", a=3.189, c=5.185),
        "Si8": bulk("Si", "diamond", a=5.431, cubic=True),
        "SiGe": bulk("SiGe", "zincblende", a=5.545),
    }
    # SiGe orderings in the 8-atom cubic cell: layered along [001], and alternating along [111] planes
    cubic = bulk("Si", "diamond", a=5.545, cubic=True)
    layered = cubic.copy()
    layered.symbols[[i for i, p in enumerate(layered.positions) if p[2] < 5.545 / 2 - 0.1]] = "Ge"
    protos["SiGe_L001"] = layered
    alt = cubic.copy()
    alt.symbols[[0, 2, 4, 6]] = "Ge"
    protos["Si3Ge"] = bulk("Si", "diamond", a=5.50, cubic=True)
    protos["Si3Ge"].symbols[[0, 5]] = "Ge"
    protos["SiGe_alt"] = alt
    protos["Si16"] = bulk("Si", "diamond", a=5.431, cubic=True).repeat((2, 1, 1))
    return protos


def build_crystals(n_per_prototype: int = 8, seed: int = 0, rattle_stdev: float = 0.1,
                   max_strain: float = 0.03) -> list[Atoms]:
    """Rattled (0.1 Å) and randomly strained (up to ±3% per component) small crystals, for cell relaxation."""
    rng = np.random.default_rng(seed)
    out = []
    for proto_name, proto in _crystal_prototypes().items():
        for k in range(n_per_prototype):
            eps = rng.uniform(-max_strain, max_strain, (3, 3))
            eps = 0.5 * (eps + eps.T)
            atoms = proto.copy()
            atoms.set_cell(proto.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            item_seed = int(rng.integers(0, 2**31))
            atoms = rattle(atoms, rattle_stdev, item_seed)
            atoms.info.update(name=f"{proto_name}_{k}", group=proto_name, seed=item_seed)
            out.append(atoms)
    # interleave prototypes so that early results cover every material
    return sorted(out, key=lambda a: (int(a.info["name"].rsplit("_", 1)[1]), a.info["group"]))
