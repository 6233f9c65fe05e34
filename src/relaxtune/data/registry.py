"""Shipped datasets: ``builtin:NAME`` and ``builtin:NAME:SPLIT`` resolved to relaxation pairs.

Each dataset is a folder under ``relaxtune/data/builtin/``: one extxyz trajectory per structure, a
``splits.json`` and a generated ``DATASHEET.md``. A *view* selects structures of another dataset's folder
without copying files. Each entry records how its structures are built and how to regenerate it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relaxtune.data import builders
from relaxtune.data.pairs import DataError, RelaxationPair, read_directory, read_splits_file

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

#: the level of theory every shipped dataset was relaxed at (its datasheet quotes it).
REFERENCE_LEVEL = (
    "GPAW 26.7.0, PBE, plane waves 300 eV, Fermi-Dirac smearing 0.05 eV, SCF convergence energy 1e-5 eV / "
    "density 1e-4, BFGS (ASE, maxstep 0.2 Å) to fmax 0.02 eV/Å"
)


@dataclass(frozen=True)
class View:
    """Which structures of its parent dataset a view keeps: rattle seeds and splits (None = all)."""

    seeds: tuple[int, ...] | None = None
    splits: tuple[str, ...] | None = None

    def keeps(self, seed: int, split: str | None) -> bool:
        return ((self.seeds is None or seed in self.seeds)
                and (self.splits is None or split in self.splits))

    def keeps_pair(self, pair: RelaxationPair) -> bool:
        return self.keeps(int(pair.info.get("seed", -1)), pair.split)

    @property
    def text(self) -> str:
        parts = []
        if self.seeds is not None:
            parts.append(f"seed in {list(self.seeds)}")
        if self.splits is not None:
            parts.append(f"split in {list(self.splits)}")
        return " and ".join(parts) or "all"


@dataclass(frozen=True)
class BuiltinDataset:
    """A shipped dataset (or a view of one): where its files are and how they were made."""

    name: str
    folder: str
    description: str
    structures: str  # how the initial structures are built
    settings: str  # level of theory beyond REFERENCE_LEVEL (cell, k-points)
    regenerate: tuple[str, ...]  # shell commands that remake it
    builder: str  # relaxtune.data.builders function that builds the inputs ("" for none)
    view: View | None = None  # a view of the dataset in ``folder``: what it keeps

    @property
    def directory(self) -> Path:
        return BUILTIN_DIR / self.folder

    @property
    def is_view(self) -> bool:
        return self.view is not None

    def splits(self) -> dict[str, list[str]]:
        path = self.directory / "splits.json"
        return read_splits_file(path) if path.exists() else {}

    def expected_structures(self) -> list[tuple[str, str]]:
        """(name, group) of every structure the builder makes for this dataset (done or not)."""
        if not self.builder:
            return []
        built = getattr(builders, self.builder)()
        if self.view is None:
            return [(a.info["name"], a.info["group"]) for a in built]
        split_of = {g: s for s, groups in self.splits().items() for g in groups}
        return [(a.info["name"], a.info["group"]) for a in built
                if self.view.keeps(int(a.info.get("seed", -1)), split_of.get(a.info["group"]))]

    def expected_names(self, split: str | None = None) -> list[str]:
        """Names of the planned structures, optionally only those of one split."""
        groups = set(self.splits().get(split, [])) if split else None
        return [n for n, g in self.expected_structures() if groups is None or g in groups]


DATASETS: dict[str, BuiltinDataset] = {
    "si-defects": BuiltinDataset(
        name="si-defects", folder="si-defects",
        description="Si point defects in a 64-site cell: initial (rattled) and DFT-relaxed structures, fixed cell.",
        structures=("17 defect types (vacancy; Si self-interstitials T, H, <110> split; substitutional B, Al, Ga, P, "
                    "As, Sb, C, Ge, N; interstitial B, P; P-V and As-V pairs) in the 2x2x2 conventional diamond cell "
                    "(64 sites) at a = 5.469 Å, defect at the origin site, positions rattled by a normal "
                    "distribution of 0.05 Å (numpy default_rng(seed), seeds 1, 2, 3): "
                    "relaxtune.data.builders.build_si_defects()"),
        settings=("Γ point only, fixed cell. Caveat: 300 eV is the reference cutoff for all species, but it is not "
                  "converged for first-row dopants (B, C, N): on the 300 eV-relaxed sub_N_1, forces at 700 eV differ "
                  "by up to 0.26 eV/Å (on a Si atom bonded to N; mean 0.04 eV/Å over all atoms), so their "
                  "relaxed N-Si bonds are those of the 300 eV level, not of converged PBE. Stress: the relaxed frame "
                  "of every structure without B, C or N carries the stress of one more SCF there at the same level "
                  "(scripts/add_final_stress.py; the energy agrees with the stored one to within 4e-5 eV), so that "
                  "fine-tuning holds the host's pressure. Structures with B, C or N have none: at 300 eV their "
                  "basis-set (Pulay) stress, scaled from c-BN's -129 GPa, is about 0.6 GPa per first-row atom in "
                  "this cell, as large as the defects' own stresses. The level's own pressure of the perfect 64-atom cell at "
                  "a = 5.469 Å is +1.10 GPa, against +0.31 GPa for the 8-atom cell at k-point density 3.5: Γ-only "
                  "sampling adds +0.8 GPa (k-converged PBE at 300 eV relaxes bulk Si to a = 5.4755 Å: crystals "
                  "Si_0, Si_1)"),
        regenerate=("OMP_NUM_THREADS=1 python scripts/generate_builtin.py si-defects --jobs 2",
                    "# or, with the CLI:",
                    "relaxtune data build si-defects -o si-defects.extxyz",
                    "relaxtune data generate si-defects.extxyz --out DIR --calculator gpaw --fmax 0.02 --kpts gamma "
                    "--jobs 2"),
        builder="build_si_defects",
    ),
    "si-defects-mini": BuiltinDataset(
        name="si-defects-mini", folder="si-defects",
        description=("View of si-defects: one rattle (seed 1) per defect type, same split by defect type "
                     "(10 train, 2 val, 5 test structures when complete). Small enough to fine-tune CHGNet on 2 CPU "
                     "cores in minutes: with the default recipe (relaxations from the DFT structures) an epoch "
                     "took about 30 s."),
        structures="the seed-1 structures of si-defects (no files of its own)",
        settings="as si-defects",
        regenerate=("# a view: regenerate si-defects",),
        builder="build_si_defects",
        view=View(seeds=(1,)),
    ),
    "si-defects-heldout-trained": BuiltinDataset(
        name="si-defects-heldout-trained", folder="si-defects",
        description=("View of si-defects: the structures of si-defects-mini's training types that it does not "
                     "train on (the rattles of seeds 2 and 3): new structures of the trained defect types."),
        structures="the seed-2 and seed-3 structures of the train split of si-defects (no files of its own)",
        settings="as si-defects",
        regenerate=("# a view: regenerate si-defects",),
        builder="build_si_defects",
        view=View(seeds=(2, 3), splits=("train",)),
    ),
    "si-defects-heldout-unseen": BuiltinDataset(
        name="si-defects-heldout-unseen", folder="si-defects",
        description=("View of si-defects: every structure of the defect types outside the train split (the "
                     "validation and test types, all rattles): defect types a model trained on the train split "
                     "never saw."),
        structures="all structures of the val and test splits of si-defects (no files of its own)",
        settings="as si-defects",
        regenerate=("# a view: regenerate si-defects",),
        builder="build_si_defects",
        view=View(splits=("val", "test")),
    ),
    "crystals": BuiltinDataset(
        name="crystals", folder="crystals",
        description="Small crystals (2-16 atoms), rattled 0.1 Å and strained up to ±3%, relaxed with the cell free.",
        structures=("Si, Ge, C (diamond), SiC, GaAs, AlP, BN (zincblende), GaN (wurtzite), Si in 8- and 16-atom "
                    "cells, SiGe orderings (zincblende, [001]-layered, alternating, Si3Ge); 8 random strains "
                    "(symmetric, each component up to ±3%) and rattles (0.1 Å) per prototype, "
                    "seed 0: relaxtune.data.builders.build_crystals()"),
        settings=("Monkhorst-Pack mesh from kpts={'density': 3.5, 'gamma': True}, cell relaxed together with the "
                  "positions (ASE FrechetCellFilter), no point-group symmetry (time reversal kept); plane-wave "
                  "cutoff raised for structures with first-row elements (C: 500 eV; B, N: 700 eV) because at "
                  "300 eV the basis-set (Pulay) stress shrinks their cells (c-BN -129 GPa, diamond -51 GPa, "
                  "zb-GaN -48 GPa at the experimental lattice constant; Si, Ge, AlP, GaAs are converged at 300 eV)"),
        regenerate=("OMP_NUM_THREADS=1 python scripts/generate_builtin.py crystals --jobs 2",
                    "# or, with the CLI (one call per cutoff; --ecut 500 for C, 700 for B and N compounds):",
                    "relaxtune data build crystals -o crystals.extxyz",
                    "relaxtune data generate crystals.extxyz --out DIR --calculator gpaw --fmax 0.02 --relax-cell "
                    "--jobs 2"),
        builder="build_crystals",
    ),
}


def get_dataset(name: str) -> BuiltinDataset:
    """The registry entry for ``name`` (``DataError`` listing the known names otherwise)."""
    if name not in DATASETS:
        raise DataError(f"builtin:{name}: dataset: unknown; available: {', '.join('builtin:' + n for n in DATASETS)}")
    return DATASETS[name]


def parse_builtin(spec: str) -> tuple[BuiltinDataset, str | None]:
    """``NAME`` or ``NAME:SPLIT`` (with or without the ``builtin:`` prefix) -> (dataset, split)."""
    spec = spec[len("builtin:"):] if spec.startswith("builtin:") else spec
    name, _, split = spec.partition(":")
    return get_dataset(name), (split or None)


def load_builtin(spec: str) -> list[RelaxationPair]:
    """Pairs of a shipped dataset, ``NAME`` or ``NAME:SPLIT``; each pair carries its split."""
    ds, split = parse_builtin(spec)
    if not ds.directory.is_dir() or not any(ds.directory.glob("*.extxyz")):
        raise DataError(f"builtin:{ds.name}: files: no relaxations shipped yet in {ds.directory} "
                        f"(regenerate: {ds.regenerate[0]})")
    pairs = read_directory(ds.directory)
    if ds.view is not None:
        pairs = [p for p in pairs if ds.view.keeps_pair(p)]
    for p in pairs:
        p.info.setdefault("dataset", ds.name)
    if split is not None:
        splits = ds.splits()
        if split not in splits:
            raise DataError(f"builtin:{ds.name}:{split}: split: unknown; available: {', '.join(splits) or 'none'}")
        pairs = [p for p in pairs if p.split == split]
    return pairs


def builtin_path(name: str) -> Path:
    """The folder holding a shipped dataset's files."""
    return get_dataset(name).directory

