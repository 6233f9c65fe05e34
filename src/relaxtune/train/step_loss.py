"""What an objective measured in one optimizer step: ``StepLoss`` with its ``RelaxationCounts``, and
``LossParts``, the generator type of an objective (pieces of loss to differentiate, then the ``StepLoss``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator

import torch


@dataclass
class RelaxationCounts:
    """What training relaxations did, for a step or summed over an epoch: optimizer steps and convergence per
    structure; the implicit solve's CG iterations, fallbacks to the unrolled gradient and truncated solves."""

    steps: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    cg_iterations: int = 0
    fallback: int = 0
    truncated: int = 0

    def add(self, other: "RelaxationCounts") -> None:
        """Count ``other``'s relaxations in too."""
        self.steps.extend(other.steps)
        self.converged.extend(other.converged)
        self.cg_iterations += other.cg_iterations
        self.fallback += other.fallback
        self.truncated += other.truncated


@dataclass
class StepLoss:
    """What an objective measured on its structures (one process's share of a mini-batch).

    The differentiated loss is ``total / weight``: ``weight`` counts the structures in the loss (``n_ok``) or,
    for the ``forces`` objective (``per_frame``), the DFT frames. ``blew``: structures left out (their
    relaxation blew up or their loss is not finite). ``error``: why the step raised, when it did.
    """

    total: float
    weight: float
    n_ok: int
    blew: torch.Tensor
    per_frame: bool = False
    n_blew: int = 0
    relaxations: RelaxationCounts = field(default_factory=RelaxationCounts)
    error: str | None = None

    @property
    def loss_sum(self) -> float:
        """The reported loss summed over the structures (``forces``: the mean frame loss times ``n_ok``)."""
        if not self.per_frame:
            return self.total
        return self.total / self.weight * self.n_ok if self.weight else 0.0

    @classmethod
    def empty(cls, n_pairs: int, per_frame: bool, error: str | None = None) -> "StepLoss":
        """Nothing in the loss (no structure, or the step raised ``error``)."""
        return cls(0.0, 0.0, 0, torch.zeros(n_pairs, dtype=torch.bool), per_frame=per_frame, error=error)


#: an objective's pieces of loss to differentiate, then (as the generator's return value) its ``StepLoss``
LossParts = Generator[torch.Tensor, None, StepLoss]
