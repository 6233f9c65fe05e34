"""Any relaxtune energy model (pretrained or fine-tuned) as an ASE ``Calculator``.

The topology (neighbor list, crystal graph) is rebuilt on every calculation: ASE drivers may move atoms by
any amount between calls, so correctness wins over the small saving of reusing it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from relaxtune.potentials import load_model
from relaxtune.potentials.base import EnergyModel, energy_and_forces
from relaxtune.state import Batch


def _model_dtype(model: EnergyModel, default: torch.dtype) -> torch.dtype:
    """The floating dtype of the model's weights (classical models keep float64 scalars: use ``default``)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dim() > 0:
            return p.dtype
    return default


def _model_device(model: EnergyModel) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class RelaxtuneCalculator(Calculator):
    """ASE calculator for energy, free_energy, forces and stress (eV, eV/Å, eV/Å^3, ASE sign convention).

    ``model``: an ``EnergyModel``, or anything ``relaxtune.potentials.load_model`` accepts ("chgnet",
    "sevennet", "lj", "sw", a MACE model file, a fine-tuned checkpoint). ``dtype`` defaults to the model's.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: EnergyModel | str | Path = "chgnet", *, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, EnergyModel):
            model = load_model(str(model), dtype=dtype or torch.float32).eval()
        if device is not None:
            model = model.to(device)
        # a model passed in keeps its own mode and device (the caller may still be training it)
        self.model = model
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.dtype = dtype or _model_dtype(model, torch.float64)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        batch = Batch.from_atoms([self.atoms], dtype=self.dtype, device=self.device)
        prepared = self.model.prepare(batch)
        with_stress = bool(self.atoms.pbc.all())
        out = energy_and_forces(self.model, batch, prepared, compute_stress=with_stress)
        energy = float(out.energy[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out.forces.detach().cpu().double().numpy(),
        }
        if with_stress:  # without 3D periodicity ASE reports stress as not implemented for this calculation
            self.results["stress"] = full_3x3_to_voigt_6_stress(out.stress[0].detach().cpu().double().numpy())
