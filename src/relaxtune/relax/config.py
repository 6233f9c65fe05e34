"""What a relaxation is asked to do (``RelaxConfig``) and what it returns (``RelaxResult``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from relaxtune.relax.steps import LBFGS_H0, FireParams, LBFGSParams
from relaxtune.state import Batch

#: relaxation optimizers; L-BFGS only without a graph (its history is not differentiated)
OPTIMIZERS = ("fire", "gd", "lbfgs")


@dataclass(frozen=True)
class RelaxConfig(FireParams):
    """How to relax. FIRE parameters (inherited from ``FireParams``) are ASE's defaults; ``step_size`` etc. are
    for gradient descent."""

    optimizer: str = "fire"  # "fire" | "gd" | "lbfgs"
    fmax: float = 0.05  # eV/Å; converged when max row force < fmax (strict, as ASE)
    max_steps: int = 500
    relax_cell: bool = False
    pressure: float = 0.0  # eV/Å^3, target pressure with relax_cell
    # gradient descent
    step_size: float = 0.02  # Å²/eV
    max_displacement: float | None = 0.2  # Å per atom per step (smooth cap), None = no cap
    anneal: float = 1.0  # eta multiplied by this every step
    momentum: float = 0.0
    # L-BFGS (ASE's memory and alpha; its step is capped by ``maxstep`` too). ``h0``: the initial inverse Hessian
    # of each step, "scaled" (sᵀy / yᵀy from the newest step: about half of ASE's steps on Si defects) or
    # "fixed" (I / alpha: ASE's LBFGS step for step); see ``steps.LBFGSParams``
    memory: int = 100
    alpha: float = 70.0  # eV/Å², initial Hessian
    h0: str = "scaled"
    # safety
    blowup_force: float = 1e3  # eV/Å

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.fmax <= 0 or self.max_steps < 0:
            raise ValueError("fmax must be > 0 and max_steps >= 0")
        if self.step_size <= 0 or self.dt <= 0 or self.maxstep <= 0:
            raise ValueError("step_size, dt and maxstep must be positive")
        if self.max_displacement is not None and self.max_displacement <= 0:
            raise ValueError("max_displacement must be positive or None")
        if self.h0 not in LBFGS_H0:
            raise ValueError(f"h0 must be one of {', '.join(LBFGS_H0)}, got {self.h0!r}")

    @staticmethod
    def step_field(optimizer: str) -> str:
        """The field that is the step size η for ``optimizer``: GD's ``step_size`` (Å²/eV) or FIRE's initial
        ``dt``; so that one option (``--step-size``) can set either."""
        return "step_size" if optimizer == "gd" else "dt"

    @property
    def eta(self) -> float:
        """This configuration's step size η (see ``step_field``)."""
        return getattr(self, self.step_field(self.optimizer))

    @property
    def lbfgs_params(self) -> LBFGSParams:
        return LBFGSParams(maxstep=self.maxstep, memory=self.memory, alpha=self.alpha, h0=self.h0)

    @property
    def fire_params(self) -> FireParams:
        return FireParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FireParams)})


@dataclass(frozen=True)
class RelaxResult:
    batch: Batch  # final structures (positions/cell carry the graph when training)
    energy: torch.Tensor  # (n_systems,) eV, at the final structures
    forces: torch.Tensor  # (n_atoms, 3) eV/Å, model forces at the final structures (fixed atoms included)
    stress: torch.Tensor | None  # (n_systems, 3, 3) eV/Å^3 with relax_cell, else None
    n_steps: torch.Tensor  # (n_systems,) long, optimizer steps taken
    converged: torch.Tensor  # (n_systems,) bool
    blew_up: torch.Tensor  # (n_systems,) bool
    fmax: torch.Tensor  # (n_systems,) final max row force (the convergence measure)
    energy_trace: torch.Tensor | None = None  # (n_evaluations, n_systems) when record_trace
