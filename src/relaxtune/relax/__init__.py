"""Differentiable batched relaxation: pure optimizer steps, cell degrees of freedom, the unrolled loop, and
in-flight batching for relaxing many structures."""

from relaxtune.relax.config import OPTIMIZERS, RelaxConfig, RelaxResult
from relaxtune.relax.loop import GRAD_MODES, relax
from relaxtune.relax.params import StepParameters, StepValues
from relaxtune.relax.stream import RelaxedStructure, StreamProgress, relax_stream

__all__ = ["GRAD_MODES", "OPTIMIZERS", "RelaxConfig", "RelaxResult", "RelaxedStructure", "StepParameters", "StepValues",
           "StreamProgress", "relax", "relax_stream"]
