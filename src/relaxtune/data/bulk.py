"""The bulk crystals of a set of elements: what a run keeps from pretraining and checks after training.

``crystals_of`` picks the shipped ``builtin:crystals`` pairs (DFT-relaxed with the cell free) made only of the
given elements; ``bulk_prototypes`` adds ASE's reference lattice of each element that has no elemental crystal
there, so that any run has the bulk of its elements (without DFT for the added ones).
"""

from __future__ import annotations

from typing import Sequence

from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, reference_states

from relaxtune.data.registry import load_builtin

#: ASE reference lattices ``ase.build.bulk`` builds from the element name alone
SIMPLE_LATTICES = ("fcc", "bcc", "hcp", "diamond", "sc")


def crystals_of(species: Sequence[str], name: str = "crystals") -> list:
    """The pairs of builtin dataset ``name`` (every split) whose elements all occur in ``species``."""
    allowed = set(species)
    return [p for p in load_builtin(name) if set(p.initial.get_chemical_symbols()) <= allowed]


def bulk_prototypes(species: Sequence[str]) -> list[Atoms]:
    """One relaxed cell per crystal prototype of ``species`` in ``builtin:crystals``, plus ASE's reference lattice of each
    element that has no elemental prototype there (where ASE knows a simple one)."""
    protos: dict[str, Atoms] = {}
    for pair in crystals_of(species):
        protos.setdefault(pair.group or pair.name, pair.final.copy())
    elemental = {str(a.get_chemical_symbols()[0]) for a in protos.values() if len(set(a.get_chemical_symbols())) == 1}
    for el in sorted(set(species) - elemental):
        state = reference_states[atomic_numbers[el]] or {}
        if state.get("symmetry") in SIMPLE_LATTICES:
            protos[f"{el}-{state['symmetry']}"] = bulk(el)
    out = []
    for name, atoms in protos.items():
        atoms.calc = None
        atoms.info = {"name": name}
        out.append(atoms)
    return out
