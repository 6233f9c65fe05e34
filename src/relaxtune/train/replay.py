"""Replay: DFT frames of general data fitted at every optimizer step, next to the training structures.

Self-distillation keeps the pretrained model's own answers on the host; replay fits DFT's answers on data the
user already has at the same level of theory (e.g. the bulk crystals of ``builtin:crystals``), so the host is
held to DFT rather than to the pretrained model. Every step draws ``replay_per_step`` of the replay structures
and fits ``frames_per_structure`` of each one's DFT frames, exactly as the training structures' frame term
(``relaxtune.train.frame_loss``): energy relative to the relaxed frame, forces and, on cell relaxations, stress.
"""

from __future__ import annotations

import torch

from relaxtune.data import load_pairs
from relaxtune.potentials.base import EnergyModel
from relaxtune.train.config import TrainConfig
from relaxtune.train.distill import draw
from relaxtune.train.frame_loss import FrameLoss

#: keeps the replay draw independent of the distillation draw of the same step
REPLAY_SALT = 15485863


class Replay:
    """The replay structures of ``config.replay`` (a data spec, e.g. ``builtin:crystals:train``) and their loss."""

    def __init__(self, config: TrainConfig, model: EnergyModel, dtype: torch.dtype, device: torch.device):
        self.config = config
        pairs = load_pairs(config.replay) if config.replay and config.replay_weight > 0 else []
        self.frames = FrameLoss(config, model, dtype, device, {id(p): i for i, p in enumerate(pairs)})
        self.pairs = [p for p in pairs if self.frames.frames(p)]  # read once, kept by FrameLoss
        if pairs and not self.pairs:
            raise ValueError(f"replay {config.replay}: no structure carries DFT energies and forces")

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def loss(self, step: int) -> torch.Tensor:
        """The mean frame loss of this step's draw (with the graph)."""
        c = self.config
        chosen = [self.pairs[i] for i in draw(len(self.pairs), c.replay_per_step, c.seed, step, REPLAY_SALT)]
        losses = []
        for chunk in self.frames.chunks(chosen, epoch=step, sample=True):
            terms = self.frames.terms(chunk.reference, chunk.frames, chunk.use_stress)
            losses.append((terms * torch.tensor(chunk.weights, dtype=terms.dtype, device=terms.device)).sum())
        return torch.stack(losses).sum() / len(chosen)
