"""The gradient terms that keep what the pretrained model knew: self-distillation on bulk of the training
elements (``relaxtune.train.distill``), replay of general DFT data (``relaxtune.train.replay``), with optional
gradient surgery against both, the L2-SP anchor, and updates that keep the bulk's outputs."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from relaxtune.potentials.base import EnergyModel
from relaxtune.train.config import TrainConfig
from relaxtune.train.distill import distillation_loss, distillation_set, draw
from relaxtune.train.orthogonal import OrthogonalUpdates
from relaxtune.train.replay import Replay


class KeepPretrained:
    """Adds ``distill_weight`` x the distillation gradient, ``replay_weight`` x the replay gradient and
    ``anchor_weight`` x ∇|θ-θ0|² to the gradients of ``params`` (the model's trainable weights, at their
    pretrained values when this is built), and with ``distill_orthogonal`` keeps each optimizer step orthogonal
    to the bulk's energies and stresses, unless the training data relax cells (``fits_cells``)."""

    def __init__(self, config: TrainConfig, model: EnergyModel, params: Sequence[torch.Tensor],
                 species: list[str], dtype: torch.dtype, device: torch.device, fits_cells: bool = False,
                 log: Callable[[str], None] = lambda message: None):
        self.config = config
        self.model = model
        self.params = list(params)
        self.anchor = [p.detach().clone() for p in self.params] if config.anchor_weight > 0 else []
        orthogonal = config.distill_orthogonal and not fits_cells
        if config.distill_orthogonal and fits_cells:
            log("note: orthogonal updates off: the training data hold cell relaxations, whose stresses a step "
                "that keeps the bulk's energies and stresses could not fit")
        self.distill = (distillation_set(model, species, config.distill_per_prototype, config.seed, dtype)
                        if config.distill_weight > 0 or orthogonal else [])
        self.replay = Replay(config, model, dtype, device)
        self.dtype = dtype
        self.orthogonal = (OrthogonalUpdates(model, self.distill, self.params, dtype)
                           if orthogonal and self.distill else None)
        n_weights = sum(p.numel() for p in self.params)
        if self.orthogonal is not None and self.orthogonal.basis.shape[1] > n_weights // 2:
            log(f"note: orthogonal updates off: the bulk's energies and stresses move "
                f"{self.orthogonal.basis.shape[1]} independent directions of the {n_weights} trainable weights, "
                "and a step orthogonal to them would leave too little of the model to train")
            self.orthogonal = None
        self._before: torch.Tensor | None = None

    def before_step(self) -> None:
        """Remember the weights before an optimizer step (``distill_orthogonal``)."""
        if self.orthogonal is not None:
            self._before = self.orthogonal.weights()

    def after_step(self) -> None:
        """With ``distill_orthogonal``: remove from the step just taken its component along the gradients of the
        bulk's energies and stresses, so that it leaves them unchanged to first order whatever the optimizer made
        of the gradients (``relaxtune.train.orthogonal``)."""
        if self.orthogonal is not None and self._before is not None:
            self.orthogonal.project(self._before)

    def add_gradients(self, step: int) -> dict[str, float]:
        """Add the terms' gradients once the data gradient is complete (every rank adds the same: the draws
        depend on the seed and ``step`` alone); returns the distillation and replay losses of those in use."""
        c = self.config
        losses, weighted = {}, []
        if self.distill and c.distill_weight > 0:
            picks = draw(len(self.distill), c.distill_per_step, c.seed, step)
            loss = distillation_loss(self.model, [self.distill[i] for i in picks], c.stress_weight, self.dtype,
                                     c.distill_force_weight)
            losses["distill"], weighted = loss, [c.distill_weight * loss]
        if self.replay:
            loss = self.replay.loss(step)
            losses["replay"] = loss
            weighted.append(c.replay_weight * loss)
        if weighted:
            grads = torch.autograd.grad(sum(weighted), self.params, allow_unused=True)
            if c.distill_project:
                drop_conflict(self.params, grads)
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        for p, p0 in zip(self.params, self.anchor):
            g = 2.0 * c.anchor_weight * (p.detach() - p0)
            p.grad = g if p.grad is None else p.grad + g
        return {name: float(loss.detach()) for name, loss in losses.items()}


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
