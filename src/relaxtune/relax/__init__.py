"""Differentiable batched relaxation: pure optimizer steps, cell degrees of freedom and the unrolled loop."""

from relaxtune.relax.loop import GRAD_MODES, RelaxConfig, RelaxResult, relax
from relaxtune.relax.params import StepParameters, StepValues

__all__ = ["GRAD_MODES", "RelaxConfig", "RelaxResult", "StepParameters", "StepValues", "relax"]
