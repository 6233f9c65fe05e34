"""What a generation run is asked to do: the calculator, the level of theory and the relaxation's limits."""

from __future__ import annotations

from dataclasses import dataclass


class GenerateError(ValueError):
    """A setup problem found before any structure is relaxed (calculator missing, no pseudopotential...)."""


@dataclass(frozen=True)
class GenerateSettings:
    calculator: str = "gpaw"  # gpaw | espresso | emt | sw | MODULE:CLASS
    fmax: float = 0.02  # eV/Å
    relax_cell: bool = False
    max_steps: int = 300
    ecut: float = 300.0  # eV, plane-wave cutoff (DFT calculators)
    kpts: str = "auto"  # auto: Γ for ≥ 32 atoms, else k-point density 3.5 Å (gamma-centred); gamma; density:X
    pseudo_dir: str = ""  # espresso: UPF folder ("" = $ESPRESSO_PSEUDO or /usr/share/espresso/pseudo)
    pseudopotentials: str = ""  # espresso: "Si=Si.pbe-rrkj.UPF,C=..." to override the automatic PBE choice

    def level(self) -> str:
        """A one-line description of the level of theory, written into every file."""
        if self.calculator == "gpaw":
            import gpaw  # optional dependency: only a GPAW run needs it

            return f"GPAW {gpaw.__version__} PBE PW{self.ecut:g} kpts={self.kpts} FD0.05"
        if self.calculator == "espresso":
            return f"QuantumESPRESSO PBE ecutwfc={self.ecut:g}eV kpts={self.kpts} FD0.05"
        return self.calculator
