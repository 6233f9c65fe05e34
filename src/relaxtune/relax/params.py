"""Trainable relaxation parameters: log step size, momentum logit, optional per-element step scales.

``relax(..., step_params=p)`` calls ``p(batch.numbers)`` and uses the result instead of the config's values:

* gradient descent: ``eta = exp(log_step_size)`` (Å²/eV), times ``exp(log_element_scale[Z])`` per atom if
  enabled; momentum ``sigmoid(momentum_logit)`` if the module has one, else the config's momentum.
* FIRE: ``exp(log_step_size)`` is the initial time step ``dt``; the per-element scales precondition the forces
  fed to FIRE (convergence is still judged on the true forces); momentum is not used.

Parameters are stored in float64 (0-dim, so they do not promote float32 inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepValues:
    step_size: torch.Tensor  # 0-dim
    atom_scale: torch.Tensor | None  # (n_atoms,) or None
    momentum: torch.Tensor | None  # 0-dim or None


class StepParameters(torch.nn.Module):
    """Learnable step size (log), momentum (logit, optional) and per-element step scales (log, optional)."""

    def __init__(self, step_size: float = 0.02, momentum: float | None = None, per_element: bool = False):
        super().__init__()
        if step_size <= 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self.log_step_size = torch.nn.Parameter(torch.tensor(math.log(step_size), dtype=torch.float64))
        if momentum is not None:
            if not 0.0 < momentum < 1.0:
                raise ValueError(f"a learnable momentum must lie strictly between 0 and 1, got {momentum}")
            self.momentum_logit = torch.nn.Parameter(
                torch.tensor(math.log(momentum / (1.0 - momentum)), dtype=torch.float64))
        else:
            self.momentum_logit = None
        self.log_element_scale = (torch.nn.Parameter(torch.zeros(119, dtype=torch.float64))
                                  if per_element else None)

    @property
    def step_size(self) -> torch.Tensor:
        return self.log_step_size.exp()

    @property
    def momentum(self) -> torch.Tensor | None:
        return None if self.momentum_logit is None else torch.sigmoid(self.momentum_logit)

    def forward(self, numbers: torch.Tensor) -> StepValues:
        scale = None if self.log_element_scale is None else self.log_element_scale[numbers].exp()
        return StepValues(step_size=self.step_size, atom_scale=scale, momentum=self.momentum)

    def extra_repr(self) -> str:
        m = self.momentum
        return (f"step_size={self.step_size.item():.4g}, momentum={None if m is None else round(m.item(), 4)}, "
                f"per_element={self.log_element_scale is not None}")
