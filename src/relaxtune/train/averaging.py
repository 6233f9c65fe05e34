"""An exponential moving average of the trainable weights, the model that validation and best.pt see.

With a few optimizer steps per epoch on a few structures, each step's weights carry the noise of its mini-batch
and the validation Dq that picks best.pt carries the noise of two or three structures. Averaging the weights
over the last ``average_epochs`` epochs (an exponential moving average started at the pretrained weights, as
MACE's fine-tuning and weight-space ensembling do) smooths both. Its time constant is set in epochs, so that it
means the same for 10 and for 1,000 training structures.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch


class WeightAverage:
    """The moving average of ``params`` with a time constant of ``average_epochs`` x ``steps_per_epoch`` optimizer
    steps; ``average_epochs`` 0 keeps no average (``applied`` then leaves the weights as they are)."""

    def __init__(self, params: Sequence[torch.Tensor], average_epochs: float, steps_per_epoch: int):
        self.params = list(params)
        steps = average_epochs * steps_per_epoch
        self.decay = math.exp(-1.0 / steps) if steps > 0 else 0.0
        self.average = [p.detach().clone() for p in self.params] if self.decay > 0 else []

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: average <- decay * average + (1 - decay) * weights."""
        for a, p in zip(self.average, self.params):
            a.lerp_(p.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration of the block, the trained ones back after it."""
        if not self.average:
            yield
            return
        trained = [p.detach().clone() for p in self.params]
        _copy(self.params, self.average)
        try:
            yield
        finally:
            _copy(self.params, trained)

    def state(self) -> dict[str, Any]:
        """last.pt's entry (the trained weights themselves are the checkpoint's state_dict)."""
        return {"weight_average": [a.clone() for a in self.average]}

    def load(self, state: dict[str, Any]) -> None:
        stored = state.get("weight_average") or []
        if len(stored) != len(self.average):
            raise ValueError(f"last.pt holds {len(stored)} averaged tensors, the run keeps {len(self.average)}")
        _copy(self.average, stored)


@torch.no_grad()
def _copy(targets: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    for t, v in zip(targets, values):
        t.copy_(v)
