"""Which weights train and how fast: ``train_params`` selection, the AdamW groups and the LR schedule.

Module roles come from the model (``EnergyModel.readout_modules``, ``embedding_modules``,
``element_embedding_modules``): the trainer names no model's modules itself.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from relaxtune.potentials.base import EnergyModel
from relaxtune.train.config import TrainConfig


def _in_modules(name: str, modules: Sequence[str]) -> bool:
    """True when a component of the dotted parameter ``name`` is one of ``modules``."""
    return any(c in modules for c in name.split("."))


def select_trainable(model: EnergyModel, spec: str) -> dict[str, int]:
    """Set ``requires_grad`` by ``spec``: all | readout | freeze-embeddings | comma-separated name fragments.

    readout = the model's ``readout_modules`` (none declared: the last top-level module with parameters);
    freeze-embeddings = everything but its ``embedding_modules``. Returns {"trainable": n, "frozen": n}.
    """
    named = list(model.named_parameters())
    if spec == "all":
        keep = {n for n, _ in named}
    elif spec == "readout" and model.readout_modules:
        keep = {n for n, _ in named if _in_modules(n, model.readout_modules)}
    elif spec == "readout":
        last = named[-1][0].split(".")[0] if named else None
        keep = {n for n, _ in named if n.split(".")[0] == last}
    elif spec in ("freeze-embeddings", "freeze_embeddings"):
        if not model.embedding_modules:
            raise ValueError(f"train_params {spec!r}: model {model.name!r} declares no embedding modules")
        keep = {n for n, _ in named if not _in_modules(n, model.embedding_modules)}
    else:
        frags = [f.strip() for f in spec.split(",") if f.strip()]
        keep = {n for n, _ in named if any(f in n for f in frags)}
    if not keep:
        raise ValueError(f"train_params {spec!r}: no parameter of the model matches")
    for n, p in named:
        p.requires_grad_(n in keep)
    n_train = sum(p.numel() for n, p in named if n in keep)
    return {"trainable": int(n_train), "frozen": int(sum(p.numel() for _, p in named) - n_train)}


def element_embedding_names(model: EnergyModel) -> set[str]:
    """Names of the trainable parameters that embed each element on its own (``element_embedding_modules``)."""
    return {n for n, p in model.named_parameters()
            if p.requires_grad and _in_modules(n, model.element_embedding_modules)}


def optimizer_groups(model: EnergyModel, config: TrainConfig, relax_params: Sequence[torch.Tensor]
                     ) -> list[dict[str, Any]]:
    """AdamW groups: the model's trainable weights, with ``embedding_lr`` the per-element embeddings apart (an
    element's own error is fixed in its own row at a high rate while the weights every element shares move
    slowly), and the relaxation's parameters at ``step_lr``."""
    c = config
    base = {"weight_decay": c.weight_decay}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if c.embedding_lr is None:
        groups = [{"params": [p for _, p in named], "lr": c.lr, "name": "model", **base}]
    else:
        names = element_embedding_names(model)
        if not names:
            declared = ", ".join(model.element_embedding_modules) or "none declared"
            raise ValueError(f"embedding_lr: model {c.model!r} has no trainable per-element embedding ({declared})")
        groups = [{"params": [p for n, p in named if n not in names], "lr": c.lr, "name": "model", **base},
                  {"params": [p for n, p in named if n in names], "lr": c.embedding_lr, "name": "elements", **base}]
        groups = [g for g in groups if g["params"]]
    if relax_params:
        groups.append({"params": list(relax_params), "lr": c.step_lr, "weight_decay": 0.0, "name": "relax"})
    return groups


def lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup, then cosine to ``min_lr_ratio`` (or constant)."""
    warm = int(math.ceil(config.warmup_frac * total_steps)) if config.warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
