"""The gradient terms that keep the model near its pretrained self: self-distillation on bulk of the training
elements (``relaxtune.train.distill``), with optional gradient surgery, and the L2-SP anchor."""

from __future__ import annotations

from typing import Sequence

import torch

from relaxtune.potentials.base import EnergyModel
from relaxtune.train.config import TrainConfig
from relaxtune.train.distill import distillation_draw, distillation_loss, distillation_set


class KeepPretrained:
    """Adds ``distill_weight`` x the distillation gradient and ``anchor_weight`` x ∇|θ-θ0|² to the gradients of
    ``params`` (the model's trainable weights, at their pretrained values when this is built)."""

    def __init__(self, config: TrainConfig, model: EnergyModel, params: Sequence[torch.Tensor],
                 species: list[str], dtype: torch.dtype):
        self.config = config
        self.model = model
        self.params = list(params)
        self.anchor = [p.detach().clone() for p in self.params] if config.anchor_weight > 0 else []
        self.distill = (distillation_set(model, species, config.distill_per_prototype, config.seed, dtype)
                        if config.distill_weight > 0 else [])
        self.dtype = dtype

    def add_gradients(self, step: int) -> float | None:
        """Add the terms' gradients once the data gradient is complete (every rank adds the same: the draw of
        the bulk set depends on the seed and ``step`` alone); returns the distillation loss, if any."""
        c = self.config
        distilled = None
        if self.distill and c.distill_weight > 0:
            picks = distillation_draw(len(self.distill), c.distill_per_step, c.seed, step)
            loss = distillation_loss(self.model, [self.distill[i] for i in picks], c.stress_weight, self.dtype,
                                     c.distill_force_weight)
            grads = torch.autograd.grad(c.distill_weight * loss, self.params, allow_unused=True)
            if c.distill_project:
                drop_conflict(self.params, grads)
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
            distilled = float(loss.detach())
        for p, p0 in zip(self.params, self.anchor):
            g = 2.0 * c.anchor_weight * (p.detach() - p0)
            p.grad = g if p.grad is None else p.grad + g
        return distilled


def drop_conflict(params: Sequence[torch.Tensor], keep: Sequence[torch.Tensor | None]) -> None:
    """Gradient surgery (PCGrad): where the data gradient (``p.grad``) points against ``keep``, remove that
    component from it, so that the data step leaves the kept loss unchanged to first order."""
    pairs = [(p, g) for p, g in zip(params, keep) if g is not None and p.grad is not None]
    if not pairs:
        return
    dot = sum(float((p.grad.double() * g.double()).sum()) for p, g in pairs)
    norm2 = sum(float((g.double() ** 2).sum()) for _, g in pairs)
    if dot < 0 and norm2 > 0:
        for p, g in pairs:
            p.grad = p.grad - (dot / norm2) * g
