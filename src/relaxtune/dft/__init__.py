"""Reference relaxations with DFT (GPAW, Quantum ESPRESSO) or any ASE calculator: one extxyz trajectory per
structure, resumable, in parallel single-threaded workers.

``generate`` relaxes the structures of ``read_structures`` not done yet (``relaxtune.dft.output``
describes the files); ``preflight`` checks the setup first. One module per job: settings, k-points,
cutoffs, pseudopotentials, calculators (gpaw, espresso), output files, one relaxation, the worker pool.
"""

from relaxtune.dft.calculators import make_calculator
from relaxtune.dft.cutoffs import CELL_RELAX_MIN_ECUT, cell_relax_min_ecut, cutoff_warning
from relaxtune.dft.inputs import read_structures
from relaxtune.dft.output import partial_path, pending
from relaxtune.dft.preflight import preflight
from relaxtune.dft.pseudopotentials import DEFAULT_PSEUDO_DIR, choose_pseudopotentials, is_pbe, upf_header
from relaxtune.dft.relaxation import relax_one
from relaxtune.dft.runner import generate
from relaxtune.dft.settings import GenerateError, GenerateSettings

__all__ = [
    "CELL_RELAX_MIN_ECUT", "DEFAULT_PSEUDO_DIR", "GenerateError", "GenerateSettings", "cell_relax_min_ecut",
    "choose_pseudopotentials", "cutoff_warning", "generate", "is_pbe", "make_calculator", "partial_path",
    "pending", "preflight", "read_structures", "relax_one", "upf_header",
]
