"""The calculator a run relaxes with, by name: ``gpaw``, ``espresso``, ``emt`` and ``sw`` (fast, for tests), or
``MODULE:CLASS`` (any ASE calculator class that takes no arguments)."""

from __future__ import annotations

import importlib
from pathlib import Path

from ase import Atoms
from ase.calculators.calculator import Calculator

from relaxtune.dft.espresso_calculator import check_espresso, make_espresso
from relaxtune.dft.gpaw_calculator import check_gpaw, make_gpaw
from relaxtune.dft.settings import GenerateError, GenerateSettings

_UNKNOWN = "unknown calculator {name!r}: use gpaw, espresso, emt, sw or MODULE:CLASS"


def make_calculator(atoms: Atoms, settings: GenerateSettings, directory: Path | None = None) -> Calculator:
    """An ASE calculator for one structure at the chosen level of theory (``directory``: scratch for codes
    that write files, one per structure so parallel workers never share one)."""
    name = settings.calculator
    if name == "gpaw":
        return make_gpaw(atoms, settings)
    if name == "espresso":
        return make_espresso(atoms, settings, directory)
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name == "sw":
        from relaxtune.calculator import RelaxtuneCalculator  # loads torch: only when asked for
        from relaxtune.potentials.classical import StillingerWeber

        return RelaxtuneCalculator(StillingerWeber().double())
    module, _, cls = name.partition(":")
    if not cls:
        raise GenerateError(_UNKNOWN.format(name=name))
    return getattr(importlib.import_module(module), cls)()


def check_calculator(symbols: list[str], settings: GenerateSettings) -> None:
    """The calculator can be made for these elements: installed, with its data files (``GenerateError``)."""
    name = settings.calculator
    if name == "gpaw":
        check_gpaw(symbols)
    elif name == "espresso":
        check_espresso(symbols, settings)
    elif name == "sw":
        importlib.import_module("relaxtune.potentials.classical")
        importlib.import_module("relaxtune.calculator")
    elif name != "emt":
        module, _, cls = name.partition(":")
        if not cls:
            raise GenerateError(_UNKNOWN.format(name=name))
        try:
            obj = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            raise GenerateError(f"calculator {name}: cannot import: {exc}") from None
        if not callable(obj):
            raise GenerateError(f"calculator {name}: {cls} is not a class")
