"""Energy models behind one interface (see ``base.EnergyModel``) and a loader by name or file."""

from relaxtune.potentials.base import EnergyForces, EnergyModel, UnsupportedElementError, energy_and_forces

__all__ = ["EnergyForces", "EnergyModel", "UnsupportedElementError", "energy_and_forces"]
